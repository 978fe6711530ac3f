"""The run record as typed models, and the one registry of the columns that tables show.

A run record is what :func:`harness.engine.runner.run` returns and what the tracking store writes as JSON.
:class:`RunRecord` names every field the runner writes; ``RunRecord.from_dict(d).to_dict() == d``
(key order included) for every record on disk, and a malformed record is a :class:`UserError`
naming the field. Fields that the runner adds only sometimes (``ranks``, ``resumed_from_task``) and
those that other code adds (``suite``, ``worker``, ``mlflow_run_id``, ``experiment``, ``error``)
stay absent when absent: ``to_dict`` writes exactly the fields that were set.

Pydantic v2 (not stdlib dataclasses): it validates nested types and names the failing field's path
for free, keeps unknown keys (``extra="allow"``: older and newer records still load), and tells set
fields from defaults (``exclude_unset``), which is what makes the round trip exact.

:data:`COLUMNS` declares each reported metric and cost once: its path in the record, its headers
and its :class:`Kind`; one formatter per kind. The terminal table (harness/orchestration/console.py) and the
report's tables (reports/tables.py) read their columns from it. A new metric: a field in
:class:`SettingMetrics` (or :class:`Costs`), its value in harness/engine/metrics.py (or the runner), and
one :func:`register` call here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from harness.core.errors import UserError


def _number(v: Any) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PydanticCustomError("number", "Input should be a number")
    return v


# An int stays an int and a float a float (so the JSON text is unchanged); strings and booleans fail.
Number = Annotated[int | float, PlainValidator(_number)]


class _Model(BaseModel):
    """Strict types, unknown keys kept, and the key order of the dict it was read from."""

    model_config = ConfigDict(extra="allow", strict=True)
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: Any) -> Any:
        inst = handler(data)
        if isinstance(data, Mapping) and isinstance(inst, _Model):
            inst._order = tuple(data)
        return inst

    @model_serializer(mode="wrap")
    def _in_order(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        if not self._order:
            return d
        first = {k: d[k] for k in self._order if k in d}
        return first | {k: v for k, v in d.items() if k not in first}


class TaskInfo(_Model):
    """One task of the stream and its split sizes."""

    id: int
    name: str | None = None
    classes: list[int] | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None


class PerTask(_Model):
    """Measurements of one task: its training and evaluation, the model after it."""

    task: int
    train_s: Number | None = None
    eval_s: Number | None = None
    train_samples: int | None = None
    samples_per_s: Number | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    state_bytes: int | None = None
    persistent_bytes: int | None = None  # what the method carries to the next task (harness/core/memory.py)
    compute_budget_flops: Number | None = None  # training FLOPs the task could spend (None: no compute budget)
    compute_budget_cut: bool | None = None  # its stream ended early because the next step would pass it
    comm_bytes: int | None = None
    train_flops_per_sample: Number | None = None
    passes: Number | None = None
    budget_passes: Number | None = None
    avg_acc: dict[str, Number] | None = None  # mean accuracy on tasks 0..k per setting
    code: str | None = None  # digest of the code that trained and evaluated this task (engine/codestate.py)


class SettingMetrics(_Model):
    """The continual-learning metrics of one accuracy matrix (harness/engine/metrics.py, docs/methods.md §1)."""

    final_avg_acc: Number
    avg_inc_acc: Number | None = None
    forgetting: Number | None = None
    bwt: Number | None = None
    fwt: Number | None = None


class Costs(_Model):
    """Costs of the run (docs/methods.md §2): parameters, FLOPs, time, memory, communication, energy."""

    params_total: int | None = None
    params_trainable: int | None = None
    inference_flops_per_sample: Number | None = None
    train_flops_total: Number | None = None
    train_flops_boundary: Number | None = None
    train_flops_per_sample: Number | None = None
    train_flops_per_drawn_sample: Number | None = None
    train_samples: int | None = None
    passes_per_task: Number | list[Number | None] | dict[str, Any] | None = None  # older records: per task
    budget_passes: Number | None = None
    budget_rule: str | None = None
    train_time_s: Number | None = None
    eval_time_s: Number | None = None
    samples_per_s: Number | None = None
    peak_memory_bytes: Number | None = None
    peak_memory_kind: str | None = None
    peak_memory_increase_bytes: Number | None = None
    method_state_bytes: int | None = None
    comm_bytes: Number | None = None
    comm_rounds: int | None = None
    flop_steps_counted: int | None = None
    host_peak_memory_bytes: int | None = None
    host_peak_memory_kind: str | None = None
    dataset_bytes: dict[str, int] | None = None  # per device
    footprint_bytes: int | None = None
    footprint_param_bytes: int | None = None
    footprint_buffer_bytes: int | None = None
    dataset_device_bytes: int | None = None
    buffer_samples: int | None = None  # examples stored for replay (the field declared role="buffer_size")
    # Persistent memory (harness/core/memory.py): the most bytes carried from one task to the next, its
    # breakdown by kind at that task, and the suite's memory budget the run was fitted to (None: none).
    persistent_bytes: int | None = None
    persistent_by_kind: dict[str, int] | None = None
    budget_bytes: int | None = None
    budget_note: str | None = None
    compute_budget: dict[str, float] | None = None  # {"per_task": N} or {"per_sample": x} (None: none)
    energy_kwh: Number | None = None
    energy_cpu_kwh: Number | None = None
    energy_gpu_kwh: Number | None = None
    energy_ram_kwh: Number | None = None
    energy_kind: str | None = None
    energy_tool: str | None = None
    peak_memory_excl_dataset_bytes: int | None = None  # GPU runs only


class RunConfig(_Model):
    """The resolved configuration: method and hyperparameters, scenario and options, protocol, seed,
    and the environment that ran it."""

    method: str
    hparams: dict[str, Any] = {}
    scenario: str | None = None
    scenario_options: dict[str, Any] = {}
    protocol: dict[str, Any] = {}
    seed: int | None = None
    data_root: str | None = None
    synthetic_data: Any = None  # the `dmkd synth` marker, None for real data
    env: dict[str, str] = {}


class RunRecord(_Model):
    """One run: identity, configuration, tasks, accuracy matrices, per-task measurements, costs,
    metrics per evaluation setting and status. ``key`` and ``scenario`` are required; the rest is
    absent in a failed run's record or a record written before the field existed."""

    key: str
    config_hash: str | None = None
    config_group: str | None = None
    method: str | None = None
    label: str | None = None
    scenario: str
    setting: str | None = None  # the scenario's kind: class or domain
    settings: list[str] = []  # evaluation settings: class_il, task_il, domain_il
    seed: int | None = None
    status: str = "running"
    tuned: bool = False
    tuned_trials: int = 0
    eval_split: str = "test"
    synthetic_data: bool = False
    config: RunConfig | None = None
    n_tasks: int | None = None
    tasks: list[TaskInfo] = []
    acc: dict[str, list[list[Number]]] = {}  # acc[setting][k][j]: task j after training task k
    random_init_acc: dict[str, list[Number]] = {}
    per_task: list[PerTask] = []
    method_metrics: list[list[Any]] = []  # [name, value, step]
    artifacts: dict[str, Any] = {}
    code: dict[str, str] | None = None  # every code digest of per_task -> its git revision, for people
    started_at: str | None = None
    resumed_from_task: int | None = None
    random_init_eval_s: Number | None = None
    ranks: int | None = None  # torchrun: number of processes
    costs: Costs | None = None
    metrics: dict[str, SettingMetrics] | None = None
    finished_at: str | None = None
    error: str | None = None
    failed_at: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> RunRecord:
        """Parse a record dict; a malformed one raises UserError naming the field (and ``where``)."""
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            err = exc.errors()[0]
            # The path of field names and indices; pydantic's union/validator tags ("list[...]") left out.
            field = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p)) or "(the record)"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            src = f" {where}" if where else ""
            got = repr(err.get("input"))[:40] if err["type"] != "missing" else "nothing"
            raise UserError(f"malformed run record{src}: field {field}: {err['msg']} (got {got}){more}",
                            "delete that record and re-run the run (the suite resumes missing runs)") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict: exactly the fields that are set, in the order they were read or set."""
        return self.model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------------------------
# Kinds of value and their formatters
# ------------------------------------------------------------------------------------------------
def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_si(x: float | None, unit: str = "", base: float = 1000.0) -> str:
    """3 significant digits with k/M/G/T prefixes (binary prefixes when base is 1024)."""
    if _missing(x):
        return "–"
    prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi"] if base == 1024 else ["", "k", "M", "G", "T", "P"]
    i = 0
    v = float(x)  # type: ignore[arg-type]
    while abs(v) >= base and i < len(prefixes) - 1:
        v /= base
        i += 1
    s = f"{v:.0f}" if i == 0 and v == int(v) else f"{v:.3g}"
    return f"{s} {prefixes[i]}{unit}".strip()


def fmt_fixed(x: float, digits: int = 3, sign: bool = False) -> str:
    """Fixed decimals, never "-0.000"."""
    x = 0.0 if abs(x) < 0.5 * 10.0**-digits else x
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


@dataclass(frozen=True)
class Kind:
    """What a value is, and how one value of it is written (``–`` when missing)."""

    name: str
    write: Callable[[float], str]
    digits: int = 3  # decimals of a mean ± interval cell (fractions)

    def fmt(self, x: Any) -> str:
        return "–" if _missing(x) else self.write(float(x))


FRACTION = Kind("fraction", lambda x: fmt_fixed(x, 3))  # accuracies, forgetting: 0.816
SIGNED_FRACTION = Kind("signed fraction", lambda x: fmt_fixed(x, 3, sign=True))  # BWT, FWT: -0.070
COUNT = Kind("count", fmt_si)  # parameters: 478 k
FLOPS = Kind("flops", lambda x: fmt_si(x, "FLOP"))  # 127 GFLOP
BYTES = Kind("bytes", lambda x: fmt_si(x, "B", 1024))  # memory: 1.79 GiB
TRAFFIC_BYTES = Kind("traffic bytes", lambda x: fmt_si(x, "B"))  # bytes sent, decimal prefixes: 12.6 MB
SECONDS = Kind("seconds", lambda x: f"{x:.3g} s")  # 6.31 s
RATE = Kind("rate", lambda x: fmt_si(x, "/s"))  # samples per second: 8.56 k/s
RATIO = Kind("ratio", lambda x: f"{x:.3g}")  # passes per task: 1
ENERGY_KWH = Kind("energy (kWh)", lambda x: fmt_si(x * 1000.0, "Wh"))  # stored in kWh, shown in Wh
PERCENT = Kind("percent", lambda x: f"{100 * x:.0f}%")  # a share: 0.93 -> 93%
KINDS = {k.name: k for k in (FRACTION, SIGNED_FRACTION, COUNT, FLOPS, BYTES, TRAFFIC_BYTES, SECONDS, RATE, RATIO,
                             ENERGY_KWH, PERCENT)}


# ------------------------------------------------------------------------------------------------
# The column registry
# ------------------------------------------------------------------------------------------------
SETTING = "{setting}"  # path element standing for the evaluation setting (class_il, task_il, ...)
Getter = Callable[[Any, str | None], Any]


def lookup(rec: Any, path: Iterable[str], setting: str | None = None) -> Any:
    """The value at ``path`` in a record dict or :class:`RunRecord` (None where absent)."""
    obj = rec
    for part in path:
        part = setting if part == SETTING else part
        if obj is None or part is None:
            return None
        obj = obj.get(part) if isinstance(obj, Mapping) else getattr(obj, part, None)
    return obj


@dataclass(frozen=True)
class Column:
    """One reported number: where it is in the record, its headers and its kind.

    ``name`` is the report frame's column (and the terminal header unless ``short`` is given);
    ``title`` the report's header. ``get`` replaces the path lookup for a derived value (it gets the record and setting).
    ``metric`` columns are per evaluation setting and shown as mean ± interval in the report."""

    name: str
    title: str
    path: tuple[str, ...]
    kind: Kind
    metric: bool = False
    console: bool = True
    report: bool = True
    get: Getter | None = None
    short: str = ""

    @property
    def header(self) -> str:
        """The terminal table's header."""
        return self.short or self.name

    def value(self, rec: Any, setting: str | None = None) -> float | None:
        v = self.get(rec, setting) if self.get is not None else lookup(rec, self.path, setting)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        return float(v)

    def fmt(self, x: Any) -> str:
        return self.kind.fmt(x)


