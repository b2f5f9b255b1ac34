"""Resuming main.py after a crash: leftovers of an interrupted checkpoint write are removed."""

from tests.model_utils import tiny_main_flags
from tests.test_training import run_main


def test_leftovers_of_interrupted_checkpoint_writes_are_removed_when_a_run_starts(synthetic_coco, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftovers = [".checkpoint.pth.4242.0123abcd.tmp", ".checkpoint0009.pth.17.ffffffff.tmp"]
    others = ["notes.tmp", ".checkpoint.pth.tmp", ".checkpoint.pth.4242.0123abcd.tmp.bak", "checkpoint.tmp"]
    for name in leftovers + others:
        (out / name).write_bytes(b"partial")
    run_main(*tiny_main_flags(synthetic_coco, out, "--epochs", "0"))
    assert sorted(path.name for path in out.iterdir() if "tmp" in path.name) == sorted(others)
