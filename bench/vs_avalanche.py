"""Native baselines vs their Avalanche twins: final accuracies and speed, measured in one process.

Protocol (issue #3): Split Fashion-MNIST (5 x 2, full data), MLP 784-400-400, SGD lr 0.01 momentum
0.9, batch 128, 1 epoch per task, seed 0. Both members of a pair get the same initial weights
(ctx.make_model) and the same hyperparameters, translated to Avalanche's conventions by TWINS.
Goals: |acc native − acc Avalanche| <= 0.02 and native >= 3x faster (train seconds, our meter).

``--whole-run`` instead compares whole runs as a user sees them (:func:`whole_run`): wall time of data
set-up, training and every evaluation of our run (``harness.engine.runner.run``, the path of ``dmkd run``)
against Avalanche driven the way its users drive it: its own ``SplitFMNIST`` benchmark (5 experiences,
fixed class order, its default ToTensor+Normalize transforms on PIL images), its strategy
(Naive/EWC/LwF/Replay/SynapticIntelligence) with an ``EvaluationPlugin`` of accuracy metrics, and
``strategy.eval(test_stream)`` before training and after every experience (as our runner evaluates).
Same process, same MLP and initial weights, same optimiser and batch sizes.

    OMP_NUM_THREADS=1 python bench/vs_avalanche.py [--max-train N] [--methods ft,ewc,...]

``--permuted`` runs the permuted anchor instead (:func:`permuted_anchor`, docs/permuted-anchor.md):
5-task Permuted Fashion-MNIST, FT under our protocol with one factor at a time switched to what
Avalanche's PermutedMNIST does, and Avalanche's own pipeline (its Naive strategy on datasets built as
its PermutedMNIST builds them) as the reference.

    OMP_NUM_THREADS=1 python bench/vs_avalanche.py --permuted [--seeds 0,1,2] [--max-train N]
    OMP_NUM_THREADS=1 python bench/vs_avalanche.py --whole-run [--methods ft,ewc,...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run

# native name, native hparams, Avalanche name, Avalanche hparams (same loss after convention changes)
TWINS: list[tuple[str, dict, str, dict]] = [
    ("ft", {}, "avl-naive", {}),
    ("joint", {}, "avl-joint", {}),
    ("ewc", {"ewc_lambda": 100.0}, "avl-ewc", {"ewc_lambda": 50.0}),  # Avalanche: no 1/2 in the penalty
    ("lwf", {"alpha": 1.0, "temperature": 2.0}, "avl-lwf", {"alpha": 4.0, "temperature": 2.0}),  # α·T²
    ("si", {"c": 1.0, "xi": 0.1}, "avl-si", {"si_lambda": 2.0, "eps": 0.1}),  # Avalanche: λ/2
    ("er", {"buffer_size": 500}, "avl-replay", {"mem_size": 500}),
]


# One factor at a time, each switched from our protocol to Avalanche PermutedMNIST's:
# (label, scenario options, protocol changes, method)
AVALANCHE_FACTORS: list[tuple[str, dict, dict, str]] = [
    ("ours (val 10%, fmnist norm, all permuted, optimiser reset)", {}, {}, "ft"),
    ("  no validation carve (val_fraction=0)", {"val_fraction": 0.0}, {}, "ft"),
    ("  task 0 unpermuted", {"first_unpermuted": True}, {}, "ft"),
    ("  MNIST normalisation (0.1307/0.3081)", {"normalization": "mnist"}, {}, "ft"),
    ("  optimiser state kept across tasks", {}, {"reset_optimizer": False}, "ft"),
    ("  Avalanche Naive strategy (adapter)", {}, {}, "avl-naive"),
    ("all Avalanche factors (val 0, mnist norm, no reset)", {"val_fraction": 0.0, "normalization": "mnist"},
     {"reset_optimizer": False}, "ft"),
]


def avalanche_permuted_reference(seed: int, n_tasks: int, max_train: int = 0, max_test: int = 0) -> float:
    """Final average accuracy of Avalanche's Naive on Permuted Fashion-MNIST built the way Avalanche's
    ``PermutedMNIST`` builds MNIST: every experience permuted (``np.random.RandomState(seed)``), the
    whole 60k training set (no validation carve), Normalize(0.1307, 0.3081), one optimiser for the
    whole stream (Avalanche keeps the SGD state across experiences). Same MLP and initialisation as
    ours (seeded build_backbone), SGD lr 0.01 momentum 0.9, batch 128, 1 epoch."""
    import numpy as np
    import torch
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from harness.core.backbones import build_backbone
    from scenarios.fmnist import load_fmnist

    tx, ty, vx, vy = load_fmnist(None)
    if max_train:
        tx, ty = tx[:max_train], ty[:max_train]
    if max_test:
        vx, vy = vx[:max_test], vy[:max_test]
    rng = np.random.RandomState(seed)
    perms = [torch.from_numpy(rng.permutation(784)).long() for _ in range(n_tasks)]

    def data(x, perm):
        return ((x.reshape(len(x), -1).float() / 255.0)[:, perm] - 0.1307) / 0.3081

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone("mlp", (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = Naive(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=128,
                     train_epochs=1, eval_mb_size=1024, device="cpu", evaluator=EvaluationPlugin(loggers=[]),
                     eval_every=-1)
    torch.manual_seed(seed)
    for t, perm in enumerate(perms):
        ds = _make_taskaware_tensor_classification_dataset(data(tx, perm), ty, targets=ty, task_labels=0)
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

        exp = benchmark_from_datasets(train=[ds]).train_stream[0]
        exp.current_experience = t
        strategy.train(exp, eval_streams=[])
    model.eval()
    accs = []
    with torch.no_grad():
        for perm in perms:
            x = data(vx, perm)
            accs.append(float((model(x).argmax(1) == vy).float().mean()))
    return float(np.mean(accs))


def permuted_anchor(seeds: list[int], n_tasks: int = 5, max_train: int = 0, max_test: int = 0) -> None:
    """FT's final accuracy on Permuted Fashion-MNIST, one Avalanche factor switched at a time, per seed."""
    import numpy as np

    print(f"Permuted Fashion-MNIST, {n_tasks} tasks, MLP 784-400-400, SGD 0.01 m0.9, batch 128, 1 epoch; "
          f"final average accuracy (domain-IL, test), seeds {seeds}")
    for label, sset, pset, method in AVALANCHE_FACTORS:
        opts = {"n_tasks": n_tasks, "max_train_per_task": max_train, "max_test_per_task": max_test} | sset
        accs = []
        for seed in seeds:
            proto = Protocol(epochs=1, batch_size=128, lr=0.01, momentum=0.9, optimizer="sgd", backbone="mlp",
                             **pset)
            rec = run(RunSpec(method, "permuted-fmnist", seed, scenario_set=opts, protocol=proto))
            accs.append(rec["metrics"]["domain_il"]["final_avg_acc"])
        print(f"{label:<56} {np.mean(accs):.4f}  per seed {' '.join(f'{a:.4f}' for a in accs)}", flush=True)
    accs = [avalanche_permuted_reference(s, n_tasks, max_train, max_test) for s in seeds]
    print(f"{'Avalanche pipeline (PermutedMNIST-style, Naive)':<56} {np.mean(accs):.4f}  per seed "
          f"{' '.join(f'{a:.4f}' for a in accs)}", flush=True)
