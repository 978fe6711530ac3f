"""Fashion-MNIST scenarios: Split (class-IL / task-IL), Permuted and Rotated (domain-IL).

The data are found in this order: ``--data-root``, ``$DMKD_DATA``, the Debian package
``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist), then torchvision's download
when the machine is online. Files are the original IDX files, gzipped or not, in the folder
itself, in ``fashion-mnist/``, or in torchvision's ``FashionMNIST/raw/`` layout.
"""

from __future__ import annotations

import functools
import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core.data import Scenario, Task, TensorSource
from harness.core.defaults import documented
from harness.core.errors import UserError
from harness.core.streams import is_held_out
from scenarios.base import (
    ScenarioOptions,
    candidate_roots,
    cap,
    class_order,
    class_split_tasks,
    register_scenario,
    split_train_val,
)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics of Fashion-MNIST (inputs scaled to [0, 1])
# Normalisations a scenario can choose (``normalization`` option of the domain-IL scenarios):
# fmnist: the data's own statistics (default); mnist: MNIST's (0.1307, 0.3081), which Avalanche's
# PermutedMNIST applies; none: pixels in [0, 1].
NORMALIZATIONS = {"fmnist": (MEAN, STD), "mnist": (0.1307, 0.3081), "none": (0.0, 1.0)}
HOW_TO_GET = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    "or put the four IDX files in a folder and pass --data-root or set DMKD_DATA"
)


def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: {e} (truncated or corrupt file?)", HOW_TO_GET) from None


