"""COCO-format detection dataset with up-front validation of the annotation file.

The annotation file is checked once at construction, so that bad input fails immediately with an error
naming the file and the offending entry instead of crashing mid-epoch:

* missing image folder / annotation file, invalid JSON, missing ``images``/``categories``;
* an annotation whose image or category is not declared, or whose ``bbox`` is not 4 finite numbers;
* an image listed in the file but absent from the image folder.

Boxes partly outside their image are clipped and empty boxes (zero or negative width/height, or fully
outside) dropped, as the original release does per image; one :class:`AnnotationRepairWarning` per dataset
counts them. An image that cannot be decoded raises :class:`ImageLoadError` naming the file and image id
(the original release silently substituted another image).

An image whose file is not of the ``width``/``height`` the annotation file gives it draws an
:class:`ImageSizeWarning` (boxes are in the annotation file's pixels, so its annotations may be wrong):
the headers of the first :data:`SIZE_CHECK_LIMIT` images (all of a small set) are read at construction,
and one warning counts their mismatches; a later image is checked when it is loaded, for free, and its
first mismatch warns once per process (each data loader worker is one).
"""
import contextlib
import io
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

MAX_EXAMPLES = 5  # offending entries quoted in an error or warning
SIZE_CHECK_LIMIT = 2000  # images whose file header is read at construction (under a second on a local disk)


class AnnotationRepairWarning(UserWarning):
    """Some boxes of an annotation file are clipped to their image or dropped as empty."""


class ImageSizeWarning(UserWarning):
    """Image files whose size differs from the width/height of the annotation file."""


class ImageLoadError(RuntimeError):
    """An image listed in the annotation file is missing or cannot be decoded."""


class DatasetError(ValueError):
    """A dataset cannot be used as given (no folder, a malformed annotation file); the message names it."""


def _fail(ann_file: Path, message: str):
    raise DatasetError(f"{ann_file}: {message}")


