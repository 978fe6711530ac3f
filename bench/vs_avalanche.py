"""Native baselines vs their Avalanche twins: final accuracies and speed, measured in one process.

Protocol (issue #3): Split Fashion-MNIST (5 x 2, full data), MLP 784-400-400, SGD lr 0.01 momentum
0.9, batch 128, 1 epoch per task, seed 0. Both members of a pair get the same initial weights
(ctx.make_model) and the same hyperparameters, translated to Avalanche's conventions by TWINS.
Goals: |acc native − acc Avalanche| <= 0.02 and native >= 3x faster (train seconds, our meter).

    OMP_NUM_THREADS=1 python bench/vs_avalanche.py [--max-train N] [--methods ft,ewc,...]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.api import Protocol
from harness.runner import RunSpec, run

# native name, native hparams, Avalanche name, Avalanche hparams (same loss after convention changes)
TWINS: list[tuple[str, dict, str, dict]] = [
    ("ft", {}, "avl-naive", {}),
    ("joint", {}, "avl-joint", {}),
    ("ewc", {"ewc_lambda": 100.0}, "avl-ewc", {"ewc_lambda": 50.0}),  # Avalanche: no 1/2 in the penalty
    ("lwf", {"alpha": 1.0, "temperature": 2.0}, "avl-lwf", {"alpha": 4.0, "temperature": 2.0}),  # α·T²
    ("si", {"c": 1.0, "xi": 0.1}, "avl-si", {"si_lambda": 2.0, "eps": 0.1}),  # Avalanche: λ/2
    ("er", {"buffer_size": 500}, "avl-replay", {"mem_size": 500}),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-train", type=int, default=0, help="cap per task (0 = full data)")
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--methods", default=",".join(t[0] for t in TWINS))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    chosen = set(args.methods.split(","))
    opts = {"max_train_per_task": args.max_train, "max_test_per_task": args.max_test}
    proto = Protocol(epochs=1, batch_size=128, lr=0.01, momentum=0.9, optimizer="sgd", backbone="mlp")
    print(f"{'method':<8}{'twin':<12}{'acc native':>11}{'acc avl':>9}{'diff':>8}{'t native':>10}{'t avl':>8}"
          f"{'speedup':>9}   (class-IL final avg acc; train seconds)")
    for native, nset, twin, tset in TWINS:
        if native not in chosen:
            continue
        r_n = run(RunSpec(native, "split-fmnist", 0, method_set=nset, scenario_set=opts, protocol=proto))
        r_a = run(RunSpec(twin, "split-fmnist", 0, method_set=tset, scenario_set=opts, protocol=proto))
        a_n = r_n["metrics"]["class_il"]["final_avg_acc"]
        a_a = r_a["metrics"]["class_il"]["final_avg_acc"]
        t_n, t_a = r_n["costs"]["train_time_s"], r_a["costs"]["train_time_s"]
        print(f"{native:<8}{twin:<12}{a_n:>11.4f}{a_a:>9.4f}{a_n - a_a:>+8.4f}{t_n:>10.2f}{t_a:>8.2f}"
              f"{t_a / t_n:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
