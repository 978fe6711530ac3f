"""Split Tiny-ImageNet (10 tasks x 20 classes), class-IL and task-IL.

The official folder ``tiny-imagenet-200/`` (in the data root or the root itself): ``wnids.txt``
(class order = the file's order), ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` with labels
from ``val/val_annotations.txt`` (tab separated: file, wnid, bounding box). ``words.txt``, when present,
names the classes. The official test set has no labels, so the official validation set is our TEST
split and each task's validation split is carved from its training images (``val_fraction``).
110,000 images of 64 x 64 stream from disk (``in_memory`` decodes them once into a uint8 tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core.data import Scenario
from harness.core.defaults import documented
from harness.core.errors import UserError
from scenarios.base import (
    ImageFileOptions,
    candidate_roots,
    class_order,
    class_split_tasks,
    find_dir,
    register_scenario,
)
from scenarios.streaming import IMAGENET_MEAN, IMAGENET_STD, StreamingSource, is_image_file
from scenarios.synth import synthetic_marker

FOLDER_NAMES = ("tiny-imagenet-200", "tiny-imagenet", "tinyimagenet", "TinyImageNet")
HOW_TO_GET = (
    "download tiny-imagenet-200.zip (the CS231n Tiny ImageNet archive, cs231n.stanford.edu/tiny-imagenet-200.zip) "
    "and extract it under the data root so that <root>/tiny-imagenet-200/wnids.txt, train/ and val/ exist; "
    "pass --data-root or set DMKD_DATA (no --download: torchvision has no Tiny-ImageNet class); offline, "
    "`dmkd synth tinyimagenet --out <root>` writes a synthetic stand-in"
)


@dataclass
class TinyImageNetFiles:
    """Every file of the data set with its label: train images first, then the official val set."""

    root: Path
    wnids: list[str]
    class_names: list[str]
    paths: list[Path]
    targets: torch.Tensor
    n_train: int
    synthetic: dict | None = None  # the SYNTHETIC marker of `dmkd synth` data


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}", HOW_TO_GET) from None


def scan_tinyimagenet(data_root: str | None) -> TinyImageNetFiles:
    """Find the folder, parse wnids.txt and val_annotations.txt, list the images (sorted by name)."""
    roots = candidate_roots(data_root)
    root = find_dir(roots, FOLDER_NAMES, ["wnids.txt", "train", "val"])
    if root is None:
        where = ", ".join(str(r) for r in roots) or "no data root given"
        raise UserError(f"Tiny-ImageNet (wnids.txt, train/, val/) not found ({where})", HOW_TO_GET)
    wnids = [w.strip() for w in _read_lines(root / "wnids.txt") if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"{root / 'wnids.txt'} is empty or lists a class twice", HOW_TO_GET)
    label = {w: i for i, w in enumerate(wnids)}

    paths: list[Path] = []
    targets: list[int] = []
    for w in wnids:
        folder = root / "train" / w / "images"
        files = sorted(p for p in folder.glob("*") if is_image_file(p)) if folder.is_dir() else []
        if not files:
            raise UserError(f"no training images for class {w} in {folder}", HOW_TO_GET)
        paths += files
        targets += [label[w]] * len(files)
    n_train = len(paths)

    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"{ann} not found (the validation labels)", HOW_TO_GET)
    for n, line in enumerate(_read_lines(ann), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or cols[1].strip() not in label:
            raise UserError(
                f"{ann} line {n}: expected 'file<TAB>wnid<TAB>...' with a wnid of wnids.txt, got {line!r}",
                HOW_TO_GET,
            )
        img = root / "val" / "images" / cols[0].strip()
        if not img.is_file():
            raise UserError(f"{img} (listed in {ann.name}) not found", HOW_TO_GET)
        paths.append(img)
        targets.append(label[cols[1].strip()])
    if len(paths) == n_train:
        raise UserError(f"{ann} lists no images", HOW_TO_GET)

    names = list(wnids)
    words = root / "words.txt"
    if words.is_file():
        desc = dict(ln.split("\t", 1) for ln in _read_lines(words) if "\t" in ln)
        names = [desc.get(w, w).strip() for w in wnids]
    return TinyImageNetFiles(root, wnids, names, paths, torch.tensor(targets, dtype=torch.long), n_train,
                             synthetic_marker(root))


@dataclass
class TinyImageNetOptions(ImageFileOptions):
    """Split Tiny-ImageNet: the 200 classes in tasks of equal class count."""

    n_tasks: int = documented(10, "tasks of equal class count (10 -> 10 x 20); must divide the number of classes",
                              "Mammoth's seq-tinyimg: 10 tasks x 20 classes", ge=1)
    shuffle_classes: bool = documented(False, "False keeps the wnids.txt order; True draws the order from the seed",
                                       "Mammoth: classes in order")
    image_size: int = documented(64, "side the images are resized to", "Tiny-ImageNet's native 64 x 64", ge=8)
    augment: bool = documented(True, "random crop (padding image_size/8) + horizontal flip of training batches",
                               "Mammoth's seq-tinyimg: RandomCrop(64, padding=4) + RandomHorizontalFlip")


@register_scenario(
    "split-tinyimagenet",
    TinyImageNetOptions,
    "resnet18",
    "Split Tiny-ImageNet, 10 tasks x 20 classes (class-IL and task-IL)",
    runs_on_cpu=False,
)
def split_tinyimagenet(opts: TinyImageNetOptions, seed: int, data_root: str | None) -> Scenario:
    files = scan_tinyimagenet(data_root)
    n_classes = len(files.wnids)
    source = StreamingSource(
        files.paths,
        files.targets,
        image_size=opts.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=opts.augment,
        num_workers=opts.num_workers,
    )
    order = class_order(n_classes, opts.shuffle_classes, seed)
    ty, vy = files.targets[: files.n_train], files.targets[files.n_train :]
    tasks = class_split_tasks(source, ty, vy, files.n_train, order, opts.n_tasks, opts, seed)
    if opts.in_memory:
        source.preload(torch.cat([torch.cat([t.train_idx, t.val_idx, t.test_idx]) for t in tasks]))
    return Scenario(
        "split-tinyimagenet", "class", tasks, n_classes, source.input_shape, "resnet18", files.class_names,
        synthetic=files.synthetic,
    )
