"""Timing and memory helpers shared by the benchmark scripts (``scripts/benchmark*.py``).

Wall-clock timing waits for the device (``synchronize``) after every run, so asynchronous CUDA/MPS work is
counted where it happens. Peak memory is the CUDA allocator's high-water mark or, on the CPU, the rise of the
process's resident set (see :class:`PeakMemory`).
"""
import ctypes
import ctypes.util
import gc
import platform
import resource
import time
from typing import Callable, List, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait until the queued work of ``device`` has finished (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_runs_ms(run: Callable[[], object], device: torch.device, warmup: int, iters: int) -> List[float]:
    """Wall time in milliseconds of each of ``iters`` calls of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_timed_runs_ms(runs: Sequence[Callable[[], object]], device: torch.device,
                              iters: int) -> List[List[float]]:
    """Wall times in milliseconds of ``iters`` calls of each of ``runs`` (already warmed up), taken in turns.

    Round ``i`` calls the functions in order starting at ``runs[i % len(runs)]``, so a change of machine
    load during the measurement, or an advantage of going first, hits every function alike; the ratio of
    their medians is then far steadier on a shared machine than from one block of runs after the other.
    """
    times: List[List[float]] = [[] for _ in runs]
    synchronize(device)
    for round_index in range(iters):
        for offset in range(len(runs)):
            index = (round_index + offset) % len(runs)
            start = time.perf_counter()
            runs[index]()
            synchronize(device)
            times[index].append((time.perf_counter() - start) * 1e3)
    return times


class PeakMemory:
    """Peak memory during a block, above the usage when the block starts.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics, exact; ``start_bytes``
    is what was allocated before the block (weights, optimizer state ...), so ``start_bytes + peak_bytes`` is
    the absolute high-water mark. Elsewhere: the rise of the process's peak resident set. Free heap memory is
    first returned to the OS (glibc ``malloc_trim``) and the kernel's high-water mark reset through
    ``/proc/self/clear_refs`` where available; otherwise the lifetime ``ru_maxrss`` is used and ``exact`` is
    False (the figure is then a lower bound).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True
        self.start_bytes = 0
        self.peak_bytes = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._return_free_heap_to_os()
            self.exact = self._reset_rss_high_water_mark()
            self.start_bytes = self._rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start_bytes
        else:
            peak = self._rss_bytes("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak_bytes = max(peak - self.start_bytes, 0)
        return False

    @staticmethod
    def _return_free_heap_to_os():
        """glibc keeps freed blocks mapped; reusing them would hide the step's allocations from the RSS."""
        libc_name = ctypes.util.find_library("c")
        if libc_name is None:
            return
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _reset_rss_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _rss_bytes(field: str) -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: torch.device) -> str:
    """The GPU's marketing name on CUDA, else the device type with the processor name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"
