"""The one Method interface and the method registry.

Everything a method needs from the harness comes through :class:`harness.core.context.RunContext`;
everything the harness needs from a method is the handful of hooks on :class:`Method`. The runner owns
the task loop, evaluation and every measurement so that all methods are measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harness.core.context import RunContext
from harness.core.data import ALL_SETTINGS, Task


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
@dataclass
class HParams:
    """Base class of every method's hyperparameter dataclass: fields declared with
    ``harness.core.config.documented`` (default, meaning, source, accepted values, search range)."""

    def validate(self) -> None:
        """Rules between fields (each field's own type, bounds and choices are checked by pydantic
        from its declaration); subclasses extend it."""


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
    # The training budget (docs/methods.md §6): "epochs" = protocol.epochs passes over each task's training
    # data, whatever the schedule; "cumulative" = Joint's stated exception (the union of tasks 0..t).
    BUDGET: ClassVar[str] = "epochs"
    # Method state a resumed run needs beyond the model (and the optimiser when it is kept across
    # tasks): attribute names, checkpointed and restored by the base class. Values are tensors,
    # containers of tensors and plain values (checkpoints load with weights_only=True).
    STATE: ClassVar[tuple[str, ...]] = ()
    # The persistent-memory kind of each key of extra_state (harness/core/memory.py: replay, importance,
    # snapshot, router, nodes, other); undeclared keys count as "other". The bytes are measured, not declared.
    STATE_KINDS: ClassVar[dict[str, str]] = {}

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
        for x, y in self.ctx.train_batches(task):
            self.training_step(x, y, task)  # its loss goes through ctx.backward: the runner checks it

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
        """Method state beyond the model for checkpoints: the attributes named in ``STATE``.
        Override it (calling super) only for state that is no such value (a module, a buffer with a
        format of its own); tests/test_resume_all.py checks every method resumes exactly."""
        return {name: getattr(self, name) for name in self.STATE}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the ``STATE`` attributes a checkpoint holds, tensors moved to the run's device."""
        for name in self.STATE:
            if name in state:
                setattr(self, name, _to_device(state[name], self.ctx.device))

    # ---- tuning --------------------------------------------------------------------------
    @classmethod
    def search_space(cls, trial: Any, cap: Any = None) -> dict[str, Any]:
        """Hyperparameters suggested by an Optuna trial: the learning rate, tuned for every method
        so that budgets are equal (``protocol.<field>`` keys override the protocol), then every
        hyperparameter declared with a search range (``documented(..., search=Search.log(1, 1e6))``,
        beside its default and source). ``cap`` bounds the capacity fields by a memory budget
        (:func:`harness.core.config.suggest_fields`). A method with a conditional space may override this."""
        from harness.core.config import suggest_fields
        from harness.core.protocol import Protocol

        shared = {f"protocol.{k}": v for k, v in suggest_fields(Protocol, trial).items()}
        return {**shared, **suggest_fields(cls.HParams, trial, cap)}


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


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors in (nested dicts, lists and tuples of) a checkpointed value, moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
