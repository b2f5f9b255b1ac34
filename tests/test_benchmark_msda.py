"""Smoke test of scripts/benchmark_msda.py: tiny shapes, a core and a module case, the previous op and bf16
autocast taking turns with the current one; the JSON report is complete and positive."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_msda_runs_cases_and_variants(tmp_path):
    out = tmp_path / "msda.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark_msda.py", "--image-size", "64", "96", "--queries", "10", "--iters", "1",
         "--warmup", "0", "--threads", "1", "--cases", "core/encoder", "module/decoder", "--reference",
         "--autocast", "bfloat16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["variants"] == ["current", "reference", "current, autocast bfloat16",
                                            "reference, autocast bfloat16"]
    rows = report["results"]
    assert [row["case"] for row in rows] == ["core/encoder"] * 4 + ["module/decoder"] * 4
    for row in rows:
        assert row["fwd_bwd_ms"] > 0 and row["fwd_ms"] > 0 and row["saved_mib"] > 0, row
    assert "(ratios: to the current op of the same case)" in result.stdout
