"""Cost meters shared by every run (METHODS.md §2): FLOPs, parameters, time, memory.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x MACs, forward and
backward). Training FLOPs are measured on the method's real step: the runner opens a counter
when a training batch is handed out and closes it when the next one is asked for, so whatever
the method does with that batch (teacher forwards, replay samples, regularisers) is counted.
Counting every step would slow training several-fold, so the meter counts the first step of
each task and then one step in every ``every``, and charges each uncounted step with the FLOPs
per sample of the next counted one (or the latest, at the end of a task).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """FLOPs of one call of ``fn`` and its result."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


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
    """Samples FLOPs of training steps as batches are drawn (see the module docstring)."""

    def __init__(self, every: int = 100) -> None:
        self.every = every
        self._counter: FlopCounterMode | None = None
        self._counted_batch = 0
        self.batch_index = 0  # within the current task
        self.per_sample = 0.0  # FLOPs per sample of the latest counted step
        self.total = 0.0  # estimated training FLOPs of all steps so far
        self.counted_steps = 0
        self._uncharged = 0  # samples of uncounted steps not yet charged

    def __call__(self, batch_size: int) -> None:
        """Called by the context right before a batch is handed to the method."""
        self._close_counter()
        if self.batch_index % self.every == 0:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
            self._counted_batch = batch_size
        else:
            self._uncharged += batch_size
        self.batch_index += 1

    def _close_counter(self) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        flops = self._counter.get_total_flops()
        self._counter = None
        self.per_sample = flops / max(self._counted_batch, 1)
        self.total += flops + self.per_sample * self._uncharged
        self._uncharged = 0
        self.counted_steps += 1

    def pause(self) -> None:
        """Close the open step counter early (work that follows is counted elsewhere)."""
        self._close_counter()

    def finish_task(self) -> None:
        """Close the task's last counter and charge its remaining steps at the latest rate."""
        self._close_counter()
        self.total += self.per_sample * self._uncharged
        self._uncharged = 0
        self.batch_index = 0


class PeakMemory:
    """Peak memory of a run: CUDA peak allocated on GPU, else the process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process(os.getpid())

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        self.peak_rss = self.start_rss = self._proc.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
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

    @property
    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(self.peak_rss)

    @property
    def increase_bytes(self) -> int:
        """Peak minus the level at the start of the run: what this run itself added (CPU)."""
        if self.device.type == "cuda":
            return self.peak_bytes
        return int(max(self.peak_rss - self.start_rss, 0))

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"


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
