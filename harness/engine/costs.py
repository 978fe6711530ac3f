"""Cost meters shared by every run (docs/methods.md §2): FLOPs, parameters, time, memory.

FLOPs come from torch's FLOP formulas (``torch.utils.flop_counter``; FLOPs = 2 x MACs, forward and
backward), totalled by :class:`harness.core.flops.FlopCounter`, which returns FlopCounterMode's totals
without its module tracking. Training FLOPs are measured on the method's real step: the runner opens
a counter when a training batch is handed out and closes it when the next one is asked for, so
whatever the method does with that batch (teacher forwards, replay samples, regularisers) is counted.
Counting every step would slow training several-fold, so the meter counts the first step of
each task and then one step in every ``every``, and charges each uncounted step with the FLOPs
per sample of the next counted one (or the latest, at the end of a task).

Work inside ``train_task`` that is not a step is counted exactly, as boundary FLOPs: from the start
of ``train_task`` to its first batch (a set-up pass, a teacher pass), and from the end of a batch
stream (the method asked for a batch after the last one: its last step is over) to the next batch
or the end of ``train_task`` (work between epochs, a consolidation pass at the end). ``ctx.counted``
work suspends whatever counter is open, so it is never counted twice.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from harness.core.flops import FlopCounter, count_flops  # noqa: F401  (count_flops: re-exported)
from harness.core.memory import persistent_by_kind


def parameter_counts(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(total, trainable) parameters of the given modules, each parameter counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
    return total, trainable


class StepFlopMeter:
    """Samples FLOPs of training steps as batches are drawn and counts the work of ``train_task``
    outside its steps exactly (see the module docstring).

    The runner calls :meth:`begin_task` right before ``train_task`` and :meth:`finish_task` right
    after; the context calls the meter before each batch it hands out, :meth:`end_of_batches` when
    a batch stream ends, and :meth:`suspend` / :meth:`resume` around ``ctx.counted`` work."""

    def __init__(self, every: int = 100) -> None:
        self.every = every
        self._counter: FlopCounter | None = None
        self._step = False  # the open counter is a step's (else boundary work's)
        self._counted_batch = 0
        self._suspended = 0  # depth of suspend() calls
        self._suspended_counter = False  # a counter was open when suspended
        self._in_task = False
        self.batch_index = 0  # within the current task
        self.per_sample = 0.0  # FLOPs per sample of the latest counted step
        self.total = 0.0  # estimated training FLOPs of all steps so far
        self.boundary = 0  # exact FLOPs of work in train_task outside its steps, not yet taken
        self.counted_steps = 0
        self._uncharged = 0  # samples of uncounted steps not yet charged
        self._task_start = 0.0  # self.total when the current task began

    def begin_task(self) -> None:
        """``train_task`` starts: count its work up to the first batch as boundary FLOPs."""
        self._close_counter()
        self._in_task = True
        self._task_start = self.total
        self.per_sample = 0.0  # this task's steps are measured afresh (its first step is always counted)
        self._open(step=False)

    def task_flops(self) -> tuple[float, float]:
        """(FLOPs spent by the current task so far, FLOPs per sample of its latest step): the open step
        is closed first, so every step drawn so far is in the sum (a compute budget reads this before
        handing out the next batch)."""
        if self._step:
            self._close_counter()
        spent = self.total - self._task_start + self.per_sample * self._uncharged + self.boundary
        return spent, self.per_sample

    def __call__(self, batch_size: int) -> None:
        """Called by the context right before a batch is handed to the method."""
        self._close_counter()
        if self.batch_index % self.every == 0:
            self._open(step=True)
            self._counted_batch = batch_size
        else:
            self._uncharged += batch_size
        self.batch_index += 1

    def end_of_batches(self) -> None:
        """A batch stream ran out (the method asked for a batch after its last): the last step is
        over, and the work from here to the next batch or to the end of ``train_task`` is counted
        exactly as boundary FLOPs."""
        self._close_counter()
        if self._in_task:
            self._open(step=False)

    def suspend(self) -> None:
        """Stop counting until :meth:`resume` (the work in between is counted elsewhere)."""
        self._suspended += 1
        if self._suspended == 1:
            self._suspended_counter = self._counter is not None
            if self._counter is not None:
                self._counter.__exit__(None, None, None)

    def resume(self) -> None:
        """Count again into the counter that :meth:`suspend` stopped."""
        self._suspended -= 1
        if self._suspended == 0 and self._suspended_counter:
            assert self._counter is not None
            self._counter.__enter__()
            self._suspended_counter = False

    def _open(self, step: bool) -> None:
        self._counter = FlopCounter()
        self._step = step
        if self._suspended:
            self._suspended_counter = True  # entered by resume()
        else:
            self._counter.__enter__()

    def _close_counter(self) -> None:
        if self._counter is None:
            return
        counter, self._counter = self._counter, None
        if counter.active:
            counter.__exit__(None, None, None)
        if self._suspended:
            self._suspended_counter = False
        flops = counter.get_total_flops()
        if not self._step:
            self.boundary += flops
            return
        self.per_sample = flops / max(self._counted_batch, 1)
        self.total += flops + self.per_sample * self._uncharged
        self._uncharged = 0
        self.counted_steps += 1

    def finish_task(self) -> None:
        """Close the task's last counter and charge its remaining steps at the latest rate."""
        self._close_counter()
        self.total += self.per_sample * self._uncharged
        self._uncharged = 0
        self.batch_index = 0
        self._in_task = False

    def count_boundary(self, fn, *args: Any) -> int:
        """Run ``fn(*args)`` (work after ``train_task``: a consolidation pass) and return its exact FLOPs,
        counted in the meter's own boundary counter, which ``ctx.counted`` work inside it suspends (so
        that such work, counted once per signature, is neither counted twice nor through the
        counter's per-operation dispatch on every call)."""
        self._close_counter()
        before, self.boundary = self.boundary, 0
        self._open(step=False)
        try:
            fn(*args)
        finally:
            self._close_counter()
            flops, self.boundary = self.boundary, before
        return int(flops)

    def take_boundary(self) -> int:
        """The boundary FLOPs counted since the last call (the runner adds them to the run's)."""
        flops, self.boundary = self.boundary, 0
        return int(flops)


