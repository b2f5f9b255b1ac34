"""DETR's detection augmentations: every transform maps ``(PIL image, target)`` to
``(image, target)`` and keeps the target's ``boxes`` (absolute xyxy until :class:`Normalize`), ``area``
and ``size`` consistent with the image.

Randomness follows the original release: Python ``random`` for flip / branch / scale / crop size, the torch RNG
for the crop position (through ``torchvision.transforms.RandomCrop.get_params``).
"""
import random
from typing import Dict, Optional, Sequence, Tuple

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from util.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd")

Target = Optional[Dict[str, torch.Tensor]]


def crop(image: Image.Image, target: Target, region: Tuple[int, int, int, int]):
    """Crop ``region = (top, left, height, width)``; boxes are shifted and clamped to the crop, ``area``
    recomputed from the clamped boxes, and boxes with no positive width or height dropped (with their fields)."""
    cropped = F.crop(image, *region)
    if target is None:
        return cropped, None
    top, left, height, width = region
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top], dtype=torch.float32)
        corners = boxes.reshape(-1, 2, 2)  # [N, (top-left, bottom-right), (x, y)]
        corners = torch.min(corners, torch.as_tensor([width, height], dtype=torch.float32)).clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        keep = (corners[:, 1, :] > corners[:, 0, :]).all(dim=1)
        for field in PER_BOX_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


def hflip(image: Image.Image, target: Target):
    """Mirror horizontally: ``x0' = W - x1``, ``x1' = W - x0``."""
    flipped = F.hflip(image)
    if target is None or "boxes" not in target:
        return flipped, target
    width = image.size[0]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([width, 0, width, 0])
    return flipped, target


def resized_shape(image_size: Tuple[int, int], size: int, max_size: Optional[int] = None) -> Tuple[int, int]:
    """Output ``(height, width)`` for short side ``size`` with the long side capped at ``max_size``.

    ``image_size`` is PIL's ``(width, height)``. If the long side would exceed the cap, the short side becomes
    ``int(round(max_size * short / long))``. A short side already equal to the target keeps the size;
    otherwise the long side is ``int(size * long / short)`` (truncated).
    """
    width, height = image_size
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: Image.Image, target: Target, size, max_size: Optional[int] = None):
    """Resize to short side ``size`` (an int) or exactly to ``size = (height, width)``; boxes scale by the
    actual width/height ratios and ``area`` by their product."""
    if isinstance(size, (list, tuple)):
        new_height, new_width = size
    else:
        new_height, new_width = resized_shape(image.size, size, max_size)
    resized = F.resize(image, [new_height, new_width])
    if target is None:
        return resized, None
    ratio_width = resized.size[0] / image.size[0]
    ratio_height = resized.size[1] / image.size[1]
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_width, ratio_height, ratio_width, ratio_height],
                                                            dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (ratio_width * ratio_height)
    target["size"] = torch.tensor([new_height, new_width], dtype=torch.int64)
    return resized, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the short side to a size drawn uniformly from ``sizes`` (long side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize: empty list of sizes")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target=None):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop of width ``U_int[min_size, min(W, max_size)]`` and height ``U_int[min_size, min(H, max_size)]``
    at a uniformly random position. An image side shorter than ``min_size`` is kept whole (the original
    would raise there)."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target):
        upper_width = min(image.width, self.max_size)
        upper_height = min(image.height, self.max_size)
        width = random.randint(min(self.min_size, upper_width), upper_width)
        height = random.randint(min(self.min_size, upper_height), upper_height)
        region = T.RandomCrop.get_params(image, [height, width])
        return crop(image, target, region)


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p: float = 0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL image -> float ``[3, H, W]`` in [0, 1]; the target is unchanged."""

    def __call__(self, image, target):
        return F.to_tensor(image), target


class Normalize:
    """Normalise the image with ``mean``/``std`` and turn boxes into cxcywh relative to the current
    (unpadded) image size, i.e. divided by ``(W, H, W, H)``."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: torch.Tensor, target: Target = None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"{self.__class__.__name__}({inner}\n)"


def _check_sizes(args) -> None:
    for flag in ("train_scales", "crop_resize_scales"):
        values = getattr(args, flag)
        if len(values) == 0 or min(values) <= 0:
            raise ValueError(f"--{flag} {values}: need at least one positive size")
    if args.val_scale <= 0 or args.max_size <= 0:
        raise ValueError(f"--val_scale {args.val_scale} and --max_size {args.max_size} must be positive")
    low, high = args.crop_size
    if not 0 < low <= high:
        raise ValueError(f"--crop_size {low} {high}: need 0 < MIN <= MAX")


def make_coco_transforms(image_set: str, args):
    """The DETR COCO recipe. Train: flip, then either a multi-scale resize or resize -> random crop ->
    multi-scale resize, then normalise. Val: resize the short side to ``--val_scale``; both cap the long
    side at ``--max_size``. Sizes come from ``--train_scales``, ``--crop_resize_scales``, ``--crop_size``."""
    _check_sizes(args)
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if image_set == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(args.train_scales, max_size=args.max_size),
                Compose([
                    RandomResize(args.crop_resize_scales),
                    RandomSizeCrop(*args.crop_size),
                    RandomResize(args.train_scales, max_size=args.max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return Compose([RandomResize([args.val_scale], max_size=args.max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
