"""Image data sources shared by the CIFAR, Tiny-ImageNet and PACS/OfficeHome scenarios.

Two sources hand out the same kind of batches (uint8 pixels cut, optionally augmented, then scaled
to [0, 1] and normalised on the training device):

- :class:`ImageTensorSource`: the whole data set as one uint8 NCHW tensor (small data sets, CIFAR).
- :class:`StreamingSource`: image files decoded by a torch DataLoader (PIL decode, resize to a
  square, uint8 tensor); large data sets (Tiny-ImageNet, PACS, OfficeHome). ``preload`` keeps the
  decoded images of chosen indices in memory instead (the scenarios' ``in_memory`` option).

Train-time augmentation (random crop with zero padding + horizontal flip, as torchvision's
``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``) runs on the whole batch on the device,
drawing from the batch generator, so a seed gives the same crops whatever ``num_workers`` is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from harness.core.data import DataSource, TensorSource
from harness.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator | None) -> Tensor:
    """Per-sample random crop (zero padding ``pad`` on each side) and horizontal flip of an NCHW batch.

    Offsets and flips are drawn on the CPU from ``generator`` (the global RNG when None), so the
    result depends only on that RNG state, not on the device. Works for any dtype (uint8 included).
    """
    b, c, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    dev = x.device
    off, flip = off.to(dev), flip.to(dev)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    rows = off[:, :1] + torch.arange(h, device=dev)  # B x H
    cols = off[:, 1:] + torch.arange(w, device=dev)  # B x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class _Normalise:
    """uint8 pixels -> float in [0, 1] -> per-channel (x - mean) / std, on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self._dev: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, raw: Tensor) -> Tensor:
        ms = self._dev.get(raw.device)
        if ms is None:
            # fold the 1/255 into the affine map: (x/255 - m)/s = x * (1/(255 s)) - m/s
            ms = self._dev[raw.device] = (
                (1.0 / (255.0 * self.std)).to(raw.device),
                (self.mean / self.std).to(raw.device),
            )
        return raw.float() * ms[0] - ms[1]


class ImageTensorSource(TensorSource):
    """A uint8 NCHW image tensor on the training device, with on-device train augmentation.

    ``augment`` switches the random crop (padding ``pad``, default size // 8, i.e. 4 for 32x32) and
    horizontal flip of training batches; evaluation batches are never augmented.
    """

    FLOAT_CACHE_BYTES = 0  # augmentation works on uint8 crops; no float copy of the data set

    def __init__(
        self,
        data: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = True,
        pad: int | None = None,
    ) -> None:
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise ValueError(f"ImageTensorSource needs uint8 NCHW data, got {data.dtype} {tuple(data.shape)}")
        super().__init__(data, targets)
        self.augment = augment
        self.pad = data.shape[-1] // 8 if pad is None else pad
        self._normalise = _Normalise(mean, std)

    def convert(self, raw: Tensor) -> Tensor:
        return self._normalise(raw)

    def codec(self) -> None:
        """Training batches are augmented crops of the stored images: replay stores them as float."""
        return None

    def batches(
        self, indices, batch_size, *, shuffle, generator, device, train=False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        self.to(device)
        targets = self._targets_on(device)
        idx = indices[torch.randperm(len(indices), generator=generator)] if shuffle else indices
        idx = idx.to(device)
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            raw = self.data.index_select(0, b)
            if train and self.augment:
                raw = random_crop_flip(raw, self.pad, generator)
            yield self._normalise(raw), targets.index_select(0, b)


class _ImageFiles(Dataset):
    """Decodes one image file to a uint8 3 x size x size tensor (RGB, bilinear resize when needed)."""

    def __init__(self, paths: Sequence[str], targets: Tensor, size: int) -> None:
        self.paths = list(paths)
        self.targets = targets.tolist()
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
                arr = np.array(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(
                f"cannot decode image {path}: {e}", "re-extract the data set (truncated or corrupt file)"
            ) from None
        return torch.from_numpy(arr).permute(2, 0, 1), self.targets[i]


def _worker_error(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker comes back with the worker traceback as its text."""
    if "Traceback" not in e.problem:
        return e
    last = e.problem.strip().splitlines()[-1]
    return UserError(last.split("UserError: ", 1)[-1], "re-extract the data set (truncated or corrupt file)")


class StreamingSource(DataSource):
    """Image files decoded on demand through a DataLoader (``num_workers`` processes; 0 = in-process).

    Every image is resized to ``image_size`` x ``image_size`` (aspect ratio not kept, as
    torchvision's ``Resize((s, s))``). Labels come from ``targets``; pixels are normalised with
    ``mean``/``std`` on the device; training batches get :func:`random_crop_flip` when ``augment``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        targets: Tensor,
        *,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = True,
        pad: int | None = None,
        num_workers: int = 0,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = [str(p) for p in paths]
        self.targets = targets.long().cpu()
        self.image_size = image_size
        self.input_shape = (3, image_size, image_size)
        self.augment = augment
        self.pad = image_size // 8 if pad is None else pad
        self.num_workers = num_workers
        self._normalise = _Normalise(mean, std)
        self._files = _ImageFiles(self.paths, self.targets, image_size)
        self._cache: Tensor | None = None  # uint8 images of preloaded indices
        self._slot: Tensor | None = None  # index -> row of _cache, -1 when not preloaded

    # ---- decoding -----------------------------------------------------------------------
    def _load(self, order: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
        """uint8 image batches of ``order`` (in that order), decoded by the DataLoader."""
        loader = DataLoader(
            self._files,
            batch_size=batch_size,
            sampler=order.tolist(),
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
        )
        try:
            for raw, _ in loader:
                yield raw.to(device, non_blocking=True)
        except UserError as e:
            raise _worker_error(e) from None

    def preload(self, indices: Tensor, batch_size: int = 256) -> None:
        """Decode the images of ``indices`` once and keep them as one uint8 tensor (CPU)."""
        idx = torch.unique(indices.long().cpu())
        cache = torch.empty((len(idx), *self.input_shape), dtype=torch.uint8)
        pos = 0
        for raw in self._load(idx, batch_size, torch.device("cpu")):
            cache[pos : pos + len(raw)] = raw
            pos += len(raw)
        slot = torch.full((len(self.paths),), -1, dtype=torch.long)
        slot[idx] = torch.arange(len(idx))
        self._cache, self._slot = cache, slot

    def _cached(self, device: torch.device) -> Tensor:
        assert self._cache is not None
        if self._cache.device != device:
            self._cache = self._cache.to(device)
        return self._cache

    # ---- the DataSource interface --------------------------------------------------------
    def batches(
        self, indices, batch_size, *, shuffle, generator, device, train=False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        idx = indices[torch.randperm(len(indices), generator=generator)] if shuffle else indices
        idx = idx.cpu()
        targets = self.targets[idx].to(device)
        if self._slot is not None and bool((self._slot[idx] >= 0).all()):
            cache = self._cached(device)
            slots = self._slot[idx].to(device)
            raws: Iterator[Tensor] = (
                cache.index_select(0, slots[s : s + batch_size]) for s in range(0, len(idx), batch_size)
            )
        else:
            raws = self._load(idx, batch_size, device)
        for start, raw in zip(range(0, len(idx), batch_size), raws, strict=True):
            if train and self.augment:
                raw = random_crop_flip(raw, self.pad, generator)
            yield self._normalise(raw), targets[start : start + batch_size]