def persistent_memory(method: Any) -> dict[str, int]:
    """Bytes per kind that ``method`` carries to the next task, measured on its resumable state
    (harness/core/memory.py): the same count for every method, whatever it declares."""
    return persistent_by_kind(method.state_dict(), type(method).STATE_KINDS)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) of this process to its current RSS.

    Linux >= 4.0: writing "5" to /proc/self/clear_refs. Garbage is collected and freed heap pages
    are handed back first (glibc malloc_trim), so that memory a previous run left free does not
    count. Returns False where the reset is unavailable.
    """
    gc.collect()
    # Everything alive now (modules, caches, the data set) moves to the collector's permanent
    # generation, so the next run's collection scans only what was made since: 0.5 s a run
    # otherwise, once MLflow, pandas and torch are loaded.
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return read_vm_hwm() is not None


def read_vm_hwm() -> int | None:
    """The kernel's peak resident set of this process in bytes (VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """The run's own peak memory.

    Host (every device): the kernel's peak RSS counter reset at the start of the run and read at
    the end (kind ``vmhwm_reset``); where that is unavailable, the RSS sampled every 20 ms (kind
    ``rss_sampled``). GPU: the allocator's peak, its counters reset at the start of the run (kind
    ``cuda_max_allocated``); the host peak is kept apart as ``host_peak_bytes``.
    """

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process(os.getpid())

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        self.hwm_reset = reset_peak_rss()
        self.peak_rss = self.start_rss = self._proc.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_cuda = int(torch.cuda.memory_allocated(self.device))
        if not self.hwm_reset:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self.hwm_reset:
            self.peak_rss = max(self.peak_rss, read_vm_hwm() or 0)

    @property
    def host_peak_bytes(self) -> int:
        return int(self.peak_rss)

    @property
    def host_kind(self) -> str:
        return "vmhwm_reset" if self.hwm_reset else "rss_sampled"

    @property
    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(self.peak_rss)

    @property
    def increase_bytes(self) -> int:
        """Peak minus the level at the start of the run: what this run itself added."""
        if self.device.type == "cuda":
            return int(max(self.peak_bytes - self.start_cuda, 0))
        return int(max(self.peak_rss - self.start_rss, 0))

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else self.host_kind


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def footprint(modules: Iterable[nn.Module], method_state_bytes: int) -> dict[str, int]:
    """Analytic footprint: bytes of parameters and buffers (each tensor once) + the method's state."""
    seen: set[tuple[str, int]] = set()
    params = buffers = 0
    for m in modules:
        for p in m.parameters():
            if _storage_key(p) not in seen:
                seen.add(_storage_key(p))
                params += p.numel() * p.element_size()
        for b in m.buffers():
            if _storage_key(b) not in seen:
                seen.add(_storage_key(b))
                buffers += b.numel() * b.element_size()
    return {"footprint_bytes": params + buffers + int(method_state_bytes), "footprint_param_bytes": params,
            "footprint_buffer_bytes": buffers, "method_state_bytes": int(method_state_bytes)}


def dataset_bytes(sources: Iterable[Any]) -> dict[str, int]:
    """Bytes of the data sets' tensors per device (raw data, float caches, targets), each storage once."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key not in seen:
                seen.add(key)
                out[str(obj.device)] = out.get(str(obj.device), 0) + obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth)
        elif depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
            for v in vars(obj).values():
                visit(v, depth + 1)

    for src in sources:
        visit(src, 0)
    return out


class Stopwatch:
    """Wall-clock seconds, synchronising CUDA so that queued kernels are included."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self.t0
