"""scripts/convergence.py and scripts/ablate.py: real (tiny) seeded training runs, their records, summaries,
tables and figures, and resumption from the records alone."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.model_utils import TINY_MODEL_FLAGS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import ablate  # noqa: E402
import convergence  # noqa: E402
import experiment  # noqa: E402

TINY_RUN_FLAGS = ["-m", "dn_dab_detr", *TINY_MODEL_FLAGS, "--train_scales", "64", "80", "--max_size", "128",
                  "--val_scale", "96", "--crop_resize_scales", "64", "80", "--crop_size", "48", "64",
                  "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--instability_probe", "4"]


def curve(*runs):
    """An arm's curves as experiment.arm_curves gives them, from per-run AP lists (IS: 1 - AP)."""
    arm = {"epochs": list(range(len(runs[0])))}
    for field, transform in (("AP", lambda v: v), ("AP50", lambda v: v), ("matching_instability", lambda v: 1 - v),
                             ("matching_instability_per_object", lambda v: (1 - v) / 2)):
        values = [[transform(v) for v in run] for run in runs]
        columns = list(zip(*values))
        arm[field] = {"runs": values, "mean": [float(np.mean(c)) for c in columns],
                      "std": [float(np.std(c, ddof=1)) if len(c) > 1 else 0.0 for c in columns]}
    return arm


def test_summary_judges_means_over_seeds():
    curves = {"baseline_full": curve([0.0, 0.1, 0.2, 0.3], [0.0, 0.1, 0.2, 0.31], [0.0, 0.1, 0.2, 0.29]),
              "dn_full": curve([0.1, 0.3, 0.5, 0.6], [0.1, 0.3, 0.5, 0.62], [0.1, 0.3, 0.5, 0.58]),
              "dn_half": curve([0.1, 0.31], [0.1, 0.29], [0.1, 0.30])}
    summary = convergence.summarize(curves, epochs=4)
    assert summary["final_ap"]["baseline_full"]["mean"] == pytest.approx(0.3)
    assert summary["final_ap"]["baseline_full"]["std"] == pytest.approx(0.01)
    assert summary["dn_full_epochs_to_baseline_final_ap"] == 2 and summary["epoch_ratio"] == 0.5
    assert summary["dn_full_vs_baseline_full"]["exceeds_seed_spread"] is True
    half = summary["dn_half_vs_baseline_full"]
    assert half["difference"] == pytest.approx(0.0) and half["exceeds_seed_spread"] is False
    instability = summary["instability"]
    assert instability["early_epochs"] == 1
    assert instability["matching_instability"]["dn_full"]["early_epochs"] == pytest.approx(0.9)
    assert instability["matching_instability"]["epochs_dn_below_baseline"] == 4
    text = convergence.markdown(summary, curves)
    assert "after 2 of 4 epochs (ratio 0.50)" in text and "within the seed spread" in text
    assert "| dn_half | 2 | 3 | 30.0 ± 1.0 | 31.0, 29.0, 30.0 |" in text

    never = convergence.summarize({"baseline_full": curve([0.1, 0.4]), "dn_full": curve([0.1, 0.2])}, epochs=2)
    assert never["dn_full_epochs_to_baseline_final_ap"] is None
    assert never["dn_full_vs_baseline_full"]["p_value"] is None  # one seed: no test
    assert "never reaches" in convergence.markdown(never, {"baseline_full": curve([0.1, 0.4]),
                                                           "dn_full": curve([0.1, 0.2])})


def test_arm_specs_half_schedule_and_seed_order():
    specs = convergence.arm_specs(["baseline_full", "dn_half"], 20, [0, 1])
    assert [(s.key, s.epochs, s.lr_drop) for s in specs] == [
        ("baseline_full_seed0", 20, 16), ("dn_half_seed0", 10, 8), ("baseline_full_seed1", 20, 16),
        ("dn_half_seed1", 10, 8)]
    assert specs[0].flags == ("--no-use_dn",) and specs[1].flags == ("--use_dn",)


def run_script(name, *arguments, cwd):
    command = [sys.executable, str(ROOT / "scripts" / name), *arguments]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def convergence_run(synthetic_coco, tmp_path_factory):
    """scripts/convergence.py on tiny settings: 3 arms x 2 seeds, 2 epochs (the half schedule: 1)."""
    root = tmp_path_factory.mktemp("convergence")
    out, results = root / "work", root / "results"
    arguments = ["--out", str(out), "--results", str(results), "--data", str(synthetic_coco), "--config",
                 str(ROOT / "configs" / "synthetic.py"), "--epochs", "2", "--seeds", "0", "1", "--", *TINY_RUN_FLAGS]
    run_script("convergence.py", *arguments, cwd=root)
    return root, out, results, arguments


