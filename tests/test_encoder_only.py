"""dn_dab_deformable_detr_deformable_encoder_only end to end: training, --eval --resume of a checkpoint whose
network flags only its keys reveal, inference.py, and the flag checks (read, mismatched, ignored, unsupported)."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import get_args_parser, warn_ignored_flags
from models import build_model
from models.builder import adopt_state_dict_flags, flags_from_state_dict
from tests.model_utils import TINY_MODEL_FLAGS, tiny_args, tiny_main_flags
from util.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODEL = "dn_dab_deformable_detr_deformable_encoder_only"
DATA_FLAGS = ["--val_scale", "96", "--max_size", "128", "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]


def run(script, *flags):
    result = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_state_dict_reveals_classes_patterns_and_activation():
    model, _, _ = build_model(tiny_args(MODEL, "--num_patterns", "2", "--transformer_activation", "relu"))
    flags = {flag: value for flag, (value, _) in flags_from_state_dict(model.state_dict()).items()}
    assert flags == {"num_classes": 11, "num_patterns": 2, "transformer_activation": "relu", "two_stage": False}
    prelu, _, _ = build_model(tiny_args(MODEL))
    assert flags_from_state_dict(prelu.state_dict())["transformer_activation"][0] == "prelu"

    parser = get_args_parser()
    args = parser.parse_args(["-m", MODEL, *TINY_MODEL_FLAGS])  # no --num_classes, default patterns/activation
    adopt_state_dict_flags(args, model.state_dict(), parser, "ckpt.pth")
    assert (args.num_classes, args.num_patterns, args.transformer_activation) == (11, 2, "relu")

    explicit = parser.parse_args(["-m", MODEL, *TINY_MODEL_FLAGS, "--num_patterns", "3"])
    with pytest.raises(CheckpointError, match=r"ckpt\.pth: --num_patterns 3 .*transformer\.patterns\.weight"):
        adopt_state_dict_flags(explicit, model.state_dict(), parser, "ckpt.pth")
    relu = parser.parse_args(["-m", MODEL, *TINY_MODEL_FLAGS, "--transformer_activation", "relu"])
    with pytest.raises(CheckpointError, match=r"--transformer_activation 'relu' .*activation\.weight"):
        adopt_state_dict_flags(relu, prelu.state_dict(), parser, "ckpt.pth")
    classes = parser.parse_args(["-m", MODEL, *TINY_MODEL_FLAGS, "--num_classes", "5"])
    with pytest.raises(CheckpointError, match=r"--num_classes 5 .*label_enc\.weight"):
        adopt_state_dict_flags(classes, model.state_dict(), parser, "ckpt.pth")


def test_ignored_flags_warn_and_unsupported_flags_fail(caplog):
    args = tiny_args(MODEL, "--dec_n_points", "8", "--random_refpoints_xy", "--pre_norm")
    with caplog.at_level(logging.WARNING):
        warn_ignored_flags(args)
    warned = " ".join(record.getMessage() for record in caplog.records)
    for flag in ("--dec_n_points", "--random_refpoints_xy", "--pre_norm"):
        assert f"{flag} " in warned and MODEL in warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_ignored_flags(tiny_args(MODEL, "--num_patterns", "3"))
    assert not caplog.records
    with pytest.raises(ValueError, match="--two_stage"):
        build_model(tiny_args(MODEL, "--two_stage"))
    with pytest.raises(ValueError, match="--num_feature_levels"):
        build_model(tiny_args(MODEL, "--num_feature_levels", "2"))


def test_dn_class_loss_weight_is_fixed_and_absent_without_dn():
    _, criterion, _ = build_model(tiny_args(MODEL, "--use_dn", "--cls_loss_coef", "2"))
    assert criterion.weight_dict["loss_ce"] == 2 and criterion.weight_dict["tgt_loss_ce"] == 1.0
    _, baseline, _ = build_model(tiny_args(MODEL))
    assert not any(key.startswith("tgt_") for key in baseline.weight_dict)


def test_trains_then_evaluates_and_detects_from_keys_alone(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    run("main.py", *tiny_main_flags(synthetic_coco, out, "-m", MODEL, "--num_patterns", "2",
                                    "--transformer_activation", "relu", "--epochs", "1"))
    logged_ap = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    keys_only = tmp_path / "keys_only.pth"  # like a checkpoint that records no usable flags
    save_checkpoint({"model": checkpoint["model"], "epoch": checkpoint["epoch"]}, keys_only)

    eval_dir = tmp_path / "eval"
    result = run("main.py", "-m", MODEL, *TINY_MODEL_FLAGS, "--coco_path", str(synthetic_coco), "--output_dir",
                 str(eval_dir), "--eval", "--resume", str(keys_only), *DATA_FLAGS)
    log = result.stdout + result.stderr
    assert "--num_patterns 2 read from" in log and "--transformer_activation 'relu' read from" in log
    evaluated = json.loads((eval_dir / "log.txt").read_text().splitlines()[-1])
    assert evaluated["test_coco_eval_bbox"] == pytest.approx(logged_ap, abs=1e-9)

    detect_dir = tmp_path / "detect"
    run("inference.py", "--resume", str(out / "checkpoint.pth"), "--images", str(synthetic_coco / "val2017"),
        "--output_dir", str(detect_dir), "--threshold", "0", *DATA_FLAGS)
    detections = json.loads((detect_dir / "detections.json").read_text())
    assert len({d["image_id"] for d in detections}) == len(list((synthetic_coco / "val2017").glob("*.jpg")))


def test_explicit_flag_against_the_checkpoint_is_a_clear_error(synthetic_coco, tmp_path):
    model, _, _ = build_model(tiny_args(MODEL, "--num_patterns", "2"))
    path = tmp_path / "patterns.pth"
    save_checkpoint({"model": model.state_dict()}, path)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "-m", MODEL, *TINY_MODEL_FLAGS, "--num_patterns",
                             "1", "--coco_path", str(synthetic_coco), "--eval", "--resume", str(path), *DATA_FLAGS],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--num_patterns 1" in result.stderr and "transformer.patterns.weight" in result.stderr


def test_baseline_weights_load_into_the_dn_model():
    torch.manual_seed(0)
    baseline, _, _ = build_model(tiny_args(MODEL, "--num_patterns", "2"))
    dn_model, _, _ = build_model(tiny_args(MODEL, "--num_patterns", "2", "--use_dn"))
    dn_model.load_state_dict(baseline.state_dict(), strict=True)
