"""scripts/visualize_dn.py on the synthetic COCO fixture: the pictures, the drawn queries and the mask."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.dn_components import dn_attention_mask
from util.visualization import display_scale

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("visualize_dn", ROOT / "scripts" / "visualize_dn.py")
visualize_dn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(visualize_dn)


def first_train_image_with_objects(coco_path: Path):
    """(image entry, its non-crowd annotations) read straight from the annotation file."""
    data = json.loads((coco_path / "annotations" / "instances_train2017.json").read_text())
    for image in sorted(data["images"], key=lambda img: img["id"]):
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        if anns:
            return image, anns
    raise AssertionError("the fixture has no training image with objects")


def test_queries_and_mask_pictures_for_the_default_image(synthetic_coco, tmp_path, capsys):
    image, anns = first_train_image_with_objects(synthetic_coco)
    num_gt, scalar, num_queries, cell = len(anns), 3, 7, 5
    out = tmp_path / "vis"
    result = visualize_dn.main(["--coco_path", str(synthetic_coco), "--out", str(out), "--scalar", str(scalar),
                                "--num_queries", str(num_queries), "--cell_size", str(cell), "--seed", "1"])

    assert len(result.gt_boxes) == num_gt
    assert len(result.noised_boxes) == scalar * num_gt
    assert all(box.dashed for box in result.noised_boxes)
    assert [box.caption.split()[0] for box in result.noised_boxes] == [f"g{g}" for g in range(scalar)
                                                                       for _ in range(num_gt)]
    num_rows = scalar * num_gt + num_queries
    printed = capsys.readouterr().out
    assert f"image id {image['id']}" in printed and f"attention mask shape ({num_rows}, {num_rows})" in printed

    with Image.open(out / "dn_queries.png") as queries_png:
        scale = display_scale((image["width"], image["height"]), 640)
        assert queries_png.size == (round(image["width"] * scale), round(image["height"] * scale))
    with Image.open(out / "dn_attention_mask.png") as mask_png:
        assert mask_png.size == (num_rows * cell, num_rows * cell)
        pixels = np.asarray(mask_png.convert("RGB"))
    centres = pixels[cell // 2::cell, cell // 2::cell]  # [Q, Q, 3]: one sample per (query, key) cell
    shown_blocked = (centres == np.array(visualize_dn.BLOCKED_COLOR)).all(axis=-1)
    expected = dn_attention_mask(scalar * num_gt, num_gt, num_queries).numpy()
    np.testing.assert_array_equal(shown_blocked, expected)

    # The noised boxes drawn are the DN module's, in display pixels.
    meta = result.queries.dn_meta
    width, height = Image.open(out / "dn_queries.png").size
    corners = torch.cat([meta.noised_boxes[:, :2] - meta.noised_boxes[:, 2:] / 2,
                         meta.noised_boxes[:, :2] + meta.noised_boxes[:, 2:] / 2], dim=1)
    drawn = torch.tensor([box.box for box in result.noised_boxes])
    torch.testing.assert_close(drawn, corners * torch.tensor([width, height, width, height]))


def test_noise_scales_and_seed_control_the_drawn_queries(synthetic_coco, tmp_path):
    base = ["--coco_path", str(synthetic_coco), "--image_set", "val", "--out", str(tmp_path), "--scalar", "2"]
    clean = visualize_dn.main(base + ["--box_noise_scale", "0", "--label_noise_scale", "0"])
    gt = torch.tensor([box.box for box in clean.gt_boxes])
    torch.testing.assert_close(torch.tensor([box.box for box in clean.noised_boxes]), gt.repeat(2, 1))
    assert [box.caption.split(" ", 1)[1] for box in clean.noised_boxes] == [box.caption for box in clean.gt_boxes] * 2

    noisy = visualize_dn.main(base + ["--box_noise_scale", "0.8", "--seed", "3"])
    again = visualize_dn.main(base + ["--box_noise_scale", "0.8", "--seed", "3"])
    other = visualize_dn.main(base + ["--box_noise_scale", "0.8", "--seed", "4"])
    assert [b.box for b in noisy.noised_boxes] == [b.box for b in again.noised_boxes]
    assert [b.box for b in noisy.noised_boxes] != [b.box for b in other.noised_boxes]
    assert not torch.allclose(torch.tensor([b.box for b in noisy.noised_boxes]), gt.repeat(2, 1))


def test_image_and_ann_file_select_an_image_and_unknown_ids_are_named(synthetic_coco, tmp_path, capsys):
    ann_file = synthetic_coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    image = data["images"][-1]
    num_gt = sum(1 for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"])
    result = visualize_dn.main(["--image", str(synthetic_coco / "val2017" / image["file_name"]),
                                "--ann_file", str(ann_file), "--out", str(tmp_path), "--scalar", "4"])
    assert len(result.noised_boxes) == 4 * num_gt
    assert f"image id {image['id']}" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--image_id 424242 is not in .*instances_train2017.json"):
        visualize_dn.main(["--coco_path", str(synthetic_coco), "--image_id", "424242", "--out", str(tmp_path)])
