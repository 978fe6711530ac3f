"""Memory budgets: every row of a suite fitted to one persistent-memory budget before anything trains.

Persistent memory (harness/core/memory.py) is measured on a method's resumable state. To plan a row
before it trains, the harness *probes* it: the real method, with the row's settings, on a miniature
copy of the row's stream (the same tasks, classes and input shapes, :data:`PROBE_SAMPLES` training
samples a task, the test split sealed), and measures what it carries after each task. What a method
keeps between tasks depends on the stream's structure and the settings, not on the number of samples,
so the probe's bytes are the real run's; every run records its measured bytes, and
tests/test_budget_memory.py checks the two agree for every method.

How a row is fitted (``fit_to_budget``):

- A field declared ``role="buffer_size"`` (ER's ``buffer_size``) is filled: stored samples cost the
  same bytes each, so the harness probes two sizes and sets the buffer to
  ``(budget − model − other state) ÷ bytes per sample`` (at most the stream's training samples).
  A suite may not fix such a field by hand under a budget.
- Integer fields declared ``role="capacity"`` (DMKD's and MoE's ``n_experts``) keep their value when it
  fits; tuning suggests them only inside the budget (``capacity_cap``).
- A method with nothing to spend keeps its settings and stays under the budget; its note says so.
- A row that does not fit at its settings is refused before anything trains (one line, exit 2).

``memory: aligned`` is the largest persistent memory among the suite's rows at their untuned settings
(documented defaults and ``set:`` values; tuned values are chosen inside the budget, so they cannot
decide it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.config import hparams_from
from harness.core.data import Scenario, TensorSource
from harness.core.errors import UserError
from harness.core.memory import format_bytes, stream_samples
from harness.engine.costs import persistent_memory
from harness.engine.runner import RunSpec, build_context, get_scenario, resolve_method

PROBE_SAMPLES = 256  # training samples a task in the probe's miniature stream
_PROBES: dict[str, dict[str, int]] = {}
_CACHE_FILE: Path | None = None


def use_probe_cache(path: str | Path | None) -> None:
    """Keep probe results in ``path`` (a JSON file), shared by the processes of a suite (its workers
    load the same rows) and kept across invocations. Entries are keyed by the row and a digest of the
    project's source code, so a code change never reuses a stale plan."""
    global _CACHE_FILE
    _CACHE_FILE = None if path is None else Path(path)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (12 hex digits) of every Python source of the harness, methods and scenarios."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("harness", "methods", "scenarios"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _cache_read(key: str) -> dict[str, int] | None:
    if _CACHE_FILE is None or not _CACHE_FILE.is_file():
        return None
    try:
        data = json.loads(_CACHE_FILE.read_text())
    except (OSError, ValueError):
        return None  # unreadable: probe again (it is rewritten below)
    hit = data.get(code_digest(), {}).get(key) if isinstance(data, dict) else None
    if isinstance(hit, dict) and all(isinstance(v, int) for v in hit.values()):
        return hit
    return None


def _cache_write(key: str, kinds: dict[str, int]) -> None:
    if _CACHE_FILE is None:
        return
    from filelock import FileLock

    try:
        _CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(_CACHE_FILE) + ".lock", timeout=30):
            try:
                data = json.loads(_CACHE_FILE.read_text()) if _CACHE_FILE.is_file() else {}
            except (OSError, ValueError):
                data = {}
            digest = code_digest()
            data = {digest: {**(data.get(digest) or {}), key: kinds}}  # plans of older code are dropped
            tmp = _CACHE_FILE.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            tmp.replace(_CACHE_FILE)
    except OSError:
        pass  # a cache that cannot be written costs time, never a result


def role_fields(method: str, role: str) -> list[dataclasses.Field]:
    cls = resolve_method(method)
    return [f for f in dataclasses.fields(cls.HParams) if f.metadata.get("role") == role]


def _probe_key(spec: RunSpec) -> str:
    ident = {"method": spec.method, "set": spec.method_set, "scenario": spec.scenario,
             "options": spec.scenario_set, "protocol": dataclasses.asdict(spec.protocol), "seed": spec.seed,
             "data_root": spec.data_root}
    return json.dumps(ident, sort_keys=True, default=str)


