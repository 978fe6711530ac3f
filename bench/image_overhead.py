"""Image-pipeline overhead of the harness, in one process, on synthetic data written by `dmkd synth`.

1. In memory (Split CIFAR-10): training samples/s of the harness (``dmkd run``'s runner, FT, one task
   of every class) against a bare PyTorch loop on the same decoded uint8 tensor: same backbone and
   initial weights, batch, SGD, normalisation and augmentation (the same on-device random crop + flip).
   Goal: harness >= 0.90x the bare loop.
2. Streaming (Tiny-ImageNet JPEGs): images/s of the harness's StreamingSource (decode, resize, crop +
   flip, normalise) against torchvision's ImageFolder + DataLoader with the equivalent transforms
   (RandomCrop(64, padding=8), RandomHorizontalFlip, ToTensor, Normalize), at the same number of
   workers. Goal: streaming >= 1.0x ImageFolder.

The two sides alternate ``--repeats`` times and the best of each is kept. Defaults are modest (a few
minutes on one CPU thread):

    OMP_NUM_THREADS=1 python bench/image_overhead.py [--data-root DIR] [--train 500] [--stream 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.core.backbones import build_backbone
from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run
from scenarios.base import build_scenario
from scenarios.streaming import IMAGENET_MEAN, IMAGENET_STD, random_crop_flip
from scenarios.synth import generate


def bare_loop(data_root: str, n_train: int, backbone: str, batch: int, seed: int) -> float:
    """Plain PyTorch on the scenario's uint8 tensor: training samples/s of one epoch."""
    sc = build_scenario("split-cifar10", _opts(n_train), seed, data_root)
    task = sc.tasks[0]
    src = task.source
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(backbone, sc.input_shape, sc.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.0)
    mean = src._normalise.mean
    std = src._normalise.std
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    idx = task.train_idx[torch.randperm(len(task.train_idx), generator=g)]
    for s in range(0, len(idx), batch):
        raw = src.data.index_select(0, idx[s : s + batch])
        x = (random_crop_flip(raw, 4, g).float() / 255.0 - mean) / std
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), src.targets[idx[s : s + batch]]).backward()
        opt.step()
    return len(idx) / (time.perf_counter() - t0)


def harness_run(data_root: str, n_train: int, backbone: str, batch: int, seed: int) -> float:
    spec = RunSpec("ft", "split-cifar10", seed, {}, _opts(n_train), device="cpu", data_root=data_root,
                   protocol=Protocol(backbone=backbone, batch_size=batch, lr=0.03, momentum=0.0,
                                     eval_batch_size=1024))
    return run(spec)["costs"]["samples_per_s"]


def _opts(n_train: int) -> dict:
    return {"n_tasks": 1, "max_train_per_task": n_train, "max_test_per_task": 100, "val_fraction": 0.0}


def streaming_rate(data_root: str, n: int, batch: int, workers: int, seed: int) -> float:
    sc = build_scenario("split-tinyimagenet", {"n_tasks": 1, "max_train_per_task": n, "val_fraction": 0.0,
                                               "num_workers": workers}, seed, data_root)
    task = sc.tasks[0]
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    count = 0
    for x, _ in task.source.batches(task.train_idx, batch, shuffle=True, generator=g, device=torch.device("cpu"),
                                    train=True):
        count += len(x)
    return count / (time.perf_counter() - t0)


def imagefolder_rate(data_root: str, n: int, batch: int, workers: int, seed: int) -> float:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomCrop(64, padding=8), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(Path(data_root) / "tiny-imagenet-200" / "train"), transform=tf)
    g = torch.Generator().manual_seed(seed)
    sub = Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())
    loader = DataLoader(sub, batch_size=batch, shuffle=True, num_workers=workers, generator=g)
    t0 = time.perf_counter()
    count = 0
    for x, _ in loader:
        count += len(x)
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None, help="a `dmkd synth` root (default: write a small one)")
    ap.add_argument("--train", type=int, default=500, help="CIFAR-10 training images per measurement")
    ap.add_argument("--stream", type=int, default=1000, help="Tiny-ImageNet images per streaming measurement")
    ap.add_argument("--backbone", default="resnet18-reduced")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of both streaming pipelines")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tmp = None
    root = args.data_root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
        generate("cifar10", Path(root), scale=max(args.train / 45_000, 0.005))
        generate("tinyimagenet", Path(root), scale=max(args.stream / 100_000, 0.01))
    print(f"threads {torch.get_num_threads()}, backbone {args.backbone}, batch {args.batch}, "
          f"{args.train} CIFAR-10 training images, {args.stream} Tiny-ImageNet JPEGs, workers {args.workers}")
    bare, harness, stream, folder = [], [], [], []
    for r in range(args.repeats):
        bare.append(bare_loop(root, args.train, args.backbone, args.batch, r))
        harness.append(harness_run(root, args.train, args.backbone, args.batch, r))
        stream.append(streaming_rate(root, args.stream, args.batch, args.workers, r))
        folder.append(imagefolder_rate(root, args.stream, args.batch, args.workers, r))
        print(f"  repeat {r}: bare {bare[-1]:.1f}, harness {harness[-1]:.1f} training samples/s; "
              f"streaming {stream[-1]:.0f}, ImageFolder {folder[-1]:.0f} images/s")
    b, h, s, f = max(bare), max(harness), max(stream), max(folder)
    # Paired ratios (each repeat's two sides ran back to back, under about the same machine load):
    # their median is robust to load that changes between repeats; best-of-each is printed too.
    mem_pairs = sorted(x / y for x, y in zip(harness, bare))
    stream_pairs = sorted(x / y for x, y in zip(stream, folder))
    print(f"in memory: harness {h:.1f} vs bare loop {b:.1f} training samples/s (best of each) -> ratio {h / b:.2f}; "
          f"median paired ratio {statistics.median(mem_pairs):.2f} (goal >= 0.90)")
    print(f"streaming: StreamingSource {s:.0f} vs ImageFolder+DataLoader {f:.0f} images/s at {args.workers} "
          f"workers (best of each) -> ratio {s / f:.2f}; median paired ratio {statistics.median(stream_pairs):.2f} "
          f"(goal >= 1.0)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
