"""Running statistics of logged values and the progress lines of the training / evaluation loops.

Host syncs: values may be logged as (GPU) tensors every step. A tensor is *not* converted to a Python
number when it is logged; it is kept (detached) until its value is needed — when a progress line is
printed, a statistic is read, or the meters are synchronised across processes — and then all pending
tensors of all meters of a :class:`MetricLogger` are copied to the host together (one transfer per
device). So logging costs one device sync per ``print_freq`` iterations instead of one per value.
A meter also converts its pending tensors on its own after :data:`MAX_PENDING` of them. Logged tensors
are snapshotted on the device (one ``torch.stack`` per ``update`` call), so changing them in place later
does not change what was logged.
"""
import datetime
import math
import statistics
import sys
import time
from collections import defaultdict, deque
from functools import partial
from numbers import Number
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from util.distributed import collective_device, get_world_size

MAX_PENDING = 1024
MIB = 1024 * 1024


class SmoothedValue:
    """A series of values: median / mean over the last ``window_size`` values, plus the weighted mean
    of all values (``global_avg``), the window maximum and the latest value."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        # (value, n) not yet recorded: the value is a 0-d tensor or, when logged after one, a float.
        self._pending: List[tuple] = []

    def update(self, value: Union[torch.Tensor, Number], n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"SmoothedValue.update: expected a scalar, got a tensor of shape {tuple(value.shape)}")
            self._add_snapshot(value.detach().reshape(()).clone(), n)
        elif self._pending:
            self._pending.append((float(value), n))
        else:
            self._record(float(value), n)

    def _add_snapshot(self, value: torch.Tensor, n: int) -> None:
        """Keep a 0-d tensor that no one modifies afterwards until its value is needed."""
        self._pending.append((value, n))
        if len(self._pending) >= MAX_PENDING:
            materialize([self])

    def _record(self, value: float, n: int) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over processes (the window stays local)."""
        synchronize_meters([self])

    @property
    def median(self) -> float:
        materialize([self])
        return statistics.median_low(self.deque) if self.deque else math.nan

    @property
    def avg(self) -> float:
        materialize([self])
        return sum(self.deque) / len(self.deque) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        materialize([self])
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        materialize([self])
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        materialize([self])
        return self.deque[-1] if self.deque else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


def materialize(meters: Iterable[SmoothedValue]) -> None:
    """Record the pending tensor values of ``meters``, copying them to the host once per device."""
    meters = [m for m in meters if m._pending]
    by_device: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
    for meter in meters:
        for value, _ in meter._pending:
            if isinstance(value, torch.Tensor):
                by_device[value.device].append(value)
    host_values = {device: iter(torch.stack(tensors).tolist()) for device, tensors in by_device.items()}
    for meter in meters:
        pending, meter._pending = meter._pending, []
        for value, n in pending:
            meter._record(next(host_values[value.device]) if isinstance(value, torch.Tensor) else value, n)


def synchronize_meters(meters: List[SmoothedValue]) -> None:
    """Sum ``count`` / ``total`` of each meter over processes, all meters in one collective.

    Every process must pass the same meters in the same order.
    """
    materialize(meters)
    if get_world_size() == 1 or not meters:
        return
    counts_totals = torch.tensor([[m.count, m.total] for m in meters], dtype=torch.float64,
                                 device=collective_device())  # [M, 2]
    dist.all_reduce(counts_totals)
    for meter, (count, total) in zip(meters, counts_totals.tolist()):
        meter.count, meter.total = int(count), total