def miniature(scenario: Scenario, n: int = PROBE_SAMPLES) -> Scenario:
    """The stream's structure with synthetic data: the same tasks, classes, transforms and input format
    (a uint8 data set stays uint8 with the same normalisation, so stored samples cost what they cost),
    ``n`` random training and validation samples a task, no test samples. What a method carries between
    tasks depends on this structure, not on the pixels; and no sample of the real stream is read, so a
    tuning protocol's reach (first tasks only, a held-out stream) is never crossed by planning."""
    gen = torch.Generator().manual_seed(0)
    tasks, data, targets = [], [], []
    first = scenario.tasks[0].source
    raw = getattr(first, "data", None)
    uint8 = isinstance(raw, torch.Tensor) and raw.dtype == torch.uint8 and first.codec() is not None
    shape = tuple(raw.shape[1:]) if uint8 else tuple(scenario.input_shape)
    for k, t in enumerate(scenario.tasks):
        classes = torch.as_tensor(list(t.classes) or [0], dtype=torch.long)
        targets.append(classes[torch.arange(2 * n) % len(classes)])
        if uint8:
            data.append(torch.randint(0, 256, (2 * n, *shape), generator=gen, dtype=torch.uint8))
        else:
            data.append(torch.randn((2 * n, *shape), generator=gen))
    if uint8:
        source = TensorSource(torch.cat(data), torch.cat(targets), scale=first.scale)
        source.mean, source.std = first.mean, first.std
    else:
        source = TensorSource(torch.cat(data), torch.cat(targets))
    for k, t in enumerate(scenario.tasks):
        base = 2 * n * k
        tasks.append(dataclasses.replace(t, source=source, train_idx=torch.arange(base, base + n),
                                         val_idx=torch.arange(base + n, base + 2 * n),
                                         test_idx=torch.arange(0), test_sealed=True))
    return dataclasses.replace(scenario, tasks=tasks)


def _evaluation(spec: RunSpec) -> RunSpec:
    """The run on the evaluation stream: budgets are planned on its structure, whatever stream tunes."""
    return dataclasses.replace(spec, stream=None) if getattr(spec, "stream", None) is not None else spec


def probe(spec: RunSpec) -> dict[str, int]:
    """Persistent bytes per kind that ``spec``'s method carries at the task where it carries the most,
    measured on the miniature stream (cached per process). Every random state is restored afterwards."""
    key = _probe_key(spec)
    if key in _PROBES:
        return dict(_PROBES[key])
    cached = _cache_read(key)
    if cached is not None:
        _PROBES[key] = cached
        return dict(cached)
    cls = resolve_method(spec.method)
    hp = hparams_from(cls.HParams, spec.method_set)
    scenario = miniature(get_scenario(_evaluation(spec)))
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            ctx = build_context(dataclasses.replace(spec, protocol=dataclasses.replace(spec.protocol, epochs=1)),
                                scenario, torch.device("cpu"))
            method = cls(hp, ctx)
            most: dict[str, int] = {}
            for task in scenario.tasks:
                ctx.current_task = task
                method.before_task(task)
                method.train_task(task)
                method.after_task(task)
                carried = persistent_memory(method)
                if sum(carried.values()) > sum(most.values()):
                    most = carried
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    _PROBES[key] = dict(most)
    _cache_write(key, most)
    return most


def total(kinds: dict[str, int]) -> int:
    return int(sum(kinds.values()))


def eval_stream_samples(spec: RunSpec) -> int:
    """Training samples of the evaluation stream (a count: no sample is read)."""
    return int(stream_samples(get_scenario(_evaluation(spec))))


def _with(spec: RunSpec, **values: Any) -> RunSpec:
    return dataclasses.replace(spec, method_set={**spec.method_set, **values})


