"""Inference FLOPs per sample of DMKD's model for K = 1, 2, 4 at N = 8 (torch.utils.flop_counter).

Shows that sparse dispatch makes the experts' FLOPs grow with K, not with N: the learned router
costs the same for every K and the expert part is K times one expert. Under routing=autoencoder
every expert's autoencoder scores the input, so that routing cost grows with N (printed too).

    OMP_NUM_THREADS=1 python bench/dmkd_flops.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from methods.dmkd.hparams import DMKDParams
from methods.dmkd.model import DMKDModel


def flops_per_sample(model: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / len(x)


def build(n: int, k: int, routing: str, hp: DMKDParams) -> DMKDModel:
    torch.manual_seed(0)
    model = DMKDModel(nn.Flatten(), 784, 784, 10, n, hp.expert_hidden, k, routing, hp.ae_hidden, hp.ae_temperature)
    if routing == "autoencoder":
        model.owned.fill_(True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    hp = DMKDParams()
    x = torch.randn(args.batch, 1, 28, 28)
    one_expert = 2 * (784 * hp.expert_hidden + hp.expert_hidden * 10)
    print(f"N={args.n}, expert 784-{hp.expert_hidden}-10 ({one_expert} FLOPs/sample), batch {args.batch}")
    print(f"{'routing':<12} {'K':>2} {'FLOPs/sample':>14} {'vs K=1':>7} {'experts part':>13} {'= K x expert':>13}")
    for routing in ("learned", "autoencoder"):
        base = None
        for k in (1, 2, 4):
            f = flops_per_sample(build(args.n, k, routing, hp), x)
            base = base or f
            route_cost = flops_per_sample(build(args.n, k, routing, hp).gates, x)
            print(f"{routing:<12} {k:>2} {f:>14,.0f} {f / base:>7.2f} {f - route_cost:>13,.0f} "
                  f"{(f - route_cost) / one_expert:>13.2f}")
    dense = flops_per_sample(lambda t: build(args.n, 2, "learned", hp)(t, dense=True), x)
    print(f"dense (every expert computed, K=2 masks): {dense:,.0f} FLOPs/sample")


if __name__ == "__main__":
    main()