def test_convergence_three_arms_two_seeds_then_resumed_from_records_alone(convergence_run, synthetic_coco):
    root, out, results, arguments = convergence_run
    runs = {p.name: p for p in (results / "runs").iterdir()}
    assert set(runs) == {f"{arm}_seed{s}" for arm in convergence.ARMS for s in (0, 1)}
    for key, record in runs.items():
        settings = json.loads((record / "run.json").read_text())
        lines = [json.loads(line) for line in (record / "log.txt").read_text().splitlines()]
        assert len(lines) == settings["epochs"] == (1 if key.startswith("dn_half") else 2)
        assert settings["lr_drop"] == (1 if key.startswith("dn_half") else 2) and settings["seed"] == int(key[-1])
        assert settings["data"] == {"folder": str(Path(synthetic_coco).resolve())}
        assert all("train_matching_instability" in line and "train_matching_instability_per_object" in line
                   for line in lines)
        assert all(("train_tgt_loss_bbox" in line) == key.startswith("dn_") for line in lines)
    configs = {s: json.loads((out / f"dn_full_seed{s}" / "config.json").read_text()) for s in (0, 1)}
    assert configs[0]["seed"] == 0 and configs[1]["seed"] == 1 and configs[0]["instability_probe"] == 4

    merged = json.loads((results / "epochs.json").read_text())["arms"]
    assert merged["dn_half"]["epochs"] == [0] and merged["baseline_full"]["epochs"] == [0, 1]
    first_log = [json.loads(line) for line in (runs["baseline_full_seed0"] / "log.txt").read_text().splitlines()]
    assert merged["baseline_full"]["AP"]["runs"][0] == [line["test_coco_eval_bbox"][0] for line in first_log]
    assert merged["baseline_full"]["matching_instability"]["runs"][0] == [
        line["train_matching_instability"] for line in first_log]
    ap_runs = np.array(merged["dn_full"]["AP"]["runs"])
    assert merged["dn_full"]["AP"]["mean"] == pytest.approx(ap_runs.mean(0).tolist())
    assert merged["dn_full"]["AP"]["std"] == pytest.approx(ap_runs.std(0, ddof=1).tolist())

    summary = json.loads((results / "summary.json").read_text())
    assert summary["seeds"] == {arm: 2 for arm in convergence.ARMS} and summary["full_epochs"] == 2
    assert summary["final_ap"]["dn_half"]["runs"] == [run[-1] for run in merged["dn_half"]["AP"]["runs"]]
    assert {"dn_full_vs_baseline_full", "dn_half_vs_baseline_full", "epoch_ratio"} <= set(summary)
    assert summary["instability"]["matching_instability"]["dn_full"]["all_epochs"] >= 0
    assert "| baseline_full | 2 | 2 |" in (results / "convergence.md").read_text()
    picture = np.asarray(Image.open(results / "convergence.png").convert("L"))
    assert picture.shape[0] > 100 and picture.std() > 0

    # A later session without the checkpoints: the records alone make every run finished.
    work_copy = root / "work_copy"
    shutil.copytree(out, work_copy)
    shutil.rmtree(out)
    try:
        rerun = run_script("convergence.py", *arguments, cwd=root)
        assert rerun.stdout.count("not retrained") == 6 and not (out / "dn_full_seed0").exists()
        assert json.loads((results / "summary.json").read_text()) == summary
    finally:
        shutil.rmtree(out, ignore_errors=True)
        work_copy.rename(out)

    # A record made with other settings is never mixed in.
    changed = [*arguments[:-len(TINY_RUN_FLAGS)], *TINY_RUN_FLAGS[:-1], "5"]
    failed = subprocess.run([sys.executable, str(ROOT / "scripts" / "convergence.py"), *changed], cwd=root,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "with other settings" in failed.stderr

    plotted = root / "replot.png"
    run_script("plot_curves.py", "--merged", str(results / "epochs.json"), "--out", str(plotted), "--fields", "AP",
               "matching_instability", cwd=root)
    assert np.asarray(Image.open(plotted).convert("L")).std() > 0


def test_ablate_reuses_recorded_runs_and_resumes_an_interrupted_one(convergence_run, synthetic_coco, tmp_path):
    _, out, convergence_results, _ = convergence_run
    results = tmp_path / "ablation"
    arguments = ["--out", str(out), "--results", str(results), "--runs", str(convergence_results / "runs"),
                 "--data", str(synthetic_coco), "--config", str(ROOT / "configs" / "synthetic.py"), "--epochs", "1",
                 "--seeds", "0", "1", "--only", "dn_half", "no_attn_mask_half", "--", *TINY_RUN_FLAGS]
    first = run_script("ablate.py", *arguments, cwd=tmp_path)
    # The half-schedule DN runs of the convergence experiment are the ablation's full-DN variant.
    assert "dn_half_seed0: finished" in first.stdout and "dn_half_seed1: finished" in first.stdout
    assert json.loads((out / "no_attn_mask_half_seed1" / "config.json").read_text())["dn_attn_mask"] is False
    ablation = json.loads((results / "ablation.json").read_text())
    assert [row["variant"] for row in ablation["rows"]] == ["dn_half", "no_attn_mask_half"]
    assert ablation["rows"][1]["seeds"] == 2 and ablation["rows"][1]["flags"] == "--use_dn --no-dn_attn_mask"
    assert ablation["rows"][1]["final_ap_minus_first_variant"] == pytest.approx(
        ablation["rows"][1]["final_ap_mean"] - ablation["rows"][0]["final_ap_mean"])
    assert "| no_attn_mask_half | `--use_dn --no-dn_attn_mask` | 2 |" in (results / "ablation.md").read_text()
    assert np.asarray(Image.open(results / "ablation.png").convert("L")).std() > 0

    # Interrupted after training its epoch, before the evaluation (no record, no log line): resumed, evaluated once.
    interrupted = out / "no_attn_mask_half_seed1"
    shutil.rmtree(convergence_results / "runs" / interrupted.name)
    (interrupted / "log.txt").write_text("")
    second = run_script("ablate.py", *arguments, cwd=tmp_path)
    assert f"--resume {interrupted / 'checkpoint.pth'}" in second.stdout
    assert [json.loads(line)["epoch"] for line in (interrupted / "log.txt").read_text().splitlines()] == [0]
    assert json.loads((results / "ablation.json").read_text()) == ablation
def test_ablate_rejects_an_unknown_variant(tmp_path):
    failed = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablate.py"), "--only", "no_such"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "no_such" in failed.stderr and "dn_half" in failed.stderr


def test_ablate_variants_are_name_equals_flags():
    args = ablate.get_parser().parse_args(["--variant", "dn=--use_dn", "--variant", "bf16=--use_dn --amp"])
    assert ablate.chosen_variants(args) == {"dn": ("--use_dn",), "bf16": ("--use_dn", "--amp")}
    assert list(ablate.chosen_variants(ablate.get_parser().parse_args([]))) == list(ablate.DEFAULT_VARIANTS)
    with pytest.raises(SystemExit):
        ablate.get_parser().parse_args(["--variant", "--use_dn"])


def test_generated_data_settings_are_part_of_a_run_record(tmp_path):
    """A record made on other generated data (here: without class colours) is not reused."""
    parser = convergence.get_parser()
    flags = ["--out", str(tmp_path), "--num_train", "2", "--num_val", "1"]
    coloured = experiment.prepare_experiment(parser.parse_args(flags), [], tmp_path / "runs")
    assert coloured.dataset == {"synthetic": {"num_train": 2, "num_val": 1, "seed": 0, "preset": "easy",
                                              "class_colours": True}}
    spec = experiment.RunSpec("dn_full", ("--use_dn",), 1, 1, 0)
    record = tmp_path / "runs" / spec.key
    record.mkdir(parents=True)
    (record / "run.json").write_text(json.dumps(experiment.run_settings(spec, coloured)))
    (record / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 1.0}) + "\n")
    assert experiment.recorded_run(spec, coloured) == record
    uncoloured = experiment.prepare_experiment(parser.parse_args([*flags, "--no-class_colours"]), [], tmp_path)
    assert uncoloured.data != coloured.data and uncoloured.dataset["synthetic"]["class_colours"] is False
    assert (uncoloured.data / "annotations" / "instances_train2017.json").exists()
    plain = experiment.Experiment(coloured.flags, coloured.data, {"synthetic": {
        **coloured.dataset["synthetic"], "class_colours": False}}, tmp_path, tmp_path / "runs")
    with pytest.raises(experiment.ExperimentError, match="with other settings"):
        experiment.recorded_run(spec, plain)


