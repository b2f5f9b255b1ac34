"""Two real processes (torchrun, gloo, CPU) train and evaluate like one process would."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from engine import train_one_epoch
from models import build_model
from models.registry import MODELS
from tests.model_utils import random_targets, tiny_args, tiny_main_flags
from util.checkpoint import load_checkpoint
from util.misc import nested_tensor_from_tensor_list

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_training_reports_the_single_process_evaluation(synthetic_coco, tmp_path):
    out = tmp_path / "ddp"
    # Batch 1 per process, so the evaluated batches (and their padding) match a single-process run.
    flags = tiny_main_flags(synthetic_coco, out, "--epochs", "1", "--batch_size", "1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "main.py"), *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "rank 1/2" in output and "gloo" in output
    # 8 training images, 2 processes x batch 1: 4 steps per process.
    assert "[3/4]" in output
    distributed_ap = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0

    single = tmp_path / "single"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *tiny_main_flags(
        synthetic_coco, single, "--batch_size", "1", "--eval", "--resume", str(out / "checkpoint.pth"))],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    single_ap = json.loads((single / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    assert single_ap == pytest.approx(distributed_ap, abs=1e-9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_ddp_steps_with_one_decoder_layer(rank: int, world_size: int, port: int) -> None:
    """Each model with ``--dec_layers 1`` under DDP (find_unused_parameters off, the default): DDP fails at
    the second step if a parameter took no part in the first."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(rank)
        images = nested_tensor_from_tensor_list([torch.randn(3, 64, 80, generator=generator)] * 2)
        loader = [(images, random_targets([2, 1], generator=generator))] * 2
        for modelname in sorted(MODELS):
            model, criterion, _ = build_model(tiny_args(modelname, "--use_dn", "--dec_layers", "1"))
            ddp_model = DistributedDataParallel(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            stats = train_one_epoch(ddp_model, criterion, loader, optimizer, torch.device("cpu"), epoch=0,
                                    print_freq=100)
            assert stats["optimizer_steps"] == 2, modelname
    finally:
        dist.destroy_process_group()


def test_one_decoder_layer_trains_under_ddp():
    mp.spawn(train_two_ddp_steps_with_one_decoder_layer, args=(2, free_port()), nprocs=2)
