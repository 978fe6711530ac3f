"""Suites: a YAML file -> many runs (methods x scenarios x seeds), resumable and shareable.

Every run is executed by :func:`execute`, which writes the JSON record, the MLflow runs and a
checkpoint after each task. Running a suite again skips finished runs and resumes unfinished
ones from their last completed task. Any number of workers divide a suite's runs through an Optuna
storage (harness/orchestration/cluster.py); a dead worker's run is taken over and resumed from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from harness.core.config import Document, split_params, validate_document
from harness.core.context import TrainingDiverged
from harness.core.errors import UserError
from harness.core.protocol import Protocol
from harness.engine.runner import RunObserver, RunSpec, _safe, run
from harness.orchestration.retry import GRACE_S, HEARTBEAT_S
from harness.orchestration.tracking import Store, flatten

DONE = ("finished", "failed")  # a cell with a record in one of these states is done


@dataclass
class SuiteConfig:
    name: str
    experiment: str
    seeds: list[int]
    protocol: dict[str, Any]
    scenarios: list[tuple[str, dict[str, Any]]]
    methods: list[tuple[str, str, dict[str, Any]]]  # (method, label, overrides)
    device: str = "auto"
    data_root: str | None = None
    description: str = ""
    tuned: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    reference: str = ""  # label of the row the report compares every other row with (component suites)
    on_code_change: str = "refuse"  # a checkpoint written by other code: refuse, restart or resume (execute)
    source: Path | None = None  # the YAML file (tuned settings live beside it, under tuned/<name>/)
    # The persistent-memory budget (harness/engine/budget.py): None, "aligned" or bytes; and whether it
    # is the file's own (else --budget overrode it: tuned settings and the experiment get a suffix).
    budget_memory: str | int | None = None
    budget_overridden: bool = False
    # The compute budget: None, {"per_task": N} or "aligned" (resolved per scenario to {"per_sample": x}).
    budget_compute: str | dict[str, float] | None = None
    _budgets: dict[str, int] = field(default_factory=dict, repr=False)
    tuning: dict[str, Any] = field(default_factory=dict)  # the suite's tuning protocol (harness/core/streams.py)

    def specs(self) -> list[RunSpec]:
        """Every run of the suite, seeds innermost so that a method's seeds finish together."""
        out = []
        proto = protocol_from(self.protocol)
        for sc_name, sc_opts in self.scenarios:
            for m_name, label, overrides in self.methods:
                # Tuned settings are keyed by the row's label (tune-suite) or, for `dmkd tune`, the method.
                tuned = self.tuned.get((label or m_name, sc_name)) or self.tuned.get((m_name, sc_name))
                m_set = dict(overrides)
                run_proto = proto
                trials = 0
                tuning = None
                if tuned is not None:
                    t_method, t_proto = split_params(tuned["params"])
                    m_set = {**t_method, **overrides}
                    run_proto = dataclasses.replace(proto, **t_proto)
                    trials = int(tuned.get("n_trials", 0))
                    tuning = dict(tuned["tuning"]) if tuned.get("tuning") else None
                row = [RunSpec(
                    method=m_name, scenario=sc_name, seed=seed, method_set=m_set, scenario_set=dict(sc_opts),
                    protocol=dataclasses.replace(run_proto),
                    label=(label or m_name if tuned else label) + ("+tuned" if tuned else ""),
                    device=self.device, data_root=self.data_root, tuned=tuned is not None, tuned_trials=trials,
                    tuning=tuning)
                    for seed in self.seeds]
                out += self.fit_row(row, sc_name, sc_opts, overrides)
        return out

    def budget_bytes(self, sc_name: str, sc_opts: dict[str, Any]) -> int | None:
        """The memory budget on one scenario in bytes (None: no budget). ``aligned``: the largest
        persistent memory among the rows at their untuned settings (defaults and ``set:`` values)."""
        if self.budget_memory is None:
            return None
        if self.budget_memory != "aligned":
            return int(self.budget_memory)
        key = json.dumps([sc_name, sc_opts], sort_keys=True, default=str)
        if key not in self._budgets:
            from harness.engine.budget import aligned_budget

            proto = protocol_from(self.protocol)
            self._budgets[key] = aligned_budget([
                RunSpec(method=m, scenario=sc_name, seed=self.seeds[0], method_set=dict(o), scenario_set=dict(sc_opts),
                        protocol=proto, device=self.device, data_root=self.data_root) for m, _l, o in self.methods])
        return self._budgets[key]

    def compute_budget(self, spec: RunSpec) -> dict[str, float] | None:
        """The row's compute budget: None, {"per_task": N}, or for ``aligned`` the FLOPs per sample of a
        plain training step on the scenario ({"per_sample": x}: x × epochs × |D_t| for task t)."""
        if self.budget_compute is None or isinstance(self.budget_compute, dict):
            return self.budget_compute
        key = json.dumps(["compute", spec.scenario, spec.scenario_set, spec.protocol.backbone], sort_keys=True)
        if key not in self._budgets:
            from harness.engine.budget import plain_step_flops_per_sample

            self._budgets[key] = plain_step_flops_per_sample(spec)
        return {"per_sample": float(self._budgets[key])}

    def budget_text(self) -> str:
        """How the suite's budget reads in captions and tuned files."""
        if self.budget_memory is None:
            return "none"
        if self.budget_memory == "aligned":
            return "aligned (the largest persistent memory among the rows at their untuned settings)"
        from harness.core.memory import format_bytes

        return format_bytes(int(self.budget_memory))

    def fit_row(self, row: list[RunSpec], sc_name: str, sc_opts: dict[str, Any],
                overrides: dict[str, Any]) -> list[RunSpec]:
        """The seeds of one row fitted to the memory budget (the same fit for every seed)."""
        compute = self.compute_budget(row[0])
        if compute is not None:
            row = [dataclasses.replace(s, compute_budget=dict(compute)) for s in row]
        budget = self.budget_bytes(sc_name, sc_opts)
        if budget is None:
            return row
        from harness.engine.budget import fit_to_budget

        fitted = fit_to_budget(row[0], budget, overrides)
        return [dataclasses.replace(s, method_set=dict(fitted.method_set), budget_bytes=fitted.budget_bytes,
                                    budget_note=fitted.budget_note) for s in row]


