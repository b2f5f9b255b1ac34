"""Two real processes (torchrun, gloo, CPU) train and evaluate like one process would."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_utils import tiny_main_flags
from util.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_training_reports_the_single_process_evaluation(synthetic_coco, tmp_path):
    out = tmp_path / "ddp"
    # Batch 1 per process, so the evaluated batches (and their padding) match a single-process run.
    flags = tiny_main_flags(synthetic_coco, out, "--epochs", "1", "--batch_size", "1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "main.py"), *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "rank 1/2" in output and "gloo" in output
    # 8 training images, 2 processes x batch 1: 4 steps per process.
    assert "[3/4]" in output
    distributed_ap = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0

    single = tmp_path / "single"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *tiny_main_flags(
        synthetic_coco, single, "--batch_size", "1", "--eval", "--resume", str(out / "checkpoint.pth"))],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    single_ap = json.loads((single / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    assert single_ap == pytest.approx(distributed_ap, abs=1e-9)
