"""Avalanche adapter: run Avalanche 0.6 strategies through our Method interface (optional extra).

Each ``avl-*`` method builds one Avalanche strategy around our backbone (``ctx.make_model()``, so
the initialisation equals the native methods'), with our optimiser and protocol (batch size,
epochs, device). ``train_task`` turns the task's training split into an Avalanche tensor dataset
(one copy of that task's training inputs, after the task's transform: Avalanche needs a dataset
object) and trains one experience; our runner evaluates the strategy's model with our evaluator.
A plugin tells the runner's meters about each Avalanche minibatch, so samples and FLOPs of
Avalanche's real step are counted (for Replay the minibatch includes the replayed samples), and
the end of each epoch, so that the work Avalanche does after it (EWC's importance pass) is counted
as boundary work; it also hands every backpropagated loss to the runner's finite check, so a
diverged avl-* run fails like a native one (TrainingDiverged at its task).
The optimiser is rebuilt at every task, as ``Protocol.reset_optimizer`` does for native methods.
Resume is not supported: Avalanche strategies have no state_dict; a resumed run restarts them.

Hyperparameters are Avalanche's own arguments, with Avalanche's conventions. Known differences
from our native methods (found by reading avalanche 0.6.0; see tests/test_avalanche_crosscheck.py):
- EWC: penalty ``λ Σ I (θ−θ*)²`` (no 1/2), I = squared gradient of the *batch-mean* loss averaged
  over batches, about batch-size times smaller than the per-sample Fisher. Same λ: far weaker.
- LwF: KD term ``α · KL`` without T²; our α·T² equals Avalanche's ``alpha``.
- SynapticIntelligence misbehaves: (1) it clamps the importance to at most 0.001
  (``update_ewc_data(..., clip_to=0.001)``) while the raw importance ω/(Δ²+ε) with ε=1e-7 is
  usually far above that, so every weight gets the same importance 0.001 and SI degenerates into
  a weak uniform L2 pull towards the previous weights (at si_lambda≈1, no measurable effect);
  (2) its path integral uses the gradient of the *regularised* loss (Zenke: unregularised);
  (3) it copies every gradient to the CPU at every step (slow on GPU).
- Replay: the buffer is class-balanced per experience (ExperienceBalancedBuffer), not a
  reservoir; each step concatenates a buffer minibatch of the same size.
- JointTraining can be trained once only, so each task builds a fresh JointTraining on the
  current model and the union of experiences 0..t (our ``joint``, cumulative, continuing weights).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harness.core.data import Task
from harness.core.defaults import documented
from harness.core.errors import UserError
from harness.core.method import HParams, Method, register, tensor_bytes

AVALANCHE_AVAILABLE = importlib.util.find_spec("avalanche") is not None


def missing_avalanche() -> UserError:
    return UserError("avalanche-lib is not installed", "pip install 'dmkd-bench[avalanche]'")


def task_dataset(task: Task, device: torch.device | str = "cpu") -> Any:
    """The task's training split as an Avalanche classification dataset (inputs as the model sees them)."""
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )

    xs, ys = [], []
    for x, y in task.batches("train", 4096, device=device):
        xs.append(x.cpu())
        ys.append(y.cpu())
    x, y = torch.cat(xs), torch.cat(ys)
    return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)


def _meter_plugin(ctx) -> Any:
    from avalanche.core import SupervisedPlugin

    class _RunnerMeter(SupervisedPlugin):
        """Ties Avalanche's training loop to the runner, as ``ctx.train_batches`` and ``ctx.backward``
        tie a native loop: each minibatch is counted in the sample and FLOP meters, the end of an
        epoch ends the meter's batch stream (the last step is over: what follows until the next
        minibatch or the end of the experience, e.g. EWC's importance pass, is boundary work), and
        every backpropagated loss (regularisers included) goes to the runner's finite check."""

        def before_training_iteration(self, strategy, **kwargs) -> None:
            n = len(strategy.mb_y)
            if ctx.step_hook is not None:
                ctx.step_hook(n)
            ctx.samples_seen += n

        def after_backward(self, strategy, **kwargs) -> None:
            ctx.record_loss(strategy.loss)

        def after_training_epoch(self, strategy, **kwargs) -> None:
            end = getattr(ctx.step_hook, "end_of_batches", None)
            if end is not None:
                end()

    return _RunnerMeter()


@dataclass
class AvlParams(HParams):
    """Strategies without hyperparameters of their own (Naive, JointTraining)."""