def protocol_from(d: dict[str, Any]) -> Protocol:
    from harness.core.config import hparams_from

    p = hparams_from(Protocol, d)
    p.validate()
    return p


def parse_seeds(value: Any, where: str) -> list[int]:
    """``seeds:`` of a suite or ablation file: a non-empty list of distinct integers in range, or a
    positive count N meaning 0..N-1."""
    from harness.engine.runner import MAX_SEED, validate_seed

    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UserError(f"{where}: seeds: {value} runs nothing", "give a count >= 1 or a list, e.g. seeds: [0, 1, 2]")
        value = list(range(value))
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: seeds must be a non-empty list of integers", "e.g. seeds: [0, 1, 2]")
    for v in value:
        try:
            validate_seed(v)
        except UserError:
            raise UserError(f"{where}: seeds must be integers in [0, {MAX_SEED}]; {v!r} is not",
                            "e.g. seeds: [0, 1, 2]") from None
    dup = sorted({v for v in value if value.count(v) > 1})
    if dup:
        raise UserError(f"{where}: seed(s) {', '.join(map(str, dup))} listed twice", "list each seed once")
    return list(value)


class ScenarioEntry(Document):
    name: str
    options: dict[str, Any] | None = None


class MethodEntry(Document):
    name: str
    label: str | None = None
    set: dict[str, Any] | None = None


class BudgetEntry(Document):
    """``budget:`` of a suite file: ``memory: 4 MiB`` (or bytes), ``aligned`` or ``none``; and
    ``compute: aligned`` (every task may spend what fine-tuning spends on it) or
    ``train_flops_per_task: N``."""

    memory: str | int | None = None
    compute: Literal["aligned", "none"] | None = None
    train_flops_per_task: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class TuningEntry(Document):
    """``tuning:`` of a suite file: the protocol `dmkd tune-suite` tunes under and `dmkd suite` reads
    the tuned files of (docs/tuning.md)."""

    protocol: str = "end-of-stream"
    first_tasks: int | None = None


