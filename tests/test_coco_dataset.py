"""COCO-format dataset: targets (spec §6.1), build helpers and clear errors on bad input."""
import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from datasets import build_dataset, get_coco_api_from_dataset
from models.builder import resolve_num_classes
import datasets.coco
from datasets.coco import AnnotationRepairWarning, CocoDetection, ImageLoadError, ImageSizeWarning
from util.misc import collate_fn

CATEGORIES = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}]


def _args(coco_path, **overrides):
    values = dict(dataset_file="coco", coco_path=str(coco_path), train_scales=[64, 80], max_size=160,
                  val_scale=72, crop_resize_scales=[60, 70], crop_size=[32, 48])
    values.update(overrides)
    return argparse.Namespace(**values)


def write_coco(root: Path, images, annotations, categories=CATEGORIES, split: str = "val") -> Path:
    """A COCO folder with real JPEGs: ``images`` = [(id, width, height)], file names ``<id>.jpg``."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, width, height in images:
        Image.new("RGB", (width, height), (image_id * 40 % 256, 90, 30)).save(folder / f"{image_id}.jpg")
        entries.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
    (root / "annotations").mkdir(exist_ok=True)
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return ann_file


def _ann(ann_id, image_id, bbox, category_id=2, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), "iscrowd": 0, **extra}


def test_synthetic_val_targets_are_normalised_and_exclude_crowd(synthetic_coco):
    dataset = build_dataset("val", _args(synthetic_coco))
    data = json.loads((synthetic_coco / "annotations" / "instances_val2017.json").read_text())
    by_id = {img["id"]: img for img in data["images"]}
    assert len(dataset) == len(data["images"]) == 6
    crowd_seen = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        info = by_id[target["image_id"].item()]
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        regular = [a for a in anns if not a["iscrowd"]]
        crowd_seen += len(anns) - len(regular)
        assert image.shape[0] == 3 and list(image.shape[-2:]) == target["size"].tolist()
        assert min(image.shape[-2:]) == 72
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        assert target["labels"].tolist() == [a["category_id"] for a in regular]
        # Resize ratios cancel in the normalisation: cxcywh relative to the original image.
        w, h = info["width"], info["height"]
        expected = torch.tensor([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                                 for x, y, bw, bh in (a["bbox"] for a in regular)]).reshape(-1, 4)
        assert torch.allclose(target["boxes"], expected, atol=1e-5)
        assert target["iscrowd"].tolist() == [0] * len(regular)
        for key in ("labels", "image_id", "iscrowd", "orig_size", "size"):
            assert target[key].dtype == torch.int64, key
        assert target["boxes"].dtype == target["area"].dtype == torch.float32
    assert crowd_seen >= 1


def test_train_split_batches_through_the_loader(synthetic_coco):
    dataset = build_dataset("train", _args(synthetic_coco))
    samples, targets = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_fn)))
    assert samples.tensors.shape[:2] == (4, 3) and len(targets) == 4
    for target, mask in zip(targets, samples.mask):
        height, width = target["size"].tolist()
        assert min(height, width) in (64, 80)
        assert not mask[:height, :width].any() and mask.sum() == mask.numel() - height * width
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_raw_target_clamps_drops_and_keeps_missing_iscrowd(tmp_path):
    annotations = [
        _ann(1, 1, [10, 20, 30, 40], area=1000.0),
        _ann(2, 1, [0, 0, 50, 50], category_id=5, iscrowd=1),
        _ann(3, 1, [5, 5, 0, 10]),  # zero width: dropped
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [60, 5, 10, 10], "area": 100.0},  # no iscrowd key: kept
        _ann(5, 1, [90, 70, 20, 20]),  # partly outside the 100 x 80 image: clipped
        _ann(6, 1, [50, 10, -20, 30]),  # negative width: dropped
        _ann(7, 1, [120, 10, 5, 5]),  # outside the image: dropped
    ]
    ann_file = write_coco(tmp_path, [(1, 100, 80)], annotations)
    with pytest.warns(AnnotationRepairWarning) as record:
        dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(ann_file) in message
    assert "of 6 non-crowd boxes, 1 extend outside their image" in message and "ids [5]" in message
    assert "3 are empty after clipping" in message and "ids [3, 6, 7]" in message

    image, target = dataset[0]
    assert image.size == (100, 80)
    assert target["boxes"].tolist() == [[10, 20, 40, 60], [60, 5, 70, 15], [90, 70, 100, 80]]
    assert target["labels"].tolist() == [2, 5, 2]
    assert target["area"].tolist() == [1000.0, 100.0, 400.0]  # the annotations' own area fields
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["image_id"].tolist() == [1]
    assert target["orig_size"].tolist() == target["size"].tolist() == [80, 100]
    # The evaluation ground truth keeps every annotation, with COCOeval's required fields filled in.
    assert len(dataset.coco.anns) == 7 and dataset.coco.anns[4]["iscrowd"] == 0


def test_clean_file_gives_no_warning_and_keeps_empty_images(tmp_path):
    ann_file = write_coco(tmp_path, [(1, 60, 40), (4, 30, 50)], [_ann(1, 4, [1, 2, 3, 4])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert dataset.ids == [1, 4]
    _, empty = dataset[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def write_resized_coco(root: Path) -> Path:
    """Images 1..4 annotated as 64x48; the JPEGs of 2 and 4 are really 80x60 and 48x64."""
    ann_file = write_coco(root, [(image_id, 64, 48) for image_id in range(1, 5)], [_ann(1, 2, [1, 2, 30, 20])])
    Image.new("RGB", (80, 60), (0, 90, 30)).save(root / "val2017" / "2.jpg")
    Image.new("RGB", (48, 64), (0, 90, 30)).save(root / "val2017" / "4.jpg")
    return ann_file


def test_image_size_differing_from_the_annotation_warns_once_with_count_and_ids(tmp_path):
    ann_file = write_resized_coco(tmp_path)
    with pytest.warns(ImageSizeWarning) as record:
        dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(ann_file) in message and "2 of 4 images checked" in message
    assert "image id 2: file 80x60, annotated 64x48; image id 4: file 48x64, annotated 64x48" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[1][1]["orig_size"].tolist() == [60, 80]  # checked already: no second warning


def test_image_size_beyond_the_construction_check_warns_when_first_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.coco, "SIZE_CHECK_LIMIT", 1)
    ann_file = write_resized_coco(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = CocoDetection(tmp_path / "val2017", ann_file)  # image 1 only is checked, and fine
        dataset[2]
    with pytest.warns(ImageSizeWarning, match=r"image id 4: file 48x64, annotated 64x48.*not reported") as record:
        dataset[3]
        dataset[1]
    assert len(record) == 1


def test_missing_coco_path_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"--coco_path {missing} is not a folder.*train2017"):
        build_dataset("train", _args(missing))


def test_missing_annotation_file(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="annotation file .*instances_val2017.json not found"):
        build_dataset("val", _args(tmp_path))


def test_missing_image_folder(tmp_path):
    write_coco(tmp_path, [(1, 10, 10)], [], split="val")
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        (tmp_path / "annotations" / "instances_val2017.json").read_text())
    with pytest.raises(FileNotFoundError, match="image folder .*train2017 not found"):
        build_dataset("train", _args(tmp_path))


def test_listed_image_missing_names_file_and_id(tmp_path):
    ann_file = write_coco(tmp_path, [(1, 20, 20), (3, 20, 20)], [])
    (tmp_path / "val2017" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images listed in .* are missing .*3\.jpg \(image id 3\)"):
        CocoDetection(tmp_path / "val2017", ann_file)


@pytest.mark.parametrize("corruption", ["truncated", "garbage"])
def test_corrupt_jpeg_raises_naming_file_and_id(tmp_path, corruption):
    ann_file = write_coco(tmp_path, [(1, 64, 48), (2, 64, 48)], [_ann(1, 2, [1, 1, 5, 5])])
    path = tmp_path / "val2017" / "2.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if corruption == "truncated" else b"not a jpeg at all" * 10)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert dataset[0][1]["image_id"].item() == 1
    with pytest.raises(ImageLoadError, match=r"cannot read image .*2\.jpg \(image id 2"):
        dataset[1]


def test_unknown_category_names_annotation_image_and_category(tmp_path):
    ann_file = write_coco(tmp_path, [(1, 20, 20)], [_ann(1, 1, [1, 1, 5, 5]), _ann(7, 1, [2, 2, 5, 5], category_id=4)])
    with pytest.raises(ValueError, match=r"annotation id 7 \(image id 1\) has category_id 4, which is not in "
                                         r"'categories' \(ids \[2, 5\]\)"):
        CocoDetection(tmp_path / "val2017", ann_file)


@pytest.mark.parametrize("bad, message", [
    ({"bbox": [1, 2, 3]}, r"annotation id 1 \(image id 1\) has bbox \[1, 2, 3\]"),
    ({"bbox": [1, 2, float("nan"), 3]}, "4 finite numbers"),
    ({"image_id": 9}, "annotation id 1 refers to image id 9, which is not in 'images'"),
])
def test_malformed_annotations(tmp_path, bad, message):
    ann_file = write_coco(tmp_path, [(1, 20, 20)], [{**_ann(1, 1, [1, 1, 5, 5]), **bad}])
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path / "val2017", ann_file)


def test_invalid_json(tmp_path):
    write_coco(tmp_path, [(1, 20, 20)], [])
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    ann_file.write_text("{ this is not json")
    with pytest.raises(ValueError, match="instances_val2017.json: not a valid JSON file"):
        CocoDetection(tmp_path / "val2017", ann_file)


def test_coco_api_through_subsets_and_num_classes(synthetic_coco, tmp_path):
    dataset = build_dataset("val", _args(synthetic_coco))
    assert get_coco_api_from_dataset(Subset(Subset(dataset, [0, 1, 2]), [1])) is dataset.coco
    with pytest.raises(TypeError, match="no COCO ground truth"):
        get_coco_api_from_dataset([1, 2])
    max_id = max(dataset.coco.getCatIds())
    args = _args(synthetic_coco)
    args.num_classes = None
    assert resolve_num_classes(args, dataset_max_category_id=max_id) == 12 and args.num_classes == 12
    args.num_classes = 5
    with pytest.raises(ValueError, match="--num_classes 5 is too small"):
        resolve_num_classes(args, dataset_max_category_id=max_id)
