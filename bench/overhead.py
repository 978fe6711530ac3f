"""Harness overhead: dmkd's FT against a bare PyTorch loop on Split Fashion-MNIST.

Same MLP 784-400-400-10, SGD lr 0.01 momentum 0.9, batch 128, 1 epoch per task, data in memory
(the bare loop even gets pre-normalised float tensors). The two are alternated in one process
and the best of ``--repeats`` is kept for each. Prints training samples/s of both and the ratio
(goal >= 0.90), then evaluation time of the harness against a bare batched evaluation.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python bench/overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from harness.core.backbones import mlp
from harness.engine.runner import RunSpec, run
from scenarios.base import build_scenario


def bare_loop(scenario, seed: int) -> tuple[float, float, int]:
    """Plain PyTorch: (train seconds, eval seconds, training samples)."""
    torch.manual_seed(seed)
    model = mlp((1, 28, 28), 10)
    src = scenario.tasks[0].source
    data = src.convert(src.data)  # all images normalised once, outside the timed region
    targets = src.targets
    g = torch.Generator().manual_seed(seed)
    train_s = eval_s = 0.0
    n = 0
    for k, task in enumerate(scenario.tasks):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        t0 = time.perf_counter()
        model.train()
        idx = task.train_idx[torch.randperm(len(task.train_idx), generator=g)]
        for s in range(0, len(idx), 128):
            b = idx[s : s + 128]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data[b]), targets[b]).backward()
            opt.step()
        n += len(idx)
        train_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for t in scenario.tasks:
                for s in range(0, len(t.test_idx), 1024):
                    b = t.test_idx[s : s + 1024]
                    (model(data[b]).argmax(1) == targets[b]).sum()
        eval_s += time.perf_counter() - t0
    return train_s, eval_s, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sc = build_scenario("split-fmnist", {}, 0, None)
    best_h = best_b = 0.0
    eval_h = eval_b = float("inf")
    for _ in range(args.repeats):
        rec = run(RunSpec("ft", "split-fmnist", 0))
        best_h = max(best_h, rec["costs"]["samples_per_s"])
        eval_h = min(eval_h, rec["costs"]["eval_time_s"])
        tr, ev, n = bare_loop(sc, 0)
        best_b = max(best_b, n / tr)
        eval_b = min(eval_b, ev)
    print(f"threads: torch={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{'':24}{'harness':>12}{'bare':>12}{'ratio':>8}")
    print(f"{'train samples/s':24}{best_h:12.0f}{best_b:12.0f}{best_h / best_b:8.3f}")
    print(f"{'eval seconds (5x5 tasks)':24}{eval_h:12.3f}{eval_b:12.3f}{eval_b / eval_h:8.3f}")


if __name__ == "__main__":
    main()