class SuiteFile(Document):
    """The structure of a suite YAML file (configs/quick.yaml); the values inside are checked by the
    dataclasses they configure (methods' hyperparameters, scenarios' options, the protocol)."""

    name: str | None = None
    experiment: str | None = None
    seeds: Any = Field(default_factory=lambda: [0])  # parse_seeds: a count or a list of distinct seeds
    protocol: dict[str, Any] | None = None
    scenarios: list[ScenarioEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    device: str | None = None
    data_root: str | None = None
    description: str | None = None
    reference: str | None = None
    budget: BudgetEntry | None = None
    tuning: TuningEntry | None = None


def _names_as_entries(raw: Any) -> Any:
    """``- ft`` is short for ``- {name: ft}`` in scenarios: and methods:."""
    if isinstance(raw, dict):
        for key in ("scenarios", "methods"):
            if isinstance(raw.get(key), list):
                raw = {**raw, key: [{"name": e} if isinstance(e, str) else e for e in raw[key]]}
    return raw


def parse_budget(value: Any, where: str) -> str | int | None:
    """A memory budget as written in a suite file or on the command line: none, aligned or a size."""
    from harness.core.memory import parse_bytes

    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, str) and value.strip().lower() == "aligned":
        return "aligned"
    return parse_bytes(value, where)


def load_suite(path: str | Path, budget: str | None = None) -> SuiteConfig:
    """Parse and validate a suite YAML file; every problem is one UserError line, and the whole
    suite (every method, scenario option, protocol field and seed) is checked before anything runs."""
    from harness.core.yamlio import load_yaml_file
    from harness.orchestration.tracking import check_experiment_name

    path = Path(path)
    doc = validate_document(SuiteFile, _names_as_entries(load_yaml_file(path, "suite file")), str(path),
                            "see configs/quick.yaml")
    name = doc.name or path.stem
    seeds = parse_seeds(doc.seeds, str(path))
    protocol = doc.protocol or {}
    protocol_from(protocol)  # validate early
    from harness.engine.record import MAX_LABEL

    for m in doc.methods:
        if m.label is not None and len(m.label) > MAX_LABEL:
            raise UserError(f"{path}: the label of a {m.name} entry is {len(m.label):,} characters long; a label is at "
                            f"most {MAX_LABEL}", "shorten it (it names a table row)")
    methods = [(m.name, m.label or "", dict(m.set or {})) for m in doc.methods]
    experiment = check_experiment_name(doc.experiment or name)
    own = parse_budget(doc.budget.memory if doc.budget else None, f"{path}: budget.memory")
    chosen = own if budget is None else parse_budget(budget, "--budget")
    overridden = budget is not None and chosen != own
    if overridden:  # another budget is another table: its own experiment (and tuned settings)
        experiment = check_experiment_name(f"{experiment}-budget-{_budget_slug(chosen)}")
    cfg = SuiteConfig(name, experiment, seeds, protocol, [(e.name, dict(e.options or {})) for e in doc.scenarios],
                      methods, device=doc.device or "auto", data_root=doc.data_root,
                      description=doc.description or "", reference=doc.reference or "", source=path,
                      budget_memory=chosen, budget_overridden=overridden)
    if doc.budget is not None and doc.budget.compute == "aligned" and doc.budget.train_flops_per_task:
        raise UserError(f"{path}: budget has both compute: aligned and train_flops_per_task",
                        "keep one of them")
    if doc.budget is not None and doc.budget.train_flops_per_task:
        cfg.budget_compute = {"per_task": float(doc.budget.train_flops_per_task)}
    elif doc.budget is not None and doc.budget.compute == "aligned":
        cfg.budget_compute = "aligned"
    if doc.tuning is not None:
        from harness.core.streams import TuningProtocol

        try:
            cfg.tuning = TuningProtocol(doc.tuning.protocol, doc.tuning.first_tasks).as_dict()
        except UserError as e:
            raise UserError(f"{path}: tuning: {e.problem}", e.fix) from None
    if cfg.reference and cfg.reference not in {lab or m for m, lab, _ in methods}:
        raise UserError(f"{path}: reference {cfg.reference!r} is not the label of any method entry",
                        "set reference: to one of the methods' labels")
    specs = cfg.specs()
    validate_specs(specs)
    check_unique(specs, str(path))
    return cfg


