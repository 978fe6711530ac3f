"""The one Method interface, the Task/Scenario types and the run context.

Everything a method needs from the harness comes through :class:`RunContext`; everything the
harness needs from a method is the handful of hooks on :class:`Method`. The runner owns the task
loop, evaluation and every measurement so that all methods are measured the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harness.errors import UserError

# Settings a scenario can be evaluated in.
CLASS_IL = "class_il"
TASK_IL = "task_il"
DOMAIN_IL = "domain_il"
ALL_SETTINGS = frozenset({CLASS_IL, TASK_IL, DOMAIN_IL})


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class DataSource:
    """A labelled dataset addressed by integer index.

    ``batches`` yields (x, y) already on ``device``, as float inputs ready for the backbone.
    Small datasets keep everything as tensors (see :class:`TensorSource`); large ones stream
    from disk through a DataLoader (see ``scenarios.streaming.StreamingSource``).
    """

    input_shape: tuple[int, ...]
    targets: Tensor  # int64 labels of every sample, on CPU

    def batches(
        self,
        indices: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None,
        device: torch.device,
        train: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)


class TensorSource(DataSource):
    """Whole dataset held as one tensor (uint8 or float) on the training device.

    Batches are cut by index, converted to float and normalised on the fly, so there is no
    per-sample Python and no copy of the dataset.
    """

    def __init__(
        self,
        data: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        scale: float = 1.0,
    ) -> None:
        self.data = data
        self._float: Tensor | None = None
        self.targets = targets.long().cpu()
        self._targets_dev: dict[torch.device, Tensor] = {}
        self.input_shape = tuple(data.shape[1:])
        self.scale = scale
        shape = (1, -1) + (1,) * (data.dim() - 2) if data.dim() > 2 else (1, -1)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(shape)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(shape)
        if data.dim() == 2 and self.mean is not None:
            self.mean = self.mean.reshape(1, -1) if self.mean.numel() > 1 else self.mean.reshape(1, 1)
            self.std = self.std.reshape(1, -1) if self.std.numel() > 1 else self.std.reshape(1, 1)

    # Datasets up to this many bytes as float32 are normalised once and kept as floats, so that
    # batches are plain index_select (Fashion-MNIST: 220 MB); larger ones convert per batch.
    FLOAT_CACHE_BYTES = 1 << 30

    def to(self, device: torch.device) -> TensorSource:
        if self.data.device != device:
            self.data = self.data.to(device)
            self._float = None
        if getattr(self, "_float", None) is None and self.data.numel() * 4 <= self.FLOAT_CACHE_BYTES:
            self._float = self.convert(self.data)
        return self

    def _targets_on(self, device: torch.device) -> Tensor:
        if device not in self._targets_dev:
            self._targets_dev[device] = self.targets.to(device)
        return self._targets_dev[device]

    def convert(self, raw: Tensor) -> Tensor:
        x = raw.float()
        if self.scale != 1.0:
            x = x * (1.0 / self.scale)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def batches(self, indices, batch_size, *, shuffle, generator, device, train=False):
        self.to(device)
        targets = self._targets_on(device)
        idx = indices
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        idx = idx.to(device)
        cached = getattr(self, "_float", None)
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            x = cached.index_select(0, b) if cached is not None else self.convert(self.data.index_select(0, b))
            yield x, targets.index_select(0, b)


@dataclass
class Task:
    """One step of the stream: index sets into ``source`` and the classes it holds."""

    id: int
    classes: list[int]
    source: DataSource
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor
    name: str = ""
    # Optional per-task transform applied to input batches on the device (permutation, rotation).
    transform: Callable[[Tensor], Tensor] | None = None
    # Set by the runner while tuning: the test split cannot be read at all.
    test_sealed: bool = False

    def split_indices(self, split: str) -> Tensor:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        if split == "test" and self.test_sealed:
            raise PermissionError(f"task {self.id}: the test split is sealed (tuning reads validation data only)")
        return {"train": self.train_idx, "val": self.val_idx, "test": self.test_idx}[split]

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        device = torch.device(device)
        for x, y in self.source.batches(
            self.split_indices(split),
            batch_size,
            shuffle=shuffle,
            generator=generator,
            device=device,
            train=split == "train",
        ):
            if self.transform is not None:
                x = self.transform(x)
            yield x, y


@dataclass
class Scenario:
    """An ordered list of tasks plus what every method needs to know about them."""

    name: str
    setting: str  # "class" (evaluated class-IL and task-IL) or "domain" (domain-IL)
    tasks: list[Task]
    num_classes: int
    input_shape: tuple[int, ...]
    default_backbone: str
    class_names: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    # Protocol defaults of this scenario (epochs, batch size, optimiser) — overridable.
    protocol_defaults: dict[str, Any] = field(default_factory=dict)
    # The SYNTHETIC marker of data written by `dmkd synth` (None: real data); recorded with every run.
    synthetic: dict[str, Any] | None = None

    @property
    def settings(self) -> list[str]:
        return [CLASS_IL, TASK_IL] if self.setting == "class" else [DOMAIN_IL]

    def __len__(self) -> int:
        return len(self.tasks)


# --------------------------------------------------------------------------------------------
# Protocol and context
# --------------------------------------------------------------------------------------------
@dataclass
class Protocol:
    """Training protocol shared by every method of a run (the paper's 'experimental setup')."""

    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 1024
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone: str | None = None  # None: the scenario's default
    reset_optimizer: bool = True  # fresh optimiser state at every task (Avalanche/FACIL default)
    # Numerics and speed (GPU): autocast dtype of every forward pass (training, teachers, Fisher passes,
    # replay, routing, evaluation); fp16 adds torch.amp's gradient scaler. channels_last: NHWC weights and
    # image batches. compile: torch.compile the model (nn.Module.compile, in place; state dict unchanged).
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}", "use a positive batch size")
        if self.eval_batch_size < 1:
            raise UserError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}",
                            "use a positive evaluation batch size, e.g. eval_batch_size=1024")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number, got {self.lr}", "set lr=0.01 for example")
        for name in ("momentum", "weight_decay"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"{name} must be a finite number >= 0, got {v}", f"set e.g. {name}=0")
        if self.momentum >= 1:
            raise UserError(f"momentum must be < 1, got {self.momentum}", "use e.g. momentum=0.9")
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"unknown optimizer {self.optimizer!r}", "use sgd or adam")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}", f"use one of: {', '.join(PRECISIONS)}")


