"""Accuracy against bytes sent: FedAvg, DIMAT, WA, DMKD full and DMKD salient (p = 10%).

Split Fashion-MNIST (5 x 2 classes, class-IL and task-IL), P = 4 nodes, IID and Dirichlet(α = 0.5)
partitions, ``--rounds`` rounds per task sharing the budget of ``--epochs`` passes per task (R·E =
epochs, docs/methods.md §6: each round trains epochs / R of a pass), in-process backend. Prints one row per (method, partition): final average
accuracy (class-IL / task-IL), forgetting (class-IL), total bytes, rounds, training wall seconds, and
each method's bytes relative to FedAvg's on the same split; then the goal check per partition.
DMKD runs with its defaults (autoencoder routing, one expert per task), training=decentralized on a
fully connected topology; a sync sends only the modules routed to since the last sync.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python bench/communication.py --rounds 1

Goal (issue #5): DMKD salient (p = 10%) sends <= 0.25x FedAvg's bytes at <= 0.02 lower final accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from harness.core.method import METHODS
from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, resolve_method, run

P = 4


def rows(rounds: int) -> list[tuple[str, str, dict]]:
    """(label, method, options) of every row; DMKD rows appear when its decentralized mode exists."""
    base = {"n_nodes": P, "rounds": rounds}
    out = [("FedAvg", "fedavg", base), ("DIMAT", "dimat", base | {"topology": "full"}),
           ("WA", "wa", base | {"topology": "full"})]
    out += dmkd_rows(rounds)
    return out


def dmkd_rows(rounds: int) -> list[tuple[str, str, dict]]:
    """DMKD full and salient (salient_p = 0.1), if dmkd has its decentralized options."""
    resolve_method("ft")  # imports every method
    cls = METHODS.get("dmkd")
    if cls is None:
        return []
    names = {f.name for f in fields(cls.HParams)}
    if not {"training", "communication", "n_nodes"} <= names:
        return []
    base = {"training": "decentralized", "n_nodes": P, "rounds": rounds, "topology": "full"}
    return [("DMKD full", "dmkd", base | {"communication": "full"}),
            ("DMKD salient", "dmkd", base | {"communication": "salient", "salient_p": 0.1})]


def goal_check(table: list[dict]) -> list[str]:
    """Per partition: DMKD salient bytes <= 0.25x FedAvg's and accuracy >= FedAvg's - 0.02 (both settings)."""
    lines = []
    for part in dict.fromkeys(r["partition"] for r in table):
        by = {r["method"]: r for r in table if r["partition"] == part}
        if "FedAvg" not in by or "DMKD salient" not in by:
            continue
        f, d = by["FedAvg"], by["DMKD salient"]
        ratio = d["bytes"] / f["bytes"]
        gaps = {s: d[f"final_acc_{s}"] - f[f"final_acc_{s}"] for s in ("class_il", "task_il")}
        ok = ratio <= 0.25 and all(g >= -0.02 for g in gaps.values())
        lines.append(f"goal {part}: DMKD salient bytes x{ratio:.3f} of FedAvg (<= 0.25), accuracy difference "
                     f"class-IL {gaps['class_il']:+.3f}, task-IL {gaps['task_il']:+.3f} (>= -0.02): "
                     f"{'met' if ok else 'NOT met'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="passes per task (the protocol's budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=0, help="cap per task (0 = all; caps are for quick checks)")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    args = ap.parse_args()
    sset = {"max_train_per_task": args.max_train} if args.max_train else {}
    table = []
    for partition, extra in (("iid", {"partition": "iid"}), ("dirichlet(0.5)", {"partition": "dirichlet", "dirichlet_alpha": 0.5})):
        fedavg_bytes = None
        for label, method, opts in rows(args.rounds):
            t0 = time.perf_counter()
            rec = run(RunSpec(method, "split-fmnist", args.seed, method_set=opts | extra, scenario_set=sset,
                              protocol=Protocol(epochs=args.epochs)))
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
        print("DMKD full / salient: not run (dmkd has no decentralized options; see dmkd_rows)")
    for line in goal_check(table):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