def read_idx(path: Path) -> Tensor:
    """Parse an IDX file (magic, dims, uint8 payload), checking sizes so corrupt files fail clearly."""
    raw = _open(path)
    if len(raw) < 4:
        raise UserError(f"{path} is truncated", HOW_TO_GET)
    zero, dtype, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number)", HOW_TO_GET)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated", HOW_TO_GET)
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise UserError(f"{path} has {len(raw)} bytes, its header says {expected} (truncated or corrupt)", HOW_TO_GET)
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _locate(folder: Path, stem: str) -> Path | None:
    for sub in ("", "fashion-mnist", "FashionMNIST/raw", "fashion_mnist"):
        for suffix in ("", ".gz"):
            p = folder / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def find_fmnist(data_root: str | None) -> dict[str, Path] | None:
    for root in candidate_roots(data_root, DEBIAN_DIR):
        found = {k: _locate(root, stem) for k, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if data_root and root == Path(data_root).expanduser() and any(found.values()):
            missing = [FILES[k] for k, v in found.items() if v is None]
            raise UserError(f"Fashion-MNIST files missing under {root}: {', '.join(missing)}", HOW_TO_GET)
    return None


@functools.lru_cache(maxsize=2)
def load_fmnist(data_root: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x uint8 Nx28x28, train_y, test_x, test_y)."""
    files = find_fmnist(data_root)
    if files is None:
        files = _download()
    tx, ty = read_idx(files["train_x"]), read_idx(files["train_y"])
    vx, vy = read_idx(files["test_x"]), read_idx(files["test_y"])
    if tx.shape[1:] != (28, 28) or vx.shape[1:] != (28, 28) or len(tx) != len(ty) or len(vx) != len(vy):
        raise UserError("Fashion-MNIST files have inconsistent shapes (corrupt download?)", HOW_TO_GET)
    if int(ty.max()) > 9 or int(vy.max()) > 9:
        raise UserError("Fashion-MNIST labels outside 0..9 (corrupt label file?)", HOW_TO_GET)
    return tx, ty.long(), vx, vy.long()


def _download() -> dict[str, Path]:
    """Last resort: torchvision's download into ~/.cache/dmkd (works only when online)."""
    root = Path.home() / ".cache" / "dmkd"
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        raise UserError("Fashion-MNIST not found and could not be downloaded", HOW_TO_GET) from None
    found = {k: _locate(root, stem) for k, stem in FILES.items()}
    if not all(found.values()):
        raise UserError("Fashion-MNIST download incomplete", HOW_TO_GET)
    return found  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _source(data_root: str | None, normalization: str = "fmnist") -> tuple[TensorSource, int, Tensor, Tensor]:
    """The whole data set as one source, shared by every scenario built from it in this process
    (every seed and option: tasks only hold index tensors), so that its float copy is made once
    per process, not once per run (0.7 s each)."""
    tx, ty, vx, vy = load_fmnist(data_root)
    data = torch.cat([tx, vx]).unsqueeze(1)  # N x 1 x 28 x 28 uint8, train first then test
    targets = torch.cat([ty, vy])
    mean, std = NORMALIZATIONS[normalization]
    return TensorSource(data, targets, mean=mean, std=std, scale=255.0), len(tx), ty, vy


@dataclass
class SplitOptions(ScenarioOptions):
    """Split Fashion-MNIST: the ten classes in tasks of equal class count."""

    n_tasks: int = documented(5, "tasks of equal class count (must divide 10)",
                              "Split MNIST's 5 x 2 (Zenke et al. 2017; van de Ven et al. 2019)", ge=1)
    shuffle_classes: bool = documented(False, "False keeps the class order 0..9; True draws it from the seed",
                                       "van de Ven et al. 2019: classes in order")


@register_scenario("split-fmnist", SplitOptions, "mlp", "Split Fashion-MNIST, 5 tasks x 2 classes (class-IL and task-IL)")
def split_fmnist(opts: SplitOptions, seed: int, data_root: str | None) -> Scenario:
    source, n_train, ty, vy = _source(data_root)
    order = class_order(10, opts.shuffle_classes, seed)
    tasks = class_split_tasks(source, ty, vy, n_train, order, opts.n_tasks, opts, seed)
    return Scenario("split-fmnist", "class", tasks, 10, (1, 28, 28), "mlp", CLASS_NAMES)


@dataclass
class PermutedOptions(ScenarioOptions):
    """Permuted Fashion-MNIST: each task is all ten classes under its own fixed pixel permutation
    drawn from the seed. first_unpermuted and normalization exist to explain the permuted anchor of
    docs/permuted-anchor.md."""

    n_tasks: int = documented(10, "number of domains (tasks)", "van de Ven et al. 2019: 10 permutations", ge=1)
    first_unpermuted: bool = documented(
        False, "True keeps task 0 as the original images", "GEM and Avalanche's PermutedMNIST permute every "
        "task (our default); van de Ven's code keeps the first one unpermuted (True)")
    normalization: str = documented(
        "fmnist", "fmnist (the data's own mean/std) | mnist (MNIST's 0.1307/0.3081) | none",
        "ours: the data's own statistics; mnist is what Avalanche's PermutedMNIST applies", choices=NORMALIZATIONS)


@dataclass
class RotatedOptions(ScenarioOptions):
    """Rotated Fashion-MNIST: task t is rotated by t * max_angle / n_tasks degrees."""

    n_tasks: int = documented(10, "number of domains (tasks)", "ours: as many as the permuted stream", ge=1)
    max_angle: float = documented(180.0, "rotation of the last task plus one step, in degrees",
                                  "GEM's MNIST Rotations (Lopez-Paz & Ranzato 2017): angles in [0, 180)")


def _domain_tasks(source, n_train: int, ty: Tensor, vy: Tensor, opts, seed: int, transforms) -> list[Task]:
    g = torch.Generator().manual_seed(seed + 104729)
    tasks = []
    for t, (name, fn) in enumerate(transforms):
        tr = cap(torch.arange(n_train), opts.max_train_per_task, g)
        te = cap(torch.arange(len(vy)) + n_train, opts.max_test_per_task, g)
        tr, va = split_train_val(tr, source.targets, opts.val_fraction, g)
        tasks.append(Task(t, list(range(10)), source, tr, va, te, name=name, transform=fn))
    return tasks


class Permute:
    """Fixed pixel permutation of a batch (applied on the device)."""

    value_preserving = True  # moves pixels without changing values: a permuted uint8 image stays one

    def __init__(self, perm: Tensor) -> None:
        self.perm = perm
        self._dev: dict = {}

    def __call__(self, x: Tensor) -> Tensor:
        p = self._dev.get(x.device)
        if p is None:
            p = self._dev[x.device] = self.perm.to(x.device)
        flat = x.reshape(x.shape[0], -1)
        return flat.index_select(1, p).reshape(x.shape)


class Rotate:
    """Rotation of a normalised batch by a fixed angle; the background stays black."""

    def __init__(self, degrees: float, background: float) -> None:
        a = math.radians(degrees)
        self.theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
        self.degrees = degrees
        self.background = background

    def __call__(self, x: Tensor) -> Tensor:
        if self.degrees % 360 == 0:
            return x
        theta = self.theta.to(x.device, x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x - self.background, grid, align_corners=False) + self.background


@register_scenario("permuted-fmnist", PermutedOptions, "mlp", "Permuted Fashion-MNIST (domain-IL), 10 tasks")
def permuted_fmnist(opts: PermutedOptions, seed: int, data_root: str | None) -> Scenario:
    if opts.n_tasks < 1:
        raise UserError("n_tasks must be >= 1", "set n_tasks=10 for example")
    source, n_train, ty, vy = _source(data_root, opts.normalization)
    g = torch.Generator().manual_seed(seed + 15485863)
    transforms = [(f"permutation {t}", Permute(torch.randperm(784, generator=g))) for t in range(opts.n_tasks)]
    if opts.first_unpermuted:
        transforms[0] = ("original", Permute(torch.arange(784)))
    tasks = _domain_tasks(source, n_train, ty, vy, opts, seed, transforms)
    return Scenario("permuted-fmnist", "domain", tasks, 10, (1, 28, 28), "mlp", CLASS_NAMES)


@register_scenario("rotated-fmnist", RotatedOptions, "mlp", "Rotated Fashion-MNIST (domain-IL), 10 tasks")
def rotated_fmnist(opts: RotatedOptions, seed: int, data_root: str | None) -> Scenario:
    if opts.n_tasks < 1:
        raise UserError("n_tasks must be >= 1", "set n_tasks=10 for example")
    source, n_train, ty, vy = _source(data_root)
    background = (0.0 - MEAN) / STD
    step = opts.max_angle / opts.n_tasks
    # A held-out tuning stream: the same spacing, every angle shifted by an offset in (0, step) drawn
    # from its stream seed, so that none of its rotations is one of the evaluation stream's.
    offset = 0.0
    if is_held_out(seed):
        offset = step * (0.05 + 0.9 * float(torch.rand(1, generator=torch.Generator().manual_seed(seed + 3571))))
    transforms = [(f"rotation {offset + t * step:g} deg", Rotate(offset + t * step, background))
                  for t in range(opts.n_tasks)]
    tasks = _domain_tasks(source, n_train, ty, vy, opts, seed, transforms)
    return Scenario("rotated-fmnist", "domain", tasks, 10, (1, 28, 28), "mlp", CLASS_NAMES)
