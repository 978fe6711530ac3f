"""Cost of counting FLOPs: torch's FlopCounterMode vs the harness's total-only FlopCounter vs none.

Times, in one process, (1) one counted training step (zero_grad, forward, cross-entropy, backward,
SGD step with momentum; batch 128) and (2) EWC's Fisher pass (``methods.common.batch_mean_fisher``
over ``--fisher-batches`` batches of 128), each under FlopCounterMode, under
``harness.core.flops.FlopCounter``, under a bare dispatch mode (its ``__torch_dispatch__`` only runs
the operator: the floor of any counter written as a Python dispatch mode) and with no counter. The
four are alternated, ``--repeats`` rounds of ``--steps`` calls each; the best round per call is
kept. ``--clock cpu`` (default) times the process's CPU time, which other work on a shared machine
disturbs far less than the wall clock (``--clock wall``); with one torch thread the two agree on an
idle machine. Both counters' FLOP totals are printed too (they must be equal). Synthetic inputs of
the backbone's shape (MLP 784-400-400-10 by default, the Fashion-MNIST runs';
``--backbone resnet18-reduced --input 3,32,32`` for a conv net).

    OMP_NUM_THREADS=1 python bench/flop_counter.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from harness.core.backbones import build_backbone
from harness.core.flops import FlopCounter
from methods.common import batch_mean_fisher


class BareMode(TorchDispatchMode):
    """Runs every operator and nothing else."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


COUNTERS = {
    "FlopCounterMode": lambda: FlopCounterMode(display=False),
    "FlopCounter": FlopCounter,
    "bare mode": BareMode,
    "no counter": contextlib.nullcontext,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mlp")
    ap.add_argument("--input", default="1,28,28", help="input shape, comma-separated")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--fisher-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="calls per round (Fisher: a fifth of them)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.input.split(","))
    model = build_backbone(args.backbone, shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    batches = [(torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,)))
               for _ in range(args.fisher_batches)]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def fisher() -> None:
        batch_mean_fisher(model, batches)

    work = {"training step": (step, args.steps), "EWC Fisher pass": (fisher, max(1, args.steps // 5))}
    best = {(w, c): float("inf") for w in work for c in COUNTERS}
    flops: dict[tuple[str, str], int] = {}
    for w, (fn, _) in work.items():  # warm-up (allocator, first-call paths)
        for c, make in COUNTERS.items():
            with make() as counter:
                fn()
            if c in ("FlopCounterMode", "FlopCounter"):
                flops[w, c] = int(counter.get_total_flops())
    for _ in range(args.repeats):
        for w, (fn, n) in work.items():
            for c, make in COUNTERS.items():
                t0 = clock()
                for _ in range(n):
                    with make():
                        fn()
                best[w, c] = min(best[w, c], (clock() - t0) / n)

    print(f"backbone {args.backbone} input {shape} batch {args.batch}; Fisher pass: {args.fisher_batches} "
          f"batches; best of {args.repeats} rounds; {args.clock} time")
    print(f"threads: torch.get_num_threads()={torch.get_num_threads()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} torch {torch.__version__}")
    print(f"{'':16s} {'FlopCounterMode':>15s} {'FlopCounter':>11s} {'bare mode':>9s} {'no counter':>10s}"
          f" {'FCM/none':>8s} {'FC/none':>7s} {'bare/none':>9s} {'FCM/FC':>6s}  FLOPs (FCM = FC)")
    for w in work:
        fcm, fc, bare, none = (best[w, c] * 1e3 for c in COUNTERS)
        same = "equal" if flops[w, "FlopCounterMode"] == flops[w, "FlopCounter"] else "DIFFER"
        print(f"{w:16s} {fcm:12.2f} ms {fc:8.2f} ms {bare:6.2f} ms {none:7.2f} ms {fcm / none:7.2f}x"
              f" {fc / none:6.2f}x {bare / none:8.2f}x {fcm / fc:5.2f}x"
              f"  {flops[w, 'FlopCounter']:.4g} ({same})")


if __name__ == "__main__":
    main()
