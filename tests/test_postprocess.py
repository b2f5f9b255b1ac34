"""Post-processing: top-k over queries x classes, absolute xyxy boxes."""
import torch

from models.postprocess import PostProcess


def test_topk_over_queries_and_classes():
    generator = torch.Generator().manual_seed(0)
    batch, num_queries, num_classes, k = 2, 7, 5, 9
    logits = torch.randn(batch, num_queries, num_classes, generator=generator)
    boxes = torch.rand(batch, num_queries, 4, generator=generator) * 0.5 + 0.2
    sizes = torch.tensor([[100, 200], [60, 40]])  # (H, W)
    results = PostProcess(num_select=k)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for b, result in enumerate(results):
        # Brute force: every (query, class) pair sorted by score.
        pairs = sorted(((torch.sigmoid(logits[b, q, c]).item(), q, c)
                        for q in range(num_queries) for c in range(num_classes)), reverse=True)[:k]
        assert result["scores"].shape == (k,) and result["boxes"].shape == (k, 4)
        assert torch.allclose(result["scores"], torch.tensor([s for s, _, _ in pairs]))
        assert result["labels"].tolist() == [c for _, _, c in pairs]
        h, w = sizes[b].tolist()
        for (_, q, _), box in zip(pairs, result["boxes"]):
            cx, cy, bw, bh = boxes[b, q].tolist()
            expected = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            assert torch.allclose(box, expected, atol=1e-4)


def test_num_select_larger_than_candidates_keeps_all():
    logits, boxes = torch.randn(1, 3, 2), torch.rand(1, 3, 4)
    result = PostProcess(num_select=300)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]]))[0]
    assert result["scores"].shape == (6,)
    assert (result["scores"][:-1] >= result["scores"][1:]).all()
