"""Accuracy against bytes sent: FedAvg, DIMAT, WA (and DMKD full / salient once it is decentralized).

Split Fashion-MNIST (5 x 2 classes, class-IL and task-IL), P = 4 nodes, IID and Dirichlet(α = 0.5)
partitions, 1 local epoch per round, ``--rounds`` rounds per task, in-process backend. Prints one row
per (method, partition): final average accuracy (class-IL / task-IL), forgetting (class-IL), total
bytes, rounds, training wall seconds, and each method's bytes relative to FedAvg's on the same split.

    OMP_NUM_THREADS=2 python bench/communication.py --rounds 3

Goal (issue #5): DMKD salient (p = 10%) sends <= 0.25x FedAvg's bytes at <= 0.02 lower final accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from harness.api import METHODS, Protocol
from harness.runner import RunSpec, resolve_method, run

P = 4


def rows(rounds: int) -> list[tuple[str, str, dict]]:
    """(label, method, options) of every row; DMKD rows appear when its decentralized mode exists."""
    base = {"n_nodes": P, "rounds": rounds, "local_epochs": 1}
    out = [("FedAvg", "fedavg", base), ("DIMAT", "dimat", base | {"topology": "full"}),
           ("WA", "wa", base | {"topology": "full"})]
    out += dmkd_rows(rounds)
    return out


def dmkd_rows(rounds: int) -> list[tuple[str, str, dict]]:
    """Hook for DMKD: rows are added only if dmkd's options include training/communication switches.

    Expected option names (METHODS.md §4): training=decentralized, communication=full|salient, p.
    Adjust here when DMKD's decentralized mode lands.
    """
    resolve_method("ft")  # imports every method
    cls = METHODS.get("dmkd")
    if cls is None:
        return []
    names = {f.name for f in fields(cls.HParams)}
    if not {"training", "communication", "n_nodes"} <= names:
        return []
    base = {"training": "decentralized", "n_nodes": P, "rounds": rounds}
    return [("DMKD full", "dmkd", base | {"communication": "full"}),
            ("DMKD salient", "dmkd", base | {"communication": "salient", "p": 0.1})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=0, help="cap per task (0 = all; caps are for quick checks)")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    args = ap.parse_args()
    sset = {"max_train_per_task": args.max_train} if args.max_train else {}
    table = []
    for partition, extra in (("iid", {"partition": "iid"}), ("dirichlet(0.5)", {"partition": "dirichlet", "alpha": 0.5})):
        fedavg_bytes = None
        for label, method, opts in rows(args.rounds):
            t0 = time.perf_counter()
            rec = run(RunSpec(method, "split-fmnist", args.seed, method_set=opts | extra, scenario_set=sset,
                              protocol=Protocol(epochs=1)))
            m, c = rec["metrics"], rec["costs"]
            if method == "fedavg":
                fedavg_bytes = c["comm_bytes"]
            table.append({"method": label, "partition": partition,
                          "final_acc_class_il": m["class_il"]["final_avg_acc"],
                          "final_acc_task_il": m["task_il"]["final_avg_acc"],
                          "forgetting_class_il": m["class_il"]["forgetting"], "bytes": c["comm_bytes"],
                          "bytes_vs_fedavg": c["comm_bytes"] / fedavg_bytes if fedavg_bytes else float("nan"),
                          "rounds": c["comm_rounds"], "train_s": c["train_time_s"],
                          "wall_s": time.perf_counter() - t0})
            r = table[-1]
            print(f"{label:13s} {partition:15s} acc(cil) {r['final_acc_class_il']:.3f}  acc(til) "
                  f"{r['final_acc_task_il']:.3f}  forg {r['forgetting_class_il']:.3f}  bytes {r['bytes'] / 1e6:8.1f} MB"
                  f"  x{r['bytes_vs_fedavg']:.2f}  rounds {r['rounds']:3d}  train {r['train_s']:6.1f}s", flush=True)
    if not dmkd_rows(args.rounds):
        print("DMKD full / salient: not run (dmkd has no decentralized mode yet; see dmkd_rows)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
