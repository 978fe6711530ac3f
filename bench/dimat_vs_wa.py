"""DIMAT against WA (its ablation without permutation) on IID and Dirichlet partitions.

Split Fashion-MNIST (5 x 2 classes), MLP, P = 4 agents fully connected, 3 rounds per task sharing
the budget of ``--epochs`` passes per task (R·E = epochs), SGD lr 0.01 momentum 0.9, batch 128, agents
from distinct initialisations (seed + i). Prints final average accuracy (class-IL, task-IL) of agent 0,
the agents' mean validation accuracy after the last task, and the fraction of hidden units the
permutations moved (mean over every round of the run, and over the rounds of the last task).
``dimat[init=shared]`` and ``wa[init=shared]`` (every agent from the same weights) are the control:
they must agree (every assignment is then the identity in the first round; later rounds may move units).

    OMP_NUM_THREADS=1 python bench/dimat_vs_wa.py [--max-train N] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-train", type=int, default=0, help="cap per task (0 = full data)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partitions", default="iid,dirichlet")
    args = ap.parse_args(argv)
    sset = {"max_train_per_task": args.max_train} if args.max_train else {}
    proto = Protocol(epochs=args.epochs, batch_size=128, lr=0.01, momentum=0.9, backbone="mlp")
    print(f"Split Fashion-MNIST, P=4 full topology, rounds=3, epochs={args.epochs}, seed {args.seed}, "
          f"max_train_per_task={args.max_train or 'all'}")
    print(f"{'row':<22}{'partition':<16}{'cil':>7}{'til':>7}{'agents val':>11}{'moved (all)':>12}{'moved (last)':>13}")
    for part in args.partitions.split(","):
        extra = {"partition": part} | ({"dirichlet_alpha": 0.5} if part == "dirichlet" else {})
        rows = [("dimat", "dimat", {}), ("wa", "wa", {})]
        if part == "iid":
            rows += [("dimat[init=shared]", "dimat", {"init": "shared"}), ("wa[init=shared]", "wa", {"init": "shared"})]
        for label, method, opts in rows:
            rec = run(RunSpec(method, "split-fmnist", args.seed, method_set={"n_nodes": 4, "rounds": 3} | extra | opts,
                              scenario_set=sset, protocol=proto))
            m = rec["metrics"]
            mm = rec["method_metrics"]
            moved = [v for n, v, _ in mm if n == "moved_fraction"]
            agents = [v for n, v, _ in mm if n == "agents_mean_val_acc"]
            all_m = f"{sum(moved) / len(moved):.3f}" if moved else "-"
            last_m = f"{sum(moved[-3:]) / 3:.3f}" if moved else "-"
            print(f"{label:<22}{part + ('(0.5)' if part == 'dirichlet' else ''):<16}"
                  f"{m['class_il']['final_avg_acc']:>7.4f}{m['task_il']['final_avg_acc']:>7.4f}"
                  f"{agents[-1]:>11.4f}{all_m:>12}{last_m:>13}", flush=True)


if __name__ == "__main__":
    main()