def _budget_slug(budget: str | int | None) -> str:
    return "none" if budget is None else str(budget)


def check_unique(specs: list[RunSpec], where: str) -> None:
    """Two entries of a suite that would show as one row (the same label, or labels that are the same
    file name) or the same (scenario, options) twice are an error: one would stand for the other."""
    labels: dict[str, str] = {}
    cells: set[tuple[str, str, int]] = set()
    for s in specs:
        label = s.method_label()
        safe = _safe(label)
        other = labels.setdefault(safe, label)
        sc = json.dumps([s.scenario, s.scenario_set], sort_keys=True, default=str)
        cell = (safe, sc, s.seed)
        if cell in cells:
            what = f"labels {other!r} and {label!r}" if other != label else f"label {label!r}"
            raise UserError(f"{where}: {what} name the same row twice (scenario {s.scenario}, seed {s.seed})",
                            "give each method entry its own label (label: ...) and list each scenario once")
        cells.add(cell)


def validate_specs(specs: list[RunSpec]) -> None:
    """Resolve names and options of every run before any training starts."""
    import scenarios  # noqa: F401
    from harness.core.backbones import BACKBONES
    from harness.core.config import hparams_from
    from harness.engine.runner import resolve_device, resolve_method, validate_seed
    from scenarios.base import SCENARIOS

    for s in specs:
        cls = resolve_method(s.method)
        hparams_from(cls.HParams, s.method_set)
        if s.scenario not in SCENARIOS:
            raise UserError(f"unknown scenario {s.scenario!r}", f"choose one of: {', '.join(SCENARIOS)}")
        hparams_from(SCENARIOS[s.scenario].options, s.scenario_set)
        if s.protocol.backbone is not None and s.protocol.backbone not in BACKBONES:
            raise UserError(f"unknown backbone {s.protocol.backbone!r}", f"choose one of: {', '.join(BACKBONES)}")
        resolve_device(s.device)
        validate_seed(s.seed)
        s.protocol.validate()


def preflight(specs: list[RunSpec]) -> None:
    """Build every distinct scenario of a suite once (data found and readable, options consistent,
    splits non-empty), so that a bad second scenario fails before the first one trains."""
    from harness.engine.runner import check_splits, get_scenario

    seen: set[str] = set()
    for s in specs:
        k = json.dumps([s.scenario, s.scenario_set, s.data_root], sort_keys=True, default=str)
        if k not in seen:
            seen.add(k)
            check_splits(get_scenario(s), s.eval_split)


# ---------------------------------------------------------------------------------------------
# Executing runs with tracking and checkpoints
# ---------------------------------------------------------------------------------------------
class TrackingObserver(RunObserver):
    """Writes the JSON record, MLflow metrics and a checkpoint as the run progresses."""

    def __init__(self, store: Store, spec: RunSpec, parent_id: str | None, extra: dict[str, Any] | None = None,
                 checkpoint: bool = True) -> None:
        self.store, self.spec, self.parent_id = store, spec, parent_id
        self.extra = extra or {}
        self.checkpoint = checkpoint
        self.run_id: str | None = None
        self._logged_method_metrics = 0

    def on_start(self, record: dict[str, Any]) -> None:
        record.update(self.extra)
        ml = self.store.mlflow
        if ml is not None:
            prev = self.store.load_record(record["key"])
            self.run_id = (prev or {}).get("mlflow_run_id") or ml.find_or_create(
                {"dmkd.kind": "run", "dmkd.key": record["key"]}, f"seed {record['seed']}", self.parent_id)
            record["mlflow_run_id"] = self.run_id
            _log_run_params(ml, self.run_id, record)
        self.store.save_record(record)

    def on_task_end(self, record: dict[str, Any], task_id: int, state_fn) -> None:
        ml = self.store.mlflow
        if ml is not None and self.run_id:
            ml.log_metrics(self.run_id, _task_metrics(record, -1), step=task_id)
            for name, value, step in record["method_metrics"][self._logged_method_metrics:]:
                ml.log_metrics(self.run_id, {name: value}, step=step)
            self._logged_method_metrics = len(record["method_metrics"])
        if self.checkpoint and task_id + 1 < record["n_tasks"]:
            self.store.save_checkpoint(record["key"], record["config_hash"], state_fn())
        self.store.save_record(record)
        kill_after = os.environ.get("DMKD_TEST_KILL_AFTER_TASK")  # testing hook: a real kill -9 mid-suite
        if kill_after is not None and int(kill_after) == task_id:
            os.kill(os.getpid(), signal.SIGKILL)
        hold = os.environ.get("DMKD_TEST_HOLD_AFTER_TASK")  # testing hook "k:file": wait after task k for file
        if hold is not None and int(hold.split(":", 1)[0]) == task_id:
            while not Path(hold.split(":", 1)[1]).exists():
                time.sleep(0.1)

    def on_end(self, record: dict[str, Any]) -> None:
        ml = self.store.mlflow
        if ml is not None and self.run_id:
            _log_run_end(ml, self.run_id, record)
        # The record is written before MLflow hears 'FINISHED', so a crash in between is safe (the
        # next suite or run of this configuration sets MLflow's status from the record).
        self.store.save_record(record)
        if os.environ.get("DMKD_TEST_KILL_BEFORE_FINISHED"):  # testing hook: kill -9 in that window
            os.kill(os.getpid(), signal.SIGKILL)
        if ml is not None and self.run_id:
            ml.set_status(self.run_id, "FINISHED")
        self.store.drop_checkpoint(record["key"])


