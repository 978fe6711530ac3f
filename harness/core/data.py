"""Data types of a run: settings, data sources, tasks, scenarios and the training-batch iterators.

A scenario is an ordered list of :class:`Task` objects; each task holds index sets into a
:class:`DataSource`. The iterators at the end assemble shuffled training batches of one task or of
the union of several (Joint); :class:`harness.core.context.RunContext` draws from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Settings a scenario can be evaluated in.
CLASS_IL = "class_il"
TASK_IL = "task_il"
DOMAIN_IL = "domain_il"
ALL_SETTINGS = frozenset({CLASS_IL, TASK_IL, DOMAIN_IL})


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class SampleCodec:
    """Stores inputs of a uint8 :class:`TensorSource` compactly: ``encode`` inverts the source's
    normalisation and rounds back to uint8, ``decode`` is the source's own conversion, so
    ``decode(encode(x))`` is bit-identical to ``x`` for every input the source (and a value-preserving
    transform such as a pixel permutation) produced. A sample costs 1 byte per pixel, as the
    continual-learning papers count stored exemplars (e.g. Zhou et al., ICLR 2023)."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.dtype = torch.uint8

    def encode(self, x: Tensor) -> Tensor:
        src = self.source
        raw = x.float()
        if src.mean is not None:
            raw = raw * src.std.to(x.device) + src.mean.to(x.device)
        return (raw * src.scale).round_().clamp_(0, 255).to(torch.uint8)

    def decode(self, stored: Tensor) -> Tensor:
        return self.source.convert(stored)


class DataSource:
    """A labelled dataset addressed by integer index.

    ``batches`` yields (x, y) already on ``device``, as float inputs ready for the backbone.
    Small datasets keep everything as tensors (see :class:`TensorSource`); large ones stream
    from disk through a DataLoader (see ``scenarios.streaming.StreamingSource``).
    """

    input_shape: tuple[int, ...]
    targets: Tensor  # int64 labels of every sample, on CPU

    def batches(
        self,
        indices: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None,
        device: torch.device,
        train: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)


class TensorSource(DataSource):
    """Whole dataset held as one tensor (uint8 or float) on the training device.

    Batches are cut by index, converted to float and normalised on the fly, so there is no
    per-sample Python and no copy of the dataset.
    """

    def __init__(
        self,
        data: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        scale: float = 1.0,
    ) -> None:
        self.data = data
        self._float: Tensor | None = None
        self.targets = targets.long().cpu()
        self._targets_dev: dict[torch.device, Tensor] = {}
        self.input_shape = tuple(data.shape[1:])
        self.scale = scale
        shape = (1, -1) + (1,) * (data.dim() - 2) if data.dim() > 2 else (1, -1)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(shape)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(shape)
        if data.dim() == 2 and self.mean is not None:
            self.mean = self.mean.reshape(1, -1) if self.mean.numel() > 1 else self.mean.reshape(1, 1)
            self.std = self.std.reshape(1, -1) if self.std.numel() > 1 else self.std.reshape(1, 1)

    # Datasets up to this many bytes as float32 are normalised once and kept as floats, so that
    # batches are plain index_select (Fashion-MNIST: 220 MB); larger ones convert per batch.
    FLOAT_CACHE_BYTES = 1 << 30

    def to(self, device: torch.device) -> TensorSource:
        if self.data.device != device:
            self.data = self.data.to(device)
            self._float = None
        if getattr(self, "_float", None) is None and self.data.numel() * 4 <= self.FLOAT_CACHE_BYTES:
            self._float = self.convert(self.data)
        return self

    def _targets_on(self, device: torch.device) -> Tensor:
        if device not in self._targets_dev:
            self._targets_dev[device] = self.targets.to(device)
        return self._targets_dev[device]

    def convert(self, raw: Tensor) -> Tensor:
        x = raw.float()
        if self.scale != 1.0:
            x = x * (1.0 / self.scale)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def codec(self) -> SampleCodec | None:
        """How to store this source's inputs as the source holds them (uint8 images as uint8): the
        inverse of :meth:`convert`; None where the source's data is not uint8."""
        if self.data.dtype != torch.uint8:
            return None
        return SampleCodec(self)

    def batches(self, indices, batch_size, *, shuffle, generator, device, train=False):
        self.to(device)
        targets = self._targets_on(device)
        idx = indices
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        idx = idx.to(device)
        cached = getattr(self, "_float", None)
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            x = cached.index_select(0, b) if cached is not None else self.convert(self.data.index_select(0, b))
            yield x, targets.index_select(0, b)


