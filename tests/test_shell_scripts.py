"""The user-facing shell scripts: scripts/setup.sh sourced into an interactive shell, scripts/eval_released.sh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_utils import tiny_main_flags

ROOT = Path(__file__).resolve().parents[1]
SHELL_OPTIONS = 'echo "flags=$-"; set -o | grep -E "^(errexit|nounset|pipefail)"'


def bash(script: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_sourcing_setup_leaves_the_shell_options_alone_and_puts_the_venv_on_path():
    result = bash(f"source scripts/setup.sh; {SHELL_OPTIONS}; false; echo alive; command -v python")
    assert result.returncode == 0, result.stderr
    options = dict(line.split() for line in result.stdout.splitlines() if line.split()[0] in
                   ("errexit", "nounset", "pipefail"))
    assert options == {"errexit": "off", "nounset": "off", "pipefail": "off"}
    assert "alive" in result.stdout  # a failing command after sourcing does not end the shell
    assert result.stdout.strip().splitlines()[-1] == str(ROOT / ".venv" / "bin" / "python")


def test_a_failing_setup_returns_an_error_without_closing_the_sourcing_shell(tmp_path):
    result = bash('source scripts/setup.sh; echo "status=$?"; echo alive',
                  env={"VENV": str(tmp_path / "venv"), "PYTHON": "false"})
    assert "status=1" in result.stdout and "alive" in result.stdout
    assert "[setup] failed" in result.stderr


@pytest.fixture(scope="module")
def trained_checkpoint(synthetic_coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    flags = tiny_main_flags(synthetic_coco, out, "--epochs", "1")
    result = subprocess.run([sys.executable, "main.py", *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoint.pth"


def test_eval_released_needs_coco_path(trained_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COCO_PATH"}
    result = subprocess.run(["bash", "scripts/eval_released.sh", "configs/synthetic.py", str(trained_checkpoint)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "set COCO_PATH" in result.stderr


def test_eval_released_runs_outside_the_venv_with_one_image_per_batch(synthetic_coco, trained_checkpoint, tmp_path):
    config = tmp_path / "eval.py"
    config.write_text("val_scale = 96\nmax_size = 128\nnum_workers = 0\ndevice = 'cpu'\n")
    out = tmp_path / "eval"
    env = {"PATH": "/usr/bin:/bin", "COCO_PATH": str(synthetic_coco), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(["bash", "scripts/eval_released.sh", str(config), str(trained_checkpoint), str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    settings = json.loads((out / "config.json").read_text())
    assert settings["batch_size"] == 1 and settings["eval_batch_size"] == 1
    logged = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(logged) == 1 and len(logged[0]["test_coco_eval_bbox"]) == 12
