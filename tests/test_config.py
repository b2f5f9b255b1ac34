"""Python config files: inheritance, validation against the real parser, CLI precedence, config.json."""
import json
import os
from pathlib import Path

import pytest

from cli import MAX_DEFAULT_WORKERS, default_num_workers, get_args_parser
from models.registry import MODELS
from util.config import ConfigError, load_config, parse_args, save_config, validate_config

REPO_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_chain(tmp_path):
    """base.py <- mid.py <- sub/child.py (child's _base_ is relative to its own folder)."""
    write(tmp_path / "base.py", "import os\nfrom pathlib import Path\n\n"
                                "def helper():\n    return 1\n\n"
                                "_private = 3\nlr = 2e-4\nepochs = 50\nlr_drop = 40\nbackbone = 'resnet50'\n")
    write(tmp_path / "mid.py", "_base_ = 'base.py'\nepochs = 12\nlr_drop = 11\ndilation = True\n")
    return write(tmp_path / "sub" / "child.py", "_base_ = '../mid.py'\nlr_drop = 10\n"
                                                "train_scales = (480, 512)\nnum_patterns = 3\n")


def test_base_chain_is_inherited_and_overridden(config_chain):
    assert load_config(config_chain) == {
        "lr": 2e-4, "epochs": 12, "lr_drop": 10, "backbone": "resnet50", "dilation": True,
        "train_scales": (480, 512), "num_patterns": 3,
    }


def test_list_of_bases_applies_in_order(tmp_path):
    write(tmp_path / "a.py", "epochs = 1\nlr = 0.1\n")
    write(tmp_path / "b.py", "epochs = 2\n")
    child = write(tmp_path / "c.py", "_base_ = ['a.py', 'b.py']\nseed = 7\n")
    assert load_config(child) == {"epochs": 2, "lr": 0.1, "seed": 7}


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.py", "_base_ = 'nowhere.py'\nepochs = 1\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.py.*child\.py"):
        load_config(child)


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path / "a.py", "_base_ = 'b.py'\n")
    b = write(tmp_path / "b.py", "_base_ = 'a.py'\n")
    with pytest.raises(ConfigError, match="circular _base_ chain"):
        load_config(b)


def test_command_line_overrides_config(config_chain):
    parser = get_args_parser()
    args = parse_args(parser, ["--config", str(config_chain), "--epochs", "3", "--coco_path", "/data/coco"])
    assert args.epochs == 3                      # CLI beats the config
    assert args.lr_drop == 10                    # child beats its base
    assert args.lr == 2e-4 and args.dilation     # inherited from base / mid
    assert args.train_scales == [480, 512]       # tuples become lists, like argparse's own values
    assert args.hidden_dim == 256                # untouched parser default
    assert args.config == str(config_chain)
    assert parser.get_default("lr_drop") == 10   # the config became the defaults


def test_command_line_turns_off_a_switch_the_config_turns_on(config_chain):
    args = parse_args(get_args_parser(), ["--config", str(config_chain), "--no-dilation"])
    assert args.dilation is False
    config = str(Path(__file__).parents[1] / "configs" / "dn_dab_detr_r50.py")
    dn = parse_args(get_args_parser(), ["--config", config])
    baseline = parse_args(get_args_parser(), ["--config", config, "--no-use_dn"])
    assert dn.use_dn is True and baseline.use_dn is False


def test_no_config_is_plain_argparse():
    args = parse_args(get_args_parser(), ["--epochs", "5"])
    assert args.epochs == 5 and args.lr == 1e-4 and args.config is None


@pytest.mark.parametrize("local_world_size", [1, 2, 64])
def test_default_num_workers_shares_the_cpus_of_the_node(monkeypatch, local_world_size):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    cpus = len(os.sched_getaffinity(0))
    expected = max(0, min(MAX_DEFAULT_WORKERS, cpus // local_world_size - 1))
    assert default_num_workers() == expected
    assert get_args_parser().parse_args([]).num_workers == expected


def test_unknown_key_names_file_and_suggests(tmp_path, capsys):
    bad = write(tmp_path / "typo.py", "epochs = 12\nlr_dorp = 11\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(get_args_parser(), ["--config", str(bad)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert str(bad) in message and "'lr_dorp'" in message and "did you mean 'lr_drop'" in message


@pytest.mark.parametrize("line, expected", [
    ("modelname = 'dn_detr'", "must be one of"),
    ("use_dn = 'yes'", "expected True or False"),
    ("epochs = 12.5", "expected int"),
    ("crop_size = [384]", "exactly 2 values"),
    ("train_scales = 800", "takes a list"),
    ("config = 'other.py'", "cannot be set inside a config file"),
])
def test_bad_values_are_rejected(tmp_path, line, expected):
    path = write(tmp_path / "bad.py", line + "\n")
    with pytest.raises(ConfigError, match=expected) as error:
        validate_config(load_config(path), get_args_parser(), path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("config", REPO_CONFIGS, ids=lambda p: p.name)
def test_repository_configs_are_valid(config):
    settings = validate_config(load_config(config), get_args_parser(), config)
    assert settings["modelname"] in MODELS


def test_save_config_writes_sorted_indented_json(tmp_path, config_chain):
    args = parse_args(get_args_parser(), ["--config", str(config_chain), "--output_dir", str(tmp_path / "run")])
    path = tmp_path / "run" / "config.json"
    save_config(args, path)
    text = path.read_text()
    assert json.loads(text) == json.loads(json.dumps(vars(args)))
    keys = [line.split('"')[1] for line in text.splitlines() if line.startswith('  "')]
    assert keys == sorted(vars(args)) and text.startswith('{\n  "')
