"""Resuming main.py after a crash: an epoch trained but not evaluated is evaluated and logged once, and
leftovers of an interrupted checkpoint write are removed."""
import shutil
import subprocess

from tests.model_utils import tiny_main_flags
from tests.test_training import ROOT, main_command, read_log, run_main


def test_epoch_whose_evaluation_failed_is_evaluated_and_logged_on_resume(synthetic_coco, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(synthetic_coco, coco)
    image = sorted((coco / "val2017").glob("*.jpg"))[0]
    original = image.read_bytes()
    image.write_bytes(original[:len(original) // 3])  # truncated: decoding it raises
    out = tmp_path / "run"
    flags = tiny_main_flags(coco, out, "--epochs", "2")
    failed = subprocess.run(main_command(*flags), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and image.name in failed.stderr, failed.stderr[-3000:]
    assert not (out / "log.txt").exists()

    image.write_bytes(original)
    # Also when it was the run's last epoch: --epochs 1 has nothing left to train, but epoch 0 to evaluate.
    resumed = run_main(*tiny_main_flags(coco, out, "--epochs", "1"), "--resume", str(out / "checkpoint.pth"))
    assert "Epoch 0 was trained but not evaluated: evaluating it first" in resumed.stdout + resumed.stderr
    assert [entry["epoch"] for entry in read_log(out)] == [0]
    run_main(*flags, "--resume", str(out / "checkpoint.pth"))
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert all(len(entry["test_coco_eval_bbox"]) == 12 and "train_loss" in entry for entry in log)


def test_leftovers_of_interrupted_checkpoint_writes_are_removed_when_a_run_starts(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftovers = [".checkpoint.pth.4242.0123abcd.tmp", ".checkpoint0009.pth.17.ffffffff.tmp"]
    others = ["notes.tmp", ".checkpoint.pth.tmp", ".checkpoint.pth.4242.0123abcd.tmp.bak", "checkpoint.tmp"]
    for name in leftovers + others:
        (out / name).write_bytes(b"partial")
    run_main(*tiny_main_flags(synthetic_coco, out, "--epochs", "1"))
    assert sorted(path.name for path in out.iterdir() if "tmp" in path.name) == sorted(others)
