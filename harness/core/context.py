"""The run context a method receives: device, seed, protocol, model factory, batches and meters.

Methods draw training batches only through :meth:`RunContext.train_batches`, which is how the runner
counts samples and measures the FLOPs of the method's real training step; work between steps goes
through :meth:`RunContext.counted` (work in ``train_task`` before its first batch or after a batch
stream's end is counted by the runner's meter). A diverged training loss raises :class:`TrainingDiverged`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from harness.core.data import Scenario, Task, task_iter, union_iter
from harness.core.flops import FlopCounter
from harness.core.protocol import PRECISIONS, Protocol


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
        # Training FLOPs each task may spend (None: no compute budget; the runner sets it per task):
        # train_batches ends a task's stream before the batch that would pass it.
        self.task_flops_budget: float | None = None
        self.budget_cut = False  # the current task's stream was cut by the compute budget
        self.samples_seen = 0
        self.extra_flops = 0  # FLOPs of work outside training steps and task boundaries (see counted)
        self.loss_sum: Tensor | None = None  # every loss through backward() this task (see check_losses)
        self.current_task: Task | None = None
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
        unscaled right after, so that hooks between backward and step see true gradients.
        Every loss is also summed (without a device sync) for the runner's finite check after the
        task (:meth:`check_losses`), so no method has to check its own losses."""
        self.record_loss(loss)
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.unscale_(opt)

    def record_loss(self, loss: Tensor) -> None:
        """Add a training loss to the sum :meth:`check_losses` checks (no device sync); :meth:`backward`
        does it for every loss it sees, a loop that backpropagates on its own (Avalanche's) calls it."""
        d = loss.detach().float()
        self.loss_sum = d if self.loss_sum is None else self.loss_sum + d

    def check_losses(self, method: str, task_id: int) -> None:
        """Raise TrainingDiverged when a loss that went through :meth:`backward` (or :meth:`record_loss`)
        during this task was inf or NaN (one device sync per task); the runner calls it after every
        ``train_task``."""
        total, self.loss_sum = self.loss_sum, None
        if total is not None:
            check_finite(total, method, task_id)

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
        (used by data partitions over nodes). Every yielded batch is counted; when the stream runs
        out (the method asks for a batch after the last one) the meter is told, so that the work
        that follows is counted as boundary work, not as a step.
        """
        task_list = [tasks] if isinstance(tasks, Task) else list(tasks)
        epochs = self.protocol.epochs if epochs is None else epochs
        bs = self.protocol.batch_size
        for _ in range(epochs):
            if len(task_list) == 1:
                t = task_list[0]
                it = task_iter(t, indices, bs, self.generator, self.device)
            else:
                it = union_iter(task_list, indices, bs, self.generator, self.device)
            for x, y in it:
                if self.task_flops_budget is not None and self._over_compute_budget(len(y)):
                    self.budget_cut = True
                    break
                if self.step_hook is not None:
                    self.step_hook(len(y))
                self.samples_seen += len(y)
                yield self._memory_format(x), y
            if self.budget_cut:
                break
        end = getattr(self.step_hook, "end_of_batches", None)
        if end is not None:
            end()

    def _over_compute_budget(self, batch: int) -> bool:
        """Whether the next step of ``batch`` samples (at the task's latest FLOPs per sample) would
        spend more than the task's compute budget (Prabhu et al., CVPR 2023: a costlier step buys
        fewer steps). The first step of a task is always taken: its cost is what is measured."""
        spent_fn = getattr(self.step_hook, "task_flops", None)
        if spent_fn is None or self.task_flops_budget is None:
            return False
        spent, per_sample = spent_fn()
        return per_sample > 0 and spent + per_sample * batch > self.task_flops_budget * (1 + 1e-9)

    def eval_batches(self, task: Task, split: str = "val") -> Iterator[tuple[Tensor, Tensor]]:
        """Unshuffled batches of a task's validation (default) or test split."""
        batches = task.batches(split, self.protocol.eval_batch_size, device=self.device)
        if not self.protocol.channels_last:
            return batches
        return ((self._memory_format(x), y) for x, y in batches)

    # ---- meters ------------------------------------------------------------------------
    # counted(): FLOPs of a call are measured once per signature (the function and the shapes, dtypes
    # and devices of its tensor arguments, the values of the others) and reused for later calls of
    # that signature, which then run without the counter's per-operation dispatch (a DIMAT run:
    # 60 merges, ~5 s of counter overhead). The counted operations (matmuls, convolutions) have
    # shape-determined FLOPs; COUNT_ONCE_PER_SIGNATURE = False measures every call.
    COUNT_ONCE_PER_SIGNATURE = True

    def counted(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run training work that happens between steps (DIMAT's matching passes, BatchNorm
        resets) and add its FLOPs to the run's training FLOPs."""
        suspend = getattr(self.step_hook, "suspend", None)
        if suspend is not None:
            suspend()  # the meter's open counter would count this work twice
        try:
            key = _signature((fn, args, kwargs)) if self.COUNT_ONCE_PER_SIGNATURE else None
            cache = self.__dict__.setdefault("_counted_flops", {})
            if key is not None and key in cache:
                out = fn(*args, **kwargs)
                self.extra_flops += cache[key]
                return out
            with FlopCounter() as counter:
                out = fn(*args, **kwargs)
            flops = counter.get_total_flops()
            if key is not None:
                cache[key] = flops
            self.extra_flops += flops
            return out
        finally:
            if suspend is not None:
                self.step_hook.resume()  # type: ignore[union-attr]

    def add_communication(self, nbytes: int, rounds: int = 0) -> None:
        self.comm_bytes += int(nbytes)
        self.comm_rounds += int(rounds)

    def log_metric(self, name: str, value: float, step: int) -> None:
        self.metrics.append((name, float(value), int(step)))


def check_finite(value: Tensor, method: str, task_id: int) -> None:
    if not bool(torch.isfinite(value)):
        raise TrainingDiverged(f"{method}: training loss became NaN/inf during task {task_id}")


def _signature(obj: Any) -> Any:
    """A hashable description of a call's arguments for :meth:`RunContext.counted`: tensors by
    shape, dtype and device; modules by identity and parameter shapes; containers recursively;
    plain values by value; functions and bound methods by identity."""
    if isinstance(obj, Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype), str(obj.device))
    if isinstance(obj, nn.Module):
        return ("M", id(obj), tuple(tuple(p.shape) for p in obj.parameters()))
    if isinstance(obj, dict):
        return ("D", tuple((_signature(k), _signature(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("L", tuple(_signature(v) for v in obj))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("V", obj)
    if hasattr(obj, "__func__") and hasattr(obj, "__self__"):  # a bound method
        return ("B", obj.__func__, id(obj.__self__))
    return ("O", type(obj).__qualname__, id(obj))

