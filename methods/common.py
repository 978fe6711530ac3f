"""Pieces shared by several methods, written once: the KD loss and the diagonal Fisher estimator.

LwF, m2mKD and DMKD import :func:`kd_loss`; EWC and DMKD's knowledge preservation import
:func:`diagonal_fisher`. Nothing here knows about the runner.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    classes: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """τ² · KL(σ(z_teacher/τ) ‖ σ(z_student/τ)), batch mean (sum over classes, mean over samples).

    ``classes`` restricts both distributions to those logits (LwF: the old classes; DMKD: the
    classes the teacher knows). The τ² factor keeps gradient magnitudes comparable across τ
    (Hinton et al. 2015).
    """
    if classes is not None:
        idx = torch.as_tensor(classes, device=student_logits.device, dtype=torch.long)
        student_logits = student_logits.index_select(1, idx)
        teacher_logits = teacher_logits.index_select(1, idx)
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return kl * (t * t)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: the teacher snapshot at a task boundary."""
    teacher = copy.deepcopy(module)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: str = "empirical",
    max_samples: int | None = None,
    params: dict[str, nn.Parameter] | None = None,
    forward: Callable[[nn.Module, dict[str, Tensor], Tensor], Tensor] | None = None,
    per_sample: str = "auto",
    generator: torch.Generator | None = None,
    class_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher: mean over samples of the squared per-sample gradient of log p(y|x).

    labels: ``empirical`` uses the true label y; ``sampled`` draws y ~ p_θ(·|x) (the true Fisher).
    params: which parameters (name -> tensor) to estimate; default every trainable parameter.
    forward: ``forward(model, params, x) -> logits``; default ``functional_call(model, params, x)``.
    per_sample: ``auto`` (default: ``linear`` when every parameter belongs to an nn.Linear and no
        custom forward is given, else ``vmap``); ``linear`` (exact closed form: for a Linear layer
        the per-sample weight gradient is g_b a_bᵀ, so Σ_b of its square is (g²)ᵀ(a²); needs 2-D
        layer inputs and each sample through each layer at most once); ``vmap`` (torch.func);
        ``loop`` (one backward per sample, for forwards with data-dependent control flow).
    class_mask: optional additive mask on the logits (e.g. restrict to the classes seen so far).
    The model is evaluated in eval mode (BatchNorm uses running statistics).
    """
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    detached = {n: params[n].detach() for n in names}
    fwd = forward or (lambda m, p, x: functional_call(m, p, (x,)))
    was_training = model.training
    model.eval()
    fisher = {n: torch.zeros_like(detached[n]) for n in names}
    n_seen = 0

    def log_lik(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = fwd(model, p, x.unsqueeze(0))
        if class_mask is not None:
            logits = logits + class_mask
        return F.log_softmax(logits, dim=1)[0].gather(0, y.reshape(1)).squeeze(0)

    per_sample_grad = vmap(grad(log_lik), in_dims=(None, 0, 0))
    linear_of = _linear_owners(model, params)
    if per_sample == "auto":
        per_sample = "linear" if forward is None and linear_of is not None else "vmap"
    if per_sample == "linear" and linear_of is None:
        raise ValueError("per_sample='linear' needs every parameter to belong to an nn.Linear")
    for x, y in batches:
        if max_samples is not None:
            x, y = x[: max_samples - n_seen], y[: max_samples - n_seen]
        if len(y) == 0:
            break
        if labels == "sampled":
            with torch.no_grad():
                logits = fwd(model, detached, x)
                if class_mask is not None:
                    logits = logits + class_mask
                y = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        if per_sample == "linear":
            _linear_fisher_batch(model, linear_of, fisher, x, y, class_mask)
        elif per_sample == "vmap":
            g = per_sample_grad(detached, x, y)
            for n in names:
                fisher[n] += g[n].pow(2).sum(0)
        else:
            live = {n: detached[n].clone().requires_grad_(True) for n in names}
            for i in range(len(y)):
                gi = torch.autograd.grad(log_lik(live, x[i], y[i]), [live[n] for n in names], allow_unused=True)
                for n, gn in zip(names, gi):
                    if gn is not None:
                        fisher[n] += gn.pow(2)
        n_seen += len(y)
        if max_samples is not None and n_seen >= max_samples:
            break
    model.train(was_training)
    if n_seen == 0:
        return fisher
    return {n: f / n_seen for n, f in fisher.items()}


def batch_mean_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: str = "empirical",
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
    run: Callable[..., Any] | None = None,
) -> dict[str, Tensor]:
    """Diagonal importance of FACIL and Avalanche: per batch b the squared gradient of the batch-mean
    loss −mean_b log p(y|x), averaged over batches weighted by their size:
    F = Σ_b |b| (∇ ℓ_b)² / Σ_b |b| (Avalanche weights batches equally; the two differ only through a
    smaller last batch). About batch-size times smaller than :func:`diagonal_fisher`'s per-sample mean.
    labels as in :func:`diagonal_fisher`; the model is evaluated in eval mode. ``run(fn, *args)`` runs
    each batch's work (``ctx.counted``: its FLOPs measured once per batch shape); default: a plain call."""
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    n_seen = 0

    def accumulate(model: nn.Module, x: Tensor, y: Tensor) -> None:
        logits = model(x)
        if labels == "sampled":
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                fisher[n] += g.detach().pow(2) * len(y)

    for x, y in batches:
        if max_samples is not None:
            x, y = x[: max_samples - n_seen], y[: max_samples - n_seen]
        if len(y) == 0:
            break
        if run is None:
            accumulate(model, x, y)
        else:
            run(accumulate, model, x, y)
        n_seen += len(y)
        if max_samples is not None and n_seen >= max_samples:
            break
    model.train(was_training)
    if n_seen == 0:
        return fisher
    return {n: f / n_seen for n, f in fisher.items()}