COLUMNS: dict[str, Column] = {}


def register(column: Column, *, before: str | None = None) -> Column:
    """Add (or replace) a column; ``before`` places it ahead of an existing one, else at the end."""
    COLUMNS.pop(column.name, None)
    if before is None or before not in COLUMNS:
        COLUMNS[column.name] = column
    else:
        items = list(COLUMNS.items())
        i = [k for k, _ in items].index(before)
        COLUMNS.clear()
        COLUMNS.update(items[:i] + [(column.name, column)] + items[i:])
    return column


def unregister(name: str) -> None:
    COLUMNS.pop(name, None)


def columns(where: str) -> list[Column]:
    """The columns shown in ``where``: "console", "report" (cost columns of the leaderboard) or
    "metrics" (the per-setting metrics, for both)."""
    cols = list(COLUMNS.values())
    if where == "metrics":
        return [c for c in cols if c.metric]
    if where == "console":
        return [c for c in cols if c.console]
    if where == "report":
        return [c for c in cols if c.report and not c.metric]
    raise ValueError(f"unknown place {where!r}")


MAX_LABEL = 100  # characters of a row's label: suite files refuse longer ones, reports shorten older ones


def bounded_label(label: str) -> str:
    """A label of at most MAX_LABEL characters: a longer one keeps its start and ends with a digest of
    the whole, so two long labels never become one row."""
    import hashlib

    if len(label) <= MAX_LABEL:
        return label
    return label[: MAX_LABEL - 10] + "…" + hashlib.sha256(label.encode()).hexdigest()[:8]


