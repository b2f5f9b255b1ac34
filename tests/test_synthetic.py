"""Synthetic COCO generator: determinism, COCO-like properties, tight boxes, presets and CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SYNTHETIC_TEST_SETTINGS
from datasets.synthetic import CATEGORIES, PALETTE, PRESETS, generate_synthetic_coco, make_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _palette_colour(image_path: Path, bbox) -> int:
    """Index of the palette colour most pixels of the shape in ``bbox`` are closest to (black background)."""
    pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int32)
    x, y, w, h = (int(round(v)) for v in bbox)
    inside = pixels[y:y + h, x:x + w].reshape(-1, 3)
    inside = inside[inside.max(axis=1) > 100]  # the shape, not the black background
    nearest = np.abs(inside[:, None, :] - PALETTE[None].astype(np.int32)).sum(-1).argmin(1)
    return int(np.bincount(nearest).argmax())


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def test_same_seed_gives_identical_bytes(synthetic_coco, tmp_path):
    again = generate_synthetic_coco(tmp_path / "again", **SYNTHETIC_TEST_SETTINGS)
    first, second = _files(synthetic_coco), _files(again)
    assert len(first) == 8 + 6 + 2
    assert first == second


def test_different_seed_differs(synthetic_coco, tmp_path):
    other = generate_synthetic_coco(tmp_path / "other", **{**SYNTHETIC_TEST_SETTINGS, "seed": 1})
    first, second = _files(synthetic_coco), _files(other)
    assert first["annotations/instances_train2017.json"] != second["annotations/instances_train2017.json"]
    jpegs = [name for name in first if name.endswith(".jpg")]
    assert sum(first[name] != second[name] for name in jpegs) == len(jpegs)


@pytest.mark.parametrize("split, num_images", [("train", 8), ("val", 6)])
def test_coco_properties(synthetic_coco, split, num_images):
    data = _load(synthetic_coco, split)
    images, annotations = data["images"], data["annotations"]
    category_ids = sorted(c["id"] for c in data["categories"])
    assert category_ids == sorted(CATEGORIES)
    assert category_ids != list(range(category_ids[0], category_ids[-1] + 1)), "ids must have gaps, like COCO"
    assert len(images) == num_images
    assert len({img["id"] for img in images}) == num_images
    assert len({a["id"] for a in annotations}) == len(annotations)

    annotated = {a["image_id"] for a in annotations}
    assert any(img["id"] not in annotated for img in images), "some images must have no objects"
    assert any(a["iscrowd"] == 1 for a in annotations) and any(a["iscrowd"] == 0 for a in annotations)
    sizes = {(img["width"], img["height"]) for img in images}
    assert len(sizes) > 1 and len({w / h for w, h in sizes}) > 1
    assert all(64 <= w <= 128 and 64 <= h <= 128 for w, h in sizes)

    by_id = {img["id"]: img for img in images}
    for ann in annotations:
        assert ann["category_id"] in category_ids
        x, y, w, h = ann["bbox"]
        img = by_id[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert 0 < ann["area"] <= w * h
    for img in images:
        with Image.open(synthetic_coco / f"{split}2017" / img["file_name"]) as decoded:
            assert decoded.format == "JPEG"
            assert decoded.size == (img["width"], img["height"])
            decoded.convert("RGB").load()


def test_boxes_are_tight_around_the_drawn_shape(tmp_path):
    """One object on a flat black background, no noise: the shape's pixels, found in the decoded JPEG
    independently of the generator, have the annotated box (within 1 px of JPEG blur) and area."""
    root = generate_synthetic_coco(
        tmp_path, num_train=24, num_val=0, seed=5, max_objects=1, noise_std=0.0, background_low=0,
        background_high=0, empty_fraction=0.0, crowd_fraction=0.0, jpeg_quality=100)
    data = _load(root, "train")
    by_image = {a["image_id"]: a for a in data["annotations"]}
    assert len(by_image) == len(data["images"]) == len(data["annotations"]) == 24
    for img in data["images"]:
        pixels = np.asarray(Image.open(root / "train2017" / img["file_name"]).convert("RGB"), dtype=np.int32)
        shape = pixels.max(axis=2) > 100  # palette colours have a channel >= 220 on black
        cols, rows = np.flatnonzero(shape.any(axis=0)), np.flatnonzero(shape.any(axis=1))
        found = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
        ann = by_image[img["id"]]
        assert np.abs(np.array(found) - np.array(ann["bbox"])).max() <= 1, (img["file_name"], found, ann["bbox"])
        perimeter = 2 * (ann["bbox"][2] + ann["bbox"][3])
        assert abs(shape.sum() - ann["area"]) <= 0.5 * perimeter


def test_class_colours_paint_each_class_in_its_own_colour(tmp_path):
    """With ``class_colours`` the dominant bright colour inside every box is its class's palette colour."""
    root = generate_synthetic_coco(
        tmp_path, num_train=30, num_val=0, seed=2, max_objects=1, noise_std=0.0, background_low=0,
        background_high=0, empty_fraction=0.0, crowd_fraction=0.0, jpeg_quality=100, class_colours=True)
    data = _load(root, "train")
    files = {img["id"]: img["file_name"] for img in data["images"]}
    colour_of_class = {}
    for ann in data["annotations"]:
        colour = _palette_colour(root / "train2017" / files[ann["image_id"]], ann["bbox"])
        assert colour_of_class.setdefault(ann["category_id"], colour) == colour, ann
    assert len(colour_of_class) >= 4 and len(set(colour_of_class.values())) == len(colour_of_class)