class AvalancheMethod(Method):
    """Base of every ``avl-*`` method: builds the strategy, trains one experience per task."""

    STRATEGY: ClassVar[str] = ""

    def __init__(self, hp: Any, ctx) -> None:
        if not AVALANCHE_AVAILABLE:
            raise missing_avalanche()
        super().__init__(hp, ctx)
        from avalanche.training.plugins import EvaluationPlugin

        self._evaluator = EvaluationPlugin(loggers=[])
        self.experiences: list[Any] = []
        self.strategy = self.build_strategy(self.model)

    def strategy_kwargs(self) -> dict[str, Any]:
        """Arguments shared by every strategy: our optimiser, protocol, device, silent evaluator."""
        p = self.ctx.protocol
        return {"optimizer": self.ctx.make_optimizer(self.model.parameters()), "criterion": nn.CrossEntropyLoss(),
                    "train_mb_size": p.batch_size, "train_epochs": p.epochs, "eval_mb_size": p.eval_batch_size,
                    "device": self.ctx.device, "evaluator": self._evaluator, "eval_every": -1,
                    "plugins": [_meter_plugin(self.ctx)]}

    def build_strategy(self, model: nn.Module) -> Any:
        import avalanche.training as avl

        return getattr(avl, self.STRATEGY)(model=model, **self.strategy_args(), **self.strategy_kwargs())

    def strategy_args(self) -> dict[str, Any]:
        return {}

    def before_task(self, task: Task) -> None:
        """Fresh optimiser state per task, like the native methods (Protocol.reset_optimizer)."""
        s = self.strategy
        if self.ctx.protocol.reset_optimizer or s.optimizer is None:
            s.optimizer = self.ctx.make_optimizer(s.model.parameters())

    def _experience(self, task: Task) -> Any:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

        exp = benchmark_from_datasets(train=[task_dataset(task)]).train_stream[0]
        exp.current_experience = task.id
        return exp

    def train_task(self, task: Task) -> None:
        exp = self._experience(task)
        self.experiences.append(exp)
        self.strategy.train(exp, eval_streams=[])
        self.model = self.strategy.model

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.strategy.model(x)

    def eval_mode(self) -> None:
        self.strategy.model.eval()

    def inference_modules(self) -> list[nn.Module]:
        return [self.strategy.model]

    def _buffer_bytes(self, n_samples: int) -> int:
        shape = self.ctx.scenario.input_shape
        per = 8 + 4 * int(torch.Size(shape).numel())
        return n_samples * per


@register
class AvlNaive(AvalancheMethod):
    NAME = "avl-naive"
    HParams = AvlParams
    STRATEGY = "Naive"
    DESCRIPTION = "Avalanche Naive (fine-tuning)"


@register
class AvlJoint(AvalancheMethod):
    NAME = "avl-joint"
    HParams = AvlParams
    STRATEGY = "JointTraining"
    BUDGET = "cumulative"  # JointTraining on experiences 0..t, like our joint
    DESCRIPTION = "Avalanche JointTraining, re-run cumulatively on tasks 0..t"

    def train_task(self, task: Task) -> None:
        self.experiences.append(self._experience(task))
        strategy = self.build_strategy(self.strategy.model)  # JointTraining trains once only
        strategy.optimizer = self.ctx.make_optimizer(strategy.model.parameters())
        strategy.train(self.experiences, eval_streams=[])
        self.strategy = strategy
        self.model = strategy.model


@dataclass
class AvlEWCParams(HParams):
    """Avalanche's EWC arguments (its penalty is λΣI(θ−θ*)², no 1/2, I from batch-mean gradients)."""

    ewc_lambda: float = documented(100.0, "Avalanche's λ (= our λ/2 under batch_mean)",
                                   "ours: Avalanche's EWCPlugin has no default λ; tune it", ge=0)
    mode: str = documented("separate", "separate | online", "Avalanche EWCPlugin's default mode",
                           choices=("separate", "online"))
    decay_factor: float = documented(1.0, "online mode: decay of the running importance",
                                     "ours: no decay (Avalanche requires a value in online mode)", ge=0, le=1)


@register
class AvlEWC(AvalancheMethod):
    NAME = "avl-ewc"
    HParams = AvlEWCParams
    STRATEGY = "EWC"
    DESCRIPTION = "Avalanche EWC"

    def strategy_args(self) -> dict[str, Any]:
        decay = self.hp.decay_factor if self.hp.mode == "online" else None
        return {"ewc_lambda": self.hp.ewc_lambda, "mode": self.hp.mode, "decay_factor": decay}

    def state_bytes(self) -> int:
        plugin = _find_plugin(self.strategy, "EWCPlugin")
        if plugin is None:
            return 0
        return tensor_bytes([{k: v.data for k, v in d.items()} for d in plugin.importances.values()],
                            [{k: v.data for k, v in d.items()} for d in plugin.saved_params.values()])


