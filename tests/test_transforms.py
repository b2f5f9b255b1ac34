"""DETR augmentations against hand-computed boxes, areas and sizes (spec §6.2, §6.3)."""
import argparse
import random

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.transforms as T


def _image(width: int, height: int) -> Image.Image:
    """An image whose pixel (x, y) encodes x in red and y in green, to check geometry."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([xs % 256, ys % 256, np.zeros_like(xs)], axis=2).astype(np.uint8)
    return Image.fromarray(pixels)


def _target(boxes, width: int, height: int):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return {
        "boxes": boxes,
        "labels": torch.arange(1, len(boxes) + 1),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        "image_id": torch.tensor([7]),
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }


def test_hflip_mirrors_boxes_and_pixels():
    image, target = T.hflip(_image(100, 50), _target([[10, 20, 30, 40]], 100, 50))
    assert target["boxes"].tolist() == [[70, 20, 90, 40]]
    assert np.asarray(image)[5, 0, 0] == 99 and np.asarray(image)[5, 99, 0] == 0
    assert target["area"].tolist() == [400]


@pytest.mark.parametrize("image_size, size, max_size, expected", [
    ((100, 50), 80, 1333, (80, 160)),  # (W, H) -> (H, W): short side 80, long 2x
    ((333, 200), 100, None, (100, 166)),  # long side int(100 * 333 / 200) = int(166.5), truncated
    ((200, 333), 100, None, (166, 100)),
    ((300, 100), 800, 1333, (444, 1332)),  # cap: 3 * 800 > 1333 -> s = round(1333 / 3) = 444, long int(1332)
    ((80, 120), 80, 1333, (120, 80)),  # short side already 80: unchanged
    ((64, 64), 100, 1333, (100, 100)),
    ((640, 480), 800, 1333, (800, 1066)),  # COCO-like: 4/3 * 800 = 1066.7 < 1333, truncated
    ((1000, 200), 800, 1333, (267, 1335)),  # round(266.6) = 267; long side int(267 * 5) = 1335 (> cap, as reference)
])
def test_resize_rule(image_size, size, max_size, expected):
    assert T.resized_shape(image_size, size, max_size) == expected


def test_resize_scales_boxes_area_and_size():
    image, target = T.resize(_image(333, 200), _target([[33.3, 20, 133.2, 120]], 333, 200), 100)
    assert image.size == (166, 100)
    ratio_w, ratio_h = 166 / 333, 100 / 200
    expected = torch.tensor([[33.3 * ratio_w, 20 * ratio_h, 133.2 * ratio_w, 120 * ratio_h]])
    assert torch.allclose(target["boxes"], expected, atol=1e-4)
    assert target["area"].item() == pytest.approx(99.9 * 100 * ratio_w * ratio_h, rel=1e-5)
    assert target["size"].tolist() == [100, 166]
    assert target["orig_size"].tolist() == [200, 333]


def test_crop_shifts_clamps_and_drops_boxes():
    boxes = [[10, 10, 30, 30], [50, 50, 90, 90], [0, 0, 5, 5], [35, 30, 60, 45]]
    image, target = T.crop(_image(100, 100), _target(boxes, 100, 100), (20, 40, 50, 50))  # top, left, h, w
    assert image.size == (50, 50)
    assert np.asarray(image)[0, 0, :2].tolist() == [40, 20]  # pixel (x=40, y=20) is the new origin
    # box 0 -> [-30, -10, -10, 10] clamps to zero width: dropped; box 2 lies outside: dropped.
    assert target["boxes"].tolist() == [[10, 30, 50, 50], [0, 10, 20, 25]]
    assert target["area"].tolist() == [40 * 20, 20 * 15]
    assert target["labels"].tolist() == [2, 4]
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["size"].tolist() == [50, 50]


def test_random_size_crop_respects_range_and_small_images():
    random.seed(0)
    torch.manual_seed(0)
    crop = T.RandomSizeCrop(30, 60)
    for _ in range(20):
        image, target = crop(_image(100, 40), _target([[0, 0, 100, 40]], 100, 40))
        width, height = image.size
        assert 30 <= width <= 60 and 30 <= height <= 40
        assert target["boxes"].tolist() == [[0, 0, width, height]]
    image, _ = T.RandomSizeCrop(50, 60)(_image(20, 30), _target([[0, 0, 5, 5]], 20, 30))
    assert image.size == (20, 30)  # smaller than min_size on both sides: kept whole


def test_normalize_gives_relative_cxcywh_and_imagenet_normalisation():
    image = Image.new("RGB", (200, 100), (255, 0, 128))
    tensor, target = T.Compose([T.ToTensor(), T.Normalize()])(image, _target([[20, 10, 60, 90]], 200, 100))
    assert tensor.shape == (3, 100, 200)
    expected_pixel = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(tensor[:, 50, 100], torch.tensor(expected_pixel), atol=1e-5)
    assert torch.allclose(target["boxes"], torch.tensor([[40 / 200, 50 / 100, 40 / 200, 80 / 100]]))
    assert target["area"].tolist() == [40 * 80]  # absolute, as in the reference


def test_random_choices_follow_probabilities():
    flip_always, flip_never = T.RandomHorizontalFlip(1.0), T.RandomHorizontalFlip(0.0)
    target = _target([[0, 0, 10, 10]], 40, 20)
    assert flip_always(_image(40, 20), target)[1]["boxes"].tolist() == [[30, 0, 40, 10]]
    assert flip_never(_image(40, 20), target)[1]["boxes"].tolist() == [[0, 0, 10, 10]]
    select = T.RandomSelect(T.RandomResize([10]), T.RandomResize([15]), p=1.0)
    assert select(_image(40, 20), target)[0].size == (20, 10)
    random.seed(1)
    chosen = {T.RandomResize([12, 16, 18])(_image(40, 20), None)[0].size[1] for _ in range(30)}
    assert chosen == {12, 16, 18}


def _args(**overrides):
    values = dict(train_scales=[64, 80], max_size=120, val_scale=72, crop_resize_scales=[60, 70],
                  crop_size=[32, 48])
    values.update(overrides)
    return argparse.Namespace(**values)


def test_val_transform_resizes_short_side_with_cap():
    transform = T.make_coco_transforms("val", _args())
    tensor, target = transform(_image(100, 80), _target([[10, 8, 50, 40]], 100, 80))
    assert tensor.shape == (3, 72, 90)  # short side 72, long int(72 * 100 / 80) = 90 <= 120
    assert target["size"].tolist() == [72, 90]
    assert torch.allclose(target["boxes"], torch.tensor([[0.3, 0.3, 0.4, 0.4]]), atol=1e-5)
    tensor, _ = transform(_image(300, 60), None)
    assert tensor.shape == (3, 24, 120)  # 5 * 72 > 120 -> short side round(120 / 5) = 24


def test_train_transform_outputs_valid_sizes_and_boxes():
    random.seed(0)
    torch.manual_seed(0)
    args = _args()
    transform = T.make_coco_transforms("train", args)
    short_sides = set()
    for _ in range(40):
        tensor, target = transform(_image(100, 80), _target([[10, 8, 50, 40], [60, 50, 95, 78]], 100, 80))
        height, width = tensor.shape[-2:]
        assert target["size"].tolist() == [height, width]
        assert max(height, width) <= args.max_size  # crops have aspect <= 48 / 32, so 80 * 1.5 fits the cap
        short_sides.add(min(height, width))
        boxes = target["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(target["labels"]) == len(target["area"])
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > 0).all()
    assert short_sides == {64, 80}


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="--crop_size 50 40"):
        T.make_coco_transforms("train", _args(crop_size=[50, 40]))
    with pytest.raises(ValueError, match="--train_scales"):
        T.make_coco_transforms("train", _args(train_scales=[]))
    with pytest.raises(ValueError, match="unknown image_set 'test'"):
        T.make_coco_transforms("test", _args())