@dataclass
class Task:
    """One step of the stream: index sets into ``source`` and the classes it holds."""

    id: int
    classes: list[int]
    source: DataSource
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor
    name: str = ""
    # Optional per-task transform applied to input batches on the device (permutation, rotation).
    transform: Callable[[Tensor], Tensor] | None = None
    # Set by the runner while tuning: the test split cannot be read at all.
    test_sealed: bool = False

    def codec(self) -> SampleCodec | None:
        """The source's :class:`SampleCodec` when this task's inputs are exactly representable in the
        source's stored format (no transform, or a value-preserving one such as a pixel permutation;
        a rotation interpolates, so rotated inputs are stored as float); else None."""
        codec = self.source.codec() if hasattr(self.source, "codec") else None
        if codec is None or (self.transform is not None and not getattr(self.transform, "value_preserving", False)):
            return None
        return codec

    def split_indices(self, split: str) -> Tensor:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        if split == "test" and self.test_sealed:
            raise PermissionError(f"task {self.id}: the test split is sealed (tuning reads validation data only)")
        return {"train": self.train_idx, "val": self.val_idx, "test": self.test_idx}[split]

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return self.samples(self.split_indices(split), batch_size, shuffle=shuffle, generator=generator,
                            device=device, train=split == "train")

    def samples(
        self,
        indices: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        train: bool = True,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of the source's samples ``indices`` with the task's transform applied: the one
        place a task's inputs are made (splits, node shards, statistics batches)."""
        for x, y in self.source.batches(indices, batch_size, shuffle=shuffle, generator=generator,
                                        device=torch.device(device), train=train):
            yield (self.transform(x) if self.transform is not None else x), y


@dataclass
class Scenario:
    """An ordered list of tasks plus what every method needs to know about them."""

    name: str
    setting: str  # "class" (evaluated class-IL and task-IL) or "domain" (domain-IL)
    tasks: list[Task]
    num_classes: int
    input_shape: tuple[int, ...]
    default_backbone: str
    class_names: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    # Protocol defaults of this scenario (epochs, batch size, optimiser) — overridable.
    protocol_defaults: dict[str, Any] = field(default_factory=dict)
    # The SYNTHETIC marker of data written by `dmkd synth` (None: real data); recorded with every run.
    synthetic: dict[str, Any] | None = None

    @property
    def settings(self) -> list[str]:
        return [CLASS_IL, TASK_IL] if self.setting == "class" else [DOMAIN_IL]

    def __len__(self) -> int:
        return len(self.tasks)


def task_iter(t: Task, indices, bs, gen, device):
    """Shuffled training batches of one task (restricted to ``indices[t.id]`` when given), transformed."""
    idx = indices[t.id] if indices is not None and t.id in indices else t.train_idx
    yield from t.samples(idx, bs, shuffle=True, generator=gen, device=device, train=True)


def union_iter(tasks: Sequence[Task], indices, bs, gen, device):
    """Batches drawn uniformly from the union of several tasks' training sets.

    Tasks may differ in source or transform (domain-IL), so each batch is assembled from the
    per-task pieces of one global shuffled order.
    """
    sizes = []
    for t in tasks:
        idx = indices[t.id] if indices is not None and t.id in indices else t.train_idx
        sizes.append(idx)
    owner = torch.cat([torch.full((len(ix),), k, dtype=torch.long) for k, ix in enumerate(sizes)])
    local = torch.cat([ix for ix in sizes])
    order = torch.randperm(len(owner), generator=gen)
    owner, local = owner[order], local[order]
    same_source = all(t.source is tasks[0].source and t.transform is None for t in tasks)
    for start in range(0, len(owner), bs):
        ob, lb = owner[start : start + bs], local[start : start + bs]
        if same_source:
            yield next(tasks[0].source.batches(lb, len(lb), shuffle=False, generator=None, device=device, train=True))
            continue
        xs, ys = [], []
        for k in torch.unique(ob).tolist():
            sel = lb[ob == k]
            t = tasks[k]
            x, y = next(t.samples(sel, len(sel), shuffle=False, generator=None, device=device, train=True))
            xs.append(x)
            ys.append(y)
        yield torch.cat(xs), torch.cat(ys)
