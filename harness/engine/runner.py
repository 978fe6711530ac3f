"""Run one (method, scenario, seed): train task by task, evaluate after each task, measure.

The runner owns the loop, the evaluation and every measurement; methods only see their hooks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.backbones import build_backbone
from harness.core.config import hparams_from, role_value
from harness.core.context import RunContext, TrainingDiverged
from harness.core.data import Scenario, Task
from harness.core.errors import UserError
from harness.core.method import METHODS, Method
from harness.core.protocol import Protocol
from harness.core.streams import FIRST_TASKS, HELD_OUT_STREAM, TuningProtocol, held_out_seed
from harness.engine import metrics
from harness.engine.checkpoints import RESUMED_RECORD_KEYS, capture_state, restore_rng
from harness.engine.codestate import code_state
from harness.engine.costs import (
    PeakMemory,
    StepFlopMeter,
    Stopwatch,
    count_flops,
    dataset_bytes,
    footprint,
    parameter_counts,
    persistent_memory,
)
from harness.engine.energy import EnergyMeter
from harness.engine.evaluation import evaluate
from harness.engine.record import Costs, PerTask, RunConfig, RunRecord, SettingMetrics, TaskInfo

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunSpec:
    """Everything that defines one run; its resolved form is recorded with the results."""

    method: str
    scenario: str
    seed: int = 0
    method_set: dict[str, Any] = field(default_factory=dict)
    scenario_set: dict[str, Any] = field(default_factory=dict)
    protocol: Protocol = field(default_factory=Protocol)
    label: str = ""  # method configuration name shown in tables (default: method + overrides)
    device: str = "auto"
    data_root: str | None = None
    eval_split: str = "test"  # "val" during tuning: the test split is never read then
    tuned: bool = False
    tuned_trials: int = 0
    # The memory budget this run was fitted to (bytes; harness/engine/budget.py) and how it was spent.
    budget_bytes: int | None = None
    budget_note: str = ""
    # The compute budget (Prabhu et al., CVPR 2023): training FLOPs each task may spend, as
    # {"per_task": N} or {"per_sample": x} (x FLOPs per training sample and epoch of the task); None: none.
    compute_budget: dict[str, float] | None = None
    # A tuning run's stream (harness/core/streams.py): {"protocol": "first-tasks", "first_tasks": K} or
    # {"protocol": "held-out-stream"}; None: the evaluation stream.
    stream: dict[str, Any] | None = None
    # The tuning protocol (and sampler seed) that chose a tuned run's settings: its provenance.
    tuning: dict[str, Any] | None = None

    def method_label(self) -> str:
        if self.label:
            return self.label
        if not self.method_set:
            return self.method
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.method_set.items()))
        return f"{self.method}[{inner}]"

    def identity(self) -> dict[str, Any]:
        """The whole resolved configuration that decides a run's numbers: method and every
        hyperparameter (defaults filled in), scenario and every option, protocol (backbone
        resolved), seed, evaluated split and label. Two specs share a record, a checkpoint or an
        MLflow run only when their identities are equal."""
        import scenarios  # noqa: F401  (registers every scenario)
        from scenarios.base import SCENARIOS

        cls = resolve_method(self.method)
        hp = hparams_from(cls.HParams, self.method_set)
        if self.scenario not in SCENARIOS:
            raise UserError(f"unknown scenario {self.scenario!r}", f"choose one of: {', '.join(SCENARIOS)}")
        sc = SCENARIOS[self.scenario]
        opts = hparams_from(sc.options, self.scenario_set)
        protocol = dataclasses.asdict(self.protocol)
        protocol["backbone"] = self.protocol.backbone or sc.default_backbone
        ident = {"method": self.method, "label": self.method_label(), "hparams": dataclasses.asdict(hp),
                 "scenario": self.scenario, "scenario_options": dataclasses.asdict(opts), "protocol": protocol,
                 "seed": int(self.seed), "eval_split": self.eval_split}
        if self.budget_bytes is not None:  # a budgeted row is its own row (unbudgeted keys are unchanged)
            ident["budget_bytes"] = int(self.budget_bytes)
        if self.compute_budget is not None:
            ident["compute_budget"] = dict(self.compute_budget)
        # Present only when set, so that the identities of runs without them are what they were.
        for k in ("stream", "tuning"):
            if getattr(self, k) is not None:
                ident[k] = dict(getattr(self, k))
        return ident

    def config_hash(self) -> str:
        """Stable hash (12 hex digits of SHA-256) of :meth:`identity`."""
        return _digest(self.identity())

    def group_hash(self) -> str:
        """Hash of the identity without the seed: the runs that are seeds of one table row."""
        ident = self.identity()
        ident.pop("seed")
        return _digest(ident)

    def key(self) -> str:
        """File-system safe run identifier: a readable label, scenario and seed, then the hash of
        the whole configuration, so that runs differing in any setting never share a key."""
        label = _safe(self.method_label())[:60]
        return f"{label}__{_safe(self.scenario)[:40]}__s{self.seed}__{self.config_hash()}"


def _digest(obj: Any) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=,[]" else "_" for ch in text)


# Run seeds: the lower half of the 32 bits torch's and numpy's generators use; the upper half is kept
# for the held-out streams of tuning (harness/core/streams.py), so no run can draw one.
MAX_SEED = 2**31 - 1


def validate_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed {seed!r} is not an integer in [0, {MAX_SEED}]", "use seeds such as 0, 1, 2")
    return seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}", "use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} cannot train a model here", "use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no GPU is available", "use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist ({torch.cuda.device_count()} GPU(s) visible)",
                        "use cuda or cuda:N with N below the number of GPUs")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def environment_info(device: torch.device) -> dict[str, str]:
    """Versions, git revision and hardware: what is needed to repeat a run."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "torch_threads": str(torch.get_num_threads()),
        "git_revision": git_revision(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_SCENARIO_CACHE: dict[str, Scenario] = {}


def get_scenario(spec: RunSpec) -> Scenario:
    """Build (or reuse, within one process) the scenario of a run: the evaluation stream of its seed,
    or the tuning stream its ``stream`` names (harness/core/streams.py)."""
    from scenarios.base import build_scenario

    stream = TuningProtocol.from_dict(spec.stream)
    if spec.stream is not None and spec.eval_split != "val":
        raise UserError(f"a tuning stream ({stream.slug}) is evaluated on validation data only",
                        "run it with eval_split='val'")
    seed = held_out_seed(spec.seed) if stream.protocol == HELD_OUT_STREAM else spec.seed
    key = json.dumps([spec.scenario, spec.scenario_set, seed, spec.data_root], sort_keys=True, default=str)
    if key not in _SCENARIO_CACHE:
        if len(_SCENARIO_CACHE) >= 16:  # scenarios share their data source: each holds index tensors
            _SCENARIO_CACHE.clear()
        _SCENARIO_CACHE[key] = build_scenario(spec.scenario, spec.scenario_set, seed, spec.data_root)
    scenario = _SCENARIO_CACHE[key]
    if stream.protocol == FIRST_TASKS:
        k = int(stream.first_tasks or 0)
        if k >= len(scenario.tasks):
            raise UserError(f"first-tasks K={k} covers the whole {len(scenario.tasks)}-task stream of "
                            f"{spec.scenario} (that is end-of-stream tuning)",
                            f"choose K between 1 and {len(scenario.tasks) - 1}")
        # The stream of the first K tasks only: later tasks do not exist for its runs.
        scenario = dataclasses.replace(scenario, tasks=scenario.tasks[:k])
    return scenario


def resolve_method(name: str) -> type[Method]:
    import methods  # noqa: F401  (registers every method)

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_splits(scenario: Scenario, eval_split: str) -> None:
    """Every task needs training samples, and the split that is evaluated needs samples too."""
    for t in scenario.tasks:
        if len(t.train_idx) == 0:
            raise UserError(f"{scenario.name}: task {t.id} has no training samples "
                            f"(val_fraction={scenario.options.get('val_fraction')} leaves none)",
                            "lower val_fraction (e.g. 0.1) or raise max_train_per_task")
        evaluated = t.val_idx if eval_split == "val" else t.test_idx
        if len(evaluated) == 0:
            if eval_split == "val":
                raise UserError(f"{scenario.name}: task {t.id} has an empty validation split; tuning reads "
                                "only validation data", "set val_fraction > 0 (e.g. 0.1)")
            raise UserError(f"{scenario.name}: task {t.id} has an empty test split", "raise max_test_per_task")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class RunObserver:
    """Receives progress of a run (tracking, checkpoints, progress bars). All hooks optional."""

    def on_start(self, record: dict[str, Any]) -> None: ...

    def on_task_end(self, record: dict[str, Any], task_id: int, state_fn) -> None:
        """``state_fn()`` returns a resumable checkpoint of the run at the start of the next task."""

    def on_end(self, record: dict[str, Any]) -> None: ...


def build_context(spec: RunSpec, scenario: Scenario, device: torch.device) -> RunContext:
    backbone = spec.protocol.backbone or scenario.default_backbone

    def factory(seed: int | None = None):
        # Same seed -> the same initial weights for every method and every call.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed if seed is None else seed)
            return build_backbone(backbone, scenario.input_shape, scenario.num_classes)

    build_backbone(backbone, scenario.input_shape, scenario.num_classes)  # validates the name early
    return RunContext(scenario, spec.protocol, device, spec.seed, factory)


def run(spec: RunSpec, observer: RunObserver | None = None, resume_state: dict[str, Any] | None = None,
        progress: Any = None) -> dict[str, Any]:
    """Execute one run and return its record: the :class:`RunRecord`'s dict, which is what is
    written as JSON and what observers see (their additions become part of the record)."""
    observer = observer or RunObserver()
    validate_seed(spec.seed)
    spec.protocol.validate()
    device = resolve_device(spec.device)
    cls = resolve_method(spec.method)
    hp = hparams_from(cls.HParams, spec.method_set)
    scenario = get_scenario(spec)
    if spec.eval_split not in ("test", "val"):
        raise UserError(f"eval_split must be test or val, got {spec.eval_split!r}", "use val for tuning")
    check_splits(scenario, spec.eval_split)
    for t in scenario.tasks:  # tuning runs cannot read the test split at all
        t.test_sealed = spec.eval_split != "test"
    settings = scenario.settings
    if not any(s in cls.SETTINGS for s in settings):
        raise UserError(f"method {cls.NAME} does not support {scenario.name}'s setting ({', '.join(settings)})",
                        "pick a scenario of a supported setting")
    seed_everything(spec.seed)
    ctx = build_context(spec, scenario, device)
    method = cls(hp, ctx)
    T = len(scenario.tasks)
    code = code_state()

    record = RunRecord(
        key=spec.key(),
        config_hash=spec.config_hash(),
        config_group=spec.group_hash(),
        method=spec.method,
        label=spec.method_label(),
        scenario=spec.scenario,
        setting=scenario.setting,
        settings=list(settings),
        seed=spec.seed,
        status="running",
        tuned=spec.tuned,
        tuned_trials=spec.tuned_trials,
        eval_split=spec.eval_split,
        synthetic_data=scenario.synthetic is not None,
        config=RunConfig(
            method=spec.method,
            hparams=dataclasses.asdict(hp),
            scenario=spec.scenario,
            scenario_options=scenario.options,
            protocol=dataclasses.asdict(spec.protocol) | {
                "backbone": spec.protocol.backbone or scenario.default_backbone},
            seed=spec.seed,
            data_root=spec.data_root,
            synthetic_data=scenario.synthetic,  # the `dmkd synth` marker, None for real data
            env=environment_info(device),
        ),
        n_tasks=T,
        tasks=[TaskInfo(id=t.id, name=t.name, classes=[int(c) for c in t.classes], n_train=len(t.train_idx),
                        n_val=len(t.val_idx), n_test=len(t.test_idx)) for t in scenario.tasks],
        acc={s: [] for s in settings},
        random_init_acc={},
        per_task=[],
        method_metrics=[],
        artifacts={},
        code={code.digest: code.describe()},
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{k: dict(v) for k, v in (("stream", spec.stream), ("tuning", spec.tuning)) if v is not None},
    )
    meter = StepFlopMeter()
    ctx.step_hook = meter
    watch = Stopwatch(device)
    boundary_flops = 0
    start_task = 0
    persistent: dict[str, int] = {}  # the breakdown at the task that carried the most bytes
    if resume_state is not None:
        method.load_state_dict(resume_state["method"])
        restore_rng(resume_state["rng"], ctx)
        record = RunRecord.from_dict(record.to_dict() | {k: resume_state["record"][k] for k in RESUMED_RECORD_KEYS
                                                         if k in resume_state["record"]}, "in the checkpoint")
        meter.total = resume_state["flops_total"]
        boundary_flops = resume_state["boundary_flops"]
        ctx.comm_bytes, ctx.comm_rounds = resume_state["comm"]
        ctx.samples_seen = resume_state["samples_seen"]
        ctx.extra_flops = resume_state.get("extra_flops", 0)
        start_task = resume_state["next_task"]
        record.resumed_from_task = start_task
        persistent = persistent_memory(method)  # what the finished tasks carried into this one
        record.code = (record.code or {}) | {code.digest: code.describe()}  # the tasks to come
    record = _notify(observer.on_start, record)

    sources = _data_sources(scenario)
    for src in sources:  # data resident before the peak counter starts: it is stated apart, not run order
        if hasattr(src, "to"):
            src.to(device)
    # One central autocast region: every hook (teachers, Fisher passes, replay, routing) and evaluation.
    with PeakMemory(device) as mem, EnergyMeter(device=device) as energy, ctx.autocast():
        if start_task == 0:
            watch.start()
            record.random_init_acc = evaluate(method, scenario, 0, spec.eval_split, ctx)
            record.random_init_eval_s = watch.stop()
        for k in range(start_task, T):
            task = scenario.tasks[k]
            ctx.current_task = task
            samples_before = ctx.samples_seen
            comm_before = ctx.comm_bytes
            ctx.task_flops_budget = task_compute_budget(spec, cls, task)
            ctx.budget_cut = False
            watch.start()
            f_before, _ = count_flops(method.before_task, task)
            meter.begin_task()  # work before the first batch and after a stream's end: boundary FLOPs
            try:
                method.train_task(task)
            finally:
                meter.finish_task()  # closes the open counter, even when train_task raised
            ctx.check_losses(method.NAME, task.id)  # every loss through ctx.backward, whatever the schedule
            f_after = meter.count_boundary(method.after_task, task)
            train_s = watch.stop()
            boundary_flops += f_before + meter.take_boundary() + f_after
            watch.start()
            accs = evaluate(method, scenario, k, spec.eval_split, ctx)
            method.after_evaluation(task)
            eval_s = watch.stop()
            for s in settings:
                record.acc[s].append(accs[s])
            total_p, trainable_p = parameter_counts(method.inference_modules())
            samples = ctx.samples_seen - samples_before
            carried = persistent_memory(method)
            if sum(carried.values()) > sum(persistent.values()):
                persistent = carried
            record.per_task.append(PerTask(
                task=k,
                train_s=train_s,
                eval_s=eval_s,
                train_samples=samples,
                samples_per_s=samples / train_s if train_s > 0 else 0.0,
                params_total=total_p,
                params_trainable=trainable_p,
                state_bytes=method.state_bytes(),
                persistent_bytes=sum(carried.values()),
                comm_bytes=ctx.comm_bytes - comm_before,
                train_flops_per_sample=meter.per_sample,
                passes=samples / max(len(task.train_idx), 1),
                budget_passes=method.budget_passes(task),
                compute_budget_flops=ctx.task_flops_budget,
                compute_budget_cut=ctx.budget_cut if ctx.task_flops_budget is not None else None,
                avg_acc={s: float(np.mean(accs[s][: k + 1])) for s in settings},
                code=code.digest,
            ))
            record.method_metrics = [list(m) for m in ctx.metrics]
            record.artifacts = ctx.artifacts
            record = _notify(lambda d, k=k, bf=boundary_flops: observer.on_task_end(
                d, k, lambda: capture_state(method, ctx, d, meter.total, bf, k + 1)), record)
            if progress is not None:
                progress(k + 1, T, record.to_dict())

    extra_flops = ctx.extra_flops
    world, boundary_flops = _combine_ranks(record, meter, boundary_flops + extra_flops)  # torchrun: totals
    extra_flops = 0  # now inside boundary_flops
    if world > 1:
        record.ranks = world
    # Costs of the final model.
    x_probe = next(ctx.eval_batches(scenario.tasks[0], spec.eval_split))[0][:64]
    method.eval_mode()
    with ctx.autocast():
        inf_flops, _ = count_flops(method.predict, x_probe)
    total_p, trainable_p = parameter_counts(method.inference_modules())
    train_samples = sum(p.train_samples for p in record.per_task)
    train_s = sum(p.train_s for p in record.per_task)
    task_samples = _record_passes(record)
    costs = {
        "params_total": total_p,
        "params_trainable": trainable_p,
        "inference_flops_per_sample": inf_flops / len(x_probe),
        "train_flops_total": meter.total + boundary_flops + extra_flops,
        "train_flops_boundary": boundary_flops + extra_flops,
        # Per training sample of the stream (Σ_t |D_t|, each sample counted once, whatever the number of
        # passes): what it costs to learn one sample of the task data. Per drawn sample: the step's cost.
        "train_flops_per_sample": (meter.total + boundary_flops + extra_flops) / max(task_samples, 1),
        "train_flops_per_drawn_sample": (meter.total + boundary_flops + extra_flops) / max(train_samples, 1),
        "train_samples": train_samples,
        "passes_per_task": float(np.mean([p.passes for p in record.per_task])) if record.per_task else 0.0,
        "budget_passes": spec.protocol.epochs,
        "budget_rule": cls.BUDGET,
        "train_time_s": train_s,
        "eval_time_s": sum(p.eval_s for p in record.per_task),
        "samples_per_s": train_samples / train_s if train_s > 0 else 0.0,
        "peak_memory_bytes": mem.peak_bytes,
        "peak_memory_kind": mem.kind,
        "peak_memory_increase_bytes": mem.increase_bytes,
        "method_state_bytes": method.state_bytes(),
        "comm_bytes": ctx.comm_bytes,
        "comm_rounds": ctx.comm_rounds,
        "flop_steps_counted": meter.counted_steps,
        "host_peak_memory_bytes": mem.host_peak_bytes,
        "host_peak_memory_kind": mem.host_kind,
        "dataset_bytes": dataset_bytes(sources),
        **footprint(method.inference_modules(), method.state_bytes()),
        "dataset_device_bytes": dataset_device_bytes(scenario, device),
        **energy.result,
        # Examples the method stores for replay, from its field declared role="buffer_size" (the report's
        # buffer column; None: no replay buffer).
        "buffer_samples": role_value(method.hp, "buffer_size"),
        "persistent_bytes": sum(persistent.values()),
        "persistent_by_kind": persistent,
        "budget_bytes": spec.budget_bytes,
        "budget_note": spec.budget_note or None,
        "compute_budget": spec.compute_budget,
    }
    if spec.budget_bytes is not None and costs["persistent_bytes"] > spec.budget_bytes:
        costs["budget_note"] = (f"OVER the budget: carried {costs['persistent_bytes']} bytes of {spec.budget_bytes} "
                                f"({spec.budget_note})")
    if device.type == "cuda":  # the peak without the data set held on the GPU
        costs["peak_memory_excl_dataset_bytes"] = max(mem.peak_bytes - costs["dataset_device_bytes"], 0)
    record.costs = Costs(**costs)
    b = record.random_init_acc
    record.metrics = {s: SettingMetrics(**metrics.summary(record.acc[s], b[s])) for s in settings}
    record.status = "finished"
    record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = record.to_dict()
    observer.on_end(out)
    return out


def task_compute_budget(spec: RunSpec, cls: type[Method], task: Task) -> float | None:
    """The training FLOPs ``task`` may spend under the run's compute budget (None: no budget; Joint's
    cumulative rule, the upper bound, is not held to one)."""
    b = spec.compute_budget
    if not b or cls.BUDGET == "cumulative":
        return None
    if "per_task" in b:
        return float(b["per_task"])
    return float(b["per_sample"]) * spec.protocol.epochs * len(task.train_idx)


def _notify(hook, record: RunRecord) -> RunRecord:
    """Call an observer hook with the record's dict form; what the hook adds (suite, worker, MLflow
    run id) becomes part of the record."""
    d = record.to_dict()
    hook(d)
    return RunRecord.from_dict(d, "after an observer hook")


def dataset_device_bytes(scenario: Scenario, device: torch.device) -> int:
    """Bytes the scenario's data sources hold on ``device`` (an accelerator), reported apart from the
    run's peak memory; 0 on the CPU, where they are part of the process."""
    if device.type == "cpu":
        return 0
    return sum(n for d, n in dataset_bytes(_data_sources(scenario)).items() if torch.device(d).type == device.type)


def _data_sources(scenario: Scenario) -> list[Any]:
    """The scenario's distinct data sources, and the train/test sources a split source wraps."""
    out: list[Any] = []
    for t in scenario.tasks:
        for src in (t.source, getattr(t.source, "train", None), getattr(t.source, "test", None)):
            if src is not None and all(src is not o for o in out):
                out.append(src)
    return out


def _record_passes(record: RunRecord) -> int:
    """Measured passes per task = samples drawn during the task / the task's training-set size (after
    the rank totals, so node methods count the samples of every node). Returns Σ_t |D_t|."""
    sizes = {t.id: t.n_train or 0 for t in record.tasks}
    for p in record.per_task:
        p.passes = (p.train_samples or 0) / max(sizes[p.task], 1)
    return sum(sizes[p.task] for p in record.per_task)


def _combine_ranks(record: RunRecord, meter: StepFlopMeter, boundary_flops: int) -> tuple[int, int]:
    """Under torch.distributed (one process per node) make the costs system totals, like the
    in-process backend's: training samples and FLOPs are summed over ranks, times are the slowest
    rank's. Communication is already counted system-wide by the nodes API.
    Returns (world size, boundary FLOPs of all ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1, boundary_flops
    per_task = record.per_task
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor([meter.total, boundary_flops] + [p.train_samples for p in per_task],
                        dtype=torch.float64, device=dev)
    slowest = torch.tensor([p.train_s for p in per_task], dtype=torch.float64, device=dev)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    meter.total = float(sums[0])
    for p, n, t in zip(per_task, sums[2:].tolist(), slowest.tolist()):
        p.train_samples, p.train_s = int(n), t
        p.samples_per_s = n / t if t > 0 else 0.0
    return dist.get_world_size(), int(sums[1])


__all__ = ["RunObserver", "RunSpec", "Task", "TrainingDiverged", "evaluate", "run"]
