"""SI, Synaptic Intelligence (Zenke, Poole & Ganguli 2017), docs/methods.md §3.

Every step: ω_k += −g_k Δθ_k, with g the gradient of the *unregularised* loss and Δθ the actual
parameter change of that step (momentum and the penalty included). At the task end:
Ω_k ← max(0, Ω_k + ω_k / ((θ_k(end) − θ*_k)² + ξ)), ω ← 0, θ* ← θ(end). Loss: L_t + c Σ_k Ω_k (θ_k − θ*_k)².
This follows the official code (github ganguli-lab/pathint, pathint/protocols.py PATH_INT_PROTOCOL:
``omega = relu(prev + grads2 / ((cweights - w)**2 + xi))`` with omega_decay='sum', and the quadratic
regulariser c Σ Ω (w − cw)² without 1/2); the clamp at 0 (a negative path integral, a parameter that
moved against its gradient, would otherwise reward moving away from θ*) is ``clamp_omega``. c and ξ
default to the official code's values for the scenario's setting (SETTING_DEFAULTS).
The penalty's gradient 2cΩ(θ − θ*) is added to the gradients after backward, so that one
backward gives both g (for ω) and the regularised update, without a second graph.

Avalanche 0.6's SynapticIntelligence differs in three ways (see the adapter docs): its g includes
the penalty's gradient, its penalty is (λ/2)ΣΩ(θ−θ*)², and it clamps Ω to at most 0.001, which
makes Ω almost uniform and the regulariser nearly inert at the usual λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.core.data import Task
from harness.core.defaults import Search, documented
from harness.core.method import HParams, Method, register, tensor_bytes

# The official code's (c, ξ) per setting: fig_split_mnist/"Figure split MNIST.ipynb" (xi=1e-3, cvals=[0, 1.0])
# and fig_permuted_mnist/"Permuted MNIST.ipynb" (xi=0.1; it sweeps c in {0, 0.01, 0.1, 1}; 0.1 is the value
# the paper's text gives for permuted MNIST, taken from the paper, not from the code).
SETTING_DEFAULTS = {"class": (1.0, 1e-3), "domain": (0.1, 0.1)}


@dataclass
class SIParams(HParams):
    """SI options; each field documents its default and source (``dmkd list --method si``)."""

    c: float | None = documented(
        None, f"penalty strength c; None = the official value for the scenario's setting "
        f"(class-IL/task-IL split: {SETTING_DEFAULTS['class'][0]}, domain-IL permuted: {SETTING_DEFAULTS['domain'][0]})",
        "Zenke et al. 2017, official code ganguli-lab/pathint: split MNIST notebook c=1; the permuted MNIST "
        "notebook sweeps c in {0, 0.01, 0.1, 1}, 0.1 as in the paper's text; van de Ven et al. 2019 found "
        "up to 1e3 best for class-IL: tune it", ge=0, search=Search.log(1e-3, 1e3))
    xi: float | None = documented(
        None, f"damping ξ of Ω's denominator; None = the official value for the setting (split: "
        f"{SETTING_DEFAULTS['class'][1]:g}, permuted: {SETTING_DEFAULTS['domain'][1]:g})",
        "ganguli-lab/pathint: xi=1e-3 in the split MNIST notebook, xi=0.1 in the permuted MNIST notebook",
        gt=0, search=Search.log(1e-3, 1.0))
    clamp_omega: bool = documented(
        True, "clamp the consolidated importance Ω at 0 after each task (relu)",
        "ganguli-lab/pathint PATH_INT_PROTOCOL: omega = relu(...)")


@register
class SI(Method):
    NAME = "si"
    STATE = ("omega", "w", "anchor", "consolidated")  # checkpointed by the base class
    STATE_KINDS = {"omega": "importance", "w": "importance", "anchor": "snapshot"}
    HParams = SIParams
    DESCRIPTION = "Synaptic Intelligence: path-integral importance, quadratic penalty"

    def __init__(self, hp: SIParams, ctx) -> None:
        c, xi = SETTING_DEFAULTS.get(ctx.scenario.setting, SETTING_DEFAULTS["class"])
        hp.c = c if hp.c is None else hp.c  # resolved in place: the run's record shows the values used
        hp.xi = xi if hp.xi is None else hp.xi
        super().__init__(hp, ctx)
        ps = self._params()
        self.omega = {n: torch.zeros_like(p) for n, p in ps.items()}  # Ω, consolidated importance
        self.w = {n: torch.zeros_like(p) for n, p in ps.items()}  # ω, running path integral
        self.anchor = {n: p.detach().clone() for n, p in ps.items()}  # θ*, start of the task
        self._grad: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}
        self.consolidated = False

    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """c Σ Ω (θ − θ*)² (for reporting and tests; training adds its gradient directly)."""
        total = torch.zeros((), device=self.ctx.device)
        for n, p in self._params().items():
            total = total + (self.omega[n] * (p - self.anchor[n]).pow(2)).sum()
        return self.hp.c * total

    def after_backward(self, x: Tensor, y: Tensor, task: Task) -> None:
        with torch.no_grad():
            for n, p in self._params().items():
                if p.grad is None:
                    continue
                if n in self._grad:  # reuse the buffers of the previous step (no allocation per step)
                    self._grad[n].copy_(p.grad)
                    self._before[n].copy_(p)
                else:
                    self._grad[n] = p.grad.detach().clone()
                    self._before[n] = p.detach().clone()
                if self.consolidated:
                    p.grad.add_(self.omega[n] * (p - self.anchor[n]), alpha=2.0 * self.hp.c)

    def after_step(self, x: Tensor, y: Tensor, task: Task) -> None:
        with torch.no_grad():
            for n, p in self._params().items():
                if n in self._grad:
                    self.w[n].addcmul_(self._grad[n], p.detach() - self._before[n], value=-1.0)

    def after_task(self, task: Task) -> None:
        with torch.no_grad():
            for n, p in self._params().items():
                delta = p.detach() - self.anchor[n]
                self.omega[n].add_(self.w[n] / (delta.pow(2) + self.hp.xi))
                if self.hp.clamp_omega:
                    self.omega[n].clamp_(min=0.0)
                self.w[n].zero_()
                self.anchor[n] = p.detach().clone()
        self.consolidated = True

    def state_bytes(self) -> int:
        return tensor_bytes(self.omega, self.w, self.anchor)