def fit_to_budget(spec: RunSpec, budget: int, fixed: dict[str, Any] | None = None) -> RunSpec:
    """``spec`` fitted to ``budget`` bytes (see the module docstring); ``fixed``: the row's ``set:``
    values (a buffer field among them is refused: the budget sets it)."""
    label = spec.method_label()
    buffers = role_fields(spec.method, "buffer_size")
    note = ""
    if buffers:
        name = buffers[0].name
        if fixed and name in fixed:
            raise UserError(f"row {label}: {name} is set by hand, but under a memory budget the harness fills it",
                            f"remove {name} from the row's set: (or run the suite without a budget)")
        one, two = total(probe(_with(spec, **{name: 1}))), total(probe(_with(spec, **{name: 2})))
        per_sample, base = two - one, 2 * one - two
        if per_sample <= 0:
            raise RuntimeError(f"{spec.method}: {name} does not change persistent memory")
        size = min((budget - base) // per_sample, eval_stream_samples(spec))
        if "le" in buffers[0].metadata:
            size = min(size, int(buffers[0].metadata["le"]))
        if size < 1:
            raise UserError(f"row {label} does not fit the memory budget {format_bytes(budget)}: the model and "
                            f"state alone take {format_bytes(base)}, with no room for one stored sample "
                            f"({format_bytes(per_sample)})", "raise the budget (budget: {memory: ...})")
        spec = _with(spec, **{name: int(size)})
        note = f"{name}={int(size)} filled to the budget ({format_bytes(per_sample)} a sample)"
        # Stored samples cost the same bytes each: the plan is affine in the buffer (the miniature stream
        # holds fewer samples than the buffer, and a buffer never allocates more slots than its stream).
        planned = probe(_with(spec, **{name: 1}))
        need = base + per_sample * int(size)
    else:
        planned = probe(spec)
        need = total(planned)
    if need > budget:
        model = planned.get("model", 0)
        caps = ", ".join(f.name for f in role_fields(spec.method, "capacity"))
        hint = f"raise the budget or lower {caps}" if caps else "raise the budget (budget: {memory: ...})"
        raise UserError(f"row {label} does not fit the memory budget {format_bytes(budget)}: it carries "
                        f"{format_bytes(need)} at its settings (model {format_bytes(model)})", hint)
    if not note and resolve_method(spec.method).BUDGET == "cumulative":
        note = "upper bound: trains on every earlier task's data, which the budget does not count"
    if not note:
        caps = [f.name for f in role_fields(spec.method, "capacity")]
        hp = hparams_from(resolve_method(spec.method).HParams, spec.method_set)
        if caps:
            note = ", ".join(f"{c}={getattr(hp, c)}" for c in caps) + " inside the budget"
        else:
            note = "nothing to spend: stays under the budget"
    return dataclasses.replace(spec, budget_bytes=int(budget), budget_note=note)


def plain_step_flops_per_sample(spec: RunSpec) -> float:
    """Training FLOPs per sample of one plain step on the run's backbone (forward, cross-entropy,
    backward on a batch of the first task): what fine-tuning spends, the unit of ``compute: aligned``."""
    from harness.core.backbones import build_backbone
    from harness.core.flops import FlopCounter

    scenario = miniature(get_scenario(_evaluation(spec)), spec.protocol.batch_size)
    task = scenario.tasks[0]
    x, y = next(task.batches("train", spec.protocol.batch_size))
    backbone = spec.protocol.backbone or scenario.default_backbone
    with torch.random.fork_rng(devices=[]):
        model = build_backbone(backbone, scenario.input_shape, scenario.num_classes)
    counter = FlopCounter()
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / len(y)


def aligned_budget(specs: list[RunSpec]) -> int:
    """The largest persistent memory among ``specs`` (one per row, at their untuned settings)."""
    return max(total(probe(s)) for s in specs)


def capacity_cap(spec: RunSpec, budget: int):
    """For tuning: ``cap(name, suggested)`` gives the largest value of capacity field ``name`` whose row
    fits ``budget`` given the values suggested so far (binary search over the probe; bytes grow with
    capacity), or raises UserError when even the smallest value does not fit."""

    def cap(name: str, suggested: dict[str, Any]) -> int:
        field = next(f for f in role_fields(spec.method, "capacity") if f.name == name)
        search = field.metadata["search"]
        lo, hi = int(search.low), int(search.high)
        base = {k: v for k, v in suggested.items() if not k.startswith("protocol.")}

        def fits(v: int) -> bool:
            trial = _with(spec, **base, **{name: v})
            if role_fields(spec.method, "buffer_size"):
                try:
                    fit_to_budget(trial, budget)
                except UserError:
                    return False
                return True
            return total(probe(trial)) <= budget

        if not fits(lo):
            raise UserError(f"{spec.method_label()}: even {name}={lo} does not fit the memory budget "
                            f"{format_bytes(budget)}", "raise the budget")
        while lo < hi:  # the largest fitting value
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    return cap
