"""COCO evaluation: exact AP values computed independently, empty predictions, results export and the
merge across real gloo processes."""
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from datasets.coco import load_coco_annotations
from datasets.coco_eval import CocoEvaluator
from tests.process_utils import run_forked

IOU_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def _xywh_to_xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _iou(a, b):
    """IoU of two xyxy boxes, written out independently of the code under test."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _perfect_predictions(coco, image_ids):
    predictions = {}
    for image_id in image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        predictions[image_id] = {
            "scores": torch.linspace(0.9, 0.5, len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "boxes": torch.tensor([_xywh_to_xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4),
        }
    return predictions


def _evaluate(coco, batches):
    evaluator = CocoEvaluator(coco, ("bbox",))
    for predictions in batches:
        evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def test_perfect_detections_give_ap_one(synthetic_coco, capsys):
    coco = load_coco_annotations(synthetic_coco / "annotations" / "instances_val2017.json")
    ids = sorted(coco.imgs)
    evaluator = _evaluate(coco, [_perfect_predictions(coco, ids[:4]), _perfect_predictions(coco, ids[4:])])
    stats = evaluator.coco_eval["bbox"].stats
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0) and stats[8] == pytest.approx(1.0)
    summary = capsys.readouterr().out
    assert summary.count("Average Precision") == 6 and summary.count("Average Recall") == 6


def _shift_for_iou(width: float, iou: float) -> float:
    """Horizontal shift d of a box of width w giving IoU (w - d) / (w + d) = iou with the original."""
    return width * (1 - iou) / (1 + iou)


def test_shifted_boxes_give_the_independently_computed_ap(tmp_path):
    # Three categories, well separated boxes. Category 2's detections are shifted to IoU ~0.72, category
    # 5's to ~0.87, category 9's are exact. Within a category every detection is then a true positive at
    # a threshold t iff t <= its IoU, so AP(t) is exactly 1 or 0 and the mean over the ten thresholds
    # 0.50:0.95 is a known fraction per category.
    gt_boxes = {  # category -> [(image_id, xywh)]
        2: [(1, [10, 10, 40, 30]), (2, [100, 20, 25, 50]), (2, [5, 5, 30, 30])],
        5: [(1, [80, 60, 50, 40]), (2, [10, 120, 60, 20])],
        9: [(1, [10, 120, 30, 30]), (3, [50, 50, 70, 70])],
    }
    target_iou = {2: 0.72, 5: 0.87, 9: 1.0}
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2, 3)]
    annotations = [{"id": n + 1, "image_id": image_id, "category_id": category, "bbox": box,
                    "area": box[2] * box[3], "iscrowd": 0}
                   for n, (category, image_id, box) in enumerate(
                       (c, i, b) for c, entries in gt_boxes.items() for i, b in entries)]
    ann_file = tmp_path / "gt.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": c, "name": str(c)} for c in gt_boxes]}))
    coco = load_coco_annotations(ann_file)

    predictions = {i: {"scores": [], "labels": [], "boxes": []} for i in (1, 2, 3)}
    expected_per_category = {}
    for category, entries in gt_boxes.items():
        hits_per_threshold = []
        for image_id, box in entries:
            gt = _xywh_to_xyxy(box)
            shift = _shift_for_iou(box[2], target_iou[category])
            detection = [gt[0] + shift, gt[1], gt[2] + shift, gt[3]]
            iou = _iou(gt, detection)
            assert min(abs(iou - t) for t in IOU_THRESHOLDS) > 0.01
            hits_per_threshold.append([iou >= t for t in IOU_THRESHOLDS])
            predictions[image_id]["scores"].append(0.9 - 0.1 * len(predictions[image_id]["scores"]))
            predictions[image_id]["labels"].append(category)
            predictions[image_id]["boxes"].append(detection)
        per_threshold = np.array(hits_per_threshold).all(axis=0)  # all or none of a category's detections hit
        assert (per_threshold == np.array(hits_per_threshold).any(axis=0)).all()
        expected_per_category[category] = per_threshold.astype(float)
    predictions = {i: {"scores": torch.tensor(p["scores"]), "labels": torch.tensor(p["labels"]),
                       "boxes": torch.tensor(p["boxes"])} for i, p in predictions.items()}

    stats = _evaluate(coco, [{1: predictions[1]}, {2: predictions[2], 3: predictions[3]}]).coco_eval["bbox"].stats
    table = np.stack(list(expected_per_category.values()))  # [categories, thresholds]
    assert stats[0] == pytest.approx(table.mean(), abs=1e-9)
    assert stats[0] == pytest.approx((5 + 8 + 10) / 30, abs=1e-9)  # the same number, spelled out
    assert stats[1] == pytest.approx(table[:, 0].mean(), abs=1e-9)  # AP50 = 1
    assert stats[2] == pytest.approx(table[:, 5].mean(), abs=1e-9)  # AP75 = 2/3


def test_no_detections_warns_and_gives_zero(synthetic_coco):
    coco = load_coco_annotations(synthetic_coco / "annotations" / "instances_val2017.json")
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator = CocoEvaluator(coco)
    evaluator.update({image_id: empty for image_id in coco.imgs})
    with pytest.warns(RuntimeWarning, match="no detections at all on the 6 evaluated images"):
        evaluator.accumulate()
    evaluator.summarize()
    stats = evaluator.coco_eval["bbox"].stats
    assert stats[0] == 0 and stats[8] == 0
    assert evaluator.results() == []


def test_results_are_coco_json_and_duplicates_count_once(synthetic_coco):
    coco = load_coco_annotations(synthetic_coco / "annotations" / "instances_val2017.json")
    ids = sorted(coco.imgs)
    predictions = _perfect_predictions(coco, ids)
    first = max(ids, key=lambda i: len(predictions[i]["labels"]))
    # Give one image's detections a label that is no category (2): its objects are missed. Evaluating
    # that image twice (a padded distributed shard) must not count its misses twice.
    wrong = {first: {**predictions[first], "labels": torch.full_like(predictions[first]["labels"], 2)}}
    once = _evaluate(coco, [wrong, {i: p for i, p in predictions.items() if i != first}])
    twice = _evaluate(coco, [wrong, {i: p for i, p in predictions.items() if i != first}, wrong])
    assert 0 < once.coco_eval["bbox"].stats[0] < 1
    np.testing.assert_allclose(once.coco_eval["bbox"].stats, twice.coco_eval["bbox"].stats)

    results = twice.results()
    assert len(results) == sum(len(p["scores"]) for p in predictions.values())
    assert [r["image_id"] for r in results] == sorted(r["image_id"] for r in results)
    json.dumps(results)
    image_id = next(i for i in ids if i != first and len(predictions[i]["boxes"]))
    x0, y0, x1, y1 = predictions[image_id]["boxes"][0].tolist()
    exported = next(r for r in results if r["image_id"] == image_id)
    assert exported["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert exported["score"] == pytest.approx(predictions[image_id]["scores"][0].item())
    assert exported["category_id"] == predictions[image_id]["labels"][0].item()
    assert set(exported) == {"image_id", "category_id", "bbox", "score"}


def test_unknown_image_id_is_rejected(synthetic_coco):
    coco = load_coco_annotations(synthetic_coco / "annotations" / "instances_val2017.json")
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    with pytest.raises(ValueError, match=r"image ids \[424242\] are not in the ground truth"):
        CocoEvaluator(coco).update({424242: empty})


def _mixed_predictions(coco):
    """Perfect, shifted, mislabelled and missing detections plus false positives: a non-trivial AP."""
    predictions = _perfect_predictions(coco, sorted(coco.imgs))
    for n, (image_id, prediction) in enumerate(sorted(predictions.items())):
        boxes = prediction["boxes"].clone()
        if n % 3 == 1:
            boxes[:, [0, 2]] += 4.0
        labels = prediction["labels"].clone()
        if n % 4 == 2:
            labels[:1] = 3
        false_positive = torch.tensor([[1.0, 1.0, 20.0, 20.0]])
        predictions[image_id] = {"boxes": torch.cat([boxes, false_positive]),
                                 "labels": torch.cat([labels, torch.tensor([7])]),
                                 "scores": torch.cat([prediction["scores"], torch.tensor([0.7])])}
    return predictions


def _distributed_worker(rank: int, world_size: int, ann_file: str, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        coco = load_coco_annotations(ann_file)
        predictions = _mixed_predictions(coco)
        ids = sorted(predictions)
        # Like a DistributedSampler: interleaved shards; the last one is padded with repeats of images of
        # another shard (all of them here, so that a double count would show).
        shard = ids[rank::world_size]
        if rank == world_size - 1:
            shard.extend(ids[0::world_size])
        evaluator = CocoEvaluator(coco)
        for start in range(0, len(shard), 2):
            evaluator.update({i: predictions[i] for i in shard[start:start + 2]})
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
        result = {"stats": evaluator.coco_eval["bbox"].stats.tolist(), "num_results": len(evaluator.results())}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_merge_across_gloo_processes_matches_single_process(synthetic_coco, tmp_path):
    ann_file = synthetic_coco / "annotations" / "instances_val2017.json"
    coco = load_coco_annotations(ann_file)
    predictions = _mixed_predictions(coco)
    reference = _evaluate(coco, [predictions])
    reference_stats = reference.coco_eval["bbox"].stats
    assert 0.2 < reference_stats[0] < 0.95

    world_size = 2
    run_forked(_distributed_worker, world_size, (world_size, str(ann_file), str(tmp_path / "rendezvous"), str(tmp_path)))
    for rank in range(world_size):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        np.testing.assert_allclose(result["stats"], reference_stats, atol=1e-12)
        assert result["num_results"] == len(reference.results())
