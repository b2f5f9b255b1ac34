"""Given flags vs parser defaults against a checkpoint's recorded network; user errors end with their message."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import inference
from cli import exit_on_user_errors, get_args_parser
from main import main
from models import build_model
from models.builder import adopt_state_dict_flags
from tests.model_utils import TINY_MODEL_FLAGS, tiny_args, tiny_main_flags
from util.checkpoint import CheckpointError, adopt_checkpoint_model_args, save_checkpoint
from util.config import given_flags, parse_args

ROOT = Path(__file__).resolve().parents[1]
DEFORMABLE = "dn_dab_deformable_detr"


@pytest.fixture(scope="module")
def deformable_checkpoint(tmp_path_factory):
    """An untrained tiny dn_dab_deformable_detr checkpoint that records its args."""
    args = tiny_args(DEFORMABLE, "--num_classes", "12")
    model, _, _ = build_model(args)
    path = tmp_path_factory.mktemp("deformable") / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(args), "epoch": 0}, path)
    return path


def test_parse_args_records_the_flags_of_the_command_line_and_the_config(tmp_path):
    config = tmp_path / "run.py"
    config.write_text("lr_drop = 10\n")
    args = parse_args(get_args_parser(), ["--config", str(config), "-m", "dn_dab_detr", "--epochs", "50"])
    # Values equal to the parser default count as given when they were given.
    assert given_flags(args, get_args_parser()) == {"lr_drop", "modelname", "epochs"}
    assert given_flags(parse_args(get_args_parser(), []), get_args_parser()) == set()


def test_given_flag_equal_to_the_default_is_not_replaced_by_the_checkpoint(deformable_checkpoint, synthetic_coco,
                                                                           tmp_path):
    args = parse_args(get_args_parser(), tiny_main_flags(synthetic_coco, tmp_path / "run", "--epochs", "1",
                                                         "--resume", str(deformable_checkpoint)))
    with pytest.raises(SystemExit, match=rf"{deformable_checkpoint}: --modelname 'dn_dab_detr' contradicts the "
                                         rf"checkpoint, which was trained with --modelname '{DEFORMABLE}'"):
        main(args)
    assert not (tmp_path / "run" / "config.json").exists()


def test_inference_refuses_a_given_model_the_checkpoint_does_not_hold(deformable_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=rf"--modelname 'dn_dab_detr' contradicts .*'{DEFORMABLE}'"):
        inference.main(["-m", "dn_dab_detr", "--resume", str(deformable_checkpoint), "--images", "x.jpg",
                        "--output_dir", str(tmp_path / "out"), "--device", "cpu"])


def test_defaults_are_taken_from_the_checkpoint_and_said_so(deformable_checkpoint, caplog):
    args = parse_args(get_args_parser(), ["--resume", str(deformable_checkpoint), "--val_scale", "800"])
    recorded = {"modelname": DEFORMABLE, "hidden_dim": 64, "val_scale": 96}
    with caplog.at_level(logging.INFO):
        adopt_checkpoint_model_args(args, recorded, get_args_parser(), "old.pth", logging.getLogger("test"))
    assert (args.modelname, args.hidden_dim) == (DEFORMABLE, 64)
    assert args.val_scale == 800  # given; an image size may differ from the training run's
    assert "--modelname 'dn_dab_deformable_detr' taken from the checkpoint old.pth (the default is 'dn_dab_detr')" \
        in caplog.text


def test_given_flag_equal_to_the_default_must_fit_the_state_dict():
    args = tiny_args("dn_dab_detr", "--num_patterns", "3")
    model, _, _ = build_model(args)
    explicit = parse_args(get_args_parser(), ["-m", "dn_dab_detr", *TINY_MODEL_FLAGS, "--num_patterns", "0"])
    with pytest.raises(CheckpointError, match=r"ckpt\.pth: --num_patterns 0 does not fit the checkpoint"):
        adopt_state_dict_flags(explicit, model.state_dict(), get_args_parser(), "ckpt.pth")
    implicit = parse_args(get_args_parser(), ["-m", "dn_dab_detr", *TINY_MODEL_FLAGS])
    adopt_state_dict_flags(implicit, model.state_dict(), get_args_parser(), "ckpt.pth")
    assert implicit.num_patterns == 3


def run_script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_missing_checkpoint_is_the_message_alone(tmp_path):
    missing = tmp_path / "nope.pth"
    result = run_script("main.py", "--eval", "--resume", str(missing), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"main.py: error: checkpoint {missing} does not exist"


def test_a_config_that_fails_to_run_is_a_usage_error_naming_it(tmp_path, capsys):
    config = tmp_path / "broken.py"
    config.write_text("epochs = 1 +\n")
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--config", str(config)])
    assert f"config file {config} failed to run: SyntaxError" in capsys.readouterr().err


def test_a_missing_data_folder_is_the_message_alone(tmp_path):
    result = run_script("main.py", *tiny_main_flags(tmp_path / "no_coco", tmp_path / "run", "--epochs", "1"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"main.py: error: --coco_path {tmp_path / 'no_coco'} is not a folder: expected " \
                                    "a COCO-format folder with train2017/, val2017/ and annotations/instances_{train," \
                                    "val}2017.json"


def test_user_errors_exit_with_the_message_and_others_keep_their_traceback():
    with pytest.raises(SystemExit, match=r"^prog: error: checkpoint x\.pth does not exist$"):
        with exit_on_user_errors("prog"):
            raise FileNotFoundError("checkpoint x.pth does not exist")
    with pytest.raises(KeyError):
        with exit_on_user_errors("prog"):
            raise KeyError("a bug")


def test_flag_prefixes_are_not_taken_for_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--epoch", "3"])
    assert "unrecognized arguments: --epoch 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--conf", "x.py"])
    assert "unrecognized arguments: --conf x.py" in capsys.readouterr().err
