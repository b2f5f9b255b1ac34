"""scripts/plot_curves.py on log.txt files written in main.py's format (the plot script is under test)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot_curves.py"


def load_script():
    spec = importlib.util.spec_from_file_location("plot_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_curves = load_script()


def epoch_line(epoch: int, ap: float, loss: float) -> dict:
    """One log.txt line as main.py writes it after a training epoch."""
    coco = [ap, ap + 0.2, ap + 0.05] + [ap / 2] * 9
    return {"train_lr": 1e-4, "train_loss": loss, "train_loss_bbox": loss / 10, "train_tgt_loss_bbox": loss / 20,
            "train_class_error": 50.0, "test_loss": loss * 1.1, "test_coco_eval_bbox": coco, "epoch": epoch,
            "n_parameters": 1234, "epoch_time": 3.5}


def write_run(folder: Path, aps, losses) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(epoch_line(e, ap, loss)) for e, (ap, loss) in enumerate(zip(aps, losses))]
    (folder / "log.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def two_runs(tmp_path):
    dn = write_run(tmp_path / "dn_run", [0.101, 0.253, 0.374], [9.0, 7.0, 5.5])
    baseline = write_run(tmp_path / "baseline", [0.052, 0.148], [9.5, 8.0])
    return dn, baseline


def test_plot_has_one_subplot_per_field_at_the_documented_size_and_draws_every_run(two_runs, tmp_path):
    out = tmp_path / "figures" / "curves.png"
    plot_curves.main([str(two_runs[0]), str(two_runs[1] / "log.txt"), "--out", str(out),
                      "--fields", "AP", "AP50", "loss", "tgt_loss_bbox"])
    width, height = plot_curves.SUBPLOT_SIZE_INCHES
    with Image.open(out) as image:  # 4 fields -> 3 columns x 2 rows
        assert image.size == (round(3 * width * plot_curves.DPI), round(2 * height * plot_curves.DPI))
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for run_index in (0, 1):  # each run's line colour appears (its markers are filled with it)
        color = np.array(plot_curves.palette_color(run_index))
        assert (np.abs(pixels.astype(int) - color).sum(axis=1) <= 6).sum() > 50


def test_table_lists_each_runs_ap_per_epoch_in_percent(two_runs, capsys):
    plot_curves.main([str(p) for p in two_runs] + ["--table"])
    table = capsys.readouterr().out
    assert "| epoch | dn_run | baseline |" in table
    assert "| 0 | 10.1 | 5.2 |" in table
    assert "| 1 | 25.3 | 14.8 |" in table
    assert "| 2 | 37.4 | - |" in table  # the baseline has no epoch 2


def test_table_metric_selects_another_coco_number(two_runs, capsys):
    plot_curves.main([str(two_runs[0]), "--table", "--table_metric", "AP50"])
    assert "| 1 | 45.3 |" in capsys.readouterr().out


def test_later_lines_of_an_epoch_win_and_eval_lines_merge(tmp_path):
    folder = write_run(tmp_path / "restarted", [0.1, 0.2], [9.0, 8.0])
    with (folder / "log.txt").open("a") as f:
        f.write(json.dumps(epoch_line(1, 0.3, 7.0)) + "\n")
        f.write(json.dumps({"test_coco_eval_bbox": [0.35] + [0.0] * 11, "epoch": 1, "n_parameters": 1}) + "\n")
    run = plot_curves.load_runs([str(folder)])[0]
    assert run.values("AP") == pytest.approx({0: 0.1, 1: 0.35})
    assert run.values("loss") == pytest.approx({0: 9.0, 1: 7.0})  # train keys kept from the training line


def test_missing_log_is_a_clear_error_naming_the_folder(tmp_path):
    empty_run = tmp_path / "never_trained"
    empty_run.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), str(empty_run), "--table"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode != 0
    assert f"run folder {empty_run} has no log.txt" in result.stderr


def test_log_without_epochs_and_unknown_field_are_clear_errors(two_runs, tmp_path):
    empty_log = tmp_path / "empty" / "log.txt"
    empty_log.parent.mkdir()
    empty_log.write_text("\n")
    with pytest.raises(SystemExit, match=f"{empty_log} has no epoch records"):
        plot_curves.main([str(empty_log), "--table"])
    with pytest.raises(SystemExit, match="--fields no_such_loss: no run logs it.*train_tgt_loss_bbox"):
        plot_curves.main([str(two_runs[0]), "--out", str(tmp_path / "x.png"), "--fields", "AP", "no_such_loss"])
    assert not (tmp_path / "x.png").exists()


def test_broken_line_is_named_but_an_incomplete_last_line_is_ignored(two_runs, tmp_path):
    log = two_runs[0] / "log.txt"
    log.write_text(log.read_text() + '{"epoch": 3, "train_lo')  # a run writing its line right now
    assert plot_curves.load_runs([str(log)])[0].epochs == [0, 1, 2]
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(plot_curves.LogError, match=f"{log}, line 2: not a JSON line"):
        plot_curves.load_runs([str(log)])