# Autocast dtype of each Protocol.precision (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """Raised when a training loss becomes NaN or infinite; the run is marked failed."""


class RunContext:
    """What the runner lends a method: device, seed, protocol, model factory, batches, meters.

    Methods draw training batches only through :meth:`train_batches`, which is how the runner
    counts samples and measures the FLOPs of the method's real training step.
    """

    def __init__(
        self,
        scenario: Scenario,
        protocol: Protocol,
        device: torch.device,
        seed: int,
        model_factory: Callable[[], nn.Module],
        nodes: Any = None,
    ) -> None:
        self.scenario = scenario
        self.protocol = protocol
        self.device = device
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._model_factory = model_factory
        self.comm_bytes = 0
        self.comm_rounds = 0
        self.nodes = nodes
        self.metrics: list[tuple[str, float, int]] = []  # extra per-task metrics from methods
        self.artifacts: dict[str, Any] = {}  # name -> JSON-able object, written by the runner
        self.step_hook: Callable[[int], None] | None = None  # set by the runner (FLOP meter)
        self.samples_seen = 0
        self.extra_flops = 0  # FLOPs of work outside training steps and task boundaries (see counted)
        self.current_task: Task | None = None
        self.allow_test = True  # False during tuning: test splits must not be read
        self.amp_dtype = PRECISIONS.get(protocol.precision)
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(device.type) if protocol.precision == "fp16" else None
        )

    # ---- numerics ----------------------------------------------------------------------
    def autocast(self) -> Any:
        """The protocol's autocast region; the runner wraps every method hook and evaluation in it.

        The weight-cast cache is off: it lives until the outermost region exits, so inside one region
        spanning many optimiser steps it would keep feeding the forward passes stale weights."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                              cache_enabled=False)

    def backward(self, loss: Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """``loss.backward()``; under fp16 the loss is scaled and the given optimizers' gradients are
        unscaled right after, so that hooks between backward and step see true gradients."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.unscale_(opt)

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` for each; under fp16 through the gradient scaler (a step with inf/NaN
        gradients is skipped and the scale lowered)."""
        if self.scaler is None:
            for opt in optimizers:
                opt.step()
            return
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def _memory_format(self, x: Tensor) -> Tensor:
        if self.protocol.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ---- model and optimiser -----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.scenario.num_classes

    def make_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised backbone+head for this scenario, on the device: the run's initial
        weights, or (``seed`` given) the initialisation drawn from that seed (DIMAT's agents);
        channels_last and compiled when the protocol says so."""
        model = (self._model_factory() if seed is None else self._model_factory(seed)).to(self.device)
        if self.protocol.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)
        if self.protocol.compile:
            model.compile()
        return model

    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        p = self.protocol
        lr = p.lr if lr is None else lr
        if p.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=p.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)

    # ---- data --------------------------------------------------------------------------
    def train_batches(
        self, tasks: Task | Sequence[Task], *, epochs: int | None = None, indices: dict[int, Tensor] | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled training batches over one task or the union of several (Joint).

        ``indices`` optionally restricts each task (by id) to a subset of its training indices
        (used by data partitions over nodes). Every yielded batch is counted.
        """
        task_list = [tasks] if isinstance(tasks, Task) else list(tasks)
        epochs = self.protocol.epochs if epochs is None else epochs
        bs = self.protocol.batch_size
        for _ in range(epochs):
            if len(task_list) == 1:
                t = task_list[0]
                it = _task_iter(t, indices, bs, self.generator, self.device)
            else:
                it = _union_iter(task_list, indices, bs, self.generator, self.device)
            for x, y in it:
                if self.step_hook is not None:
                    self.step_hook(len(y))
                self.samples_seen += len(y)
                yield self._memory_format(x), y

    def eval_batches(self, task: Task, split: str = "val") -> Iterator[tuple[Tensor, Tensor]]:
        """Unshuffled batches of a task's validation (default) or test split."""
        if split == "test" and not self.allow_test:
            raise PermissionError("the test split is sealed during tuning")
        batches = task.batches(split, self.protocol.eval_batch_size, device=self.device)
        if not self.protocol.channels_last:
            return batches
        return ((self._memory_format(x), y) for x, y in batches)

    # ---- meters ------------------------------------------------------------------------
    def counted(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run training work that happens between steps (DIMAT's matching passes, BatchNorm
        resets) and add its FLOPs to the run's training FLOPs."""
        from torch.utils.flop_counter import FlopCounterMode

        pause = getattr(self.step_hook, "pause", None)
        if pause is not None:
            pause()  # an open step counter would count this work twice
        with FlopCounterMode(display=False) as counter:
            out = fn(*args, **kwargs)
        self.extra_flops += int(counter.get_total_flops())
        return out

    def add_communication(self, nbytes: int, rounds: int = 0) -> None:
        self.comm_bytes += int(nbytes)
        self.comm_rounds += int(rounds)

    def log_metric(self, name: str, value: float, step: int) -> None:
        self.metrics.append((name, float(value), int(step)))


def _task_iter(t: Task, indices, bs, gen, device):
    idx = indices[t.id] if indices is not None and t.id in indices else t.train_idx
    for x, y in t.source.batches(idx, bs, shuffle=True, generator=gen, device=device, train=True):
        if t.transform is not None:
            x = t.transform(x)
        yield x, y


def _union_iter(tasks: Sequence[Task], indices, bs, gen, device):
    """Batches drawn uniformly from the union of several tasks' training sets.

    Tasks may differ in source or transform (domain-IL), so each batch is assembled from the
    per-task pieces of one global shuffled order.
    """
    sizes = []
    for t in tasks:
        idx = indices[t.id] if indices is not None and t.id in indices else t.train_idx
        sizes.append(idx)
    owner = torch.cat([torch.full((len(ix),), k, dtype=torch.long) for k, ix in enumerate(sizes)])
    local = torch.cat([ix for ix in sizes])
    order = torch.randperm(len(owner), generator=gen)
    owner, local = owner[order], local[order]
    same_source = all(t.source is tasks[0].source and t.transform is None for t in tasks)
    for start in range(0, len(owner), bs):
        ob, lb = owner[start : start + bs], local[start : start + bs]
        if same_source:
            yield next(tasks[0].source.batches(lb, len(lb), shuffle=False, generator=None, device=device, train=True))
            continue
        xs, ys = [], []
        for k in torch.unique(ob).tolist():
            sel = lb[ob == k]
            t = tasks[k]
            x, y = next(t.source.batches(sel, len(sel), shuffle=False, generator=None, device=device, train=True))
            if t.transform is not None:
                x = t.transform(x)
            xs.append(x)
            ys.append(y)
        yield torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
@dataclass
class HParams:
    """Base class of every method's hyperparameter dataclass (documented defaults)."""


class Method:
    """Base class of every continual-learning method.

    Subclasses set ``NAME``, ``SETTINGS`` (the settings they support) and ``HParams`` (a
    dataclass with documented defaults) and override a few hooks. The default
    :meth:`train_task` runs ``protocol.epochs`` epochs of :meth:`training_step` with one
    optimiser; methods with their own schedule (Joint, FedAvg, m2mKD) override it but still
    draw batches from ``ctx.train_batches`` so that samples and FLOPs are counted.
    """

    NAME: ClassVar[str] = ""
    SETTINGS: ClassVar[frozenset[str]] = ALL_SETTINGS
    HParams: ClassVar[type] = HParams
    DESCRIPTION: ClassVar[str] = ""
    # The training budget (METHODS.md §6): "epochs" = protocol.epochs passes over each task's training
    # data, whatever the schedule; "cumulative" = Joint's stated exception (the union of tasks 0..t).
    BUDGET: ClassVar[str] = "epochs"

    def __init__(self, hp: Any, ctx: RunContext) -> None:
        self.hp = hp
        self.ctx = ctx
        self.model: nn.Module = ctx.make_model()
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- hooks ---------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        if self.optimizer is None or self.ctx.protocol.reset_optimizer:
            self.optimizer = self.ctx.make_optimizer(self.trainable_parameters())

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        """Loss of one minibatch; the default is plain cross-entropy over the whole head."""
        return nn.functional.cross_entropy(self.model(x), y)

    def train_task(self, task: Task) -> None:
        self.model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        for x, y in self.ctx.train_batches(task):
            loss = self.training_step(x, y, task)
            loss_sum = loss_sum + loss.detach()
        check_finite(loss_sum, self.NAME, task.id)

    def training_step(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        """One optimiser step on a minibatch; returns the (detached-able) loss."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.training_loss(x, y, task)
        self.ctx.backward(loss, self.optimizer)
        self.after_backward(x, y, task)
        self.ctx.step(self.optimizer)
        self.after_step(x, y, task)
        return loss

    def after_backward(self, x: Tensor, y: Tensor, task: Task) -> None:
        """Called between backward and the optimiser step (gradients are available)."""

    def after_step(self, x: Tensor, y: Tensor, task: Task) -> None:
        """Called after the optimiser step (SI's path integral, ER's buffer insert)."""

    def after_task(self, task: Task) -> None:
        """Task boundary work: snapshots, importance estimates, consolidation."""

    def after_evaluation(self, task: Task) -> None:
        """Diagnostics after the runner's evaluation of ``task`` (extra metrics); not counted as
        training time or FLOPs. It must read validation data only (ctx.eval_batches(task, "val"))."""

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits over all classes of the scenario (the runner applies the masks)."""
        return self.model(x)

    def eval_mode(self) -> None:
        self.model.eval()

    # ---- accounting ----------------------------------------------------------------------
    def budget_passes(self, task: Task) -> float:
        """Passes over ``task``'s training data this method declares (the runner measures the real ones):
        protocol.epochs; under the cumulative rule, epochs x |D_0 ∪ .. ∪ D_t| / |D_t|."""
        epochs = float(self.ctx.protocol.epochs)
        if self.BUDGET == "cumulative":
            seen = self.ctx.scenario.tasks[: task.id + 1]
            return epochs * sum(len(t.train_idx) for t in seen) / max(len(task.train_idx), 1)
        return epochs

    def inference_modules(self) -> list[nn.Module]:
        """Modules whose parameters count as the method's deployed model."""
        return [self.model]

    def state_bytes(self) -> int:
        """Bytes of the method's own persistent state (buffers, Fisher maps, teacher copies)."""
        return 0

    # ---- checkpointing (resume) -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "extra": self.extra_state()}
        if self.optimizer is not None and not self.ctx.protocol.reset_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.load_extra_state(state.get("extra", {}))
        if "optimizer" in state:
            self.optimizer = self.ctx.make_optimizer(self.trainable_parameters())
            self.optimizer.load_state_dict(state["optimizer"])

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the model (teachers, importances, buffers) for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- tuning --------------------------------------------------------------------------
    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Hyperparameters suggested by an Optuna trial (ranges from the literature).

        Keys are the method's hyperparameter names; ``protocol.<field>`` keys override the
        protocol (the learning rate, tuned for every method so that budgets are equal).
        Subclasses add their own keys to ``super().search_space(trial)``.
        """
        return {"protocol.lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True)}


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate ``protocol.<field>`` entries from method hyperparameters."""
    method = {k: v for k, v in params.items() if not k.startswith("protocol.")}
    protocol = {k[len("protocol."):]: v for k, v in params.items() if k.startswith("protocol.")}
    return method, protocol


def check_finite(value: Tensor, method: str, task_id: int) -> None:
    if not bool(torch.isfinite(value)):
        raise TrainingDiverged(f"{method}: training loss became NaN/inf during task {task_id}")


def tensor_bytes(*tensors_or_dicts: Any) -> int:
    """Total bytes of tensors, possibly nested in dicts/lists/modules."""
    total = 0
    for obj in tensors_or_dicts:
        if obj is None:
            continue
        if isinstance(obj, Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, nn.Module):
            total += sum(t.numel() * t.element_size() for t in obj.state_dict().values())
        elif isinstance(obj, dict):
            total += tensor_bytes(*obj.values())
        elif isinstance(obj, (list, tuple)):
            total += tensor_bytes(*obj)
    return total


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its NAME."""
    if not cls.NAME:
        raise ValueError(f"{cls.__name__} has no NAME")
    METHODS[cls.NAME] = cls
    return cls


def hparams_from(cls: type, overrides: dict[str, Any]) -> Any:
    """Build a hyperparameter dataclass, converting string overrides to the field types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(
                f"unknown option {key!r} for {cls.__qualname__}",
                f"valid options: {', '.join(sorted(fields))}",
            )
        kwargs[key] = coerce(value, fields[key].type, key)
    hp = cls(**kwargs)
    validate = getattr(hp, "validate", None)
    if callable(validate):
        validate()
    return hp


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a CLI/YAML value to a dataclass field's declared type, with a clear error."""
    tname = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    tname = tname.replace(" ", "")
    try:
        if tname in ("int",):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tname in ("float",):
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise UserError(f"option {key}={value!r} is not a finite number", f"give {key} a finite value")
            return out
        if tname in ("bool",):
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tname in ("str",):
            return str(value)
        if tname.startswith(("str|None", "None|str")) or tname == "Optional[str]":
            return None if value in (None, "none", "None", "") else str(value)
        if tname.startswith("float|None"):
            if value in (None, "none", "None", ""):
                return None
            return coerce(value, "float", key)
        if tname.startswith("int|None"):
            return None if value in (None, "none", "None", "") else int(value)
    except (TypeError, ValueError):
        raise UserError(f"option {key}={value!r} is not a valid {tname}", f"give {key} a {tname} value") from None
    return value


def require(cond: bool, problem: str, fix: str) -> None:
    """Validation helper for hyperparameter dataclasses."""
    if not cond:
        raise UserError(problem, fix)


def choice(value: str, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}", f"set {key} to one of {list(allowed)}")
