"""Split CIFAR-10 (5 x 2) and Split CIFAR-100 (10 x 10 or 20 x 5), class-IL and task-IL.

The data are the official "python version" archives, extracted: ``cifar-10-batches-py/``
(data_batch_1..5, test_batch, batches.meta) and ``cifar-100-python/`` (train, test, meta), read by
torchvision's CIFAR10/CIFAR100 classes with ``download=False``. They are looked for in the data
root given by ``--data-root``, then ``$DMKD_DATA`` (in the folder itself or in cifar10/, cifar100/,
cifar/ below it). Nothing is downloaded. The 60,000 images are held as one uint8 tensor on the
training device; training batches are augmented there (random crop 32, padding 4, horizontal flip).
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from harness.core.data import Scenario
from harness.core.defaults import documented
from harness.core.errors import UserError
from scenarios.base import ScenarioOptions, candidate_roots, class_order, class_split_tasks, register_scenario
from scenarios.streaming import ImageTensorSource
from scenarios.synth import synthetic_marker

# Per-channel statistics of the training images, pixels scaled to [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class _Checked:
    """Mixin for torchvision's CIFAR classes: MD5 checking of the files made optional.

    torchvision refuses files whose MD5 differs from the official archive; with ``check_md5=False``
    only their presence is checked (re-packed copies, test fixtures). A corrupt file then fails
    while unpickling, which :func:`load_cifar` turns into a UserError.
    """

    check_md5: bool = True

    def __init__(self, root: str, *, train: bool, check_md5: bool) -> None:
        self.check_md5 = check_md5
        super().__init__(root, train=train, download=False)  # type: ignore[call-arg]

    def _check_integrity(self) -> bool:
        if self.check_md5:
            return super()._check_integrity()  # type: ignore[misc]
        folder = Path(self.root) / self.base_folder  # type: ignore[attr-defined]
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)  # type: ignore[attr-defined]

    def _load_meta(self) -> None:
        if self.check_md5:
            return super()._load_meta()  # type: ignore[misc]
        path = Path(self.root) / self.base_folder / self.meta["filename"]  # type: ignore[attr-defined]
        if not path.is_file():
            raise RuntimeError(f"metadata file {path.name} not found")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]  # type: ignore[attr-defined]


def _torchvision_class(num_classes: int) -> type:
    """torchvision's CIFAR10 or CIFAR100 class, imported when data are read: importing torchvision
    costs seconds, which listing or validating a scenario does not pay."""
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if num_classes == 10 else CIFAR100


@functools.cache
def _checked_class(num_classes: int) -> type:
    """:class:`_Checked` over torchvision's class of that family."""
    base = _torchvision_class(num_classes)
    return type(f"_{base.__name__}", (_Checked, base), {"__module__": __name__})


@dataclass(frozen=True)
class _Family:
    name: str
    folder: str  # torchvision's base_folder
    archive: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def dataset(self) -> type:
        return _checked_class(self.num_classes)


FAMILIES = {
    10: _Family(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", 10, CIFAR10_MEAN, CIFAR10_STD
    ),
    100: _Family(
        "CIFAR-100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        100,
        CIFAR100_MEAN,
        CIFAR100_STD,
    ),
}


def _how_to_get(fam: _Family, root: str) -> str:
    return (
        f"download {fam.archive} (the python version) from the CIFAR site (cs.toronto.edu/~kriz/cifar.html) "
        f"and extract it under {root} so that {root}/{fam.folder}/ exists; pass --data-root or set DMKD_DATA; "
        f"on an online machine --set download=true fetches it there (or --download); offline, "
        f"`dmkd synth {fam.name.lower().replace('-', '')} --out {root}` writes a synthetic stand-in"
    )