def read_annotation_json(ann_file) -> dict:
    """Parse a COCO instances file, checking it is a JSON object with ``images`` and ``categories`` lists
    (``annotations`` defaults to an empty list)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} not found: expected a COCO instances JSON "
                                "with 'images', 'annotations' and 'categories'")
    try:
        with ann_file.open("rb") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{ann_file}: not a valid JSON file ({error})") from error
    if not isinstance(dataset, dict):
        _fail(ann_file, f"expected a JSON object with 'images', 'annotations' and 'categories', "
                        f"got {type(dataset).__name__}")
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list):
            _fail(ann_file, f"missing list '{key}' (a COCO instances file has 'images', 'annotations' and "
                            "'categories')")
    dataset.setdefault("annotations", [])
    return dataset


def _validate_entries(ann_file: Path, dataset: dict) -> None:
    """Ids and references: every annotation points at a declared image and category, with a 4-number bbox."""
    image_ids = set()
    for image in dataset["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or "file_name" not in image:
            _fail(ann_file, f"image entry {image!r} needs an integer 'id' and a 'file_name'")
        if image["id"] in image_ids:
            _fail(ann_file, f"image id {image['id']} is listed twice")
        image_ids.add(image["id"])
    category_ids = set()
    for category in dataset["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or category["id"] < 0:
            _fail(ann_file, f"category entry {category!r} needs a non-negative integer 'id'")
        category_ids.add(category["id"])
    for ann in dataset["annotations"]:
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                _fail(ann_file, f"annotation {ann.get('id', ann)!r} lacks '{key}'")
        if ann["image_id"] not in image_ids:
            _fail(ann_file, f"annotation id {ann['id']} refers to image id {ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in category_ids:
            _fail(ann_file, f"annotation id {ann['id']} (image id {ann['image_id']}) has category_id "
                            f"{ann['category_id']!r}, which is not in 'categories' (ids {sorted(category_ids)})")
        bbox = ann["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            _fail(ann_file, f"annotation id {ann['id']} (image id {ann['image_id']}) has bbox {bbox!r}; "
                            "expected [x, y, width, height] of 4 finite numbers")


def _fill_evaluation_defaults(dataset: dict) -> None:
    """pycocotools' COCOeval needs ``iscrowd`` and ``area`` on every ground-truth annotation; a missing
    ``iscrowd`` means "not a crowd" and a missing ``area`` is taken as the box area."""
    for ann in dataset["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])


def _scan_box_repairs(ann_file: Path, dataset: dict) -> None:
    """Warn once, with counts, about non-crowd boxes the loader will clip to their image or drop as empty
    (the image size comes from the file's ``width``/``height``; when absent only empty boxes are detected)."""
    sizes = {img["id"]: (img.get("width", math.inf), img.get("height", math.inf)) for img in dataset["images"]}
    anns = [a for a in dataset["annotations"] if not a["iscrowd"]]
    if not anns:
        return
    boxes = np.fromiter(itertools.chain.from_iterable(a["bbox"] for a in anns), dtype=np.float64,
                        count=4 * len(anns)).reshape(-1, 4)  # [N, 4] xywh
    image_wh = np.fromiter(itertools.chain.from_iterable(sizes[a["image_id"]] for a in anns), dtype=np.float64,
                           count=2 * len(anns)).reshape(-1, 2)  # [N, 2]
    corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)  # [N, 4] xyxy
    clipped = np.clip(corners, 0, np.tile(image_wh, 2))
    dropped = ~((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    repaired = ~dropped & (clipped != corners).any(axis=1)
    if not dropped.any() and not repaired.any():
        return
    ids = np.array([a["id"] for a in anns])
    problems = []
    if repaired.any():
        problems.append(f"{int(repaired.sum())} extend outside their image and are clipped to it "
                        f"(e.g. annotation ids {ids[repaired][:MAX_EXAMPLES].tolist()})")
    if dropped.any():
        examples = ids[dropped][:MAX_EXAMPLES].tolist()
        problems.append(f"{int(dropped.sum())} are empty after clipping (zero or negative width/height, or "
                        f"outside the image) and are dropped (e.g. annotation ids {examples})")
    warnings.warn(f"{ann_file}: of {len(anns)} non-crowd boxes, " + "; ".join(problems),
                  AnnotationRepairWarning, stacklevel=3)


def load_coco_annotations(ann_file) -> COCO:
    """Read and validate a COCO instances file; returns an indexed pycocotools ``COCO`` object."""
    ann_file = Path(ann_file)
    dataset = read_annotation_json(ann_file)
    _validate_entries(ann_file, dataset)
    _fill_evaluation_defaults(dataset)
    _scan_box_repairs(ann_file, dataset)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _check_images_present(img_folder: Path, coco: COCO, ann_file: Path) -> None:
    present = set(os.listdir(img_folder))
    missing = [(img["file_name"], image_id) for image_id, img in coco.imgs.items()
               if img["file_name"] not in present and not (img_folder / img["file_name"]).is_file()]
    if missing:
        examples = ", ".join(f"{name} (image id {image_id})" for name, image_id in missing[:MAX_EXAMPLES])
        raise FileNotFoundError(f"{len(missing)} of {len(coco.imgs)} images listed in {ann_file} are missing "
                                f"from {img_folder}: {examples}")


def annotated_size(image_info: dict) -> Optional[Tuple[int, int]]:
    """``(width, height)`` of an ``images`` entry, None when the annotation file does not give both."""
    if "width" in image_info and "height" in image_info:
        return image_info["width"], image_info["height"]
    return None


def header_size(path: Path) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from the image file's header (PIL decodes no pixels here); None if unreadable,
    which loading the image reports."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return None


def size_mismatch_text(image_id: int, file_size: Tuple[int, int], json_size: Tuple[int, int]) -> str:
    return f"image id {image_id}: file {file_size[0]}x{file_size[1]}, annotated {json_size[0]}x{json_size[1]}"


def _warn_size_mismatches(img_folder: Path, coco: COCO, image_ids: Sequence[int], ann_file: Path) -> None:
    """One :class:`ImageSizeWarning` counting the images of ``image_ids`` whose file size is not the annotated one."""
    mismatches = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        json_size = annotated_size(info)
        file_size = header_size(img_folder / info["file_name"]) if json_size is not None else None
        if file_size is not None and file_size != json_size:
            mismatches.append(size_mismatch_text(image_id, file_size, json_size))
    if mismatches:
        unchecked = len(coco.imgs) - len(image_ids)
        later = f"; the other {unchecked} images are checked when loaded" if unchecked else ""
        warnings.warn(f"{ann_file}: {len(mismatches)} of {len(image_ids)} images checked have another size in "
                      f"{img_folder} than their width/height here, so their boxes may be wrong (e.g. "
                      f"{'; '.join(mismatches[:MAX_EXAMPLES])}){later}", ImageSizeWarning, stacklevel=3)


class CocoDetection(Dataset):
    """Images of a COCO-format folder with their detection targets.

    Item: ``(image, target)`` where, before ``transforms``, ``image`` is a PIL RGB image and ``target`` has
    ``boxes`` (absolute xyxy, float32, clamped to the image, empty ones dropped), ``labels`` (category ids,
    int64), ``image_id`` (int64 ``[1]``), ``area`` (the annotations' ``area``, float32), ``iscrowd`` (int64),
    ``orig_size`` and ``size`` (int64 ``(H, W)``). Crowd annotations are not training targets. Every image
    of the file is used, including those without annotations. ``self.coco`` is the ground truth for
    evaluation.
    """

    def __init__(self, img_folder, ann_file, transforms=None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder {self.img_folder} not found: expected the images listed in "
                                    f"{self.ann_file}")
        self.coco = load_coco_annotations(self.ann_file)
        _check_images_present(self.img_folder, self.coco, self.ann_file)
        self.ids: List[int] = sorted(self.coco.imgs)
        _warn_size_mismatches(self.img_folder, self.coco, self.ids[:SIZE_CHECK_LIMIT], self.ann_file)
        self.transforms = transforms
        self.size_warned = False  # a size mismatch of an image loaded after the first SIZE_CHECK_LIMIT

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        path = self.img_folder / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise ImageLoadError(f"cannot read image {path} (image id {image_id}, listed in {self.ann_file}): "
                                 f"{type(error).__name__}: {error}") from error

    def check_loaded_size(self, image_id: int, image_size: Tuple[int, int]) -> None:
        """Warn at the first image of this process whose size is not the annotated one."""
        json_size = annotated_size(self.coco.imgs[image_id])
        if self.size_warned or json_size is None or image_size == json_size:
            return
        self.size_warned = True
        warnings.warn(f"{self.ann_file}: {size_mismatch_text(image_id, image_size, json_size)} in {self.img_folder}, "
                      "so its boxes may be wrong; further such images of this process are not reported",
                      ImageSizeWarning, stacklevel=3)

    def make_target(self, image_id: int, image_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Target of one image of PIL size ``(W, H)`` before any transform."""
        width, height = image_size
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "image_id": torch.tensor([image_id], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32)[keep],
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64)[keep],
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        if index >= SIZE_CHECK_LIMIT:  # the first ones were checked at construction
            self.check_loaded_size(image_id, image.size)
        target = self.make_target(image_id, image.size)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def category_names_from_annotations(ann_file: Union[str, Path]) -> Dict[int, str]:
    """``{category id: name}`` of a COCO instances file (a category without a name is ``"class N"``)."""
    categories = read_annotation_json(ann_file)["categories"]
    return {c["id"]: str(c.get("name") or f"class {c['id']}") for c in categories if isinstance(c.get("id"), int)}
