"""scripts/gpu_check.sh: the CUDA check refuses cleanly, at once, on a machine without CUDA (it is run by hand
on a GPU machine; the suite never needs one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would really run")
def test_gpu_check_exits_with_a_clear_message_without_cuda(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2
    assert "no CUDA device is available" in result.stderr and "Nothing was run" in result.stderr
    assert not out.exists()


def test_gpu_check_rejects_unknown_arguments():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
