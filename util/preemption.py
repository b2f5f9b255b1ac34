"""Stopping a training run at a step boundary when a signal announces its end, and resuming it exactly.

Slurm can signal a job some time before its time limit (``#SBATCH --signal``, see ``scripts/slurm_train.sh``).
:class:`StopOnSignal` installs a handler that only records that the signal came; ``train_one_epoch`` asks it
after optimizer steps whether to stop, and ``main.py`` then writes a checkpoint holding the epoch and the
number of batches already trained in it. In a distributed run every process must stop at the same step
although the signal reaches them at different moments: their flags are combined with an all-reduce (max) of
a 1-element tensor every ``check_every`` optimizer steps only, so training steps get no extra host
synchronisation in between; a single process reads its flag after every step.

Exact resume also needs the random streams where they were: :func:`rng_state` captures them (Python,
NumPy, torch CPU and the current CUDA device) for the checkpoint, :func:`set_rng_state` restores them.
With ``--num_workers 0`` the augmentations draw from these streams and a resumed run continues bit for bit;
loader worker processes seed their own streams per epoch, so a resume inside an epoch gives the remaining
batches the same images in the same order but other random augmentations. Work between epochs that may draw
from them (the evaluation transforms, the matching probe) runs under :func:`preserved_rng_state`, so a run
resumed from the checkpoint written before that work continues exactly too.
"""
import argparse
import contextlib
import random
import signal
from typing import Dict, Mapping

import numpy as np
import torch
import torch.distributed as dist

from util.distributed import collective_device, get_world_size

DEFAULT_CHECK_EVERY = 10  # optimizer steps between two agreements of a distributed run (the progress-line interval)


def signal_name(text: str) -> str:
    """``"usr1"`` or ``"SIGUSR1"`` -> ``"USR1"`` (the ``--preempt_signal`` type); an error for a name this
    platform has no signal for."""
    name = text.upper().removeprefix("SIG")
    if f"SIG{name}" not in signal.Signals.__members__:
        raise argparse.ArgumentTypeError(f"no signal named {text!r} on this platform")
    return name


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (one all-reduce; ``flag`` alone in a
    single-process run)."""
    if get_world_size() == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class StopOnSignal:
    """Records the arrival of ``signal_name`` (its handler does nothing else) and tells the training loop,
    identically on every process, when to stop.

    Calling the object (after each optimizer step) answers from an agreement of all processes every
    ``check_every`` calls and False in between; :meth:`requested` agrees now. Once True, :attr:`stopped` stays
    True. Every process must make the same sequence of calls.
    """

    def __init__(self, signal_name: str = "USR1", check_every: int = DEFAULT_CHECK_EVERY):
        self.signum = signal.Signals[f"SIG{signal_name}"]
        self.check_every = 1 if get_world_size() == 1 else check_every
        self.received = False
        self.stopped = False
        self.calls = 0
        signal.signal(self.signum, self._receive)

    def _receive(self, signum, frame) -> None:
        self.received = True

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls % self.check_every:
            return False
        return self.requested()

    def requested(self) -> bool:
        """Whether any process has received the signal (a collective in a distributed run)."""
        self.stopped = self.stopped or any_process(self.received)
        return self.stopped


def rng_state(device: torch.device) -> Dict[str, object]:
    """The random streams of this process, in a form ``torch.load(weights_only=True)`` reads back."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, object], device: torch.device) -> None:
    """Continue the random streams captured by :func:`rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def preserved_rng_state(device: torch.device):
    """Run a block without moving this process's random streams: what follows draws as if it had not run."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def merge_train_stats(first: Mapping[str, float], first_batches: int, second: Mapping[str, float],
                      second_batches: int) -> Dict[str, float]:
    """Epoch averages from those of two consecutive parts of the epoch (every meter is updated once per batch,
    so each part weighs its number of batches); ``optimizer_steps`` add up."""
    total_batches = first_batches + second_batches
    merged = {}
    for name in {**first, **second}:
        if name == "optimizer_steps":
            merged[name] = first.get(name, 0) + second.get(name, 0)
        elif name in first and name in second:
            merged[name] = (first[name] * first_batches + second[name] * second_batches) / total_batches
        else:
            merged[name] = first.get(name, second.get(name))
    return merged
