"""Running a function in several forked processes (a real torch.distributed group of CPU processes)."""
import time

import pytest
import torch.multiprocessing as mp


def run_forked(function, nprocs: int, args: tuple, timeout: float = 120) -> None:
    """Run ``function(rank, *args)`` in ``nprocs`` forked processes and wait for all of them; fail the test
    (killing them) if they have not finished within ``timeout`` seconds. Fork: the children inherit the
    imported modules instead of importing torch again (CPU-only tests)."""
    context = mp.start_processes(function, nprocs=nprocs, join=False, start_method="fork", args=args)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} processes of {function.__name__} did not finish within {timeout} s")
