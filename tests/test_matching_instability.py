"""Matching instability (IS): the measure itself, and the --instability_probe of main.py (logged as train_*
keys, in TensorBoard, exact across a resume, and without any effect on training)."""
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.model_utils import tiny_main_flags
from tests.test_training import main_command, read_log, run_main
from util.checkpoint import load_checkpoint
from util.matching_instability import UNMATCHED, assignment_from_matches, matching_instability


def test_assignment_and_instability_by_hand():
    matches = [(torch.tensor([3, 0]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.int64),) * 2]
    before = assignment_from_matches(matches, num_queries=4)
    assert before.tolist() == [[0, UNMATCHED, UNMATCHED, 1], [UNMATCHED] * 4]
    # Object 1 of image 0 moves from query 3 to query 2: two assignments change.
    after = assignment_from_matches([(torch.tensor([2, 0]), torch.tensor([1, 0])), matches[1]], num_queries=4)
    stats = matching_instability(before, after, num_objects=[2, 0])
    assert stats["matching_instability"] == 1.0  # (2 + 0) / 2 images
    assert stats["matching_instability_per_object"] == 1.0  # 2 changes / 2 objects; the empty image left out
    assert matching_instability(before, before, [2, 0]) == {"matching_instability": 0.0,
                                                            "matching_instability_per_object": 0.0}
    with pytest.raises(ValueError, match="the probe images and --num_queries"):
        matching_instability(before, after[:, :3], [2, 0])


def test_probe_is_logged_survives_a_resume_and_leaves_training_unchanged(synthetic_coco, tmp_path):
    # A high lr so that the matching changes between epochs.
    flags = ("--lr", "5e-3", "--lr_backbone", "5e-3", "--epochs", "2")
    probed, plain, resumed = tmp_path / "probed", tmp_path / "plain", tmp_path / "resumed"
    run_main(*tiny_main_flags(synthetic_coco, probed, *flags, "--instability_probe", "8"))
    run_main(*tiny_main_flags(synthetic_coco, plain, *flags))
    probed_log, plain_log = read_log(probed), read_log(plain)
    for with_probe, without in zip(probed_log, plain_log):
        assert with_probe["train_loss"] == without["train_loss"]
        assert with_probe["test_coco_eval_bbox"] == without["test_coco_eval_bbox"]
        assert {k: v for k, v in with_probe.items() if "instability" not in k and "time" not in k} == \
            {k: v for k, v in without.items() if "time" not in k}
    assert not any("instability" in key for key in plain_log[0])
    instability = [line["train_matching_instability"] for line in probed_log]
    assert all(value >= 0 for value in instability) and sum(instability) > 0
    assert all(line["train_matching_instability_per_object"] >= 0 for line in probed_log)

    events = EventAccumulator(str(probed / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/matching_instability")] == pytest.approx(instability)
    assignment = load_checkpoint(probed / "checkpoint.pth")["matching_probe_assignment"]
    assert assignment.shape == (8, 12) and assignment.dtype == torch.int64

    # Stopped after its first epoch and resumed: the second epoch is measured against the stored matching.
    run_main(*tiny_main_flags(synthetic_coco, resumed, *flags[:-1], "1", "--instability_probe", "8"))
    run_main(*tiny_main_flags(synthetic_coco, resumed, *flags, "--instability_probe", "8", "--resume",
                              str(resumed / "checkpoint.pth")))
    assert [line["train_matching_instability"] for line in read_log(resumed)] == instability


def test_probe_larger_than_the_training_set_is_a_clear_error(synthetic_coco, tmp_path):
    result = subprocess.run(main_command(*tiny_main_flags(synthetic_coco, tmp_path / "run", "--epochs", "1",
                                                          "--instability_probe", "1000")),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--instability_probe 1000 exceeds the 8 training images" in result.stderr
