"""Allocations checked before training: an estimate of what a setting makes the run hold, against
what the machine has. A setting that cannot fit is one UserError line before anything trains,
instead of an out-of-memory kill or a traceback from the allocator."""

from __future__ import annotations

import torch

from harness.core.errors import UserError


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: free host memory (psutil), or the GPU's free memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_allocation(what: str, nbytes: float, device: torch.device, fix: str) -> None:
    """Refuse ``what`` when its estimated ``nbytes`` exceed the memory available on ``device``."""
    have = available_bytes(device)
    if nbytes > have:
        raise UserError(f"{what} needs about {_gib(nbytes)} on {device.type}, and {_gib(have)} are available",
                        fix)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3g} GiB"


def stream_samples(scenario) -> int:
    """Training samples of the whole stream (every task's training split)."""
    return sum(len(t.train_idx) for t in scenario.tasks)


def sample_bytes(scenario) -> int:
    """Bytes of one stored training example: its float32 input and an int64 label."""
    n = 1
    for d in scenario.input_shape:
        n *= int(d)
    return 4 * n + 8