@dataclass
class AvlLwFParams(HParams):
    """Avalanche's LwF arguments (its KL has no T²: its alpha is our α·T²)."""

    alpha: float = documented(4.0, "Avalanche's KD weight", "ours: our LwF default α·T² = 1·2², so the twins match",
                              ge=0)
    temperature: float = documented(2.0, "KD temperature T", "Li & Hoiem 2016: T = 2", gt=0)


@register
class AvlLwF(AvalancheMethod):
    NAME = "avl-lwf"
    HParams = AvlLwFParams
    STRATEGY = "LwF"
    DESCRIPTION = "Avalanche LwF"

    def strategy_args(self) -> dict[str, Any]:
        return {"alpha": self.hp.alpha, "temperature": self.hp.temperature}

    def state_bytes(self) -> int:
        plugin = _find_plugin(self.strategy, "LwFPlugin")
        return 0 if plugin is None else tensor_bytes(plugin.lwf.prev_model)


@dataclass
class AvlSIParams(HParams):
    """Avalanche's SI arguments (penalty (λ/2)ΣΩ(θ−θ*)², Ω clamped to <= 0.001)."""

    si_lambda: float = documented(1.0, "Avalanche's λ", "ours: our SI's c = 1 for split settings", ge=0)
    eps: float = documented(1e-7, "damping ξ of Ω's denominator", "Avalanche SynapticIntelligence's default eps",
                            gt=0)


@register
class AvlSI(AvalancheMethod):
    NAME = "avl-si"
    HParams = AvlSIParams
    STRATEGY = "SynapticIntelligence"
    DESCRIPTION = "Avalanche SynapticIntelligence (importance clamped to 0.001, see module docs)"

    def strategy_args(self) -> dict[str, Any]:
        return {"si_lambda": self.hp.si_lambda, "eps": self.hp.eps}

    def state_bytes(self) -> int:
        plugin = _find_plugin(self.strategy, "SynapticIntelligencePlugin")
        if plugin is None:
            return 0
        return tensor_bytes([{k: v.data for k, v in d.items()} for d in plugin.ewc_data],
                            [{k: v.data for k, v in d.items()} for d in plugin.syn_data.values()])


@dataclass
class AvlMemParams(HParams):
    """Avalanche's memory size argument."""

    mem_size: int = documented(500, "total examples stored", "ours: ER's 500 (Avalanche's default is 200)", ge=1,
                               role="buffer_size")


class _MemoryMethod(AvalancheMethod):
    def strategy_args(self) -> dict[str, Any]:
        return {"mem_size": self.hp.mem_size}

    def state_bytes(self) -> int:
        return self._buffer_bytes(min(self.hp.mem_size, sum(len(e.dataset) for e in self.experiences)))


@register
class AvlReplay(_MemoryMethod):
    NAME = "avl-replay"
    HParams = AvlMemParams
    STRATEGY = "Replay"
    DESCRIPTION = "Avalanche Replay (experience-balanced buffer)"


@register
class AvlGDumb(_MemoryMethod):
    NAME = "avl-gdumb"
    HParams = AvlMemParams
    STRATEGY = "GDumb"
    DESCRIPTION = "Avalanche GDumb (class-balanced greedy buffer, retrain from scratch)"


@dataclass
class AvlAGEMParams(HParams):
    """Avalanche's A-GEM arguments."""

    patterns_per_exp: int = documented(100, "memory per experience",
                                       "ours: a small memory (Chaudhry et al. 2019 use 250 per task)", ge=1)
    sample_size: int = documented(64, "memory samples per reference gradient",
                                  "ours: a small sample (Chaudhry et al. 2019 use 256)", ge=1)


@register
class AvlAGEM(AvalancheMethod):
    NAME = "avl-agem"
    HParams = AvlAGEMParams
    STRATEGY = "AGEM"
    DESCRIPTION = "Avalanche A-GEM"

    def strategy_args(self) -> dict[str, Any]:
        return {"patterns_per_exp": self.hp.patterns_per_exp, "sample_size": self.hp.sample_size}

    def state_bytes(self) -> int:
        return self._buffer_bytes(self.hp.patterns_per_exp * len(self.experiences))


def _find_plugin(strategy: Any, name: str) -> Any:
    for p in getattr(strategy, "plugins", []):
        if type(p).__name__ == name:
            return p
    return None
