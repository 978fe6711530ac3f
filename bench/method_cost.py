"""Where the time goes: per native method, training throughput relative to FT and evaluation time.

Every registered native method (not the Avalanche twins) runs through ``harness.engine.runner.run``, the
path of ``dmkd run``, on the same scenario in the same process, right after FT, so the ratios are
measured under the same load. Columns: training samples/s, samples/s relative to FT (1/x is the step
cost in FT steps), training samples relative to FT (passes: Joint trains cumulatively, m2mKD and
DIMAT take several passes), evaluation seconds of the run (every task's evaluation plus the one at
random initialisation) and the whole run's time.

Clock: ``--clock cpu`` (default) times with the main thread's CPU time (``time.thread_time``), which
with one thread is the work done and is barely moved by other processes on a shared machine (the
runner's Stopwatch is swapped for it in this process); ``--clock wall`` keeps the runner's wall clock. ``--json`` also writes every run's final
accuracies and accuracy matrices, so that two versions of the code can be compared number by number.

    OMP_NUM_THREADS=1 nice python bench/method_cost.py [--max-train N] [--max-test N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from harness.core.protocol import Protocol
from harness.engine import runner
from harness.engine.runner import RunSpec, resolve_method, run

# The quick suite's scenarios (configs/quick.yaml) and methods, labels as there.
SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("split-fmnist", {}), ("permuted-fmnist", {"n_tasks": 5, "max_train_per_task": 12000, "max_test_per_task": 2000})]
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("ft", "ft", {}), ("joint", "joint", {}), ("ewc", "ewc", {}), ("lwf", "lwf", {}), ("si", "si", {}),
    ("er-500", "er", {"buffer_size": 500}), ("moe", "moe", {}), ("m2mkd", "m2mkd", {}), ("dmkd", "dmkd", {}),
    ("fedavg-p4", "fedavg", {"n_nodes": 4}), ("dimat-p4", "dimat", {"n_nodes": 4}),
    ("wa-p4", "wa", {"n_nodes": 4}),
]


class ThreadCpuStopwatch:
    """The runner's Stopwatch interface on the calling thread's CPU time (valid with one thread)."""

    def __init__(self, device: torch.device) -> None:
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.thread_time()

    def stop(self) -> float:
        return time.thread_time() - self.t0


TUNED = Path(__file__).resolve().parent.parent / "configs" / "tuned" / "quick"


def tuned(label: str, scenario: str, proto: Protocol) -> tuple[dict[str, Any], Protocol]:
    """The row's tuned settings (configs/tuned/quick/<scenario>.yaml, what the quick suite runs):
    method keys, and the protocol with its tuned fields; ({}, proto) when there is no entry."""
    import dataclasses

    import yaml

    path = TUNED / f"{scenario}.yaml"
    if not path.exists():
        return {}, proto
    entry = (yaml.safe_load(path.read_text()).get("entries") or {}).get(label)
    if not entry:
        return {}, proto
    params = dict(entry["params"])
    prot = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("protocol.")}
    return {k: v for k, v in params.items() if not k.startswith("protocol.")}, dataclasses.replace(proto, **prot)


def measure(label: str, method: str, mset: dict[str, Any], scenario: str, sset: dict[str, Any], seed: int,
            proto: Protocol) -> dict[str, Any]:
    clock = time.thread_time if runner.Stopwatch is ThreadCpuStopwatch else time.perf_counter
    t0 = clock()
    rec = run(RunSpec(method, scenario, seed, method_set=mset, scenario_set=sset, protocol=proto))
    wall = clock() - t0
    c = rec["costs"]
    return {
        "label": label, "scenario": scenario, "wall_s": wall, "train_s": c["train_time_s"],
        "eval_s": c["eval_time_s"] + rec.get("random_init_eval_s", 0.0), "train_samples": c["train_samples"],
        "samples_per_s": c["samples_per_s"], "acc": rec["acc"], "metrics": rec["metrics"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-train", type=int, default=0, help="cap per task (0 = the quick suite's: all of split, 12000 per permuted task)")
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="", help="comma-separated labels (default: all); ft always runs")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names (default: both)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="thread CPU time (default) or wall")
    ap.add_argument("--json", default="", help="write every run's numbers and accuracies here")
    ap.add_argument("--defaults", action="store_true",
                    help="documented defaults instead of the quick suite's tuned settings (configs/tuned/quick)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.clock == "cpu":
        runner.Stopwatch = ThreadCpuStopwatch  # type: ignore[misc,assignment]
    chosen = set(filter(None, args.methods.split(","))) | {"ft"} if args.methods else None
    scen = set(filter(None, args.scenarios.split(","))) or None
    for _, m, _ in METHODS:
        resolve_method(m)  # fail early on an unknown method
    proto = Protocol(epochs=1, batch_size=128, lr=0.01, momentum=0.9, optimizer="sgd")
    print(f"threads: torch={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"clock={args.clock} max_train={args.max_train or 'as quick'} max_test={args.max_test or 'as quick'} "
          f"seed={args.seed} settings={'defaults' if args.defaults else 'tuned (configs/tuned/quick)'}")
    rows: list[dict[str, Any]] = []
    for scenario, base in SCENARIOS:
        if scen is not None and scenario not in scen:
            continue
        sset = dict(base)  # the quick suite's options; --max-train/--max-test replace its caps
        if args.max_train:
            sset["max_train_per_task"] = args.max_train
        if args.max_test:
            sset["max_test_per_task"] = args.max_test
        print(f"\n{scenario} {base or ''}")
        print(f"{'method':<11}{'samples/s':>10}{'vs FT':>7}{'passes':>8}{'train s':>9}{'eval s':>8}{'run s':>8}")
        ft: dict[str, Any] | None = None
        measure("ft", "ft", {}, scenario, sset, args.seed, proto)  # warm-up: data conversion, first-call costs
        for label, method, mset in METHODS:
            if chosen is not None and label not in chosen:
                continue
            m_tuned, p_row = ({}, proto) if args.defaults else tuned(label, scenario, proto)
            r = measure(label, method, {**m_tuned, **mset}, scenario, sset, args.seed, p_row)
            ft = r if label == "ft" else ft
            assert ft is not None
            r["vs_ft"] = r["samples_per_s"] / ft["samples_per_s"]
            r["passes"] = r["train_samples"] / ft["train_samples"]
            rows.append(r)
            print(f"{label:<11}{r['samples_per_s']:>10.0f}{r['vs_ft']:>7.2f}{r['passes']:>8.2f}{r['train_s']:>9.2f}"
                  f"{r['eval_s']:>8.2f}{r['wall_s']:>8.2f}", flush=True)
    total = sum(r["wall_s"] for r in rows)
    print(f"\nsum of run times: {total:.1f} s ({args.clock} clock, one seed, {torch.get_num_threads()} thread(s))")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