def _linear_owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[nn.Linear, dict[str, str]] | None:
    """Map each nn.Linear to {'weight': name, 'bias': name} of the requested parameters, or None
    when some requested parameter does not belong to a Linear layer."""
    by_id = {id(p): n for n, p in params.items()}
    owners: dict[nn.Linear, dict[str, str]] = {}
    covered = set()
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            for kind in ("weight", "bias"):
                t = getattr(mod, kind)
                if t is not None and id(t) in by_id:
                    owners.setdefault(mod, {})[kind] = by_id[id(t)]
                    covered.add(id(t))
    if len(covered) != len(by_id):
        return None
    return owners


def _linear_fisher_batch(model, owners, fisher, x, y, class_mask) -> None:
    """Add Σ_b (per-sample gradient of log p(y_b|x_b))² for every Linear parameter, in closed form."""
    inputs: dict[nn.Linear, list[Tensor]] = {m: [] for m in owners}
    grads: dict[nn.Linear, list[Tensor]] = {m: [] for m in owners}

    def fwd_hook(mod, args, out):
        a = args[0]
        if a.dim() != 2:
            raise ValueError("the closed-form Linear Fisher needs 2-D layer inputs; use per_sample='vmap'")
        inputs[mod].append(a.detach())
        out.register_hook(lambda g, mod=mod: grads[mod].append(g.detach()))

    handles = [m.register_forward_hook(fwd_hook) for m in owners]
    try:
        with torch.enable_grad():
            logits = model(x)
            if class_mask is not None:
                logits = logits + class_mask
            # The sum over samples: each sample's gradient reaches its own rows of g.
            total = F.log_softmax(logits, dim=1).gather(1, y.reshape(-1, 1)).sum()
            # autograd.grad (not backward) leaves the parameters' .grad untouched.
            torch.autograd.grad(total, [t for m in owners for t in (m.weight, m.bias) if t is not None],
                                allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for mod, names in owners.items():
        # Hooks on outputs fire in reverse order of the forward calls.
        for a, g in zip(inputs[mod], reversed(grads[mod])):
            if "weight" in names:
                fisher[names["weight"]] += g.pow(2).t() @ a.pow(2)
            if "bias" in names:
                fisher[names["bias"]] += g.pow(2).sum(0)
