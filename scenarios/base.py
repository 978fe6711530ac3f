"""Shared pieces of every scenario: the registry, options, splits and data-root lookup."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.core.config import hparams_from
from harness.core.data import DataSource, Scenario, Task
from harness.core.defaults import documented
from harness.core.errors import UserError
from harness.core.streams import is_held_out


@dataclass
class ScenarioOptions:
    """Options every scenario accepts (``--set`` / YAML ``options:``); each field documents its
    default and source (``dmkd list --scenario NAME``). The caps draw their subset from the seed (the
    same for every method) before the validation carve; every report caption shows them."""

    val_fraction: float = documented(
        0.1, "share of each task's training data held out as its validation split (what tuning reads; "
        "the test split is never used for model selection)", "ours: a 10% hold-out of the training data", ge=0, lt=1)
    max_train_per_task: int = documented(
        0, "cap on each task's training samples (0 = all), drawn from the seed",
        "ours: quick checks and tests (configs/quick.yaml sizes Permuted tasks like Split tasks)", ge=0)
    max_test_per_task: int = documented(0, "cap on each task's test samples (0 = all), drawn from the seed",
                                        "ours: quick checks and tests", ge=0)

    def validate(self) -> None:
        """Rules between options (none here: each option's own type and bounds are checked by pydantic
        from its declaration); subclasses extend it."""


@dataclass
class ImageFileOptions(ScenarioOptions):
    """Options of the scenarios that read image files (Tiny-ImageNet, PACS, OfficeHome): how they are decoded."""

    in_memory: bool = documented(False, "decode the images the tasks use once into a uint8 tensor instead of "
                                 "streaming them", "ours (harness option)")
    num_workers: int = documented(0, "DataLoader processes that decode images (0: in-process, deterministic)",
                                  "ours (harness option)", ge=0)


@dataclass
class ScenarioSpec:
    name: str
    options: type
    build: Callable[..., Scenario]
    description: str
    default_backbone: str
    runs_on_cpu: bool = True


SCENARIOS: dict[str, ScenarioSpec] = {}


def register_scenario(name: str, options: type, default_backbone: str, description: str, runs_on_cpu: bool = True):
    def deco(fn: Callable[..., Scenario]) -> Callable[..., Scenario]:
        SCENARIOS[name] = ScenarioSpec(name, options, fn, description, default_backbone, runs_on_cpu)
        return fn

    return deco


def build_scenario(name: str, options: dict[str, Any] | None, seed: int, data_root: str | None) -> Scenario:
    """Resolve a scenario by name and build it for one seed."""
    import scenarios  # noqa: F401  (registers every scenario)

    if name not in SCENARIOS:
        raise UserError(f"unknown scenario {name!r}", f"choose one of: {', '.join(SCENARIOS)}")
    spec = SCENARIOS[name]
    opts = hparams_from(spec.options, dict(options or {}))
    sc = spec.build(opts, seed=seed, data_root=data_root)
    sc.options = dataclasses.asdict(opts)
    if sc.synthetic is not None:
        sc.options["synthetic_data"] = True  # shown wherever the options are (records, MLflow params)
    return sc


def scenario_option_names(name: str) -> list[str]:
    import scenarios  # noqa: F401

    return [f.name for f in dataclasses.fields(SCENARIOS[name].options)]


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def class_order(n_classes: int, shuffle: bool, seed: int) -> list[int]:
    """The order classes enter a class-incremental stream: 0..n-1, or drawn from the seed when
    ``shuffle`` is set or the stream is a held-out tuning stream (harness/core/streams.py: another
    class order than the evaluation stream's)."""
    if shuffle or is_held_out(seed):
        return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return list(range(n_classes))


def split_train_val(
    indices: Tensor, targets: Tensor, val_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Stratified split of a task's training indices into train and validation.

    Each class keeps ``round(n_c * val_fraction)`` samples for validation; the result is
    sorted so that the same seed always gives the same split.
    """
    if val_fraction <= 0:
        return indices.sort().values, indices[:0]
    tr, va = [], []
    labels = targets[indices]
    for c in torch.unique(labels).tolist():
        ix = indices[labels == c]
        ix = ix[torch.randperm(len(ix), generator=generator)]
        n_val = round(len(ix) * val_fraction)
        va.append(ix[:n_val])
        tr.append(ix[n_val:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def cap(indices: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """A random subset of at most n indices (n = 0: all), sorted."""
    if n <= 0 or len(indices) <= n:
        return indices
    return indices[torch.randperm(len(indices), generator=generator)[:n]].sort().values


def class_split_tasks(
    source: DataSource,
    train_targets: Tensor,
    test_targets: Tensor,
    test_offset: int,
    class_order: Sequence[int],
    n_tasks: int,
    opts: ScenarioOptions,
    seed: int,
    test_source: DataSource | None = None,
) -> list[Task]:
    """Class-incremental tasks: class_order cut into n_tasks equal groups.

    ``source`` holds train samples at [0, len(train_targets)) and test samples from
    ``test_offset`` (or lives in ``test_source`` when given, then test_offset is 0).
    """
    n_classes = len(class_order)
    if n_tasks < 1 or n_classes % n_tasks != 0:
        raise UserError(
            f"{n_classes} classes cannot be split into {n_tasks} equal tasks",
            "choose n_tasks that divides the number of classes",
        )
    per = n_classes // n_tasks
    g = torch.Generator().manual_seed(seed + 7919)
    task_source = source if test_source is None else _SplitSource(source, test_source, test_offset)
    tasks = []
    for t in range(n_tasks):
        classes = [int(c) for c in class_order[t * per : (t + 1) * per]]
        cls = torch.tensor(classes)
        tr = torch.nonzero(torch.isin(train_targets, cls)).flatten()
        te = torch.nonzero(torch.isin(test_targets, cls)).flatten() + test_offset
        tr = cap(tr, opts.max_train_per_task, g)
        te = cap(te, opts.max_test_per_task, g)
        tr, va = split_train_val(tr, source.targets, opts.val_fraction, g)
        tasks.append(Task(t, classes, task_source, tr, va, te, name=f"classes {classes}"))
    return tasks


class _SplitSource(DataSource):
    """Train and test held by two sources; indices >= offset address the test source."""

    def __init__(self, train: DataSource, test: DataSource, offset: int) -> None:
        self.train, self.test, self.offset = train, test, offset
        self.input_shape = train.input_shape
        self.targets = torch.cat([train.targets, test.targets])

    def batches(self, indices, batch_size, *, shuffle, generator, device, train=False) -> Iterator:
        if len(indices) and bool((indices >= self.offset).all()):
            return self.test.batches(indices - self.offset, batch_size, shuffle=shuffle, generator=generator,
                                     device=device, train=train)
        return self.train.batches(indices, batch_size, shuffle=shuffle, generator=generator, device=device,
                                  train=train)


# ---------------------------------------------------------------------------------------------
# Data roots
# ---------------------------------------------------------------------------------------------
def candidate_roots(data_root: str | None, *extra: str) -> list[Path]:
    """Where to look for data, in order: --data-root, $DMKD_DATA, then the given defaults."""
    roots: list[Path] = []
    if data_root:
        p = Path(data_root).expanduser()
        if not p.exists():
            raise UserError(f"data root {p} does not exist", "pass an existing folder to --data-root")
        if not p.is_dir():
            raise UserError(f"data root {p} is not a folder", "pass the folder that holds the data to --data-root")
        if not os.access(p, os.R_OK | os.X_OK):
            raise UserError(f"data root {p} is not readable", "fix its permissions or pass another --data-root")
        roots.append(p)
    env = os.environ.get("DMKD_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots += [Path(e) for e in extra]
    return roots


def find_dir(roots: Sequence[Path], names: Sequence[str], must_contain: Sequence[str]) -> Path | None:
    """First folder among roots (or roots/<name>) that holds every entry of must_contain."""
    for r in roots:
        for cand in [r, *[r / n for n in names]]:
            if cand.is_dir() and all((cand / m).exists() for m in must_contain):
                return cand
    return None
