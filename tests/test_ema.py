"""The weight average (--use_ema): the update rule, and main.main end to end (training with gradient
accumulation, checkpoint keys, resume, evaluation of the average, --no-ema_weights, inference loading)."""
import json
import logging
import math

import pytest
import torch
from torch import nn

from main import get_args_parser, main
from model_loading import load_model_for_inference
from tests.model_utils import tiny_main_flags
from tests.test_training import read_log
from util.checkpoint import load_checkpoint
from util.ema import ModelEMA

pytestmark = pytest.mark.usefixtures("single_thread")


class SharedHead(nn.Module):
    """A module registered under two names (like the detector's box head) and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.inner = nn.Module()
        self.inner.head = self.head
        self.norm = nn.BatchNorm1d(2)


def test_update_averages_floats_once_copies_integers_and_warms_up():
    model = SharedHead()
    ema = ModelEMA(model, decay=0.9, warmup_steps=10)
    start = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.norm.running_mean.fill_(2.0)
    model.norm.num_batches_tracked.fill_(7)
    ema.update(model)
    decay = 0.9 * (1 - math.exp(-1 / 10))
    assert ema.current_decay() == pytest.approx(0.9 * (1 - math.exp(-2 / 10)))
    # (1 - decay) of the step towards the new weights, once although the head has two state-dict names
    torch.testing.assert_close(ema.module.head.weight, start + (1 - decay))
    torch.testing.assert_close(ema.module.inner.head.weight, start + (1 - decay))
    torch.testing.assert_close(ema.module.norm.running_mean, torch.full((2,), 2.0 * (1 - decay)))
    assert ema.module.norm.num_batches_tracked.item() == 7
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert ModelEMA(model, decay=0.9, warmup_steps=0).current_decay() == 0.9
    with pytest.raises(ValueError, match="--ema_decay"):
        ModelEMA(model, decay=1.0)


def test_training_with_ema_and_accumulation_saves_resumes_and_evaluates_the_average(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    # 8 training images in batches of 2 = 4 micro-batches per epoch = 2 optimizer steps of 2 micro-batches.
    flags = tiny_main_flags(synthetic_coco, out, "--use_ema", "--ema_decay", "0.5", "--ema_warmup_steps", "0",
                            "--accumulation_steps", "2", "--save_results")
    main(get_args_parser().parse_args([*flags, "--epochs", "1"]))
    first = load_checkpoint(out / "checkpoint.pth")
    assert first["ema_updates"] == 2 and read_log(out)[0]["train_optimizer_steps"] == 2
    assert set(first["ema_model"]) == set(first["model"])
    assert any(not torch.equal(first["ema_model"][k], first["model"][k]) for k in first["model"])

    main(get_args_parser().parse_args([*flags, "--epochs", "2", "--resume", str(out / "checkpoint.pth")]))
    assert "Resumed the weight average (ema_model, 2 updates)" in (out / "info.txt").read_text()
    final = load_checkpoint(out / "checkpoint.pth")
    assert final["ema_updates"] == 4 and final["epoch"] == 1
    logged = read_log(out)[-1]
    trained_detections = json.loads((out / "results" / "epoch0001.json").read_text())

    # --eval of the checkpoint runs the average, which is what training evaluated after the epoch.
    eval_flags = ["--coco_path", str(synthetic_coco), "--eval", "--resume", str(out / "checkpoint.pth"),
                  "--val_scale", "96", "--max_size", "128", "--batch_size", "2", "--num_workers", "0",
                  "--device", "cpu", "--save_results"]
    main(get_args_parser().parse_args([*eval_flags, "--output_dir", str(tmp_path / "ema")]))
    assert read_log(tmp_path / "ema")[-1]["test_coco_eval_bbox"] == pytest.approx(logged["test_coco_eval_bbox"],
                                                                                  abs=1e-6)
    assert same_detections(json.loads((tmp_path / "ema" / "results" / "eval.json").read_text()), trained_detections)
    main(get_args_parser().parse_args([*eval_flags, "--output_dir", str(tmp_path / "raw"), "--no-ema_weights"]))
    assert f"Resumed model weights from {out / 'checkpoint.pth'} (model)" in (tmp_path / "raw" / "info.txt").read_text()
    raw_detections = json.loads((tmp_path / "raw" / "results" / "eval.json").read_text())
    assert not same_detections(raw_detections, trained_detections)

    # inference.py, the export script and torch.hub load the average too.
    args = get_args_parser().parse_args(["--resume", str(out / "checkpoint.pth")])
    model, _, _ = load_model_for_inference(args, logging.getLogger("test"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, final["ema_model"][key]), key


def same_detections(detections, others) -> bool:
    """Equal COCO results up to float rounding (separate processes may sum in another order)."""
    def numbers(entry):
        return [entry["image_id"], entry["category_id"], *entry["bbox"], entry["score"]]

    return len(detections) == len(others) and all(
        numbers(a) == pytest.approx(numbers(b), abs=1e-4) for a, b in zip(detections, others))