def peak_memory_text() -> str:
    """Peak memory so far: CUDA max allocated when this process uses CUDA, else the process peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"max mem: {torch.cuda.max_memory_allocated() / MIB:.0f} MiB"
    try:
        import resource
    except ImportError:  # the resource module does not exist on Windows
        return "max rss: n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB
    return f"max rss: {peak_bytes / MIB:.0f} MiB"


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricLogger:
    """Named :class:`SmoothedValue` meters (created on first update) and a progress-printing iterator."""

    def __init__(self, delimiter: str = "\t", meter_fmt: Optional[str] = None):
        """``meter_fmt``: the format of the meters created on their first update (SmoothedValue's default
        when None); meters added with :meth:`add_meter` have their own."""
        self.meters: Dict[str, SmoothedValue] = defaultdict(partial(SmoothedValue, fmt=meter_fmt))
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        """Log values: scalar tensors (kept lazily, see module doc), Python or NumPy numbers; None is skipped."""
        tensors: Dict[torch.device, List[tuple]] = defaultdict(list)
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"MetricLogger.update: {name} has shape {tuple(value.shape)}, expected a scalar")
                self.meters[name]  # create meters in argument order, which is the printing order
                tensors[value.device].append((name, value.detach().reshape(())))
            elif isinstance(value, Number):
                self.meters[name].update(value)
            else:
                raise TypeError(f"MetricLogger.update: {name} is a {type(value).__name__}, expected a number or "
                                "a scalar tensor")
        # One copy per device snapshots the values (later in-place changes of the inputs do not leak in).
        for named_values in tensors.values():
            snapshot = torch.stack([value for _, value in named_values])  # [K]
            for (name, _), value in zip(named_values, snapshot.unbind(0)):
                self.meters[name]._add_snapshot(value, 1)

    def __getattr__(self, attr: str):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__} has no attribute or meter {attr!r}")

    def __str__(self) -> str:
        return self.format_meters()

    def format_meters(self, names: Optional[Sequence[str]] = None) -> str:
        """``name: meter`` of the meters ``names`` that exist, in that order (all meters when None)."""
        materialize(self.meters.values())
        chosen = list(self.meters) if names is None else [name for name in names if name in self.meters]
        return self.delimiter.join(f"{name}: {self.meters[name]}" for name in chosen)

    def format_averages(self, names: Sequence[str]) -> str:
        """``name: global average`` of the meters ``names`` that exist, in that order."""
        materialize(self.meters.values())
        return self.delimiter.join(f"{name}: {self.meters[name].global_avg:.6g}" for name in names
                                   if name in self.meters)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        """Sum every meter's count/total over processes, in one collective (meters in sorted name order)."""
        synchronize_meters([self.meters[name] for name in sorted(self.meters)])

    def log_every(self, iterable: Iterable, print_freq: int, header: Optional[str] = None, logger=None,
                  meters: Optional[Sequence[str]] = None):
        """Yield from ``iterable``, printing a progress line every ``print_freq`` iterations and at the last.

        A line holds ``[i/N]``, the ETA (from the mean iteration time so far), the meters named in
        ``meters`` that exist (all of them when None), the mean time per iteration and waiting for data
        over the last 20 iterations, iterations per second and the peak memory. A final ``Total time``
        line follows, also when the loop stops early. Lines go to ``logger.info`` when a logger is given,
        else to ``print``.
        """
        emit = logger.info if logger is not None else print
        header = header or ""
        try:
            num_iters: Optional[int] = len(iterable)
        except TypeError:
            num_iters = None
        width = len(str(num_iters)) if num_iters is not None else 0
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        num_yielded = 0
        try:
            for i, obj in enumerate(iterable):
                data_time.update(time.time() - end)
                num_yielded = i + 1
                yield obj
                iter_time.update(time.time() - end)
                if i % print_freq == 0 or i == (num_iters or 0) - 1:
                    emit(self._progress_line(header, i, num_iters, width, iter_time, data_time, meters))
                end = time.time()
        finally:
            total_time = time.time() - start
            emit(f"{header} Total time: {format_seconds(total_time)} "
                 f"({total_time / max(num_yielded, 1):.4f} s / it, {num_yielded} iterations)")

    def _progress_line(self, header: str, i: int, num_iters: Optional[int], width: int, iter_time: SmoothedValue,
                       data_time: SmoothedValue, meters: Optional[Sequence[str]]) -> str:
        parts = [header]
        if num_iters is not None:
            parts += [f"[{i:>{width}}/{num_iters}]",
                      f"eta: {format_seconds(iter_time.global_avg * (num_iters - i - 1))}"]
        else:
            parts.append(f"[{i}]")
        meters_text = self.format_meters(meters)
        if meters_text:
            parts.append(meters_text)
        parts += [f"time: {iter_time}", f"data: {data_time}", f"it/s: {1.0 / max(iter_time.avg, 1e-9):.2f}",
                  peak_memory_text()]
        return self.delimiter.join(parts)