def test_a_subset_of_shapes_is_a_dataset_with_other_categories(tmp_path):
    """--shapes: only those shapes, as categories 1..k in the given order, each in its usual class colour."""
    root = generate_synthetic_coco(
        tmp_path, num_train=12, num_val=0, seed=2, max_objects=2, noise_std=0.0, background_low=0,
        background_high=0, empty_fraction=0.0, crowd_fraction=0.0, jpeg_quality=100, class_colours=True,
        shapes="star,cross")
    data = _load(root, "train")
    assert data["categories"] == [{"id": 1, "name": "star", "supercategory": "shape"},
                                  {"id": 2, "name": "cross", "supercategory": "shape"}]
    assert {a["category_id"] for a in data["annotations"]} == {1, 2}
    files = {img["id"]: img["file_name"] for img in data["images"]}
    for ann in data["annotations"]:
        shape = data["categories"][ann["category_id"] - 1]["name"]
        colour = _palette_colour(root / "train2017" / files[ann["image_id"]], ann["bbox"])
        assert colour == list(CATEGORIES.values()).index(shape)
    with pytest.raises(ValueError, match="shapes 'star,hexagon'"):
        make_config("easy", shapes="star,hexagon")


def test_presets_differ_in_difficulty(tmp_path):
    easy, hard = _load(generate_synthetic_coco(tmp_path / "easy", 40, 0, preset="easy"), "train"), \
        _load(generate_synthetic_coco(tmp_path / "hard", 40, 0, preset="hard"), "train")
    easy_areas = np.median([a["area"] for a in easy["annotations"] if not a["iscrowd"]])
    hard_areas = np.median([a["area"] for a in hard["annotations"] if not a["iscrowd"]])
    assert hard_areas < 0.6 * easy_areas
    assert len(hard["annotations"]) > len(easy["annotations"])
    assert hard["info"]["generator"]["preset"] == "hard"
    assert hard["info"]["generator"]["max_distractors"] == PRESETS["hard"].max_distractors > 0


def test_config_validation():
    assert make_config("easy", max_objects=2, min_size=None).max_objects == 2
    with pytest.raises(TypeError, match="unknown synthetic dataset option.*max_object\\b"):
        make_config("easy", max_object=3)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        make_config("easy", min_size=200, max_size=100)
    with pytest.raises(ValueError, match="unknown preset 'impossible'"):
        make_config("impossible")


def test_command_line_matches_function(tmp_path):
    command = [sys.executable, "-m", "datasets.synthetic", "--out", str(tmp_path / "cli"), "--seed", "3",
               "--num_train", "3", "--num_val", "2", "--preset", "hard", "--max_objects", "2", "--min_size", "50",
               "--max_size", "70", "--noise_std", "2.5"]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    expected = generate_synthetic_coco(tmp_path / "function", 3, 2, seed=3, preset="hard", max_objects=2,
                                       min_size=50, max_size=70, noise_std=2.5)
    assert _files(tmp_path / "cli") == _files(expected)
