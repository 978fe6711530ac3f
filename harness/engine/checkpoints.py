"""What a resumable run checkpoint holds: the method's state, every RNG, the record so far and the
meters, captured at the start of the next task (:func:`capture_state`) and restored by the runner.

Tensors and plain numbers only, so that a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from harness.core.context import RunContext
from harness.core.method import Method


def capture_state(method: Method, ctx: RunContext, record: dict[str, Any], meter_total: float,
                  boundary_flops: int, next_task: int) -> dict[str, Any]:
    """Everything needed to resume a run at the start of ``next_task``."""
    return {
        "method": method.state_dict(),
        "rng": rng_state(ctx),
        "record": {k: record[k] for k in RESUMED_RECORD_KEYS if k in record},
        "flops_total": meter_total,
        "boundary_flops": boundary_flops,
        "comm": (ctx.comm_bytes, ctx.comm_rounds),
        "samples_seen": ctx.samples_seen,
        "extra_flops": ctx.extra_flops,
        "next_task": next_task,
    }


def rng_state(ctx: RunContext) -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers, so that checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "ctx": ctx.generator.get_state(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: dict[str, Any], ctx: RunContext) -> None:
    torch.set_rng_state(st["torch"])
    ctx.generator.set_state(st["ctx"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# What of the record so far a checkpoint carries into the resumed run ("code": each task's code).
RESUMED_RECORD_KEYS = ("acc", "random_init_acc", "per_task", "method_metrics", "artifacts", "code")

# The keys a resumable state must have (see capture_state); anything else is not resumed from.
STATE_KEYS = frozenset({"method", "rng", "record", "flops_total", "boundary_flops", "comm", "samples_seen",
                        "next_task"})
