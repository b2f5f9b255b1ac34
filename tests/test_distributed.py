"""Distributed setup and collectives with real Gloo process groups of two CPU processes.

This file is also the worker script: ``PYTHONPATH=. python tests/test_distributed.py OUT_DIR`` joins the process
group described by the environment (torchrun or Slurm variables), runs every collective and writes
what it saw to ``OUT_DIR/rank<r>.json``.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from util.distributed import (DEFAULT_MASTER_PORT, all_gather, all_reduce_mean, barrier, first_host_in_nodelist,
                              get_rank, get_world_size, init_distributed_mode, is_main_process, launcher_environment,
                              reduce_dict)
from util.metric_logger import MetricLogger

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                      "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NODELIST", "SLURM_STEP_NODELIST",
                      "SLURM_JOB_NODELIST")


def worker(out_dir: Path) -> None:
    args = argparse.Namespace(device="cpu", dist_url="env://")
    init_distributed_mode(args)
    rank = get_rank()
    gathered = all_gather({"rank": rank, "items": list(range(rank + 1)), "text": f"process {rank}"})
    losses = {"loss_bbox": torch.tensor(float(rank + 1)), "loss_ce": torch.tensor(10.0 * (rank + 1))}
    if rank == 1:  # another insertion order must not mix the values up
        losses = dict(reversed(list(losses.items())))
    averaged = reduce_dict(losses)
    summed = reduce_dict(losses, average=False)
    num_boxes = all_reduce_mean(torch.tensor(4.0 * rank))

    metrics = MetricLogger()
    for _ in range(rank + 1):  # rank 0 logs 1.0; rank 1 logs 2.0, 2.0
        metrics.update(loss=torch.tensor(float(rank + 1)), lr=1e-4)
    local_global_avg = metrics.loss.global_avg
    metrics.synchronize_between_processes()

    print(f"plain print from rank {rank}")
    print(f"forced print from rank {rank}", force=True)
    barrier()
    result = {
        "args": {k: getattr(args, k) for k in ("distributed", "rank", "world_size", "local_rank", "gpu",
                                               "dist_backend", "device")},
        "world_size": get_world_size(), "is_main": is_main_process(), "backend": dist.get_backend(),
        "master_addr": os.environ["MASTER_ADDR"], "gathered": gathered,
        "averaged": {k: v.item() for k, v in averaged.items()}, "summed": {k: v.item() for k, v in summed.items()},
        "num_boxes": num_boxes.item(), "local_loss_avg": local_global_avg, "loss_avg": metrics.loss.global_avg,
        "loss_count": metrics.loss.count, "lr_count": metrics.lr.count,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def check_results(out_dir: Path, backend: str = "gloo") -> list:
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["args"] == {"distributed": True, "rank": rank, "world_size": 2, "local_rank": rank,
                                  "gpu": rank, "dist_backend": backend, "device": "cpu"}
        assert result["world_size"] == 2 and result["is_main"] == (rank == 0) and result["backend"] == backend
        assert result["gathered"] == [{"rank": 0, "items": [0], "text": "process 0"},
                                      {"rank": 1, "items": [0, 1], "text": "process 1"}]
        assert result["averaged"] == {"loss_bbox": 1.5, "loss_ce": 15.0}
        assert result["summed"] == {"loss_bbox": 3.0, "loss_ce": 30.0}
        assert result["num_boxes"] == 2.0
        assert result["local_loss_avg"] == float(rank + 1)
        assert result["loss_avg"] == pytest.approx(5.0 / 3.0) and result["loss_count"] == 3
        assert result["lr_count"] == 3
    return results


def test_torchrun_environment(tmp_path):
    """Launched by the real torchrun: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* come from it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", __file__, str(tmp_path)]
    completed = subprocess.run(command, cwd=REPO, env=clean_environment(), capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    check_results(tmp_path)
    assert "plain print from rank 0" in completed.stdout
    assert "plain print from rank 1" not in completed.stdout  # non-main processes are silenced...
    assert "forced print from rank 1" in completed.stdout     # ...unless force=True


def test_slurm_environment(tmp_path):
    """Two srun-style tasks on one node: rank, size and master address come from the SLURM_* variables."""
    processes = []
    port = free_port()
    for rank in range(2):
        env = clean_environment()
        env.update({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NPROCS": "2",
                    "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)})
        processes.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=180)[0])
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)
    results = check_results(tmp_path)
    assert all(result["master_addr"] == "localhost" for result in results)
    assert "plain print from rank 0" in outputs[0]
    assert "plain print from rank 1" not in outputs[1] and "forced print from rank 1" in outputs[1]


def test_single_process_without_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(device="cpu", dist_url="env://")
    init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (False, 0, 1, 0)
    assert get_world_size() == 1 and get_rank() == 0 and is_main_process()
    assert all_gather({"x": 1}) == [{"x": 1}]
    loss = torch.tensor(2.5, requires_grad=True) * 2
    reduced = reduce_dict({"loss": loss})
    assert reduced["loss"].item() == 5.0 and not reduced["loss"].requires_grad
    assert all_reduce_mean(torch.tensor(3.0)).item() == 3.0


def test_launcher_environment_parsing():
    torchrun = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "node07", "MASTER_PORT": "1234"}
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "5", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[12-13]"}
    assert launcher_environment({**slurm, **torchrun}) == {  # torchrun inside a Slurm job wins
        "launcher": "torchrun", "rank": 9, "world_size": 16, "local_rank": 1, "master_addr": "node07",
        "master_port": 1234}
    layout = launcher_environment(slurm)
    assert layout["launcher"] == "slurm" and (layout["rank"], layout["world_size"], layout["local_rank"]) == (5, 8, 5)
    assert layout["master_port"] == DEFAULT_MASTER_PORT
    assert layout["master_addr"] == "gpu12"
    assert launcher_environment({**slurm, "MASTER_ADDR": "10.0.0.1"})["master_addr"] == "10.0.0.1"
    with_nprocs = {k: v for k, v in slurm.items() if k != "SLURM_NTASKS"} | {"SLURM_NPROCS": "4"}
    assert launcher_environment(with_nprocs)["world_size"] == 4
    assert launcher_environment({}) is None


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"),
    ("node[003-005,007],other", "node003"),
    ("gpu-a100-[09-12]", "gpu-a100-09"),
    ("rack[1-2]-n[07,9]", "rack1-n07"),
    ("login1,compute[2-3]", "login1"),
])
def test_first_host_in_nodelist(nodelist, first):
    assert first_host_in_nodelist(nodelist) == first


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
