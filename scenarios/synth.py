"""Format-exact synthetic image data sets (``dmkd synth NAME --out DIR``).

Real CIFAR, Tiny-ImageNet, PACS and OfficeHome cannot be fetched on offline machines, so this module
writes each of them in its real on-disk format and, by default, at its real size:

- ``cifar10``: ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta; python pickles).
- ``cifar100``: ``cifar-100-python/`` (train, test, meta; fine and coarse labels).
- ``tinyimagenet``: ``tiny-imagenet-200/`` (wnids.txt, words.txt, train/<wnid>/images/*.JPEG with
  <wnid>_boxes.txt, val/images + val/val_annotations.txt, test/images); 64 x 64 JPEGs, a few grayscale.
- ``pacs``: ``PACS/<domain>/<class>/`` (7 classes, 9,991 images, 227 x 227; sketch as PNG).
- ``officehome``: ``OfficeHome/<domain>/<class>/`` (65 classes, 15,588 non-square JPEGs, "Real World").

Every image is drawn from its class's prototype: a base colour plus two oriented colour gratings with
a class-specific frequency and angle, with a random phase (so crops and flips keep the class), random
amplitude and brightness, pixel noise and a weaker grating of a random other class as a distractor.
A model therefore learns well above chance while a broken label path shows as chance accuracy. Domain
data sets add a per-domain style (colour mixing, posterisation, grayscale sketch) on top.

Each data set folder gets a ``SYNTHETIC`` file (JSON: generator, seed, scale); the loaders detect it
(:func:`synthetic_marker`) so that every record and report made from such data says it is synthetic.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from harness.core.errors import UserError

MARKER = "SYNTHETIC"

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
PACS_COUNTS = {"photo": 1670, "art_painting": 2048, "cartoon": 2344, "sketch": 3929}  # 9,991
OFFICEHOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar",
    "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser",
    "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer",
    "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop",
    "Mouse", "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer",
    "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink",
    "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys",
    "Trash_Can", "Webcam",
)
OFFICEHOME_COUNTS = {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357}  # 15,588
assert len(OFFICEHOME_CLASSES) == 65


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
class Prototypes:
    """Per-class image prototypes: base colour and two gratings (frequency, angle, colour)."""

    def __init__(self, n_classes: int, seed: int) -> None:
        rng = np.random.default_rng([seed, n_classes, 1])
        self.n = n_classes
        self.base = rng.uniform(0.25, 0.75, (n_classes, 3)).astype(np.float32)
        self.freq = rng.uniform(1.0, 6.0, (n_classes, 2)).astype(np.float32)  # cycles per image side
        self.angle = rng.uniform(0.0, np.pi, (n_classes, 2)).astype(np.float32)
        col = rng.normal(0.0, 1.0, (n_classes, 2, 3)).astype(np.float32)
        self.color = 0.22 * col / np.linalg.norm(col, axis=-1, keepdims=True)


def render(
    protos: Prototypes, labels: np.ndarray, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 images N x H x W x 3 of the given classes (vectorised over the batch)."""
    n = len(labels)
    yy, xx = np.meshgrid(
        np.arange(height, dtype=np.float32) / max(height, width),
        np.arange(width, dtype=np.float32) / max(height, width),
        indexing="ij",
    )
    distract = (labels + rng.integers(1, max(protos.n, 2), n)) % protos.n
    img = np.empty((n, height, width, 3), np.float32)
    img[:] = protos.base[labels][:, None, None, :] + rng.uniform(-0.08, 0.08, (n, 1, 1, 1)).astype(np.float32)
    for cls, weight in ((labels, rng.uniform(0.7, 1.3, (n, 2)).astype(np.float32)),
                        (distract, np.full((n, 2), 0.35, np.float32))):
        for k in range(2):
            f, a = protos.freq[cls, k], protos.angle[cls, k]
            phase = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32)
            proj = np.cos(a)[:, None, None] * xx + np.sin(a)[:, None, None] * yy
            wave = np.sin(2 * np.pi * f[:, None, None] * proj + phase[:, None, None])
            img += (weight[:, k, None, None, None] * wave[..., None]) * protos.color[cls, k][:, None, None, :]
    img += rng.normal(0.0, 0.06, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def domain_style(img: np.ndarray, domain: int) -> np.ndarray:
    """A per-domain look on uint8 N x H x W x 3 images: 0 as is, 1 colour mixing, 2 posterised, 3 sketch."""
    style = domain % 4
    if style == 0:
        return img
    x = img.astype(np.float32) / 255.0
    if style == 1:
        mix = np.array([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6]], np.float32)
        x = np.clip((x @ mix.T - 0.5) * 1.4 + 0.5, 0, 1)
    elif style == 2:
        x = np.round(x * 3.0) / 3.0
    else:
        g = x.mean(-1, keepdims=True)
        x = np.repeat(np.clip(1.0 - 2.5 * np.abs(g - 0.5), 0, 1), 3, axis=-1)
    return (x * 255.0 + 0.5).astype(np.uint8)


