"""inference.py on real JPEGs with an untrained tiny checkpoint saved in the official layout."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from datasets.transforms import make_coco_transforms
from cli import get_args_parser
from util.checkpoint import checkpoint_state
from models import build_model
from tests.model_utils import TINY_MODEL_FLAGS, tiny_args
from util.checkpoint import save_checkpoint
from util.misc import nested_tensor_from_tensor_list
from util.coco_categories import COCO_CATEGORY_NAMES
from util.visualization import class_caption

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 12  # the synthetic categories go up to id 11
DATA_FLAGS = ["--val_scale", "96", "--max_size", "128", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy machine OpenMP's spinning
    threads make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dn_dab_detr checkpoint (model, optimizer, lr_scheduler, epoch, args) and its model."""
    torch.manual_seed(0)
    args = tiny_args("dn_dab_detr", "--use_dn", "--num_classes", str(NUM_CLASSES))
    model, _, postprocessors = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    path = tmp_path_factory.mktemp("checkpoint") / "checkpoint.pth"
    save_checkpoint(checkpoint_state(model, optimizer, lr_scheduler, None, 4, args), path)
    return path, model.eval(), postprocessors["bbox"]


@pytest.fixture(scope="module")
def image_folder(synthetic_coco, tmp_path_factory):
    """Two real val JPEGs of different sizes and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("images")
    sources = sorted((synthetic_coco / "val2017").glob("*.jpg"))[:2]
    for source in sources:
        shutil.copy(source, folder / source.name)
    (folder / "corrupt.jpg").write_bytes(sources[0].read_bytes()[:300])
    return folder, [folder / s.name for s in sources]


def expected_detections(model, postprocessor, image_paths):
    """What the model predicts for the images batched together, computed here without inference.py."""
    args = get_args_parser().parse_args(DATA_FLAGS)
    transform = make_coco_transforms("val", args)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    samples = nested_tensor_from_tensor_list([transform(image, None)[0] for image in images])
    with torch.no_grad():
        results = postprocessor(model(samples), torch.tensor([[im.height, im.width] for im in images]))
    return images, results


def test_folder_with_a_corrupt_file_gives_drawings_and_all_topk_detections(trained, image_folder, synthetic_coco,
                                                                          tmp_path):
    checkpoint, model, postprocessor = trained
    folder, image_paths = image_folder
    out = tmp_path / "out"
    ann_file = synthetic_coco / "annotations" / "instances_val2017.json"
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--resume", str(checkpoint),
                             "--images", str(folder), "--output_dir", str(out), "--threshold", "0",
                             "--ann_file", str(ann_file), "--batch_size", "2", "--display_size", "200", *DATA_FLAGS],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert any("WARNING" in line and "corrupt.jpg" in line for line in log.splitlines()), log
    assert "2 images processed, 1 skipped" in log

    images, expected = expected_detections(model, postprocessor, image_paths)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in image_paths)
    for path, image in zip(image_paths, images):
        with Image.open(out / f"{path.stem}.png") as drawn:
            scale = 200 / max(image.size)  # the test images are smaller: enlarged to --display_size
            assert drawn.size == (round(image.width * scale), round(image.height * scale))
            enlarged = image.resize(drawn.size, Image.BICUBIC)
            changed = (np.asarray(drawn.convert("RGB"), dtype=int) - np.asarray(enlarged, dtype=int)) != 0
            assert changed.any(axis=-1).mean() > 0.05  # the boxes and captions are drawn on it

    detections = json.loads((out / "detections.json").read_text())
    per_query_and_class = 12 * NUM_CLASSES  # untrained: every score > 0, so threshold 0 keeps the whole top-k
    assert len(detections) == 2 * min(300, per_query_and_class)
    for image_id, (path, image, want) in enumerate(zip(image_paths, images, expected)):
        mine = [d for d in detections if d["file_name"] == path.name]
        assert {d["image_id"] for d in mine} == {image_id}  # "corrupt" is not numeric: ids are input positions
        assert len(mine) == min(300, per_query_and_class)
        assert all(0 <= d["category_id"] < NUM_CLASSES for d in mine)
        boxes = torch.tensor([d["bbox"] for d in mine])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= image.width + 0.01).all()
        assert (boxes[:, 1] + boxes[:, 3] <= image.height + 0.01).all()
        torch.testing.assert_close(torch.tensor([d["score"] for d in mine]), want["scores"], atol=1e-5, rtol=0)
        assert [d["category_id"] for d in mine] == want["labels"].tolist()
        clipped = want["boxes"].clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, image.width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, image.height)
        xywh = torch.cat([clipped[:, :2], clipped[:, 2:] - clipped[:, :2]], dim=1)
        torch.testing.assert_close(boxes, xywh, atol=0.01, rtol=0)


def test_threshold_keeps_exactly_the_scores_above_it(trained, image_folder, tmp_path):
    checkpoint, model, postprocessor = trained
    _, image_paths = image_folder
    _, expected = expected_detections(model, postprocessor, image_paths)
    threshold = float(expected[0]["scores"].median())
    out = tmp_path / "out"
    status = inference.main(["--resume", str(checkpoint), "--images", *map(str, image_paths), "--output_dir", str(out),
                             "--threshold", str(threshold), *DATA_FLAGS])
    assert status == 0
    detections = json.loads((out / "detections.json").read_text())
    for path, want in zip(image_paths, expected):
        # Numeric stems: COCO-style image ids.
        mine = [d for d in detections if d["image_id"] == int(path.stem)]
        assert len(mine) == int((want["scores"] >= threshold).sum()) > 0
        assert min(d["score"] for d in mine) >= threshold


def test_config_supplies_the_flags_of_a_checkpoint_without_args(trained, image_folder, tmp_path):
    checkpoint, _, _ = trained
    _, image_paths = image_folder
    bare = tmp_path / "weights_only.pth"
    save_checkpoint({"model": torch.load(checkpoint, weights_only=True)["model"]}, bare)
    config = tmp_path / "tiny.py"
    values = dict(zip(TINY_MODEL_FLAGS[1::2], TINY_MODEL_FLAGS[2::2]))  # after --no_pretrained_backbone
    config.write_text("".join(f"{flag[2:]} = {value if value.isdigit() else repr(value)}\n"
                              for flag, value in values.items()))
    out = tmp_path / "out"
    status = inference.main(["--resume", str(bare), "--config", str(config), "--images", str(image_paths[0]),
                             "--output_dir", str(out), *DATA_FLAGS])
    assert status == 0
    assert (out / f"{image_paths[0].stem}.png").is_file()

    # The same weights under other network flags are refused by the strict load.
    with pytest.raises(SystemExit, match="does not fit the network"):
        inference.main(["--resume", str(bare), "--config", str(config), "--hidden_dim", "32",
                        "--images", str(image_paths[0]), "--output_dir", str(out), *DATA_FLAGS])


def test_only_unreadable_inputs_exit_with_status_1(trained, image_folder, tmp_path):
    checkpoint, _, _ = trained
    folder, _ = image_folder
    status = inference.main(["--resume", str(checkpoint), "--images", str(folder / "corrupt.jpg"),
                             str(tmp_path / "missing.jpg"), "--output_dir", str(tmp_path / "out"), *DATA_FLAGS])
    assert status == 1
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []


def test_class_names_from_annotations_else_coco_names_for_91_classes(synthetic_coco, tmp_path):
    ann_file = synthetic_coco / "annotations" / "instances_val2017.json"
    common = ["--resume", "x.pth", "--images", "x.jpg", "--output_dir", str(tmp_path)]
    synthetic = {c["id"]: c["name"] for c in json.loads(ann_file.read_text())["categories"]}
    assert inference.resolve_category_names(inference.parse_inference_args(common + ["--ann_file", str(ann_file)])) \
        == synthetic
    assert inference.resolve_category_names(
        inference.parse_inference_args(common + ["--coco_path", str(synthetic_coco)])) == synthetic
    coco = inference.resolve_category_names(inference.parse_inference_args(common + ["--num_classes", "91"]))
    assert coco == COCO_CATEGORY_NAMES and len(coco) == 80 and coco[1] == "person" and coco[90] == "toothbrush"
    assert max(coco) < 91 and {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(coco)
    other = inference.resolve_category_names(inference.parse_inference_args(common + ["--num_classes", "12"]))
    assert class_caption(5, other) == "class 5"
