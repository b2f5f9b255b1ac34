"""Datasets: COCO-format detection data, the DETR augmentations, COCO evaluation and a synthetic COCO generator."""
from pathlib import Path
from typing import Optional

from torch.utils.data import Subset

from datasets.coco import CocoDetection, DatasetError
from datasets.transforms import make_coco_transforms

SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}


def coco_split_paths(coco_path, image_set: str):
    """``(image folder, annotation file)`` of ``image_set`` ('train' or 'val') under a COCO-format root."""
    if image_set not in SPLIT_FOLDERS:
        raise ValueError(f"unknown image_set {image_set!r}; expected one of {sorted(SPLIT_FOLDERS)}")
    root = Path(coco_path)
    folder = SPLIT_FOLDERS[image_set]
    return root / folder, root / "annotations" / f"instances_{folder}.json"


def build_dataset(image_set: str, args, transforms_of: Optional[str] = None) -> CocoDetection:
    """The ``image_set`` split of ``--coco_path`` with the DETR transforms built from ``args``: those of
    ``image_set``, or of ``transforms_of`` when given (e.g. training images with the evaluation transforms)."""
    if args.dataset_file != "coco":
        raise DatasetError(f"--dataset_file {args.dataset_file!r} is not supported; only 'coco' (any COCO-format folder)")
    if args.coco_path is None:
        raise DatasetError("--coco_path is required: a COCO-format folder with train2017/, val2017/ and annotations/")
    root = Path(args.coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--coco_path {root} is not a folder: expected a COCO-format folder with "
                                "train2017/, val2017/ and annotations/instances_{train,val}2017.json")
    img_folder, ann_file = coco_split_paths(root, image_set)
    return CocoDetection(img_folder, ann_file, transforms=make_coco_transforms(transforms_of or image_set, args))


def get_coco_api_from_dataset(dataset):
    """The pycocotools ``COCO`` ground truth behind ``dataset`` (looking through ``torch.utils.data.Subset``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO ground truth ('coco' attribute) to evaluate against")
    return dataset.coco