# Avalanche strategy class per native method, for whole runs (its hyperparameters: TWINS' Avalanche side).
WHOLE_RUN_STRATEGIES = {"ft": "Naive", "ewc": "EWC", "lwf": "LwF", "si": "SynapticIntelligence", "er": "Replay"}


def _avalanche_data_root() -> Path:
    """Fashion-MNIST where torchvision's FashionMNIST (used by Avalanche's SplitFMNIST) finds it without
    downloading: <tmp>/FashionMNIST/raw/ with the decompressed idx files of our data folder."""
    import gzip
    import shutil
    import tempfile

    from scenarios.fmnist import find_fmnist

    files = find_fmnist(None)
    if files is None:
        raise SystemExit("Fashion-MNIST not found (see the README's data section)")
    root = Path(tempfile.gettempdir()) / "dmkd-avalanche-fmnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for src in files.values():
        dest = raw / src.name.removesuffix(".gz")
        if not dest.exists():
            with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return root


def avalanche_whole_run(native: str, tset: dict, proto: Protocol, root: Path) -> tuple[float, float]:
    """(wall seconds, final class-IL average accuracy) of an Avalanche user's run, benchmark creation included."""
    import avalanche.training as avl_training
    from avalanche.benchmarks.classic import SplitFMNIST
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from harness.core.backbones import mlp

    t0 = time.perf_counter()
    bench = SplitFMNIST(n_experiences=5, seed=0, fixed_class_order=list(range(10)), dataset_root=root)
    torch.manual_seed(0)  # the same initial weights as ctx.make_model() for seed 0
    model = mlp((1, 28, 28), 10)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = getattr(avl_training, WHOLE_RUN_STRATEGIES[native])(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=proto.lr, momentum=proto.momentum),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=proto.batch_size, train_epochs=proto.epochs,
        eval_mb_size=proto.eval_batch_size, device="cpu", evaluator=evaluator, **tset)
    strategy.eval(bench.test_stream)  # random initialisation, as our runner does
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
    wall = time.perf_counter() - t0
    last = evaluator.get_last_metrics()
    accs = [v for k, v in last.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")]
    return wall, sum(accs) / max(len(accs), 1)


def native_whole_run(native: str, nset: dict, proto: Protocol) -> tuple[float, float]:
    """(wall seconds, final class-IL average accuracy) of our run, data loading included."""
    from harness.engine import runner
    from scenarios.fmnist import load_fmnist

    runner._SCENARIO_CACHE.clear()
    load_fmnist.cache_clear()
    t0 = time.perf_counter()
    rec = run(RunSpec(native, "split-fmnist", 0, method_set=nset, protocol=proto))
    return time.perf_counter() - t0, rec["metrics"]["class_il"]["final_avg_acc"]


def whole_run(chosen: set[str]) -> None:
    """Print whole-run wall times (ours against Avalanche's own pipeline, same process) and the ratio."""
    proto = Protocol(epochs=1, batch_size=128, lr=0.01, momentum=0.9, optimizer="sgd", backbone="mlp")
    root = _avalanche_data_root()
    print(f"threads: torch={torch.get_num_threads()}; whole runs on Split Fashion-MNIST 5x2, full data, "
          "wall seconds of data set-up + training + 6 evaluations of every test task")
    print(f"{'method':<8}{'avalanche':<22}{'acc ours':>9}{'acc avl':>9}{'s ours':>9}{'s avl':>9}{'avl/ours':>10}")
    for native, nset, _, tset in TWINS:
        if native not in chosen or native not in WHOLE_RUN_STRATEGIES:
            continue
        t_n, a_n = native_whole_run(native, nset, proto)
        t_a, a_a = avalanche_whole_run(native, tset, proto, root)
        print(f"{native:<8}{WHOLE_RUN_STRATEGIES[native]:<22}{a_n:>9.4f}{a_a:>9.4f}{t_n:>9.2f}{t_a:>9.2f}"
              f"{t_a / t_n:>9.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-train", type=int, default=0, help="cap per task (0 = full data)")
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--methods", default=",".join(t[0] for t in TWINS))
    ap.add_argument("--permuted", action="store_true", help="run the permuted anchor (docs/permuted-anchor.md)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the permuted anchor")
    ap.add_argument("--whole-run", action="store_true", help="whole-run wall time against Avalanche's own pipeline")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.permuted:
        permuted_anchor([int(s) for s in args.seeds.split(",")], 5, args.max_train, args.max_test)
        return
    chosen = set(args.methods.split(","))
    if args.whole_run:
        whole_run(chosen)
        return
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