def codes_of(records: Iterable[Any]) -> set[str | None]:
    """The code digests that produced the tasks of these records (None: a task recorded before
    code was recorded). More than one: their numbers come from different code."""
    out: set[str | None] = set()
    for rec in records:
        for p in lookup(rec, ("per_task",)) or []:
            out.add(lookup(p, ("code",)))
    return out


def passes_of(rec: Any) -> list[float] | None:
    """Measured passes over each task's training data (``costs.passes_per_task``); None if unknown."""
    v = lookup(rec, ("costs", "passes_per_task"))
    if v is None:
        return None
    items = list(v.values()) if isinstance(v, Mapping) else v if isinstance(v, (list, tuple)) else [v]
    vals = [float(x) for x in items if x is not None]
    return vals or None


def _mean_passes(rec: Any, setting: str | None) -> float | None:
    p = passes_of(rec)
    return None if p is None else sum(p) / len(p)


def _budget_used(rec: Any, setting: str | None) -> float | None:
    used, budget = lookup(rec, ("costs", "persistent_bytes")), lookup(rec, ("costs", "budget_bytes"))
    return None if not used or not budget else float(used) / float(budget)


def _wall_s(rec: Any, setting: str | None) -> float:
    return float(lookup(rec, ("costs", "train_time_s")) or 0.0) + float(lookup(rec, ("costs", "eval_time_s")) or 0.0)


