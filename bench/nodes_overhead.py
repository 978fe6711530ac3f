"""Cost of the in-process nodes simulator against the same compute done centrally.

FedAvg with P nodes, R rounds and E = 1 local epoch processes every training sample R times per
task, like FT with R epochs per task. Both run on Split Fashion-MNIST (MLP, batch 128) in one
process, alternated, best of ``--repeats``; prints training seconds and the ratio (goal <= 1.15x).

    OMP_NUM_THREADS=2 python bench/nodes_overhead.py --rounds 2 --repeats 2
"""

from __future__ import annotations

import argparse

from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=0)
    args = ap.parse_args()
    sset = {"max_train_per_task": args.max_train} if args.max_train else {}
    best = {"ft": float("inf"), "fedavg": float("inf")}
    samples = {}
    for _ in range(args.repeats):
        for name, spec in (
            ("ft", RunSpec("ft", "split-fmnist", 0, scenario_set=sset, protocol=Protocol(epochs=args.rounds))),
            ("fedavg", RunSpec("fedavg", "split-fmnist", 0, scenario_set=sset, protocol=Protocol(epochs=args.rounds),
                               method_set={"n_nodes": args.nodes, "rounds": args.rounds, "local_epochs": 1})),
        ):
            c = run(spec)["costs"]
            best[name] = min(best[name], c["train_time_s"])
            samples[name] = c["train_samples"]
    print(f"centralized FT ({args.rounds} epochs/task): {best['ft']:.2f}s, {samples['ft']} samples")
    print(f"FedAvg in-process (P={args.nodes}, R={args.rounds}, E=1): {best['fedavg']:.2f}s, {samples['fedavg']} samples")
    print(f"ratio in-process / centralized: {best['fedavg'] / best['ft']:.3f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
