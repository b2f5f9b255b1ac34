"""main.py end to end on a tiny synthetic set: training, crash + resume, evaluation, configs, safety."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference
from engine import NonFiniteLossError, train_one_epoch
from models import build_model
from tests.model_utils import random_targets, tiny_args, tiny_main_flags
from util.checkpoint import load_checkpoint, save_checkpoint
from util.misc import nested_tensor_from_tensor_list

ROOT = Path(__file__).resolve().parents[1]
LR = 2e-4


def main_command(*flags):
    return [sys.executable, str(ROOT / "main.py"), *flags]


def run_main(*flags, timeout=300):
    result = subprocess.run(main_command(*flags), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"main.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def start_main(*flags):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(main_command(*flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def kill_when(process, condition, timeout=240):
    """Kill -9 the process as soon as ``condition()`` holds; returns False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    process.kill()
    raise TimeoutError("the condition never held")


def test_kill_mid_epoch_then_resume_continues_with_the_right_epoch_and_lr(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    flags = tiny_main_flags(synthetic_coco, out, "--epochs", "2", "--lr_drop", "1")
    process = start_main(*flags)
    seen = []

    def second_epoch_started():
        line = process.stdout.readline()
        seen.append(line)
        return "Epoch: [1]" in line

    assert kill_when(process, second_epoch_started), "".join(seen[-30:])
    # Only the first epoch finished: its checkpoint and log line are complete, nothing of the second.
    assert [entry["epoch"] for entry in read_log(out)] == [0]
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0
    assert set(checkpoint) >= {"model", "optimizer", "lr_scheduler", "epoch", "args"}

    result = run_main(*flags, "--resume", str(out / "checkpoint.pth"))
    assert "Resuming training at epoch 1" in result.stdout + result.stderr
    assert [entry["epoch"] for entry in read_log(out)] == [0, 1]
    final = load_checkpoint(out / "checkpoint.pth")
    assert final["epoch"] == 1
    # lr_drop 1: epoch 0 ran at LR, epoch 1 at LR / 10, and the schedule has stepped twice.
    assert read_log(out)[1]["train_lr"] == pytest.approx(LR * 0.1)
    assert [g["lr"] for g in final["optimizer"]["param_groups"]] == pytest.approx([LR * 0.01, 1e-5 * 0.01])
    assert final["lr_scheduler"]["last_epoch"] == 2
    assert (out / "checkpoint0000_beforedrop.pth").exists() and (out / "checkpoint0001.pth").exists()


def test_kill_while_saving_never_leaves_a_broken_checkpoint(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    flags = tiny_main_flags(synthetic_coco, out, "--epochs", "2")
    process = start_main(*flags)

    def saving():
        return any(out.glob(".checkpoint.pth.*.tmp"))

    assert kill_when(process, saving), process.stdout.read()[-3000:]
    resume = []
    if (out / "checkpoint.pth").exists():  # killed during the second write of epoch 0
        assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0
        resume = ["--resume", str(out / "checkpoint.pth")]
    run_main(*flags, *resume)
    assert not any(out.glob(".checkpoint.pth.*.tmp"))  # the killed write's temporary file was removed
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    assert read_log(out)[-1]["epoch"] == 1


def test_console_lines_are_short_and_log_txt_keeps_every_term(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    console = run_main(*tiny_main_flags(synthetic_coco, out, "--epochs", "1")).stdout.splitlines()
    steps = [line for line in console if re.search(r"Epoch: \[0\]\s+\[\d/4\]", line)]
    tests = [line for line in console if re.search(r"Test:\s+\[\d/3\]", line)]
    averages = [line for line in console if "Averaged stats" in line]
    assert len(steps) == 2 and len(tests) == 2 and len(averages) == 2, console
    for line in steps + tests + averages:
        assert len(line) < 300, line
    for line in steps:
        assert re.search(r"eta: \S+  loss: \S+ \(\S+\)  loss_ce: \S+  loss_bbox: \S+  loss_giou: \S+  "
                         r"tgt_loss_ce: \S+  tgt_loss_bbox: \S+  tgt_loss_giou: \S+  lr: \S+  time: .*max rss: \d+ MiB",
                         line), line
    assert "tgt_loss_giou:" in averages[0] and "loss_giou:" in averages[1] and "_unscaled" not in averages[0]
    (record,) = read_log(out)
    assert {"train_loss_ce_unscaled", "train_loss_bbox_0", "train_tgt_loss_giou_1", "train_cardinality_error_unscaled",
            "test_loss_giou_unscaled", "test_class_error"} <= set(record)


def test_eval_resume_reproduces_the_logged_ap_and_config_overrides(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "tiny.py"
    config.write_text("epochs = 1\nlabel_noise_scale = 0.3\nscalar = 3\n")
    run_main("--config", str(config), *tiny_main_flags(synthetic_coco, out, "--scalar", "2"))
    settings = json.loads((out / "config.json").read_text())
    assert settings["label_noise_scale"] == 0.3 and settings["epochs"] == 1  # from the config file
    assert settings["scalar"] == 2  # the command line wins over the config
    assert settings["num_classes"] == 12  # inferred: the synthetic set's largest category id is 11
    logged_ap = read_log(out)[-1]["test_coco_eval_bbox"]

    eval_dir = tmp_path / "eval"
    # Only data flags: the network comes from the checkpoint's recorded arguments.
    run_main("--coco_path", str(synthetic_coco), "--output_dir", str(eval_dir), "--eval", "--resume",
             str(out / "checkpoint.pth"), "--val_scale", "96", "--max_size", "128", "--batch_size", "2",
             "--num_workers", "0", "--device", "cpu", "--save_results")
    evaluated = read_log(eval_dir)[-1]
    assert evaluated["epoch"] == 0
    assert evaluated["test_coco_eval_bbox"] == pytest.approx(logged_ap, abs=1e-9)
    detections = json.loads((eval_dir / "results" / "eval.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])


class RunsCode:
    """Pickles to a call of ``os.system``: loading it with full unpickling would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_checkpoint_that_runs_code(synthetic_coco, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "args": RunsCode(marker)}, evil)
    result = subprocess.run(main_command(*tiny_main_flags(synthetic_coco, tmp_path / "run", "--resume", str(evil))),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert str(evil) in result.stderr and "system" in result.stderr
    assert not marker.exists()


def test_resume_from_a_missing_file_fails_loudly(synthetic_coco, tmp_path):
    missing = tmp_path / "nope.pth"
    result = subprocess.run(main_command(*tiny_main_flags(synthetic_coco, tmp_path / "run", "--resume", str(missing))),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and str(missing) in result.stderr


def test_too_few_classes_for_the_dataset_is_a_clear_error(synthetic_coco, tmp_path):
    result = subprocess.run(main_command(*tiny_main_flags(synthetic_coco, tmp_path / "run", "--num_classes", "5")),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--num_classes 5 is too small" in result.stderr


def infinite_class_loss_weight(model, criterion):
    criterion.weight_dict["loss_ce"] = float("inf")


def nan_class_logits(model, criterion):
    with torch.no_grad():
        model.class_embed.bias.fill_(float("nan"))


@pytest.mark.parametrize("corrupt, message", [
    (infinite_class_loss_weight, r"loss is inf at epoch 3, step 0.*loss_ce"),
    (nan_class_logits, r"predictions are not finite at epoch 3, step 0: .*no earlier step"),
], ids=["loss", "predictions"])
def test_non_finite_loss_or_predictions_stop_before_any_update(corrupt, message):
    """Named with the epoch, step and loss terms; NaN predictions are found by the matcher."""
    model, criterion, _ = build_model(tiny_args("dn_dab_detr", "--use_dn"))
    corrupt(model, criterion)
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 80), torch.randn(3, 80, 64)])
    loader = [(images, random_targets([2, 1]))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.input_proj.weight.clone()
    with pytest.raises(NonFiniteLossError, match=message):
        train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch=3)
    assert torch.equal(model.input_proj.weight, before)  # no update was applied


def test_divergence_stops_at_the_matcher_naming_epoch_step_and_last_terms():
    """--lr 1e6 makes the predictions NaN after one step: the matcher's check stops the run, with the terms
    of the last finite step, instead of an assertion in generalized_box_iou."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args("dn_dab_detr", "--use_dn"))
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 80), torch.randn(3, 80, 64)])
    loader = [(images, random_targets([2, 1], generator=torch.Generator().manual_seed(0)))] * 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e6)
    with pytest.raises(NonFiniteLossError, match=r"not finite at epoch 2, step 1: .*layers \[0, 1, 2\].*"
                                                 r"loss terms of step 0: .*'loss_giou': \d"):
        train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch=2, max_norm=0.1)


def test_amp_training_step_on_cpu_uses_bfloat16():
    model, criterion, _ = build_model(tiny_args("dn_dab_detr", "--use_dn"))
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 80), torch.randn(3, 80, 64)])
    loader = [(images, random_targets([2, 1]))] * 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = model.input_proj.weight.clone()
    stats = train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch=0, amp=True)
    assert stats["loss"] == stats["loss"] and stats["loss"] > 0  # finite
    assert not torch.equal(model.input_proj.weight, before)