for _c in (
    Column("final_avg_acc", "Final acc. A_T", ("metrics", SETTING, "final_avg_acc"), FRACTION, metric=True,
           short="final_acc"),
    Column("avg_inc_acc", "Avg. incr. acc.", ("metrics", SETTING, "avg_inc_acc"), FRACTION, metric=True),
    Column("forgetting", "Forgetting", ("metrics", SETTING, "forgetting"), FRACTION, metric=True),
    Column("bwt", "BWT", ("metrics", SETTING, "bwt"), SIGNED_FRACTION, metric=True),
    Column("fwt", "FWT", ("metrics", SETTING, "fwt"), SIGNED_FRACTION, metric=True),
    Column("passes_per_task", "Passes/task", ("costs", "passes_per_task"), RATIO, get=_mean_passes,
           short="passes/task"),
    Column("params", "Params", ("costs", "params_total"), COUNT),
    Column("train_flops", "Train FLOPs", ("costs", "train_flops_total"), FLOPS, short="train_FLOPs"),
    Column("energy_kwh", "Energy", ("costs", "energy_kwh"), ENERGY_KWH, console=False),
    Column("peak_memory_bytes", "Peak memory of the run", ("costs", "peak_memory_bytes"), BYTES, short="peak"),
    Column("peak_increase_bytes", "Peak above start", ("costs", "peak_memory_increase_bytes"), BYTES, console=False),
    Column("persistent_bytes", "Persistent memory", ("costs", "persistent_bytes"), BYTES, short="persistent"),
    Column("budget_used", "% of budget", ("costs", "budget_bytes"), PERCENT, get=_budget_used, short="budget"),
    Column("footprint_bytes", "Footprint", ("costs", "footprint_bytes"), BYTES, short="footprint", console=False),
    Column("comm_bytes", "Comm.", ("costs", "comm_bytes"), TRAFFIC_BYTES, console=False),
    Column("train_s", "Train time", ("costs", "train_time_s"), SECONDS, report=False),
    Column("wall_s", "Wall time", ("costs", "train_time_s"), SECONDS, console=False, get=_wall_s),
):
    register(_c)
del _c

__all__ = ["COLUMNS", "MAX_LABEL", "Column", "Costs", "Kind", "PerTask", "RunConfig", "RunRecord", "SettingMetrics", "TaskInfo",
           "bounded_label", "codes_of", "columns", "fmt_si", "lookup", "passes_of", "register", "unregister"]
