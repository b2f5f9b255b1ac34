"""scripts/convergence.py: two real (tiny) training runs, with and without denoising, and their summary."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.model_utils import TINY_MODEL_FLAGS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convergence  # noqa: E402

TINY_RUN_FLAGS = ["-m", "dn_dab_detr", *TINY_MODEL_FLAGS, "--train_scales", "64", "80", "--max_size", "128",
                  "--val_scale", "96", "--crop_resize_scales", "64", "80", "--crop_size", "48", "64",
                  "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]


class Run:
    def __init__(self, name, aps):
        self.name, self.aps = name, aps

    def values(self, field):
        return {e: ap if field == "AP" else ap + 0.1 for e, ap in enumerate(self.aps)}


def test_summary_counts_epochs_until_dn_reaches_the_final_baseline_ap():
    summary = convergence.summarize([Run("dn_detr", [0.1, 0.3, 0.5, 0.6]), Run("baseline", [0.0, 0.2, 0.25, 0.3])])
    assert summary["baseline_final_ap"] == 0.3 and summary["dn_final_ap"] == 0.6
    assert summary["dn_epochs_to_baseline_final_ap"] == 2 and summary["epoch_ratio"] == 0.5
    assert "after 2 of 4 epochs (ratio 0.50)" in convergence.markdown(summary)

    never = convergence.summarize([Run("dn_detr", [0.1, 0.2]), Run("baseline", [0.1, 0.4])])
    assert never["dn_epochs_to_baseline_final_ap"] is None and never["epoch_ratio"] is None
    assert "never reaches" in convergence.markdown(never)


def test_two_runs_curves_and_table_then_nothing_is_retrained(synthetic_coco, tmp_path):
    out = tmp_path / "conv"
    command = [sys.executable, str(ROOT / "scripts" / "convergence.py"), "--out", str(out), "--data",
               str(synthetic_coco), "--config", str(ROOT / "configs" / "synthetic.py"), "--epochs", "2",
               "--", *TINY_RUN_FLAGS]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, text=True)

    configs = {name: json.loads((out / name / "config.json").read_text()) for name in ("dn_detr", "baseline")}
    assert configs["dn_detr"]["use_dn"] is True and configs["baseline"]["use_dn"] is False
    for key in ("seed", "modelname", "hidden_dim", "epochs", "lr"):
        assert configs["dn_detr"][key] == configs["baseline"][key]
    logs = {name: (out / name / "log.txt").read_text() for name in configs}
    assert all(len(text.splitlines()) == 2 for text in logs.values())
    assert any("tgt_loss_bbox" in line for line in logs["dn_detr"].splitlines())
    assert not any("tgt_loss_bbox" in line for line in logs["baseline"].splitlines())

    summary = json.loads((out / "convergence.json").read_text())
    assert set(summary["ap"]) == {"dn_detr", "baseline"} and summary["baseline_epochs"] == 2
    final_baseline = json.loads(logs["baseline"].splitlines()[-1])["test_coco_eval_bbox"][0]
    assert summary["baseline_final_ap"] == final_baseline
    assert "| epoch | dn_detr AP | baseline AP |" in (out / "convergence.md").read_text()
    picture = np.asarray(Image.open(out / "convergence.png").convert("L"))
    assert picture.shape[0] > 100 and picture.std() > 0

    rerun = subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert {name: (out / name / "log.txt").read_text() for name in configs} == logs, rerun.stdout