def _log_run_params(ml, run_id: str | None, record: dict[str, Any]) -> None:
    """A seed run's parameters (its resolved configuration) and its identifying tags."""
    params = flatten("", {k: v for k, v in record["config"].items()})
    params.update({"label": record["label"], "tuned": record["tuned"], "eval_split": record["eval_split"]})
    ml.log_params(run_id, params)
    ml.set_tags(run_id, {"dmkd.method": record["method"], "dmkd.label": record["label"],
                         "dmkd.scenario": record["scenario"], "dmkd.seed": str(record["seed"])})


def _task_metrics(record: dict[str, Any], i: int) -> dict[str, float]:
    """The metrics logged after the record's ``i``-th task: average and per-task accuracies, costs."""
    vals: dict[str, float] = {}
    pt = record["per_task"][i]
    for s, rows in record["acc"].items():
        vals[f"{s}/avg_acc"] = pt["avg_acc"][s]
        for j, a in enumerate(rows[i]):
            vals[f"{s}/acc_task_{j}"] = a
    for k in ("train_s", "eval_s", "samples_per_s", "params_total", "state_bytes", "comm_bytes",
              "train_flops_per_sample"):
        vals[f"cost/{k}"] = pt[k]
    return vals


def _log_run_end(ml, run_id: str | None, record: dict[str, Any]) -> None:
    """A finished run's final metrics, accuracy matrices, method artifacts and the record itself."""
    final = {f"{s}/{k}": v for s, m in record["metrics"].items() for k, v in m.items()}
    final.update({f"cost/{k}": v for k, v in record["costs"].items() if isinstance(v, (int, float))})
    ml.log_metrics(run_id, final, step=record["n_tasks"])
    for s, R in record["acc"].items():
        ml.log_dict(run_id, {"R": R, "b": record["random_init_acc"][s]}, f"acc_matrix_{s}.json")
    if record.get("artifacts"):
        ml.log_dict(run_id, record["artifacts"], "method_artifacts.json")
    ml.log_dict(run_id, record, "record.json")
ON_CODE_CHANGE = ("refuse", "restart", "resume")


