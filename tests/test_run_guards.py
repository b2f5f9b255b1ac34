"""main.py refuses, before any work and with one line naming the file or flag: a run that would replace an
earlier run's checkpoint, nothing left to train, --eval without weights, out-of-range flags and files that are
not checkpoints; weights that do not fit are named briefly."""
import json
import re
import shutil

import pytest

from cli import get_args_parser
from main import main
from models import build_model
from tests.model_utils import tiny_args, tiny_main_flags
from util.checkpoint import checkpoint_state, save_checkpoint
from util.config import parse_args
from util.optim import build_lr_scheduler, build_optimizer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run folder as five epochs of a tiny model leave it: checkpoint.pth (epoch 4), checkpoint0002.pth and
    log.txt (epochs 0..4); next to it weights.pth, the model alone. Read-only: copy it to run into it."""
    args = tiny_args("dn_dab_detr", "--use_dn", "--num_classes", "12")
    model, _, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    folder = tmp_path_factory.mktemp("finished") / "run"
    for epoch, name in ((2, "checkpoint0002.pth"), (4, "checkpoint.pth")):
        save_checkpoint(checkpoint_state(model, optimizer, lr_scheduler, None, epoch, args), folder / name)
    save_checkpoint({"model": model.state_dict()}, folder.parent / "weights.pth")
    (folder / "log.txt").write_text("".join(json.dumps({"epoch": epoch}) + "\n" for epoch in range(5)))
    return folder


def run_main(coco_path, output_dir, *flags):
    main(parse_args(get_args_parser(), tiny_main_flags(coco_path, output_dir, *flags)))


def folder_contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


# A --coco_path that does not exist: a run that gets past the checks fails building the datasets.
def no_data(tmp_path):
    return tmp_path / "no_coco"


@pytest.mark.parametrize("resume", [None, "checkpoint0002.pth"], ids=["new-run", "older-checkpoint"])
def test_training_into_a_folder_with_a_checkpoint_is_refused(finished_run, tmp_path, resume):
    before = folder_contents(finished_run)
    flags = ["--epochs", "6"] + (["--resume", str(finished_run / resume)] if resume else [])
    with pytest.raises(SystemExit) as error:
        run_main(no_data(tmp_path), finished_run, *flags)
    message = str(error.value)
    assert f"already holds {finished_run / 'checkpoint.pth'}" in message and "\n" not in message
    assert f"--resume {finished_run / 'checkpoint.pth'}" in message and "--overwrite_output_dir" in message
    assert folder_contents(finished_run) == before  # not even the log file of this run


def test_resuming_the_folders_checkpoint_or_evaluating_into_it_passes(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(FileNotFoundError, match="no_coco"):
        run_main(no_data(tmp_path), run, "--epochs", "6", "--resume", str(run / "checkpoint.pth"))
    with pytest.raises(FileNotFoundError, match="no_coco"):
        run_main(no_data(tmp_path), run, "--eval", "--resume", str(run / "checkpoint0002.pth"))


def test_overwrite_output_dir_starts_over_with_a_fresh_log(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(FileNotFoundError, match="no_coco"):
        run_main(no_data(tmp_path), run, "--overwrite_output_dir")
    assert not (run / "log.txt").exists() and (run / "checkpoint.pth").exists()


@pytest.mark.parametrize("epochs", ["5", "3"])
def test_epochs_the_resumed_checkpoint_already_finished_are_an_error(finished_run, tmp_path, epochs):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(SystemExit, match=rf"checkpoint\.pth already finished epoch 4 \(5 epochs\), so --epochs "
                                         rf"{epochs} leaves nothing to train: pass --epochs greater than 5"):
        run_main(no_data(tmp_path), run, "--epochs", epochs, "--resume", str(run / "checkpoint.pth"))


def test_a_new_run_of_zero_epochs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--epochs 0 leaves nothing to train"):
        run_main(no_data(tmp_path), tmp_path / "run", "--epochs", "0")


def test_eval_without_weights_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--eval needs trained weights: give --resume .* or --pretrain_model_path"):
        run_main(no_data(tmp_path), tmp_path / "run", "--eval")


@pytest.mark.parametrize("flag, value, minimum", [
    ("--num_queries", "0", 1), ("--batch_size", "0", 1), ("--hidden_dim", "-8", 1), ("--num_workers", "-1", 0),
])
def test_out_of_range_integer_flags_are_named(tmp_path, flag, value, minimum):
    with pytest.raises(SystemExit, match=rf"^{flag} {value}: must be >= {minimum}$"):
        run_main(no_data(tmp_path), tmp_path / "run", flag, value)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"epoch 4\n", "neither a zip archive nor a pickle")],
                         ids=["empty", "text"])
@pytest.mark.parametrize("flag", ["--resume", "--pretrain_model_path"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content, reason, flag):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=rf"^{path} is not a PyTorch checkpoint \({reason}"):
        run_main(no_data(tmp_path), tmp_path / "run", flag, str(path))


@pytest.mark.parametrize("flag", ["--resume", "--pretrain_model_path"])
def test_weights_of_another_width_are_named_in_one_short_line(finished_run, synthetic_coco, tmp_path, flag):
    weights = finished_run.parent / "weights.pth"
    with pytest.raises(SystemExit) as error:
        run_main(synthetic_coco, tmp_path / "run", "--hidden_dim", "32", "--eval", flag, str(weights))
    message = str(error.value)
    assert str(weights) in message and "\n" not in message and len(message) < 600
    assert "in_proj_weight (192, 64) (network: (96, 32))" in message
    assert re.search(r"and \d+ more", message)
