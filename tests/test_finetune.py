"""Own data from a checkpoint trained on other classes: --pretrain_model_path re-initialises the class-dependent
tensors, --resume refuses a class-count mismatch, --eval infers the class count of a checkpoint without one;
and fine-tuning on a second synthetic set with other categories beats training it from scratch.

The fine-tuning comparison trains three small models (8.5 minutes on a 2-core CPU shared with another
training): it is marked ``slow`` and runs only with ``RUN_SLOW_TESTS=1`` in the environment. The logs of one run and its AP per epoch
are in docs/results/finetune_vs_scratch.
"""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.synthetic import generate_synthetic_coco
from main import get_args_parser, main
from models import build_model
from tests.model_utils import tiny_args, tiny_main_flags
from tests.test_training import read_log
from util.checkpoint import CheckpointError, load_pretrained_weights, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CLASS_KEYS = {"class_embed.weight", "class_embed.bias", "label_enc.weight"}
PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 10, 4
# Fine-tuned minus from-scratch AP after FINETUNE_EPOCHS (COCO AP as a fraction: 0.01 is one AP point).
MIN_AP_GAIN = 0.01


def save_tiny(path: Path, modelname: str = "dn_dab_detr", *flags: str, record_args: bool = True):
    args = tiny_args(modelname, "--use_dn", *flags)
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "epoch": 0, **({"args": vars(args)} if record_args else {})}, path)
    return model


def test_pretrained_weights_of_another_class_count_keep_the_fresh_class_tensors(tmp_path, caplog):
    torch.manual_seed(0)
    source = save_tiny(tmp_path / "coco.pth", "dn_dab_detr", "--num_classes", "91")
    torch.manual_seed(1)
    model, _, _ = build_model(tiny_args("dn_dab_detr", "--use_dn", "--num_classes", "5"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(model.class_dependent_keys()) == CLASS_KEYS

    with caplog.at_level(logging.INFO):
        load_pretrained_weights(model, tmp_path / "coco.pth", None, logging.getLogger("test"),
                                model.class_dependent_keys())
    (line,) = [r.message for r in caplog.records if "re-initialised" in r.message]
    assert "coco.pth" in line and all(key in line for key in CLASS_KEYS) and "(91, 64)" in line
    for key, value in model.state_dict().items():
        expected = fresh[key] if key in CLASS_KEYS else source.state_dict()[key]
        assert torch.equal(value, expected), key

    # A tensor that differs for another reason than the class count is an error naming file and tensor.
    wide, _, _ = build_model(tiny_args("dn_dab_detr", "--use_dn", "--num_classes", "5", "--dim_feedforward", "64"))
    with pytest.raises(CheckpointError, match=r"coco\.pth.*linear1\.weight \(96, 64\) \(network: \(64, 64\)\)"):
        load_pretrained_weights(wide, tmp_path / "coco.pth", None, logging.getLogger("test"),
                                wide.class_dependent_keys())


def test_resume_with_another_class_count_names_the_file_and_the_tensors(synthetic_coco, tmp_path):
    save_tiny(tmp_path / "coco.pth", "dn_dab_detr", "--num_classes", "91")
    flags = tiny_main_flags(synthetic_coco, tmp_path / "run", "--epochs", "1", "--num_classes", "12",
                            "--resume", str(tmp_path / "coco.pth"))
    with pytest.raises(SystemExit, match=r"coco\.pth: --num_classes 12 does not fit .*label_enc\.weight.*"
                                         r"--pretrain_model_path"):
        main(get_args_parser().parse_args(flags))
    # Without the flag the checkpoint's 91 classes are kept; a network flag that contradicts the recorded one
    # is named with both values, and without recorded args the tensor that does not fit is named.
    flags = tiny_main_flags(synthetic_coco, tmp_path / "run", "--epochs", "1", "--dim_feedforward", "64",
                            "--resume", str(tmp_path / "coco.pth"))
    with pytest.raises(SystemExit, match=r"coco\.pth: --dim_feedforward 64 contradicts the checkpoint, which was "
                                         r"trained with --dim_feedforward 96"):
        main(get_args_parser().parse_args(flags))
    save_tiny(tmp_path / "bare.pth", "dn_dab_detr", "--num_classes", "91", record_args=False)
    flags[flags.index("--resume") + 1] = str(tmp_path / "bare.pth")
    with pytest.raises(SystemExit, match=r"bare\.pth does not fit the network.*linear1\.weight"):
        main(get_args_parser().parse_args(flags))


def test_eval_of_a_checkpoint_without_class_count_on_a_dataset_with_fewer_ids(synthetic_coco, tmp_path):
    """A released checkpoint records no class count (91 COCO logits); the synthetic ids stop at 11."""
    save_tiny(tmp_path / "released.pth", "dn_dab_detr", "--num_classes", "91", record_args=False)
    out = tmp_path / "eval"
    main(get_args_parser().parse_args([
        "--coco_path", str(synthetic_coco), "--output_dir", str(out), "--eval", "--resume", str(tmp_path / "released.pth"),
        "--config", str(ROOT / "configs" / "dn_dab_detr_r50.py"), "--backbone", "resnet18", "--hidden_dim", "64",
        "--dim_feedforward", "96", "--enc_layers", "2", "--dec_layers", "3", "--nheads", "4", "--num_queries", "12",
        "--val_scale", "96", "--max_size", "128", "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]))
    assert f"--num_classes 91 read from {tmp_path / 'released.pth'} (label_enc.weight)" in (out / "info.txt").read_text()
    assert len(read_log(out)[-1]["test_coco_eval_bbox"]) == 12


def train_synthetic(coco_path: Path, output_dir: Path, epochs: int, *flags: str) -> list:
    """AP after each epoch of the demo's config (configs/synthetic.py) trained by main.py in a subprocess."""
    subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs" / "synthetic.py"),
                    "--coco_path", str(coco_path), "--output_dir", str(output_dir), "--epochs", str(epochs),
                    "--seed", "0", "--num_workers", "0", "--device", "cpu", *flags],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return [entry["test_coco_eval_bbox"][0] for entry in read_log(output_dir)]


@pytest.mark.slow
def test_finetuning_on_other_categories_beats_training_from_scratch(tmp_path):
    """Pre-train on the six shapes, then learn three of them as categories 1..3 (other ids, other count):
    starting from the pre-trained weights gives a clearly higher AP after the same few epochs."""
    six_shapes = generate_synthetic_coco(tmp_path / "six_shapes", num_train=200, num_val=40, seed=0)
    three_shapes = generate_synthetic_coco(tmp_path / "three_shapes", num_train=100, num_val=40, seed=1,
                                           shapes="ring,star,cross")
    train_synthetic(six_shapes, tmp_path / "pretrain", PRETRAIN_EPOCHS)
    finetuned = train_synthetic(three_shapes, tmp_path / "finetune", FINETUNE_EPOCHS,
                                "--pretrain_model_path", str(tmp_path / "pretrain" / "checkpoint.pth"))
    scratch = train_synthetic(three_shapes, tmp_path / "scratch", FINETUNE_EPOCHS)

    num_classes = {run: json.loads((tmp_path / run / "config.json").read_text())["num_classes"]
                   for run in ("pretrain", "finetune", "scratch")}
    assert num_classes == {"pretrain": 12, "finetune": 4, "scratch": 4}
    assert len(finetuned) == len(scratch) == FINETUNE_EPOCHS
    assert finetuned[-1] >= scratch[-1] + MIN_AP_GAIN, f"fine-tuned AP {finetuned}, from scratch {scratch}"