def check_code(state: dict[str, Any] | None, spec: RunSpec, store: Store, policy: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, given the code that wrote it.

    Written by this code: resumed. Written by other code (or before code was recorded): ``refuse``
    is one UserError line offering the two choices; ``restart`` sets the checkpoint aside and runs
    from task 0 under this code; ``resume`` keeps its tasks, and the record names each task's code
    (the report marks the row as mixed)."""
    from harness.engine.codestate import code_state

    if state is None:
        return None
    if policy not in ON_CODE_CHANGE:
        raise UserError(f"--on-code-change {policy!r} is not one of {', '.join(ON_CODE_CHANGE)}",
                        "pass refuse, restart or resume")
    now = code_state()
    per_task = (state.get("record") or {}).get("per_task") or []
    codes = {p.get("code") if isinstance(p, dict) else None for p in per_task}
    if codes <= {now.digest}:
        return state
    names = (state.get("record") or {}).get("code") or {}
    then = "; ".join(sorted(str(names.get(c, f"sources {c}") if c else "code not recorded") for c in codes))
    done = {0: "no task", 1: "task 0"}.get(len(per_task), f"tasks 0-{len(per_task) - 1}")
    key = spec.key()
    if policy == "refuse":
        raise UserError(f"the checkpoint of {key} ({done}) was written by other code ({then}); this is "
                        f"{now.describe()}, and resuming would mix the two in one result",
                        "pass --on-code-change restart (run it again from task 0 under this code) or "
                        "--on-code-change resume (keep those tasks; the record names each task's code)")
    if policy == "restart":
        store.drop_checkpoint(key)
        print(f"note: the checkpoint of {key} was written by other code ({then}); restarting from task 0 "
              f"under {now.describe()}", file=sys.stderr)
        return None
    print(f"note: resuming {key} after {done} written by other code ({then}); the rest runs under "
          f"{now.describe()}, and the record names each task's code", file=sys.stderr)
    return state


def execute(spec: RunSpec, store: Store, parent_id: str | None = None, *, resume: bool = True,
            progress: Any = None, extra: dict[str, Any] | None = None, checkpoint: bool = True,
            on_code_change: str = "refuse") -> dict[str, Any]:
    """Run one spec with tracking; resume from its checkpoint when one exists (see :func:`check_code`
    for a checkpoint written by other code).

    A run whose loss diverges is recorded as failed with the reason and returned (the caller
    goes on); a user error propagates; a crash leaves the record 'running' and the checkpoint.
    """
    key = spec.key()
    prev = store.load_record(key)
    if prev is not None and prev.get("status") == "finished" and prev.get("config_hash") == spec.config_hash():
        reconcile_mlflow(store, [prev])  # final: no claim needed to read it
        prev["reused"] = True
        return prev
    with store.claim(key) as waited:  # the key's one process; a second comer waits here
        prev = store.load_record(key)
        same = prev is not None and prev.get("config_hash") == spec.config_hash()
        if same and (prev.get("status") == "finished" or (waited and prev.get("status") == "failed")):
            # The identical configuration has run to the end (or, while we waited, failed): its record
            # stands (never re-run over).
            reconcile_mlflow(store, [prev])
            prev["reused"] = True
            return prev
        state = store.load_checkpoint(key, spec.config_hash()) if resume else None
        state = check_code(state, spec, store, on_code_change)
        observer = TrackingObserver(store, spec, parent_id, extra, checkpoint=checkpoint)
        try:
            return run(spec, observer, resume_state=state, progress=progress)
        except TrainingDiverged as e:
            return _fail(store, observer, spec, str(e))


def _fail(store: Store, observer: TrackingObserver, spec: RunSpec, reason: str) -> dict[str, Any]:
    rec = store.load_record(spec.key()) or {"key": spec.key(), "config_hash": spec.config_hash(),
                                             "method": spec.method, "label": spec.method_label(),
                                             "scenario": spec.scenario, "seed": spec.seed}
    rec["status"] = "failed"
    rec["error"] = reason
    rec["failed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    store.save_record(rec)
    if store.mlflow is not None and observer.run_id:
        store.mlflow.set_tags(observer.run_id, {"dmkd.error": reason[:500]})
        store.mlflow.log_dict(observer.run_id, rec, "record.json")  # a report from MLflow shows it too
        store.mlflow.set_status(observer.run_id, "FAILED")
    store.drop_checkpoint(spec.key())
    print(f"run {spec.key()} failed: {reason}", file=sys.stderr)
    return rec


def reconcile_mlflow(store: Store, records: list[dict[str, Any]]) -> None:
    """Make MLflow agree with the JSON records: a run whose record is finished (or failed) is
    FINISHED (or FAILED) in MLflow, even when the process that ran it was killed after writing the
    record and before telling MLflow."""
    ml = store.mlflow
    if ml is None:
        return
    for rec in records:
        run_id = rec.get("mlflow_run_id")
        status = {"finished": "FINISHED", "failed": "FAILED"}.get(str(rec.get("status")))
        if run_id and status:
            ml.ensure_terminated(run_id, status)


def mlflow_gaps(store: Store, records: list[dict[str, Any]]) -> list[str]:
    """Keys of the finished or failed records whose MLflow run is missing or incomplete (no
    ``record.json``, or not ended): what a tracking server that was down while they ran lacks."""
    ml = store.mlflow
    if ml is None or ml.experiment_id() is None:
        return [r["key"] for r in records if r.get("status") in DONE]
    by_key = _seed_runs(store)
    gaps = []
    for rec in records:
        if rec.get("status") not in DONE:
            continue
        run = by_key.get(rec["key"])
        if run is None or run.info.status in ("RUNNING", "SCHEDULED") or not _has_record(ml, run.info.run_id):
            gaps.append(rec["key"])
    if ml.disabled:
        raise UserError(f"the MLflow server at {ml.uri} cannot be read", "check --tracking-uri and that it runs")
    return gaps


def _seed_runs(store: Store) -> dict[str, Any]:
    """The experiment's seed runs in MLflow (not deleted), by record key."""
    ml = store.mlflow
    exp = ml.experiment_id()
    runs = ml._guard(lambda: ml.client.search_runs([exp], filter_string="tags.`dmkd.kind` = 'run'",
                                                   max_results=50000)) or []
    return {r.data.tags.get("dmkd.key"): r for r in runs}


def _has_record(ml, run_id: str) -> bool:
    arts = ml._guard(lambda: ml.client.list_artifacts(run_id)) or []
    return any(a.path == "record.json" for a in arts)


def backfill_mlflow(store: Store, records: list[dict[str, Any]]) -> list[str]:
    """Copy into MLflow, from their JSON records, the finished or failed runs it lacks or holds only in
    part (:func:`mlflow_gaps`): the same nested runs, parameters, per-task and final metrics and
    artifacts a worker logs as it runs. A partial run is deleted and logged anew, and the record then
    names the new run. Suite and group runs whose recorded seeds are all done are marked FINISHED.
    Returns the keys copied."""
    ml = store.mlflow
    if ml is None:
        raise UserError("MLflow tracking is off ('none')", "pass --tracking-uri to the store to fill")
    gaps = set(mlflow_gaps(store, records))
    partial = _seed_runs(store) if gaps else {}
    suites: dict[str, str | None] = {}
    groups: dict[tuple[str, str, str, str], str | None] = {}
    copied = []
    for rec in records:
        if rec["key"] not in gaps:
            continue
        suite = str(rec.get("suite") or store.experiment)
        if suite not in suites:
            suites[suite] = ml.find_or_create({"dmkd.kind": "suite", "dmkd.suite": suite}, f"suite {suite}")
        gkey = (suite, str(rec["label"]), str(rec["scenario"]), str(rec.get("config_group")))
        if gkey not in groups:
            groups[gkey] = ml.find_or_create(
                {"dmkd.kind": "group", "dmkd.suite": suite, "dmkd.group": f"{gkey[1]}|{gkey[2]}",
                 "dmkd.config_group": gkey[3]}, f"{gkey[1]} on {gkey[2]}", suites[suite])
        if rec["key"] in partial:  # logged in part before the server went away: replaced by a full copy
            ml._guard(ml.client.delete_run, partial[rec["key"]].info.run_id)
        run_id = ml.find_or_create({"dmkd.kind": "run", "dmkd.key": rec["key"]}, f"seed {rec['seed']}",
                                   groups[gkey])
        if run_id is None:
            break  # the server went away again; a later sync carries on
        rec = dict(rec, mlflow_run_id=run_id)
        _log_run_params(ml, run_id, rec)
        for i, pt in enumerate(rec["per_task"]):
            ml.log_metrics(run_id, _task_metrics(rec, i), step=int(pt.get("task", i)))
        for name, value, step in rec.get("method_metrics") or []:
            ml.log_metrics(run_id, {name: value}, step=step)
        if rec["status"] == "finished":
            _log_run_end(ml, run_id, rec)
        else:
            ml.set_tags(run_id, {"dmkd.error": str(rec.get("error", ""))[:500]})
            ml.log_dict(run_id, rec, "record.json")
        if ml.disabled:
            break
        ml.set_status(run_id, "FINISHED" if rec["status"] == "finished" else "FAILED")
        store.save_record(rec)
        copied.append(rec["key"])
    _close_parents(store, records)
    return copied


def _close_parents(store: Store, records: list[dict[str, Any]]) -> None:
    """Mark FINISHED the suite and group runs every recorded seed of which is done."""
    ml = store.mlflow
    exp = ml.experiment_id() if ml is not None else None
    if exp is None:
        return
    open_suites = {str(r.get("suite") or store.experiment) for r in records if r.get("status") not in DONE}
    running = ml._guard(lambda: ml.client.search_runs([exp], filter_string="attributes.status = 'RUNNING'",
                                                     max_results=50000)) or []
    for r in running:
        if r.data.tags.get("dmkd.kind") in ("suite", "group") and r.data.tags.get("dmkd.suite") not in open_suites:
            ml.set_status(r.info.run_id, "FINISHED")


def group_run(store: Store, cfg: SuiteConfig, spec: RunSpec, suite_id: str | None) -> str | None:
    """The MLflow run of one (method configuration, scenario) of a suite: the parent of its seeds."""
    label = spec.method_label()
    return store.mlflow.find_or_create(
        {"dmkd.kind": "group", "dmkd.suite": cfg.name, "dmkd.group": f"{label}|{spec.scenario}",
         "dmkd.config_group": spec.group_hash()}, f"{label} on {spec.scenario}", suite_id)


def check_heartbeat(heartbeat: Any, grace: Any) -> tuple[int, int]:
    """Whole seconds >= 1, and a grace period longer than the heartbeat; else one UserError line."""
    out = []
    for name, v in (("--heartbeat", heartbeat), ("--grace", grace)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f) or f < 1 or f != int(f):
            raise UserError(f"{name} must be a whole number of seconds >= 1, got {v!r}",
                            f"e.g. --heartbeat {HEARTBEAT_S} --grace {GRACE_S}")
        out.append(int(f))
    if out[1] <= out[0]:
        raise UserError(f"--grace ({out[1]} s) must be longer than --heartbeat ({out[0]} s)",
                        "a live worker would otherwise be taken for dead; e.g. --grace 6x the heartbeat")
    return out[0], out[1]


def run_sequential(cfg: SuiteConfig, store: Store, *, show_progress: bool = True) -> list[dict[str, Any]]:
    """One worker and no coordinator, for installs without Optuna (the GPU machine): every cell not
    done yet, in suite order, each resumed from its checkpoint; the records are the same as a
    coordinated suite's. Several workers need the coordinator (harness/orchestration/cluster.py)."""
    from tqdm.auto import tqdm

    specs = cfg.specs()
    ml = store.mlflow
    suite_id = ml.find_or_create({"dmkd.kind": "suite", "dmkd.suite": cfg.name}, f"suite {cfg.name}") if ml else None
    extra: dict[str, Any] = {"suite": cfg.name, "worker": store.worker_id}
    if cfg.reference:
        extra["reference"] = cfg.reference
    for spec in tqdm(specs, desc=f"suite {cfg.name}", unit="run", disable=not show_progress, file=sys.stderr):
        if (store.load_record(spec.key()) or {}).get("status") in ("finished", "failed"):
            continue
        execute(spec, store, group_run(store, cfg, spec, suite_id) if ml else None, extra=extra,
                on_code_change=cfg.on_code_change)
    recs = [r for r in (store.load_record(s.key()) for s in specs) if r is not None]
    reconcile_mlflow(store, recs)
    return recs


def records_done(store: Store, specs: list[RunSpec]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a suite's cells and the keys of the cells not done yet."""
    recs, left = [], []
    for s in specs:
        r = store.load_record(s.key())
        if r is not None:
            recs.append(r)
        if r is None or r.get("status") not in DONE:
            left.append(s.key())
    return recs, left