def _chunks(n: int, pixels: int, budget: int = 12_000_000) -> list[slice]:
    step = max(1, budget // max(pixels, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def images(protos: Prototypes, labels: np.ndarray, h: int, w: int, seed: int, domain: int | None = None):
    """Yield (start index, uint8 batch) over all labels in memory-bounded chunks."""
    rng = np.random.default_rng([seed, h, w, 7 if domain is None else 100 + domain])
    for sl in _chunks(len(labels), h * w * 3):
        batch = render(protos, labels[sl], h, w, rng)
        yield sl.start, batch if domain is None else domain_style(batch, domain)


def _balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels as equal as possible over classes, in a seeded random order."""
    labels = np.arange(n) % n_classes
    return rng.permutation(labels).astype(np.int64)


def _scaled(n: int, scale: float, minimum: int) -> int:
    return max(minimum, round(n * scale))


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def _write_marker(folder: Path, name: str, seed: int, scale: float, counts: dict[str, int]) -> None:
    info = {"synthetic": True, "generator": "dmkd synth (scenarios/synth.py)", "dataset": name,
            "seed": seed, "scale": scale, "counts": counts}
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


class _Py2Str(bytes):
    """A Python 2 ``str``: pickled with the (SHORT_)BINSTRING opcode, as in the official CIFAR files."""


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler writing ``_Py2Str`` as Python 2 strings (keys and names of the real files)."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2str(self, obj: _Py2Str) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str
    dispatch[bytes] = save_py2str  # numpy's raw pixel bytes too: 1 byte per byte, as in the real files


def _py2(obj: object) -> object:
    if isinstance(obj, str):
        return _Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _pickle(path: Path, obj: dict) -> None:
    """The official archives are Python 2 pickles (byte-string keys, read with encoding='latin1')."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def write_cifar(out: Path, n_classes: int, scale: float = 1.0, seed: int = 0) -> dict[str, int]:
    """CIFAR-10 (5 train batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta)."""
    n_train, n_test = _scaled(50_000, scale, 5 * n_classes), _scaled(10_000, scale, n_classes)
    if n_classes == 10:
        n_train -= n_train % 5  # five equal data batches
    rng = np.random.default_rng([seed, n_classes])
    protos = Prototypes(n_classes, seed)
    folder = out / ("cifar-10-batches-py" if n_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def flat(labels: np.ndarray, split_seed: int) -> np.ndarray:
        data = np.empty((len(labels), 3072), np.uint8)
        for start, b in images(protos, labels, 32, 32, seed * 1000 + split_seed):
            data[start : start + len(b)] = b.transpose(0, 3, 1, 2).reshape(len(b), 3072)  # row-major RGB planes
        return data

    ytr, yte = _balanced_labels(n_train, n_classes, rng), _balanced_labels(n_test, n_classes, rng)
    xtr, xte = flat(ytr, 1), flat(yte, 2)
    if n_classes == 10:
        per = n_train // 5
        for b in range(5):
            sl = slice(b * per, (b + 1) * per)
            _pickle(folder / f"data_batch_{b + 1}", {
                "batch_label": f"training batch {b + 1} of 5", "labels": ytr[sl].tolist(), "data": xtr[sl],
                "filenames": [f"synthetic_{i:05d}.png" for i in range(sl.start, sl.stop)]})
        _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": yte.tolist(),
                                         "data": xte, "filenames": [f"synthetic_{i:05d}.png" for i in range(n_test)]})
        _pickle(folder / "batches.meta", {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": per,
                                           "num_vis": 3072})
        (folder / "readme.html").write_text("<p>Synthetic CIFAR-10 written by dmkd synth.</p>\n")
    else:
        fine = [f"synthetic_class_{c:03d}" for c in range(100)]
        coarse = [f"synthetic_superclass_{c:02d}" for c in range(20)]
        for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            _pickle(folder / name, {"filenames": [f"synthetic_{i:05d}.png" for i in range(len(y))],
                                    "batch_label": f"{name}ing batch 1 of 1", "fine_labels": y.tolist(),
                                    "coarse_labels": (y // 5).tolist(), "data": x})
        _pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": coarse})
    counts = {"train": n_train, "test": n_test}
    _write_marker(folder, f"cifar{n_classes}", seed, scale, counts)
    return counts


def _save(arr: np.ndarray, path: Path, gray: bool = False) -> None:
    im = Image.fromarray(arr)
    if gray:
        im = im.convert("L")
    if path.suffix.lower() == ".png":
        im.save(path)
    else:
        im.save(path, format="JPEG", quality=90)


def write_tinyimagenet(out: Path, scale: float = 1.0, seed: int = 0, n_classes: int = 200) -> dict[str, int]:
    """tiny-imagenet-200/: 500 train, 50 val and 50 test 64 x 64 JPEGs per class (at scale 1)."""
    root = out / "tiny-imagenet-200"
    rng = np.random.default_rng([seed, 200])
    wnids = [f"n{w:08d}" for w in sorted(rng.choice(10**8, n_classes, replace=False).tolist())]
    protos = Prototypes(n_classes, seed + 11)
    per_train, per_val = _scaled(500, scale, 2), _scaled(50, scale, 1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tsynthetic class {i}\n" for i, w in enumerate(wnids)))
    labels = np.repeat(np.arange(n_classes), per_train)
    for c, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True, exist_ok=True)
    boxes: dict[int, list[str]] = {c: [] for c in range(n_classes)}
    for start, batch in images(protos, labels, 64, 64, seed * 1000 + 3):
        for i, arr in enumerate(batch, start):
            c, k = int(labels[i]), i % per_train
            name = f"{wnids[c]}_{k}.JPEG"
            _save(arr, root / "train" / wnids[c] / "images" / name, gray=i % 97 == 0)
            boxes[c].append(f"{name}\t0\t0\t63\t63\n")
    for c, w in enumerate(wnids):
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes[c]))
    n_val = per_val * n_classes
    for split in ("val", "test"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        y = _balanced_labels(n_val, n_classes, rng)
        ann = []
        for start, batch in images(protos, y, 64, 64, seed * 1000 + (4 if split == "val" else 5)):
            for i, arr in enumerate(batch, start):
                _save(arr, root / split / "images" / f"{split}_{i}.JPEG", gray=i % 97 == 0)
                ann.append(f"{split}_{i}.JPEG\t{wnids[int(y[i])]}\t0\t0\t63\t63\n")
        if split == "val":
            (root / "val" / "val_annotations.txt").write_text("".join(ann))
    counts = {"train": len(labels), "val": n_val, "test": n_val}
    _write_marker(root, "tinyimagenet", seed, scale, counts)
    return counts


def write_domains(
    out: Path, folder: str, classes: Sequence[str], counts: dict[str, int], size: tuple[int, int],
    scale: float, seed: int, suffix: Callable[[str], str],
) -> dict[str, int]:
    """<out>/<folder>/<domain>/<class>/<image>: every domain holds every class (per-domain style)."""
    base = out / folder
    protos = Prototypes(len(classes), seed + 23)
    written = {}
    for d, (domain, n) in enumerate(counts.items()):
        n = _scaled(n, scale, 2 * len(classes))
        rng = np.random.default_rng([seed, d, 31])
        labels = _balanced_labels(n, len(classes), rng)
        for c in classes:
            (base / domain / c).mkdir(parents=True, exist_ok=True)
        h, w = size
        for start, batch in images(protos, labels, h, w, seed * 1000 + 40 + d, domain=d):
            for i, arr in enumerate(batch, start):
                _save(arr, base / domain / classes[int(labels[i])] / f"pic_{i:05d}{suffix(domain)}")
        written[domain] = n
    _write_marker(base, folder.lower(), seed, scale, written)
    return written


DATASETS: dict[str, Callable[[Path, float, int], dict[str, int]]] = {
    "cifar10": lambda out, scale, seed: write_cifar(out, 10, scale, seed),
    "cifar100": lambda out, scale, seed: write_cifar(out, 100, scale, seed),
    "tinyimagenet": lambda out, scale, seed: write_tinyimagenet(out, scale, seed),
    "pacs": lambda out, scale, seed: write_domains(
        out, "PACS", PACS_CLASSES, PACS_COUNTS, (227, 227), scale, seed,
        lambda d: ".png" if d == "sketch" else ".jpg"),
    "officehome": lambda out, scale, seed: write_domains(
        out, "OfficeHome", OFFICEHOME_CLASSES, OFFICEHOME_COUNTS, (225, 300), scale, seed, lambda d: ".jpg"),
}


def generate(name: str, out: Path, scale: float = 1.0, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write one data set (or ``all``) under ``out``; returns the image counts written per data set."""
    names = list(DATASETS) if name == "all" else [name]
    for n in names:
        if n not in DATASETS:
            raise UserError(f"unknown synthetic data set {n!r}", f"choose one of: {', '.join(DATASETS)}, all")
    if not 0.0 < scale <= 1.0:
        raise UserError(f"--scale must be in (0, 1], got {scale}", "use --scale 1 for the real sizes")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder", "pass a folder (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return {n: DATASETS[n](out, scale, seed) for n in names}
    except OSError as e:
        where = e.filename or out
        raise UserError(f"cannot write the synthetic data under {out} ({e.strerror or e}: {where})",
                        "pass a writable folder with --out (with room for the data set)") from None


# ---------------------------------------------------------------------------------------------
# Detection (used by the loaders)
# ---------------------------------------------------------------------------------------------
def synthetic_marker(folder: Path) -> dict | None:
    """The contents of ``folder/SYNTHETIC`` when the data there were written by this generator."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return {"synthetic": True, **(info if isinstance(info, dict) else {}), "marker": str(path)}
