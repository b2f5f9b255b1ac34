"""COCO box evaluation with pycocotools, usable in distributed runs.

Each process evaluates its own images as they come (``update``: per-image matching with ``COCOeval``);
``synchronize_between_processes`` gathers the evaluated image ids, the per-image results and the
detections from every process, dropping images evaluated twice (a ``DistributedSampler`` pads the
last batch with repeats); ``accumulate`` and ``summarize`` then give the standard 12 COCO numbers in
``evaluator.coco_eval["bbox"].stats``.
"""
import contextlib
import copy
import io
import warnings
from typing import Dict, Iterable, List

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.distributed import all_gather

SUPPORTED_IOU_TYPES = ("bbox",)
# The 12 numbers of COCOeval.stats, in order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco_results(predictions: Dict[int, Dict[str, torch.Tensor]]) -> List[dict]:
    """``{image_id: {"scores" [N], "labels" [N], "boxes" [N, 4] absolute xyxy}}`` -> COCO results list
    (``image_id``, ``category_id`` = label, ``bbox`` = ``[x, y, w, h]``, ``score``)."""
    results = []
    for image_id, prediction in predictions.items():
        boxes = prediction["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = prediction["scores"].detach().float().cpu().tolist()
        labels = prediction["labels"].detach().cpu().tolist()
        results.extend({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score}
                       for box, label, score in zip(xywh, labels, scores))
    return results


def _quiet(function, *args):
    """Call a pycocotools function without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def _evaluate_images(coco_eval: COCOeval) -> np.ndarray:
    """Per-image matching for ``coco_eval.params.imgIds`` -> object array ``[K categories, A areas, I images]``."""
    _quiet(coco_eval.evaluate)
    params = coco_eval.params
    num_categories = len(params.catIds) if params.useCats else 1
    per_image = np.empty(len(coco_eval.evalImgs), dtype=object)
    per_image[:] = coco_eval.evalImgs
    return per_image.reshape(num_categories, len(params.areaRng), len(params.imgIds))


class CocoEvaluator:
    """Accumulates detections against the ground truth ``coco_gt`` (a pycocotools ``COCO``)."""

    def __init__(self, coco_gt: COCO, iou_types: Iterable[str] = ("bbox",)):
        self.iou_types = tuple(iou_types)
        unsupported = sorted(set(self.iou_types) - set(SUPPORTED_IOU_TYPES))
        if unsupported:
            raise ValueError(f"CocoEvaluator: unsupported iou types {unsupported}; supported: {SUPPORTED_IOU_TYPES}")
        # COCOeval only adds bookkeeping fields to the ground truth, so the dataset's object is shared, not copied.
        self.coco_gt = coco_gt
        self.coco_eval = {iou_type: COCOeval(coco_gt, iouType=iou_type) for iou_type in self.iou_types}
        self.img_ids: List[int] = []
        self.eval_imgs: Dict[str, List[np.ndarray]] = {iou_type: [] for iou_type in self.iou_types}
        self.detections: Dict[int, List[dict]] = {}  # image id -> its COCO results
        self._synchronized = False  # evalImgs hold the merged results of all updates

    def update(self, predictions: Dict[int, Dict[str, torch.Tensor]]) -> None:
        """Evaluate a batch: ``{image_id: {"scores", "labels", "boxes" (absolute xyxy)}}``."""
        img_ids = sorted({int(i) for i in predictions})
        unknown = [i for i in img_ids if i not in self.coco_gt.imgs]
        if unknown:
            raise ValueError(f"CocoEvaluator.update: image ids {unknown[:5]} are not in the ground truth")
        results = detections_to_coco_results(predictions)
        for image_id in img_ids:
            self.detections[image_id] = []
        for result in results:
            self.detections[result["image_id"]].append(result)
        self.img_ids.extend(img_ids)
        self._synchronized = False
        for iou_type, coco_eval in self.coco_eval.items():
            # loadRes adds fields (area, id, ...) to the dicts it gets: hand it copies. It cannot load an
            # empty list; an empty COCO stands for "no detections" (the images still count their misses).
            coco_dt = _quiet(COCO.loadRes, self.coco_gt, [dict(r) for r in results]) if results else COCO()
            coco_eval.cocoDt = coco_dt
            coco_eval.params.imgIds = img_ids
            self.eval_imgs[iou_type].append(_evaluate_images(coco_eval))

    def synchronize_between_processes(self) -> None:
        """Merge every process's evaluated images (each image once) and detections, on every process."""
        img_ids = np.array([i for ids in all_gather(self.img_ids) for i in ids], dtype=np.int64)
        unique_ids, first_index = np.unique(img_ids, return_index=True)
        for iou_type, coco_eval in self.coco_eval.items():
            parts = [part for rank_parts in all_gather(self.eval_imgs[iou_type]) for part in rank_parts]
            merged = (np.concatenate(parts, axis=2)[:, :, first_index] if parts  # [K, A, unique images]
                      else np.empty((0, 0, 0), dtype=object))
            coco_eval.evalImgs = list(merged.flatten())
            coco_eval.params.imgIds = unique_ids.tolist()
            coco_eval._paramsEval = copy.deepcopy(coco_eval.params)
            self.eval_imgs[iou_type] = [merged] if parts else []
        detections: Dict[int, List[dict]] = {}
        for rank_detections in all_gather(self.detections):
            for image_id, results in rank_detections.items():
                detections.setdefault(image_id, results)
        self.detections = detections
        self.img_ids = unique_ids.tolist()
        self._synchronized = True

    def accumulate(self) -> None:
        """Precision/recall tables over all evaluated images (merging first if not done yet)."""
        if not self._synchronized:
            self.synchronize_between_processes()
        if not self.img_ids:
            raise RuntimeError("CocoEvaluator.accumulate: no image was evaluated (update() was never called)")
        if self.num_detections() == 0:
            warnings.warn(f"CocoEvaluator: no detections at all on the {len(self.img_ids)} evaluated images; "
                          "every AP and AR is 0", RuntimeWarning, stacklevel=2)
        for coco_eval in self.coco_eval.values():
            _quiet(coco_eval.accumulate)

    def summarize(self) -> None:
        """Print the standard 12-line COCO summary per iou type and fill ``coco_eval[iou_type].stats``."""
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            coco_eval.summarize()

    def num_detections(self) -> int:
        return sum(len(results) for results in self.detections.values())

    def results(self) -> List[dict]:
        """All detections as a COCO results list (sorted by image id), e.g. for ``--save_results``."""
        return [result for image_id in sorted(self.detections) for result in self.detections[image_id]]
