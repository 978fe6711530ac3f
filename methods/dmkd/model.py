"""DMKD's model: shared encoder, N experts, a router, optional autoencoder/Gaussian gates, sparse top-K dispatch.

Each sample runs only through its K selected experts (index_select the routed rows, run the expert,
index_add back), so FlopCounterMode sees FLOPs that grow with K, not with N. ``dense=True`` computes
every expert and masks the gates instead: the same numbers, used as the reference in tests and as a
vmap-friendly forward for per-sample Fisher gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_expert(d_in: int, hidden: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class TiedAutoencoder(nn.Module):
    """x -> W^T relu(W x + b) + c: an undercomplete autoencoder with tied weights (half the parameters)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.encode = nn.Linear(d_in, hidden)
        self.decode_bias = nn.Parameter(torch.zeros(d_in))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return F.linear(torch.relu(self.encode(flat)), self.encode.weight.t(), self.decode_bias)


def make_autoencoder(d_in: int, hidden: int) -> nn.Module:
    return TiedAutoencoder(d_in, hidden)


LOG_2PI = math.log(2 * math.pi)


def diag_gaussian_log_density(f: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """B x C log N(f_b; mean_c, diag(var_c)) for features f (B, H), means and variances (C, H)."""
    diff = f.unsqueeze(1) - mean.unsqueeze(0)
    return -0.5 * ((diff.pow(2) / var.unsqueeze(0)).sum(dim=2) + var.log().sum(dim=1) + f.shape[1] * LOG_2PI)


def stacked_expert_parameters(experts: list[nn.Module]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W1 (k·H, D), b1 (k·H), W2 (k, C, H), b2 (k, C)) of k experts Linear-ReLU-Linear, still in the
    autograd graph of the experts' own parameters (gradients flow back to each expert)."""
    firsts = [e[0] for e in experts]  # type: ignore[index]
    lasts = [e[2] for e in experts]  # type: ignore[index]
    return (torch.cat([m.weight for m in firsts]), torch.cat([m.bias for m in firsts]),
            torch.stack([m.weight for m in lasts]), torch.stack([m.bias for m in lasts]))


def stacked_expert_logits(params: tuple[Tensor, Tensor, Tensor, Tensor], h: Tensor) -> Tensor:
    """k x B x C logits of k experts on the same inputs h (B, D) with one matmul per layer, the same
    function as running the experts one by one (up to float rounding)."""
    w1, b1, w2, b2 = params
    k, _, hidden = w2.shape
    z = torch.relu(F.linear(h, w1, b1)).reshape(h.shape[0], k, hidden).transpose(0, 1)
    return torch.baddbmm(b2.unsqueeze(1), z, w2.transpose(1, 2))


def top_k_gates(gates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The K largest gates per row, renormalised to sum to 1, and their expert indices."""
    values, index = gates.topk(k, dim=1)
    return values / values.sum(dim=1, keepdim=True).clamp_min(1e-12), index


class DMKDModel(nn.Module):
    """f_enc, experts M_1..M_N, router g(x) = softmax(W f_enc(x) + b + bias), autoencoders (optional).

    Buffers: ``spec_bias`` (entropy-guided routing term, added to router logits), ``owned`` (experts
    that hold data; only they are eligible under autoencoder/Gaussian routing), ``ae_scale`` (mean training
    reconstruction error per autoencoder), ``routed_counts`` (samples routed to each expert during
    training since the last reset: the weights of a module-wise average across nodes) and, for
    routing="gaussian" (SEED-like), ``gauss_mean`` / ``gauss_var`` (N x C x H: per expert and class the
    mean and diagonal variance of the expert's hidden features, Linear+ReLU output) and ``gauss_owned``
    (N x C: which class Gaussians an expert holds). They are empty (H = 0) under the other routers.
    """

    def __init__(self, encoder: nn.Module, d_enc: int, d_in: int, num_classes: int, n_experts: int,
                 expert_hidden: int, top_k: int, routing: str = "learned", ae_hidden: int = 32,
                 ae_temperature: float = 0.02, ae_relative: bool = False, combine: str = "logits",
                 gauss_temperature: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.d_enc, self.d_in, self.num_classes = d_enc, d_in, num_classes
        self.expert_hidden, self.ae_hidden = expert_hidden, ae_hidden
        self.top_k = top_k
        self.routing = routing
        self.ae_temperature = ae_temperature
        self.ae_relative = ae_relative
        self.gauss_temperature = gauss_temperature
        self.combine_mode = combine
        self.experts = nn.ModuleList(make_expert(d_enc, expert_hidden, num_classes) for _ in range(n_experts))
        self.router = nn.Linear(d_enc, n_experts)
        self.autoencoders = nn.ModuleList(
            make_autoencoder(d_in, ae_hidden) for _ in range(n_experts if routing == "autoencoder" else 0))
        self.register_buffer("spec_bias", torch.zeros(n_experts))
        self.register_buffer("owned", torch.zeros(n_experts, dtype=torch.bool))
        self.register_buffer("ae_scale", torch.ones(n_experts))
        self.register_buffer("routed_counts", torch.zeros(n_experts))
        gh = expert_hidden if routing == "gaussian" else 0
        self.register_buffer("gauss_mean", torch.zeros(n_experts, num_classes, gh))
        self.register_buffer("gauss_var", torch.ones(n_experts, num_classes, gh))
        self.register_buffer("gauss_owned", torch.zeros(n_experts, num_classes, dtype=torch.bool))

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    # ---- routing ---------------------------------------------------------------------------
    def reconstruction_errors(self, x: Tensor, only: Tensor | None = None) -> Tensor:
        """B x N mean squared reconstruction error of every autoencoder on the flattened input.

        ``only`` (N booleans) computes just those autoencoders; the other columns are 0 (the router
        masks them out, so an autoencoder of an expert without data costs nothing)."""
        flat = x.reshape(x.shape[0], -1)
        if only is None:
            return torch.stack([(ae(flat) - flat).pow(2).mean(dim=1) for ae in self.autoencoders], dim=1)
        cols = [(ae(flat) - flat).pow(2).mean(dim=1) if use else flat.new_zeros(flat.shape[0])
                for ae, use in zip(self.autoencoders, only.tolist())]
        return torch.stack(cols, dim=1)

    def expert_features(self, i: int, h: Tensor) -> Tensor:
        """Expert i's hidden layer relu(W1 h + b1): the feature space of its class Gaussians."""
        expert = self.experts[i]
        assert isinstance(expert, nn.Sequential)
        return expert[1](expert[0](h))

    def gaussian_scores(self, h: Tensor) -> Tensor:
        """B x N: s_i(x) = max over expert i's classes of log N(f_i(x); mu_ic, diag var_ic); -inf without any.

        Runs the first layer of every expert that owns Gaussians (router FLOPs grow with N, as the
        autoencoder router's do)."""
        scores = h.new_full((h.shape[0], self.n_experts), float("-inf"))
        for i in range(self.n_experts):
            own = self.gauss_owned[i]
            if not bool(own.any()):
                continue
            logp = diag_gaussian_log_density(self.expert_features(i, h), self.gauss_mean[i], self.gauss_var[i])
            scores[:, i] = logp.masked_fill(~own, float("-inf")).amax(dim=1)
        return scores

    def gate_logits(self, h: Tensor, x: Tensor) -> Tensor:
        """Router logits (before softmax) for encoded inputs h / raw inputs x."""
        if self.routing == "gaussian":
            if not bool(self.gauss_owned.any()):  # before the first fit: every expert alike
                return h.new_zeros(h.shape[0], self.n_experts) + self.spec_bias
            # Per-dimension log-likelihood over the temperature; experts without Gaussians get -inf.
            return self.gaussian_scores(h) / (self.gauss_temperature * self.expert_hidden) + self.spec_bias
        if self.routing == "autoencoder":
            # Only experts that own data compete (all of them before the first task ends).
            eligible = torch.where(self.owned.any(), self.owned, torch.ones_like(self.owned))
            err = self.reconstruction_errors(x, only=eligible)
            if self.ae_relative:
                err = err / self.ae_scale
            logits = -err / self.ae_temperature + self.spec_bias
            return logits.masked_fill(~eligible, float("-inf"))
        return self.router(h) + self.spec_bias

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(encoded inputs, full softmax gates B x N)."""
        h = self.encoder(x)
        return h, F.softmax(self.gate_logits(h, x), dim=1)

    # ---- forward ---------------------------------------------------------------------------
    def combine(self, h: Tensor, weights: Tensor, index: Tensor, dense: bool = False) -> Tensor:
        """y = sum_k weights[:, k] * M_{index[:, k]}(h), running each expert only on its rows."""
        out = h.new_zeros(h.shape[0], self.num_classes)
        if dense:
            for i, expert in enumerate(self.experts):
                w = (weights * (index == i)).sum(dim=1, keepdim=True)
                out = out + w * self._output(expert(h))
            return self._finish(out)
        for i, expert in enumerate(self.experts):
            hit = (index == i) & (weights > 0)  # a zero gate (ineligible expert) runs nothing
            rows = hit.any(dim=1).nonzero().squeeze(1)
            w = (weights * hit).sum(dim=1).index_select(0, rows).unsqueeze(1)
            out = out.index_add(0, rows, w * self._output(expert(h.index_select(0, rows))))
        return self._finish(out)

    def _output(self, logits: Tensor) -> Tensor:
        return F.softmax(logits, dim=1) if self.combine_mode == "probs" else logits

    def _finish(self, out: Tensor) -> Tensor:
        """combine=probs returns log Σ g̃_i softmax(M_i(x)) (a mixture of the experts' distributions)."""
        return out.clamp_min(1e-30).log() if self.combine_mode == "probs" else out

    def forward(self, x: Tensor, dense: bool = False, route: Tensor | None = None,
                count: bool = False) -> Tensor:
        """Logits over all classes. ``route`` (B,) forces one expert per sample (gate 1)."""
        if route is not None:
            h = self.encoder(x)
            weights, index = torch.ones_like(route, dtype=h.dtype).unsqueeze(1), route.unsqueeze(1)
        else:
            h, g = self.gates(x)
            weights, index = top_k_gates(g, self.top_k)
        if count:
            with torch.no_grad():
                self.routed_counts += F.one_hot(index, self.n_experts).sum(dim=(0, 1)).to(self.routed_counts)
        return self.combine(h, weights, index, dense=dense)

    def expert_logits(self, h: Tensor) -> Tensor:
        """B x N x C logits of every expert (dense; used by module-wise KD)."""
        return torch.stack([e(h) for e in self.experts], dim=1)

    # ---- module-wise state (decentralized issue) -------------------------------------------
    def module_names(self) -> list[str]:
        return ["encoder", "router", *[f"expert_{i}" for i in range(self.n_experts)]]

    def module(self, name: str) -> nn.Module:
        if name.startswith("expert_"):
            return self.experts[int(name.split("_")[1])]
        return getattr(self, name)

    def module_state(self, i: int) -> dict[str, Tensor]:
        """Parameters of expert i (and its autoencoder), detached: what a node sends for module i."""
        state = {f"expert.{k}": v.detach() for k, v in self.experts[i].state_dict().items()}
        if self.routing == "autoencoder":
            state |= {f"ae.{k}": v.detach() for k, v in self.autoencoders[i].state_dict().items()}
        return state

    def load_module_state(self, i: int, state: dict[str, Tensor]) -> None:
        self.experts[i].load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("expert.")})
        if self.routing == "autoencoder":
            self.autoencoders[i].load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("ae.")})

    # ---- growth and pruning ----------------------------------------------------------------
    def add_expert(self) -> int:
        """Append a freshly initialised expert (and router row, autoencoder); returns its index."""
        dev = self.router.weight.device
        self.experts.append(make_expert(self.d_enc, self.expert_hidden, self.num_classes).to(dev))
        if self.routing == "autoencoder":
            self.autoencoders.append(make_autoencoder(self.d_in, self.ae_hidden).to(dev))
        old = self.router
        self.router = nn.Linear(self.d_enc, old.out_features + 1).to(dev)
        with torch.no_grad():
            self.router.weight[:-1].copy_(old.weight)
            self.router.bias[:-1].copy_(old.bias)
        self.router.weight.requires_grad_(old.weight.requires_grad)
        self.router.bias.requires_grad_(old.bias.requires_grad)
        self.spec_bias = torch.cat([self.spec_bias, self.spec_bias.new_zeros(1)])
        self.owned = torch.cat([self.owned, self.owned.new_zeros(1)])
        self.ae_scale = torch.cat([self.ae_scale, self.ae_scale.new_ones(1)])
        self.routed_counts = torch.cat([self.routed_counts, self.routed_counts.new_zeros(1)])
        self.gauss_mean = torch.cat([self.gauss_mean, self.gauss_mean.new_zeros(1, *self.gauss_mean.shape[1:])])
        self.gauss_var = torch.cat([self.gauss_var, self.gauss_var.new_ones(1, *self.gauss_var.shape[1:])])
        self.gauss_owned = torch.cat([self.gauss_owned, self.gauss_owned.new_zeros(1, self.num_classes)])
        return self.n_experts - 1

    def remove_expert(self, i: int, merge_into: int | None = None, weight: float = 0.5) -> None:
        """Drop expert i; with ``merge_into`` first average it into that expert (weight of expert i)."""
        if merge_into is not None:
            with torch.no_grad():
                for p_dst, p_src in zip(self.experts[merge_into].parameters(), self.experts[i].parameters()):
                    p_dst.mul_(1 - weight).add_(weight * p_src)
        keep = [j for j in range(self.n_experts) if j != i]
        self.experts = nn.ModuleList(self.experts[j] for j in keep)
        if self.routing == "autoencoder":
            self.autoencoders = nn.ModuleList(self.autoencoders[j] for j in keep)
        old = self.router
        self.router = nn.Linear(self.d_enc, len(keep)).to(old.weight.device)
        with torch.no_grad():
            self.router.weight.copy_(old.weight[keep])
            self.router.bias.copy_(old.bias[keep])
        self.router.weight.requires_grad_(old.weight.requires_grad)
        self.router.bias.requires_grad_(old.bias.requires_grad)
        idx = torch.tensor(keep, device=self.spec_bias.device)
        for name in ("spec_bias", "owned", "ae_scale", "routed_counts", "gauss_mean", "gauss_var", "gauss_owned"):
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def resize(self, n: int) -> None:
        """Grow or shrink to n experts (checkpoint loading of a grown/pruned model)."""
        while self.n_experts < n:
            self.add_expert()
        while self.n_experts > n:
            self.remove_expert(self.n_experts - 1)


def build_encoder(kind: str, input_shape: tuple[int, ...], dim: int, backbone: nn.Module | None) -> tuple[nn.Module, int]:
    """(encoder, output dimension) for encoder kind linear | none | backbone."""
    d_in = math.prod(input_shape)
    if kind == "none":
        return nn.Flatten(), d_in
    if kind == "backbone":
        assert backbone is not None
        return backbone.features, int(backbone.feature_dim)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, dim), nn.ReLU()), dim


def describe(model: DMKDModel) -> dict[str, Any]:
    return {"n_experts": model.n_experts, "top_k": model.top_k, "routing": model.routing}
