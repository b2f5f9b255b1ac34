"""Smoke test of scripts/benchmark.py: it runs on tiny models and reports complete, positive numbers.

Only that the script works is checked here; the benchmark itself is run by hand, outside the test suite.
The models run at once, one CPU thread each.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_utils import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
SMOKE_FLAGS = ["--image_size", "64", "96", "--iters", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]
RESULT_KEYS = {"model", "use_dn", "dn_queries", "train_step_ms", "train_step_ms_runs", "inference_ms",
               "inference_ms_runs", "images_per_s", "peak_memory_mib", "peak_memory_exact", "params_total",
               "params_trainable", "gflops_per_image", "compiled_train", "compiled_inference", "compile_error"}


def start_benchmark(out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *flags, *TINY_FLAGS, *SMOKE_FLAGS, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"benchmark failed:\n{stdout}\n{stderr}"
    return stdout


def check_report(report: dict, modelname: str, stdout: str, dn_queries: int = 5 * 7) -> None:
    env, settings, results = report["environment"], report["settings"], report["results"]
    assert {"torch", "device_name", "cpu_count", "torch_threads"} <= set(env)
    assert env["torch_threads"] == 1
    assert settings["model"] == modelname
    assert settings["image_size"] == [64, 96] and settings["batch_size"] == 2 and settings["num_objects"] == 7
    assert settings["amp"] is False and settings["compile"] is False

    assert [row["use_dn"] for row in results] == [False, True]
    off, on = results
    for row in results:
        assert RESULT_KEYS <= set(row)
        assert row["model"] == modelname
        assert (row["compiled_train"], row["compiled_inference"], row["compile_error"]) == (False, False, None)
        assert len(row["train_step_ms_runs"]) == 2 and len(row["inference_ms_runs"]) == 2
        for key in ("train_step_ms", "inference_ms", "images_per_s", "peak_memory_mib", "gflops_per_image"):
            assert row[key] > 0, f"{modelname}, use_dn={row['use_dn']}: {key} = {row[key]}"
        assert 0 < row["params_trainable"] < row["params_total"]  # the stem and layer1 of the ResNet are frozen
        assert row["images_per_s"] == 2 / (row["inference_ms"] / 1e3)
    # Denoising adds no weights and does not change inference: only the training step differs.
    assert on["params_total"] == off["params_total"]
    assert on["gflops_per_image"] == off["gflops_per_image"]
    assert (off["dn_queries"], on["dn_queries"]) == (0, dn_queries)

    ratio = report["dn_overhead"]["train_step_ratio"]
    assert ratio == on["train_step_ms"] / off["train_step_ms"] > 0
    assert f"DN overhead (median train step with DN / without): {ratio:.3f}x" in stdout
    assert "grid_sample" in stdout  # the FLOP counter's blind spot is stated
    table_rows = [line for line in stdout.splitlines() if line.startswith(f"| {modelname} |")]
    assert len(table_rows) == 2 and f"{ratio:.3f}x" in table_rows[1]


def test_benchmark_runs_on_tiny_models(tmp_path):
    detr_out, deformable_out = tmp_path / "detr.json", tmp_path / "deformable.json"
    # dn_dab_detr through a config file (its use_dn = True does not stop --dn both); the deformable model
    # through -m, with the profiler on.
    detr = start_benchmark(detr_out, "--config", str(ROOT / "configs" / "dn_dab_detr_r50.py"))
    deformable = start_benchmark(deformable_out, "-m", "dn_dab_deformable_detr", "--transformer_activation", "relu",
                                 "--profile", "--profile_steps", "1", "--profile_rows", "5")
    dino_out = tmp_path / "dino.json"
    dino = start_benchmark(dino_out, "--config", str(ROOT / "configs" / "dn_dab_dino_deformable_detr_r50.py"))
    compared_out = tmp_path / "compared.json"
    compared = start_benchmark(compared_out, "-m", "dn_dab_detr", "--dn", "on",
                               "--compare", "--checkpoint_encoder --checkpoint_backbone")
    detr_stdout, deformable_stdout, dino_stdout = finish(detr), finish(deformable), finish(dino)
    compared_stdout = finish(compared)

    detr_report = json.loads(detr_out.read_text())
    check_report(detr_report, "dn_dab_detr", detr_stdout)
    assert detr_report["settings"]["config"].endswith("dn_dab_detr_r50.py")
    assert detr_report["settings"]["backbone"] == "resnet18"  # the command line overrides the config
    assert "profile" not in detr_report["results"][0]

    deformable_report = json.loads(deformable_out.read_text())
    check_report(deformable_report, "dn_dab_deformable_detr", deformable_stdout)
    for row in deformable_report["results"]:
        profile = row["profile"]
        assert profile["steps"] == 1 and len(profile["top_ops"]["self_cpu_time_total"]) == 5
        assert set(profile["phase_cpu_ms_per_step"]) == {"forward", "criterion", "backward", "optimizer"}
        assert all(ms > 0 for ms in profile["phase_cpu_ms_per_step"].values())
    assert deformable_stdout.count("top 5 ops by self CPU time") == 2

    # The DINO-style variant (contrastive DN, two-stage): a positive and a negative query per object and group.
    dino_report = json.loads(dino_out.read_text())
    check_report(dino_report, "dn_dab_dino_deformable_detr", dino_stdout, dn_queries=5 * 2 * 7)
    assert dino_report["args"]["contrastive"] and dino_report["args"]["two_stage"]

    # --compare: the plain and the checkpointed version of the same setting, and their ratios.
    compared_report = json.loads(compared_out.read_text())
    plain, checkpointed = compared_report["results"]
    flags = "--checkpoint_encoder --checkpoint_backbone"
    assert (plain["compared_flags"], checkpointed["compared_flags"]) == (None, flags)
    assert plain["use_dn"] and checkpointed["use_dn"]
    assert plain["params_total"] == checkpointed["params_total"]
    [ratio] = compared_report["comparisons"]
    assert ratio["train_step_ratio"] == checkpointed["train_step_ms"] / plain["train_step_ms"]
    assert ratio["peak_memory_ratio"] == checkpointed["peak_memory_mib"] / plain["peak_memory_mib"]
    assert ratio["images_per_s_ratio"] == checkpointed["images_per_s"] / plain["images_per_s"]
    assert f"| dn_dab_detr [{flags}] | on (35 DN queries) |" in compared_stdout
    assert f"[{flags}] / plain, DN on: train step {ratio['train_step_ratio']:.3f}x" in compared_stdout


def test_benchmark_rejects_bad_settings(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["-m", "dn_dab_detr", "--iters", "0"])
    assert exit_info.value.code == 2
    assert "--iters must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["-m", "dn_dab_detr", "--compare", "--batch_size 4"])
    assert exit_info.value.code == 2
    assert "--compare '--batch_size 4' changes --batch_size" in capsys.readouterr().err
