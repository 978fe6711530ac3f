"""PACS and OfficeHome as domain-IL: one task per domain, every task holds every class.

Layout ``<base>/<Domain>/<class>/<image>``; the base folder is the data root itself or one of
PACS/, pacs/, kfold/ (PACS) and OfficeHome/, OfficeHomeDataset_10072016/ (OfficeHome) below it.
Domain folders are matched ignoring case and space/underscore/hyphen ("Real World" = "Real_World").
Classes are the sorted union of the class folder names (7 for PACS, 65 for OfficeHome); every
domain must hold every class. Per domain: a seeded stratified train/test split (``test_fraction``),
then the validation split carved from train (``val_fraction``). Images are resized to
``image_size`` (default 224) and normalised with ImageNet statistics; they stream from disk unless
``in_memory``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from harness.core.data import Scenario, Task
from harness.core.defaults import documented
from harness.core.errors import UserError
from harness.core.streams import base_seed, is_held_out
from scenarios.base import ImageFileOptions, candidate_roots, cap, register_scenario, split_train_val
from scenarios.streaming import IMAGENET_MEAN, IMAGENET_STD, StreamingSource, is_image_file
from scenarios.synth import synthetic_marker

PACS_DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def parse_domain_order(value: str | Sequence[str], valid: Sequence[str]) -> list[str]:
    """Canonical domain names from a comma-separated string or a list; UserError on a bad name."""
    items = [s for s in (value.split(",") if isinstance(value, str) else [str(v) for v in value])]
    items = [s.strip() for s in items if s.strip()]
    canon = {_norm(d): d for d in valid}
    out = []
    for s in items:
        if _norm(s) not in canon:
            raise UserError(f"unknown domain {s!r}", f"domain_order takes names among: {', '.join(valid)}")
        out.append(canon[_norm(s)])
    if not out:
        raise UserError("domain_order is empty", f"list one or more of: {', '.join(valid)}")
    if len(set(out)) != len(out):
        raise UserError(f"domain_order lists a domain twice: {','.join(out)}", "name each domain once")
    return out


@dataclass
class DomainOptions(ImageFileOptions):
    """Domain-incremental PACS / OfficeHome: one task per domain, every class in every domain."""

    DOMAINS: ClassVar[tuple[str, ...]] = PACS_DOMAINS  # the valid names (not an option)

    domain_order: str | list[str] = documented(  # noqa: RUF009 (a field declaration, not a shared default)
        "photo,art_painting,cartoon,sketch", "the domains in task order, comma-separated or a list (a subset is "
        "allowed)", "PACS's domain order of Li et al. 2017")
    test_fraction: float = documented(0.2, "share of each domain's images (per class) held out as its test split",
                                      "ours: a per-class 80/20 split", gt=0, lt=1)
    image_size: int = documented(224, "side the images are resized to", "the usual ImageNet-backbone input", ge=8)
    augment: bool = documented(True, "random crop (padding image_size/8) + horizontal flip of training batches",
                               "ours: the CIFAR recipe scaled to the image size")

    def validate(self) -> None:
        super().validate()
        self.domain_order = ",".join(parse_domain_order(self.domain_order, self.DOMAINS))


@dataclass
class PACSOptions(DomainOptions):
    """PACS domains: photo, art_painting, cartoon, sketch (default order). Other options: DomainOptions."""


@dataclass
class OfficeHomeOptions(DomainOptions):
    """OfficeHome domains: Art, Clipart, Product, Real_World (default order). Other options: DomainOptions."""

    DOMAINS: ClassVar[tuple[str, ...]] = OFFICEHOME_DOMAINS
    domain_order: str | list[str] = documented(  # noqa: RUF009 (a field declaration, not a shared default)
        "Art,Clipart,Product,Real_World", "the domains in task order, comma-separated or a list (a subset is "
        "allowed)", "OfficeHome's domains as listed by Venkateswara et al. 2017")


@dataclass(frozen=True)
class _Dataset:
    name: str
    domains: tuple[str, ...]
    folders: tuple[str, ...]
    how_to_get: str


PACS = _Dataset(
    "PACS",
    PACS_DOMAINS,
    ("PACS", "pacs", "kfold", "PACS/kfold", "pacs/kfold"),
    "download the PACS images (the 'kfold' image folders of Li et al., ICCV 2017) and place them as <root>/PACS/<domain>/<class>/<image> "
    "with domains photo, art_painting, cartoon, sketch; pass --data-root or set DMKD_DATA (no --download); "
    "offline, `dmkd synth pacs --out <root>` writes a synthetic stand-in",
)
OFFICEHOME = _Dataset(
    "OfficeHome",
    OFFICEHOME_DOMAINS,
    (
        "OfficeHome",
        "OfficeHomeDataset_10072016",
        "officehome",
        "office_home",
        "OfficeHome/OfficeHomeDataset_10072016",
    ),
    "download OfficeHomeDataset_10072016.zip (hemanthdv.org/officeHomeDataset.html) and extract it as "
    "<root>/OfficeHome/<domain>/<class>/<image> with domains Art, Clipart, Product, Real World; pass "
    "--data-root or set DMKD_DATA (no --download); offline, `dmkd synth officehome --out <root>` writes a "
    "synthetic stand-in",
)


def _domain_dirs(base: Path, domains: Sequence[str]) -> dict[str, Path]:
    """The folders of those domains found in base, matched by normalised name."""
    if not base.is_dir():
        return {}
    by_norm = {_norm(p.name): p for p in base.iterdir() if p.is_dir()}
    return {d: by_norm[_norm(d)] for d in domains if _norm(d) in by_norm}


def find_domains(ds: _Dataset, data_root: str | None, needed: Sequence[str]) -> dict[str, Path]:
    """Domain name -> folder (every domain present), from the first base folder holding all ``needed``."""
    roots = candidate_roots(data_root)
    partial: tuple[Path, dict[str, Path]] | None = None
    for r in roots:
        for base in [r, *[r / f for f in ds.folders]]:
            found = _domain_dirs(base, ds.domains)
            if all(d in found for d in needed):
                return found
            if found and partial is None:
                partial = (base, found)
    if partial is not None:
        missing = [d for d in needed if d not in partial[1]]
        raise UserError(
            f"{ds.name} under {partial[0]} lacks the domain folder(s) {', '.join(missing)}", ds.how_to_get
        )
    where = ", ".join(str(r) for r in roots) or "no data root given"
    raise UserError(f"{ds.name} not found ({where})", ds.how_to_get)


def scan_domains(
    ds: _Dataset, dirs: dict[str, Path], order: Sequence[str]
) -> tuple[list[str], dict[str, list[tuple[Path, str]]]]:
    """Sorted class names (union over every domain) and, per domain of ``order``, its (image, class) list."""
    per_domain = {
        d: sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for d, folder in dirs.items()
    }
    classes = sorted(set().union(*per_domain.values()))
    if not classes:
        raise UserError(f"{ds.name}: no class folders in the domain folders", ds.how_to_get)
    files: dict[str, list[tuple[Path, str]]] = {}
    for d in order:
        missing = [c for c in classes if c not in per_domain[d]]
        if missing:
            raise UserError(
                f"{ds.name} domain {d} ({dirs[d]}) lacks the class folder(s) {', '.join(missing)}",
                ds.how_to_get,
            )
        items = []
        for c in classes:
            imgs = sorted(p for p in (dirs[d] / c).iterdir() if p.is_file() and is_image_file(p))
            if not imgs:
                raise UserError(
                    f"{ds.name} domain {d}: class folder {dirs[d] / c} holds no images", ds.how_to_get
                )
            items += [(p, c) for p in imgs]
        files[d] = items
    return classes, files


def build_domain_scenario(
    name: str, ds: _Dataset, opts: DomainOptions, seed: int, data_root: str | None
) -> Scenario:
    order = parse_domain_order(opts.domain_order, ds.domains)
    dirs = find_domains(ds, data_root, order)
    synthetic = synthetic_marker(next(iter(dirs.values())).parent)
    classes, files = scan_domains(ds, dirs, order)
    label = {c: i for i, c in enumerate(classes)}
    paths = [p for d in order for p, _ in files[d]]
    targets = torch.tensor([label[c] for d in order for _, c in files[d]], dtype=torch.long)
    source = StreamingSource(
        paths,
        targets,
        image_size=opts.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=opts.augment,
        num_workers=opts.num_workers,
    )
    g = torch.Generator().manual_seed(seed + 2_750_159)
    tasks, start = [], 0
    spans = {}
    for t, d in enumerate(order):
        idx = torch.arange(start, start + len(files[d]))
        spans[d] = idx
        start += len(files[d])
        if is_held_out(seed):
            continue
        train, test = split_train_val(idx, targets, opts.test_fraction, g)
        train = cap(train, opts.max_train_per_task, g)
        test = cap(test, opts.max_test_per_task, g)
        train, val = split_train_val(train, targets, opts.val_fraction, g)
        tasks.append(Task(t, list(range(len(classes))), source, train, val, test, name=d))
    if is_held_out(seed):
        tasks = _held_out_tasks(spans, order, targets, opts, seed, source, len(classes))
    if opts.in_memory:
        source.preload(torch.cat([torch.cat([t.train_idx, t.val_idx, t.test_idx]) for t in tasks]))
    return Scenario(name, "domain", tasks, len(classes), source.input_shape, "resnet18", classes,
                    synthetic=synthetic)


def _held_out_tasks(spans, order, targets, opts, seed: int, source, n_classes: int) -> list[Task]:
    """A held-out tuning stream (harness/core/streams.py): another domain order and another carve of
    the training data, from the stream seed. Each domain's train/test split is the one of the run seed
    the stream seed derives from, drawn as that evaluation stream draws it, so that the held-out stream
    never trains or validates on that evaluation stream's test images."""
    g_eval = torch.Generator().manual_seed(base_seed(seed) + 2_750_159)
    trains = {}
    for d in order:  # the evaluation stream's draws, in its order (caps and carve included)
        train, test = split_train_val(spans[d], targets, opts.test_fraction, g_eval)
        capped = cap(train, opts.max_train_per_task, g_eval)
        cap(test, opts.max_test_per_task, g_eval)
        split_train_val(capped, targets, opts.val_fraction, g_eval)
        trains[d] = (train, test)
    g = torch.Generator().manual_seed(seed + 2_750_159)
    tasks = []
    for t, i in enumerate(torch.randperm(len(order), generator=g).tolist()):
        d = order[i]
        train, test = trains[d]
        train = cap(train, opts.max_train_per_task, g)
        test = cap(test, opts.max_test_per_task, g)
        train, val = split_train_val(train, targets, opts.val_fraction, g)
        tasks.append(Task(t, list(range(n_classes)), source, train, val, test, name=d))
    return tasks


@register_scenario(
    "pacs",
    PACSOptions,
    "resnet18",
    "PACS (domain-IL): photo, art_painting, cartoon, sketch; 7 classes",
    runs_on_cpu=False,
)
def pacs(opts: PACSOptions, seed: int, data_root: str | None) -> Scenario:
    return build_domain_scenario("pacs", PACS, opts, seed, data_root)


@register_scenario(
    "officehome",
    OfficeHomeOptions,
    "resnet18",
    "OfficeHome (domain-IL): Art, Clipart, Product, Real_World; 65 classes",
    runs_on_cpu=False,
)
def officehome(opts: OfficeHomeOptions, seed: int, data_root: str | None) -> Scenario:
    return build_domain_scenario("officehome", OFFICEHOME, opts, seed, data_root)
