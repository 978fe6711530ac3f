"""Persistent memory: the bytes a method carries from one task to the next.

The harness measures it the same way for every method, from the state a resumed run needs
(``Method.state_dict()``: the model's parameters and buffers, the optimiser state when it is kept
across tasks, and every attribute of the method's ``STATE`` / ``extra_state``). tests/test_resume_all.py
proves that state complete (a run resumed from it ends with the numbers of an uninterrupted run), so
nothing a method keeps between tasks escapes the count. Each tensor storage is counted once, at its
dtype, whatever the number of references to it.

Kinds (the breakdown recorded as ``costs.persistent_by_kind``):

- ``model``: parameters and buffers of the model (every expert, autoencoder and head it holds);
- ``replay``: stored samples and their labels (ER's reservoir), as stored;
- ``importance``: Fisher / Ω maps and the running sums behind them;
- ``snapshot``: copies of earlier parameters (the anchor of a quadratic penalty, a distillation teacher);
- ``router``: routing state kept outside the model (statistics, ownership);
- ``optimizer``: optimiser state carried across tasks (absent when the protocol resets it);
- ``nodes``: the other nodes' models and state of a decentralized method (every node's bytes count);
- ``other``: anything not declared (random-generator states, counters, histories).

A method declares the kind of each top-level key of its ``extra_state`` in ``STATE_KINDS``; an
undeclared key counts as ``other``.

Below them, allocations checked before training: an estimate of what a setting makes the run hold,
against what the machine has. A setting that cannot fit is one UserError line before anything trains,
instead of an out-of-memory kill or a traceback from the allocator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from harness.core.errors import UserError

KINDS = ("model", "replay", "importance", "snapshot", "router", "optimizer", "nodes", "other")
MIB = 1 << 20


def _visit(obj: Any, seen: set[tuple[str, int]], depth: int = 0) -> int:
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return obj.numel() * obj.element_size()
        storage = obj.untyped_storage()
        key = (str(obj.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, torch.nn.Module):
        return _visit(obj.state_dict(keep_vars=True), seen, depth + 1)
    if isinstance(obj, Mapping):
        return sum(_visit(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_visit(v, seen, depth + 1) for v in obj)
    return 0


def persistent_by_kind(state: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, int]:
    """Bytes per kind of a method's resumable state (``Method.state_dict()``): ``model`` and
    ``optimizer`` by their keys, the keys of ``extra`` (and any other top-level key) by ``kinds``."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}

    def add(kind: str, obj: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown persistent-memory kind {kind!r} (one of {', '.join(KINDS)})")
        n = _visit(obj, seen)
        if n:
            out[kind] = out.get(kind, 0) + n

    add("model", state.get("model"))  # first: a reference to the model elsewhere is not counted twice
    add("optimizer", state.get("optimizer"))
    for key, value in state.items():
        if key in ("model", "optimizer"):
            continue
        if key == "extra" and isinstance(value, Mapping):
            for k, v in value.items():
                add(kinds.get(k, "other"), v)
        else:
            add(kinds.get(key, "other"), value)
    return out


def parse_bytes(text: Any, where: str = "memory") -> int:
    """``4 MiB``, ``512 KiB``, ``1.5 GiB``, ``2000000`` (bytes) or ``3 MB`` as a number of bytes."""
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    if isinstance(text, bool):
        raise UserError(f"{where}: {text!r} is not a size", "write it as bytes or with a unit, e.g. 4 MiB")
    if isinstance(text, (int, float)):
        value, unit = float(text), "b"
    else:
        parts = str(text).strip().lower().replace("_", "").split()
        if len(parts) == 1:
            num = parts[0].rstrip("kmgib")
            parts = [num, parts[0][len(num):] or "b"]
        if len(parts) != 2 or parts[1] not in units:
            raise UserError(f"{where}: {text!r} is not a size", "write it as bytes or with a unit, e.g. 4 MiB")
        try:
            value, unit = float(parts[0]), parts[1]
        except ValueError:
            raise UserError(f"{where}: {text!r} is not a size", "write it as bytes or with a unit, e.g. 4 MiB") \
                from None
    nbytes = value * units[unit]
    if not nbytes == nbytes or nbytes < 1 or nbytes > 1 << 50:  # NaN, zero, negative, absurd
        raise UserError(f"{where}: {text!r} is not a usable memory budget", "give a positive size, e.g. 4 MiB")
    return int(nbytes)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{int(n)} B"



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