def test_an_unfinished_run_is_resumed_only_with_the_settings_it_started_with(tmp_path):
    """A half-trained run's folder (a checkpoint, no record) made on other data is refused, not resumed."""
    flags = ["--out", str(tmp_path), "--num_train", "2", "--num_val", "1"]
    coloured = experiment.prepare_experiment(convergence.get_parser().parse_args(flags), [], tmp_path / "runs")
    uncoloured = experiment.prepare_experiment(convergence.get_parser().parse_args([*flags, "--no-class_colours"]),
                                               [], tmp_path / "runs")
    spec = experiment.RunSpec("dn_full", ("--use_dn",), 2, 1, 0)
    run_dir = tmp_path / spec.key
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").write_bytes(b"")
    (run_dir / "run.json").write_text(json.dumps(experiment.run_settings(spec, coloured)))
    with pytest.raises(experiment.ExperimentError, match="unfinished run dn_full_seed0 started with other settings"):
        experiment.ensure_run(spec, uncoloured)
    (run_dir / "run.json").unlink()  # a folder that does not say how its run began is not guessed at either
    with pytest.raises(experiment.ExperimentError, match="not recorded"):
        experiment.ensure_run(spec, coloured)


def test_comparison_text_never_prints_p_as_zero():
    significant = {"difference": -0.2, "p_value": 4e-7, "exceeds_seed_spread": True}
    assert convergence.comparison_text("half", significant) == (
        "half: -20.0 AP, p < 0.001; exceeds the seed spread (Welch p < 0.05).")
    close = {"difference": 0.03, "p_value": 0.141, "exceeds_seed_spread": False}
    assert convergence.comparison_text("full", close) == "full: +3.0 AP, p = 0.141; within the seed spread (Welch p >= 0.05)."
