"""Hungarian matcher: optimal assignments and the reference cost."""
import itertools

import pytest
import torch

from models.matcher import HungarianMatcher, NonFinitePredictionError
from tests.model_utils import random_targets
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def brute_force_min_cost(cost: torch.Tensor) -> float:
    """Minimum total cost of assigning every target (column) to a distinct query (row)."""
    num_queries, num_targets = cost.shape
    return min(
        sum(cost[q, t].item() for t, q in enumerate(rows))
        for rows in itertools.permutations(range(num_queries), num_targets)
    )


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal_against_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    num_queries, counts = 6, [3, 0, 4]
    matcher = HungarianMatcher(2, 5, 2, 0.25)
    targets = random_targets(counts, num_classes=7, generator=generator)
    outputs = {
        "pred_logits": torch.randn(len(counts), num_queries, 7, generator=generator),
        "pred_boxes": torch.rand(len(counts), num_queries, 4, generator=generator) * 0.5 + 0.1,
    }
    indices = matcher(outputs, targets)
    for b, (target, (query_ids, target_ids)) in enumerate(zip(targets, indices)):
        n = len(target["labels"])
        assert len(query_ids) == len(target_ids) == n
        assert sorted(target_ids.tolist()) == list(range(n))
        assert len(set(query_ids.tolist())) == n
        if n == 0:
            continue
        cost = matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"], target["boxes"])
        found = cost[query_ids, target_ids].sum().item()
        assert found == pytest.approx(brute_force_min_cost(cost), abs=1e-4)


def test_cost_matrix_matches_the_reference_formula():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=generator)
    boxes = torch.rand(5, 4, generator=generator) * 0.4 + 0.1
    labels = torch.tensor([2, 0, 3])
    tgt_boxes = torch.rand(3, 4, generator=generator) * 0.4 + 0.1
    alpha = 0.3
    cost = HungarianMatcher(2, 5, 2, alpha).cost_matrix(logits, boxes, labels, tgt_boxes)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    for q, t in itertools.product(range(5), range(3)):
        p = torch.sigmoid(logits[q, labels[t]])
        focal = alpha * (1 - p) ** 2 * -torch.log(p + 1e-8) - (1 - alpha) * p ** 2 * -torch.log(1 - p + 1e-8)
        l1 = (boxes[q] - tgt_boxes[t]).abs().sum()
        assert cost[q, t].item() == pytest.approx((5 * l1 + 2 * focal - 2 * giou[q, t]).item(), abs=1e-5)


def test_layers_are_matched_independently_in_one_call():
    generator = torch.Generator().manual_seed(3)
    targets = random_targets([2, 3], generator=generator)
    layers = [{"pred_logits": torch.randn(2, 5, 11, generator=generator),
               "pred_boxes": torch.rand(2, 5, 4, generator=generator) * 0.5 + 0.2} for _ in range(3)]
    matcher = HungarianMatcher()
    together = matcher.match_layers(layers, targets)
    for layer, matched in zip(layers, together):
        for (q1, t1), (q2, t2) in zip(matched, matcher(layer, targets)):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)
    assert all(q.dtype == torch.int64 for indices in together for q, _ in indices)


def test_all_zero_costs_are_rejected():
    with pytest.raises(ValueError, match="set_cost"):
        HungarianMatcher(0, 0, 0)


def test_non_finite_predictions_raise_a_specific_error():
    generator = torch.Generator().manual_seed(1)
    targets = random_targets([2, 1], generator=generator)
    layers = [{"pred_logits": torch.randn(2, 5, 11, generator=generator),
               "pred_boxes": torch.rand(2, 5, 4, generator=generator) * 0.5 + 0.2} for _ in range(3)]
    layers[2]["pred_boxes"][1, 3] = float("nan")
    layers[0]["pred_logits"][0, 0] = float("nan")
    with pytest.raises(NonFinitePredictionError, match=r"layers \[0, 2\] of the 3 matched"):
        HungarianMatcher().match_layers(layers, targets)
