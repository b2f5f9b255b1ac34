"""Pre-emption: a signal stops training at a step boundary with a checkpoint that resumes exactly there; the
Slurm script passes the signal on and requeues; distributed processes agree on the step to stop at."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.model_utils import tiny_main_flags
from tests.process_utils import run_forked
from tests.test_training import read_log, run_main, start_main
from util.checkpoint import load_checkpoint
from util.preemption import StopOnSignal

ROOT = Path(__file__).resolve().parents[1]


def read_until(process, text, timeout=240):
    """The output of ``process`` up to and including the first line containing ``text``."""
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"the process ended before printing {text!r}:\n{''.join(lines[-30:])}")
        lines.append(line)
        if text in line:
            return "".join(lines)
    process.kill()
    pytest.fail(f"no {text!r} within {timeout} s")


def test_signal_stops_inside_an_epoch_and_the_resumed_run_ends_with_the_uninterrupted_weights(synthetic_coco,
                                                                                             tmp_path):
    def flags(out):
        return tiny_main_flags(synthetic_coco, out, "--epochs", "1")

    process = start_main(*flags(tmp_path / "run"))
    read_until(process, "Epoch: [0]")  # the first of the epoch's 4 training steps is done
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    progress = checkpoint["epoch_in_progress"]
    assert checkpoint["epoch"] == -1 and progress["epoch"] == 0 and 1 <= progress["step"] < 4
    assert f"Stopped by SIGUSR1 in epoch 0 after batch {progress['step']}/4" in output
    assert progress["train_stats"]["optimizer_steps"] == progress["step"]
    assert not (tmp_path / "run" / "log.txt").exists()  # the epoch is not over

    resumed = run_main(*flags(tmp_path / "run"), "--resume", str(tmp_path / "run" / "checkpoint.pth"))
    assert f"Resuming epoch 0 at batch {progress['step']}/4" in resumed.stdout + resumed.stderr
    run_main(*flags(tmp_path / "reference"))
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    reference = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert final["epoch"] == reference["epoch"] == 0 and "epoch_in_progress" not in final
    for name, weight in reference["model"].items():
        assert torch.equal(final["model"][name], weight), name
    (line,) = read_log(tmp_path / "run")
    (reference_line,) = read_log(tmp_path / "reference")
    assert line["train_optimizer_steps"] == 4
    for name in ("train_loss", "train_loss_bbox", "train_tgt_loss_ce", "train_lr"):
        assert line[name] == pytest.approx(reference_line[name], rel=1e-6), name
    assert line["test_coco_eval_bbox"] == reference_line["test_coco_eval_bbox"]


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_slurm_script_passes_the_signal_on_requeues_and_the_requeued_job_resumes(synthetic_coco, tmp_path):
    """scripts/slurm_train.sh as sbatch runs it: a copy in a spool folder, started in another folder, with
    ``srun`` and ``scontrol`` replaced by small stand-ins (``srun`` runs its command, ``scontrol`` records)."""
    bin_dir, spool, work = tmp_path / "bin", tmp_path / "spool", tmp_path / "work"
    for folder in (bin_dir, spool, work):
        folder.mkdir()
    calls = tmp_path / "scontrol_calls"
    write_executable(bin_dir / "srun", '#!/bin/sh\nexec "$@"\n')
    write_executable(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    write_executable(bin_dir / "scontrol", f'#!/bin/sh\necho "$@" >> "{calls}"\n'
                     f'[ "$1" = show ] && echo "   Command={ROOT / "scripts" / "slurm_train.sh"} config out"\n'
                     'exit 0\n')
    script = spool / "slurm_script"
    shutil.copy(ROOT / "scripts" / "slurm_train.sh", script)
    config = tmp_path / "tiny.py"
    config.write_text("epochs = 1\n")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "COCO_PATH": str(synthetic_coco), "PYTHONUNBUFFERED": "1"}
    command = ["bash", str(script), str(config), str(out), *tiny_main_flags(synthetic_coco, out)]
    job = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    read_until(job, "Epoch: [0]")
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
    output = job.communicate(timeout=240)[0]
    assert job.returncode == 0, output[-3000:]
    assert "Stopped by SIGUSR1 in epoch 0" in output
    assert calls.read_text().splitlines()[-1] == "requeue 4242"
    step = load_checkpoint(out / "checkpoint.pth")["epoch_in_progress"]["step"]

    requeued = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                              timeout=240)
    assert requeued.returncode == 0, (requeued.stdout + requeued.stderr)[-3000:]
    assert f"--resume {out / 'checkpoint.pth'}" in requeued.stdout + requeued.stderr
    assert f"Resuming epoch 0 at batch {step}/4" in requeued.stdout + requeued.stderr
    assert calls.read_text().count("requeue") == 1  # a run that was not signalled is not requeued


def _agree(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        stop = StopOnSignal("USR1", check_every=3)
        answers = []
        for call in range(7):
            if rank == 1 and call == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            answers.append(stop())
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"answers": answers, "received": stop.received}, f)
    finally:
        dist.destroy_process_group()


def test_processes_agree_on_the_step_to_stop_at(tmp_path):
    """Only process 1 receives the signal (before its 4th call); both stop at the 6th call, the next agreement."""
    run_forked(_agree, 2, (str(tmp_path / "rendezvous"), str(tmp_path)))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    expected = [False, False, False, False, False, True, False]
    assert [r["answers"] for r in results] == [expected, expected]
    assert [r["received"] for r in results] == [False, True]