def download_cifar(fam: _Family, data_root: str | None) -> Path:
    """Fetch and extract the official archive with torchvision's own download (MD5-checked)."""
    try:
        return find_cifar(fam, data_root)
    except UserError:
        pass
    roots = candidate_roots(data_root)
    if not roots:
        raise UserError(f"download of {fam.name} needs a target folder", "pass --data-root DIR or set DMKD_DATA")
    root = roots[0]
    try:
        _torchvision_class(fam.num_classes)(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UserError(
            f"downloading {fam.archive} into {root} failed ({type(e).__name__}: {e})",
            f"on an offline machine fetch it elsewhere: {_how_to_get(fam, str(root))}",
        ) from None
    return root


def find_cifar(fam: _Family, data_root: str | None) -> Path:
    """The torchvision root: the folder that holds ``cifar-10-batches-py`` / ``cifar-100-python``."""
    roots = candidate_roots(data_root)
    for r in roots:
        subs = ["", "cifar", "CIFAR", fam.name.lower().replace("-", ""), fam.name.replace("-", "")]
        for cand in [r.parent if r.name == fam.folder else r, *[r / s for s in subs if s]]:
            if (cand / fam.folder).is_dir():
                return cand
    where = ", ".join(str(r) for r in roots) or "no data root given"
    raise UserError(f"{fam.name} not found ({where})", _how_to_get(fam, str(roots[0]) if roots else "<root>"))


@functools.lru_cache(maxsize=2)
def load_cifar(
    num_classes: int, data_root: str | None, check_md5: bool, download: bool = False
) -> tuple[Tensor, Tensor, int, list[str], dict | None]:
    """(uint8 images N x 3 x 32 x 32, train first then test; labels; number of train images; class names;
    the SYNTHETIC marker of `dmkd synth` data or None). Synthetic files skip the MD5 check."""
    fam = FAMILIES[num_classes]
    root = download_cifar(fam, data_root) if download else find_cifar(fam, data_root)
    synthetic = synthetic_marker(root / fam.folder)
    check_md5 = check_md5 and synthetic is None
    parts = []
    for train in (True, False):
        try:
            ds = fam.dataset(str(root), train=train, check_md5=check_md5)
        except RuntimeError:  # torchvision: missing file or MD5 mismatch
            hint = " (or pass check_md5=false for a re-packed copy)" if check_md5 else ""
            why = (
                "a file is missing or differs from the official archive (MD5)"
                if check_md5
                else "a file is missing"
            )
            raise UserError(
                f"{fam.name} under {root / fam.folder} is incomplete or corrupt: {why}",
                _how_to_get(fam, str(root)) + hint,
            ) from None
        except (
            pickle.UnpicklingError,
            EOFError,
            KeyError,
            ValueError,
            TypeError,
            AttributeError,
            ImportError,
        ) as e:
            raise UserError(
                f"{fam.name} under {root / fam.folder} has a corrupt file ({type(e).__name__}: {e})",
                _how_to_get(fam, str(root)),
            ) from None
        labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
        if len(labels) != len(ds.data) or (
            len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)
        ):
            raise UserError(
                f"{fam.name} labels are inconsistent with the images or outside 0..{num_classes - 1}",
                _how_to_get(fam, str(root)),
            )
        if len(ds.classes) != num_classes:
            raise UserError(
                f"{fam.name} meta file lists {len(ds.classes)} classes, expected {num_classes}",
                _how_to_get(fam, str(root)),
            )
        parts.append(
            (torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))), labels, list(ds.classes))
        )
    (tx, ty, names), (vx, vy, _) = parts
    return torch.cat([tx, vx]), torch.cat([ty, vy]), len(ty), names, synthetic


@dataclass
class CifarOptions(ScenarioOptions):
    """Split CIFAR-10 / CIFAR-100: the classes in tasks of equal class count."""

    n_tasks: int = documented(5, "tasks of equal class count (CIFAR-10: 5 -> 5 x 2)",
                              "Split CIFAR-10 5 x 2 (Zenke et al. 2017; Mammoth's seq-cifar10)", ge=1)
    shuffle_classes: bool = documented(False, "False keeps classes 0..C-1 in order; True draws the order from the seed",
                                       "Mammoth: classes in order")
    augment: bool = documented(True, "random crop 32 (padding 4) + horizontal flip of training batches, on the device",
                               "Mammoth's seq-cifar10 training transform")
    check_md5: bool = documented(True, "verify the official MD5 sums (False for re-packed copies; data written by "
                                 "`dmkd synth` are never MD5-checked)", "torchvision's CIFAR10/100 integrity check")
    download: bool = documented(False, "fetch the official archive with torchvision's download when it is missing "
                                "(needs a machine that is online)", "ours: nothing is downloaded unless asked")


@dataclass
class Cifar100Options(CifarOptions):
    """As CifarOptions, with CIFAR-100's task split."""

    n_tasks: int = documented(10, "tasks of equal class count (10 -> 10 x 10, 20 -> 20 x 5)",
                              "Split CIFAR-100 10 x 10 (Rebuffi et al. 2017, iCaRL; FACIL)", ge=1)


def _build(name: str, num_classes: int, opts: CifarOptions, seed: int, data_root: str | None) -> Scenario:
    data, targets, n_train, names, synthetic = load_cifar(num_classes, data_root, opts.check_md5, opts.download)
    fam = FAMILIES[num_classes]
    source = ImageTensorSource(data, targets, mean=fam.mean, std=fam.std, augment=opts.augment, pad=4)
    order = class_order(num_classes, opts.shuffle_classes, seed)
    tasks = class_split_tasks(
        source, targets[:n_train], targets[n_train:], n_train, order, opts.n_tasks, opts, seed
    )
    return Scenario(name, "class", tasks, num_classes, (3, 32, 32), "resnet18-reduced", names,
                    synthetic=synthetic)


@register_scenario(
    "split-cifar10",
    CifarOptions,
    "resnet18-reduced",
    "Split CIFAR-10, 5 tasks x 2 classes (class-IL and task-IL)",
    runs_on_cpu=False,
)
def split_cifar10(opts: CifarOptions, seed: int, data_root: str | None) -> Scenario:
    return _build("split-cifar10", 10, opts, seed, data_root)


@register_scenario(
    "split-cifar100",
    Cifar100Options,
    "resnet18-reduced",
    "Split CIFAR-100, 10 tasks x 10 classes (n_tasks=20: 20 x 5), class-IL and task-IL",
    runs_on_cpu=False,
)
def split_cifar100(opts: Cifar100Options, seed: int, data_root: str | None) -> Scenario:
    return _build("split-cifar100", 100, opts, seed, data_root)