def test_pretrained_weights_skip_ignored_keys(synthetic_coco, tmp_path):
    source, _, _ = build_model(tiny_args("dn_dab_detr"))
    path = tmp_path / "pretrained.pth"
    save_checkpoint({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    out = tmp_path / "run"
    run_main(*tiny_main_flags(synthetic_coco, out, "--eval", "--num_classes", "12", "--pretrain_model_path",
                              str(path), "--finetune_ignore", "class_embed", "label_enc"))
    info = (out / "info.txt").read_text()
    assert "dropped 3 entries" in info  # class_embed.{weight,bias} and label_enc.weight (11 vs 12 classes)
    assert "unexpected []" in info


def test_demo_config_trains_and_evaluates(synthetic_coco, tmp_path):
    """configs/synthetic.py, exactly as scripts/demo.sh uses it, for one short epoch."""
    out = tmp_path / "demo"
    run_main("--config", str(ROOT / "configs" / "synthetic.py"), "--coco_path", str(synthetic_coco),
             "--output_dir", str(out), "--epochs", "1", "--debug", "--num_workers", "0")
    config = json.loads((out / "config.json").read_text())
    assert config["modelname"] == "dn_dab_deformable_detr" and config["use_dn"] is True
    (line,) = read_log(out)
    assert len(line["test_coco_eval_bbox"]) == 12 and "train_tgt_loss_bbox" in line
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0


def test_dino_variant_trains_then_eval_resume_and_inference_reproduce_it(synthetic_coco, tmp_path):
    """-m dn_dab_dino_deformable_detr with the reference flags (contrastive DN, two-stage mixed query selection,
    look-forward-twice): one short epoch; --eval --resume (network flags from the checkpoint) gives the logged
    AP and the _enc losses; inference.py runs on the checkpoint."""
    out = tmp_path / "run"
    dino = ["-m", "dn_dab_dino_deformable_detr", "--contrastive", "--two_stage", "--use_mqs", "--use_lft",
            "--transformer_activation", "relu", "--scalar", "100"]
    run_main(*tiny_main_flags(synthetic_coco, out, *dino, "--epochs", "1"))
    (line,) = read_log(out)
    assert {"train_loss_ce_enc", "train_tgt_loss_bbox", "test_loss_bbox_enc"} <= set(line)
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["args"]["two_stage"] and "transformer.tgt_embed.weight" in checkpoint["model"]

    eval_dir = tmp_path / "eval"
    run_main("--coco_path", str(synthetic_coco), "--output_dir", str(eval_dir), "--eval", "--resume",
             str(out / "checkpoint.pth"), "--val_scale", "96", "--max_size", "128", "--batch_size", "2",
             "--num_workers", "0", "--device", "cpu")
    evaluated = read_log(eval_dir)[-1]
    assert evaluated["test_coco_eval_bbox"] == pytest.approx(line["test_coco_eval_bbox"], abs=1e-9)
    assert evaluated["test_loss_ce_enc"] == pytest.approx(line["test_loss_ce_enc"], rel=1e-5)

    image = sorted((synthetic_coco / "val2017").glob("*.jpg"))[0]
    assert inference.main(["--resume", str(out / "checkpoint.pth"), "--images", str(image), "--output_dir",
                           str(tmp_path / "detections"), "--threshold", "0", "--val_scale", "96", "--max_size", "128",
                           "--device", "cpu"]) == 0
    detections = json.loads((tmp_path / "detections" / "detections.json").read_text())
    assert len(detections) == 12 * 12  # untrained enough: all of min(--num_results 300, K * C) scores > 0


def test_checkpoint_interval_zero_keeps_checkpoint_pth_only(synthetic_coco, tmp_path):
    """The demo's setting: no numbered copies, also none at the lr drop."""
    out = tmp_path / "run"
    run_main(*tiny_main_flags(synthetic_coco, out, "--epochs", "1", "--lr_drop", "1",
                              "--save_checkpoint_interval", "0"))
    assert sorted(path.name for path in out.glob("*.pth")) == ["checkpoint.pth"]
