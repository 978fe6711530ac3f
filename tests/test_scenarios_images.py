"""Image scenarios over tiny files written in the real on-disk formats, loaded through the real builders.

CIFAR: the python-version pickles as the official archives hold them (Python 2 pickles: the dict keys
are byte strings, b'data' / b'labels' / b'fine_labels', read with encoding='bytes' or 'latin1').
Tiny-ImageNet: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt.
PACS / OfficeHome: <Domain>/<class>/<image> trees. Images are solid colours that encode their label, so
a loaded batch shows whether images and labels stayed together.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.core.errors import UserError
from harness.core.protocol import Protocol
from scenarios.base import build_scenario
from scenarios.cifar import CIFAR10_MEAN, CIFAR10_STD
from scenarios.streaming import IMAGENET_MEAN, IMAGENET_STD, StreamingSource, random_crop_flip


# ---------------------------------------------------------------------------------------------
# Writers of the real formats
# ---------------------------------------------------------------------------------------------
class Py2Str(bytes):
    """A Python 2 ``str``: pickled with the (SHORT_)BINSTRING opcode, as the official CIFAR files are."""


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2str(self, obj: Py2Str) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + bytes(obj))
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def _py2(obj):
    """Turn str keys/values into Python 2 byte strings, recursively."""
    if isinstance(obj, str):
        return Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _dump_py2(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def cifar_images(n: int, offset: int) -> np.ndarray:
    """n x 3072 uint8 rows (R plane, G plane, B plane, each 32x32 row-major), distinct per image."""
    i = np.arange(n)[:, None] + offset
    return ((np.arange(3072)[None, :] * 7 + i * 13) % 256).astype(np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> dict[str, np.ndarray]:
    """The cifar-10-batches-py folder: 5 train batches, test_batch, batches.meta. Labels cycle 0..9."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels, data = [], []
    for b in range(5):
        x = cifar_images(per_batch, b * per_batch)
        y = [(k + b) % 10 for k in range(per_batch)]
        _dump_py2(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": y,
                "data": x,
                "filenames": [f"img{k}.png" for k in range(per_batch)],
            },
        )
        labels += y
        data.append(x)
    xt = cifar_images(n_test, 10_000)
    yt = [k % 10 for k in range(n_test)]
    _dump_py2(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": yt,
            "data": xt,
            "filenames": [f"t{k}.png" for k in range(n_test)],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump_py2(
        folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}
    )
    return {
        "train_x": np.concatenate(data),
        "train_y": np.array(labels),
        "test_x": xt,
        "test_y": np.array(yt),
    }


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n, off in (("train", n_train, 0), ("test", n_test, 50_000)):
        fine = [(3 * k) % 100 for k in range(n)]
        coarse = [(k * 7) % 20 for k in range(n)]  # deliberately unrelated to the fine labels
        _dump_py2(
            folder / split,
            {
                "filenames": ["x.png"] * n,
                "batch_label": split,
                "fine_labels": fine,
                "coarse_labels": coarse,
                "data": cifar_images(n, off),
            },
        )
        out[split] = np.array(fine)
    _dump_py2(
        folder / "meta",
        {
            "fine_label_names": [f"fine{c}" for c in range(100)],
            "coarse_label_names": [f"coarse{c}" for c in range(20)],
        },
    )
    return out


def _solid(path: Path, rgb: tuple[int, int, int], size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def _colour(k: int) -> tuple[int, int, int]:
    assert 0 <= k <= 12
    return (10 + 20 * k, 240 - 18 * k, 50 + 15 * k)


TINY_WNIDS = ["n09", "n01", "n05", "n03"]  # deliberately not alphabetical
# val image -> wnid, deliberately neither alphabetical nor in file order
TINY_VAL = {
    "val_0.JPEG": "n05",
    "val_1.JPEG": "n09",
    "val_2.JPEG": "n03",
    "val_3.JPEG": "n05",
    "val_4.JPEG": "n01",
    "val_5.JPEG": "n03",
    "val_6.JPEG": "n09",
    "val_7.JPEG": "n01",
}


def write_tinyimagenet(root: Path, per_class: int = 5) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in sorted(TINY_WNIDS)) + "n99\tother\n")
    for k, w in enumerate(TINY_WNIDS):
        for i in range(per_class):
            _solid(base / "train" / w / "images" / f"{w}_{i}.JPEG", _colour(k), 64)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for name, w in TINY_VAL.items():
        _solid(base / "val" / "images" / name, _colour(TINY_WNIDS.index(w)), 64)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "test" / "images").mkdir(parents=True)
    return base


def write_domains(base: Path, domains: list[str], classes: list[str], per_class: int) -> None:
    """<base>/<domain>/<class>/<i>.png, colour = class index + 3 * domain index (PNG: lossless)."""
    for d, dom in enumerate(domains):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                _solid(base / dom / cls / f"{i:03d}.png", _colour(c + 3 * d))


def raw_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalisation: back to 0..255 pixel values."""
    m = torch.tensor(mean).reshape(1, 3, 1, 1)
    s = torch.tensor(std).reshape(1, 3, 1, 1)
    return (x * s + m) * 255.0


def cifar_set(**kw) -> dict:
    return {"check_md5": False, **kw}


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------
def test_fake_cifar_files_have_the_official_pickle_format(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # how the CIFAR page says to read them
    assert {b"data", b"labels", b"batch_label", b"filenames"} <= set(entry)
    assert entry[b"data"].shape == (20, 3072) and entry[b"data"].dtype == np.uint8


def test_split_cifar10_tasks_labels_and_splits(tmp_path):
    ref = write_cifar10(tmp_path)
    sc = build_scenario("split-cifar10", cifar_set(val_fraction=0.2), 0, str(tmp_path))
    assert (sc.name, sc.setting, sc.num_classes, sc.input_shape) == (
        "split-cifar10",
        "class",
        10,
        (3, 32, 32),
    )
    assert sc.default_backbone == "resnet18-reduced" and sc.class_names[1] == "automobile"
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    src = sc.tasks[0].source
    assert torch.equal(src.targets, torch.tensor(np.concatenate([ref["train_y"], ref["test_y"]])))
    n_train = len(ref["train_y"])  # 100: 10 per class, 20 per task
    for t in sc.tasks:
        tr, va, te = t.train_idx, t.val_idx, t.test_idx
        assert (len(tr), len(va), len(te)) == (16, 4, 4)  # 2 of each class's 10 go to validation
        assert set(src.targets[torch.cat([tr, va, te])].tolist()) == set(t.classes)
        assert int(tr.max()) < n_train <= int(te.min())
        assert not set(tr.tolist()) & set(va.tolist())
        for c in t.classes:  # stratified
            assert int((src.targets[va] == c).sum()) == 2
    again = build_scenario("split-cifar10", cifar_set(val_fraction=0.2), 0, str(tmp_path))
    other = build_scenario("split-cifar10", cifar_set(val_fraction=0.2), 1, str(tmp_path))
    assert all(torch.equal(a.val_idx, b.val_idx) for a, b in zip(sc.tasks, again.tasks, strict=True))
    assert any(not torch.equal(a.val_idx, b.val_idx) for a, b in zip(sc.tasks, other.tasks, strict=True))


def test_cifar_pixels_are_channel_planes_normalised_with_cifar_stats(tmp_path):
    ref = write_cifar10(tmp_path)
    sc = build_scenario("split-cifar10", cifar_set(val_fraction=0.0), 0, str(tmp_path))
    task = sc.tasks[0]
    x, y = next(task.batches("test", 1000))
    first = int(task.test_idx[0]) - len(ref["train_y"])
    img = torch.tensor(ref["test_x"][first], dtype=torch.float32).reshape(3, 32, 32)
    expected = (img / 255.0 - torch.tensor(CIFAR10_MEAN).reshape(3, 1, 1)) / torch.tensor(
        CIFAR10_STD
    ).reshape(3, 1, 1)
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-5)
    assert int(y[0]) == int(ref["test_y"][first])
    # pixel (c=1, h=2, w=5) is byte 1024 + 2*32 + 5 of the row
    assert x.dtype == torch.float32
    assert raw_pixels(x[:1], CIFAR10_MEAN, CIFAR10_STD)[0, 1, 2, 5].round() == ref["test_x"][first][1024 + 69]


def test_cifar_train_batches_augment_on_device_deterministically(tmp_path):
    write_cifar10(tmp_path)
    sc = build_scenario("split-cifar10", cifar_set(val_fraction=0.0), 0, str(tmp_path))
    task = sc.tasks[0]
    src = task.source
    raw = src.data.index_select(0, task.train_idx[:64])
    plain = src.convert(raw)  # the same images, not augmented
    a = next(task.batches("train", 64, shuffle=False, generator=torch.Generator().manual_seed(3)))[0]
    b = next(task.batches("train", 64, shuffle=False, generator=torch.Generator().manual_seed(3)))[0]
    assert torch.equal(a, b) and not torch.equal(a, plain)
    got = raw_pixels(a, CIFAR10_MEAN, CIFAR10_STD).round().to(torch.uint8)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    for i in range(len(raw)):  # every image is some 32x32 window of the zero-padded image, maybe mirrored
        windows = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(got[i], w) or torch.equal(got[i], w.flip(-1)) for w in windows)
    noaug = build_scenario("split-cifar10", cifar_set(val_fraction=0.0, augment=False), 0, str(tmp_path))
    t0 = noaug.tasks[0]
    assert torch.equal(next(t0.batches("train", 64, generator=torch.Generator().manual_seed(3)))[0], plain)


def test_random_crop_flip_matches_reference_loop():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6).repeat(4, 1, 1, 1)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)  # the same draws, applied one image at a time
    off = torch.randint(0, 5, (8, 2), generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        r, c = off[i].tolist()
        ref = padded[i, :, r : r + 5, c : c + 6]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, rtol=0, atol=0)
    assert bool(flip.any()) and not bool(flip.all())  # the seed exercises both branches


def test_split_cifar100_uses_fine_labels_and_n_tasks(tmp_path):
    ref = write_cifar100(tmp_path)
    sc = build_scenario("split-cifar100", cifar_set(), 0, str(tmp_path))
    assert len(sc.tasks) == 10 and sc.tasks[1].classes == list(range(10, 20)) and sc.class_names[3] == "fine3"
    assert torch.equal(sc.tasks[0].source.targets, torch.tensor(np.concatenate([ref["train"], ref["test"]])))
    sc20 = build_scenario("split-cifar100", cifar_set(n_tasks=20), 0, str(tmp_path))
    assert len(sc20.tasks) == 20 and sc20.tasks[19].classes == [95, 96, 97, 98, 99]
    with pytest.raises(UserError, match="equal tasks"):
        build_scenario("split-cifar100", cifar_set(n_tasks=3), 0, str(tmp_path))


def test_cifar_shuffle_classes_follows_the_seed(tmp_path):
    write_cifar10(tmp_path)
    orders = {}
    for seed in (0, 0, 1):
        sc = build_scenario("split-cifar10", cifar_set(shuffle_classes=True), seed, str(tmp_path))
        order = [c for t in sc.tasks for c in t.classes]
        assert sorted(order) == list(range(10))
        assert orders.setdefault(seed, order) == order
    assert orders[0] != orders[1] and orders[0] != list(range(10))


def test_cifar_missing_corrupt_and_unverified_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_scenario("split-cifar10", cifar_set(), 0, str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as e:
        build_scenario("split-cifar10", cifar_set(), 0, str(tmp_path))
    assert "cifar-10-python.tar.gz" in e.value.fix and str(tmp_path) in e.value.fix
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match=r"MD5|corrupt") as e:  # the fake files are not the official ones
        build_scenario("split-cifar10", {"check_md5": True}, 0, str(tmp_path))
    assert "check_md5" in e.value.fix
    batch3 = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    raw = batch3.read_bytes()
    batch3.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt"):
        build_scenario("split-cifar10", cifar_set(), 0, str(tmp_path))
    batch3.unlink()
    with pytest.raises(UserError, match="incomplete or corrupt"):
        build_scenario("split-cifar10", cifar_set(), 0, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ---------------------------------------------------------------------------------------------
def test_tinyimagenet_labels_from_wnids_and_val_annotations(tmp_path):
    write_tinyimagenet(tmp_path)
    opts = {"n_tasks": 2, "val_fraction": 0.2, "image_size": 32, "augment": False}
    sc = build_scenario("split-tinyimagenet", opts, 0, str(tmp_path))
    assert sc.num_classes == 4 and sc.input_shape == (3, 32, 32) and sc.default_backbone == "resnet18"
    assert sc.class_names == [f"thing {w}" for w in TINY_WNIDS]  # wnids.txt order, names from words.txt
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3]]
    src = sc.tasks[0].source
    assert isinstance(src, StreamingSource)
    n_train = 20
    expected_val = [TINY_WNIDS.index(w) for w in TINY_VAL.values()]
    assert src.targets[n_train:].tolist() == expected_val
    for t in sc.tasks:
        assert (len(t.train_idx), len(t.val_idx), len(t.test_idx)) == (
            8,
            2,
            4,
        )  # 5 per class: 4 train + 1 val
        assert int(t.train_idx.max()) < n_train <= int(t.test_idx.min())
        assert not set(t.train_idx.tolist()) & set(t.val_idx.tolist())
        for split in ("train", "val", "test"):  # every image's colour is its label's colour
            for x, y in t.batches(split, 3):
                px = raw_pixels(x, IMAGENET_MEAN, IMAGENET_STD).mean(dim=(2, 3))
                want = torch.tensor([_colour(int(k)) for k in y], dtype=torch.float32)
                torch.testing.assert_close(px, want, rtol=0, atol=3.0)  # JPEG of a flat colour


def test_tinyimagenet_in_memory_equals_streaming(tmp_path):
    write_tinyimagenet(tmp_path)
    opts = {"n_tasks": 4, "image_size": 16}
    stream = build_scenario("split-tinyimagenet", opts, 0, str(tmp_path))
    mem = build_scenario("split-tinyimagenet", {**opts, "in_memory": True}, 0, str(tmp_path))
    assert mem.tasks[0].source._cache is not None and stream.tasks[0].source._cache is None
    for a, b in zip(stream.tasks, mem.tasks, strict=True):
        assert torch.equal(next(a.batches("test", 50))[0], next(b.batches("test", 50))[0])
        xa = next(a.batches("train", 50, shuffle=True, generator=torch.Generator().manual_seed(5)))
        xb = next(b.batches("train", 50, shuffle=True, generator=torch.Generator().manual_seed(5)))
        assert torch.equal(xa[0], xb[0]) and torch.equal(xa[1], xb[1])


def test_tinyimagenet_errors(tmp_path):
    base = write_tinyimagenet(tmp_path)
    with pytest.raises(UserError, match="equal tasks"):
        build_scenario("split-tinyimagenet", {"n_tasks": 3}, 0, str(tmp_path))
    ann = base / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text(text + "val_9.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match=r"line 9"):
        build_scenario("split-tinyimagenet", {"n_tasks": 2}, 0, str(tmp_path))
    ann.unlink()
    with pytest.raises(UserError, match=r"val_annotations.txt"):
        build_scenario("split-tinyimagenet", {"n_tasks": 2}, 0, str(tmp_path))
    with pytest.raises(UserError, match="Tiny-ImageNet") as e:
        build_scenario("split-tinyimagenet", {}, 0, str(tmp_path / "tiny-imagenet-200" / "train"))
    assert "tiny-imagenet-200" in e.value.fix


def test_corrupt_image_is_a_user_error(tmp_path):
    base = write_tinyimagenet(tmp_path)
    (base / "val" / "images" / "val_2.JPEG").write_bytes(b"not a jpeg")
    sc = build_scenario("split-tinyimagenet", {"n_tasks": 2, "image_size": 16}, 0, str(tmp_path))
    with pytest.raises(UserError, match=r"val_2.JPEG"):
        for t in sc.tasks:
            list(t.batches("test", 4))


# ---------------------------------------------------------------------------------------------
# PACS / OfficeHome
# ---------------------------------------------------------------------------------------------
PACS_CLASSES = ["dog", "elephant", "giraffe"]


def test_pacs_domain_tasks_splits_and_pixels(tmp_path):
    write_domains(tmp_path / "PACS", ["art_painting", "cartoon", "photo", "sketch"], PACS_CLASSES, 10)
    opts = {"image_size": 8, "augment": False, "val_fraction": 0.25}
    sc = build_scenario("pacs", opts, 0, str(tmp_path))
    assert (sc.setting, sc.num_classes, sc.input_shape, sc.class_names) == (
        "domain",
        3,
        (3, 8, 8),
        PACS_CLASSES,
    )
    assert [t.name for t in sc.tasks] == ["photo", "art_painting", "cartoon", "sketch"]
    domain_index = {"art_painting": 0, "cartoon": 1, "photo": 2, "sketch": 3}  # as written on disk
    src = sc.tasks[0].source
    seen: set[int] = set()
    for t in sc.tasks:
        assert t.classes == [0, 1, 2]
        tr, va, te = t.train_idx.tolist(), t.val_idx.tolist(), t.test_idx.tolist()
        assert (len(tr), len(va), len(te)) == (18, 6, 6)  # per class of 10: 2 test, then 2 of 8 validation
        assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te) or seen & set(tr + va + te))
        seen |= set(tr + va + te)
        for c in range(3):
            assert int((src.targets[torch.tensor(te)] == c).sum()) == 2
        x, y = next(t.batches("test", 100))
        px = raw_pixels(x, IMAGENET_MEAN, IMAGENET_STD)
        want = torch.tensor([_colour(int(k) + 3 * domain_index[t.name]) for k in y], dtype=torch.float32)
        torch.testing.assert_close(px.mean(dim=(2, 3)), want, rtol=0, atol=1e-3)  # PNG: exact
    again = build_scenario("pacs", opts, 0, str(tmp_path))
    other = build_scenario("pacs", opts, 1, str(tmp_path))
    assert all(torch.equal(a.test_idx, b.test_idx) for a, b in zip(sc.tasks, again.tasks, strict=True))
    assert any(not torch.equal(a.test_idx, b.test_idx) for a, b in zip(sc.tasks, other.tasks, strict=True))


def test_pacs_domain_order_and_errors(tmp_path):
    write_domains(tmp_path / "kfold", ["art_painting", "cartoon", "photo", "sketch"], PACS_CLASSES, 5)
    sc = build_scenario("pacs", {"domain_order": "sketch, Photo", "image_size": 8}, 0, str(tmp_path))
    assert [t.name for t in sc.tasks] == ["sketch", "photo"] and sc.options["domain_order"] == "sketch,photo"
    sc = build_scenario(
        "pacs", {"domain_order": ["cartoon", "art_painting"], "image_size": 8}, 0, str(tmp_path)
    )
    assert [t.name for t in sc.tasks] == ["cartoon", "art_painting"]
    with pytest.raises(UserError, match="unknown domain 'clipart'") as e:
        build_scenario("pacs", {"domain_order": "photo,clipart"}, 0, str(tmp_path))
    assert "photo, art_painting, cartoon, sketch" in e.value.fix
    with pytest.raises(UserError, match="twice"):
        build_scenario("pacs", {"domain_order": "photo,photo"}, 0, str(tmp_path))
    for f in (tmp_path / "kfold" / "cartoon" / "giraffe").iterdir():
        f.unlink()
    (tmp_path / "kfold" / "cartoon" / "giraffe").rmdir()
    with pytest.raises(UserError, match=r"cartoon .* lacks the class folder.*giraffe"):
        build_scenario("pacs", {"image_size": 8}, 0, str(tmp_path))
    # a domain not asked for may be incomplete
    assert (
        len(build_scenario("pacs", {"domain_order": "photo", "image_size": 8}, 0, str(tmp_path)).tasks) == 1
    )


def test_officehome_layout_names_and_missing_domain(tmp_path):
    base = tmp_path / "OfficeHomeDataset_10072016"
    write_domains(base, ["Art", "Clipart", "Product", "Real World"], ["Alarm_Clock", "Backpack"], 5)
    sc = build_scenario("officehome", {"image_size": 8, "domain_order": "real world,art"}, 0, str(tmp_path))
    assert [t.name for t in sc.tasks] == ["Real_World", "Art"] and sc.class_names == [
        "Alarm_Clock",
        "Backpack",
    ]
    x, y = next(sc.tasks[0].batches("test", 100))
    px = raw_pixels(x, IMAGENET_MEAN, IMAGENET_STD).mean(dim=(2, 3))
    torch.testing.assert_close(
        px, torch.tensor([_colour(int(k) + 9) for k in y], dtype=torch.float32), rtol=0, atol=1e-3
    )
    assert build_scenario("officehome", {"image_size": 8}, 0, str(tmp_path)).tasks[3].name == "Real_World"
    for p in sorted((base / "Product").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (base / "Product").rmdir()
    with pytest.raises(UserError, match=r"lacks the domain folder.*Product"):
        build_scenario("officehome", {}, 0, str(tmp_path))
    with pytest.raises(UserError, match="OfficeHome not found"):
        build_scenario("officehome", {}, 0, str(tmp_path / "OfficeHomeDataset_10072016" / "Art"))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_runner_end_to_end_on_fake_cifar10(tmp_path):
    from harness.engine.runner import RunSpec, run

    write_cifar10(tmp_path, per_batch=40, n_test=40)
    spec = RunSpec(
        "ft",
        "split-cifar10",
        0,
        scenario_set=cifar_set(val_fraction=0.1),
        data_root=str(tmp_path),
        protocol=Protocol(backbone="cnn", batch_size=16),
        device="cpu",
    )
    record = run(spec)
    for setting in ("class_il", "task_il"):
        acc = record["acc"][setting]
        assert len(acc) == 5 and all(len(row) == 5 for row in acc)
        assert all(0.0 <= a <= 1.0 for row in acc for a in row)
    # task-IL picks between 2 classes, class-IL among all seen: task-IL can only be >= class-IL
    assert all(
        t >= c
        for rt, rc in zip(record["acc"]["task_il"], record["acc"]["class_il"], strict=True)
        for t, c in zip(rt, rc, strict=True)
    )


def test_worker_processes_give_the_same_batches_and_clean_errors(tmp_path):
    base = write_tinyimagenet(tmp_path, per_class=2)
    opts = {"n_tasks": 1, "image_size": 16, "val_fraction": 0.0}
    one = build_scenario("split-tinyimagenet", opts, 0, str(tmp_path)).tasks[0]
    two = build_scenario("split-tinyimagenet", {**opts, "num_workers": 1}, 0, str(tmp_path)).tasks[0]
    for split in ("train", "test"):
        a = list(one.batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
        b = list(two.batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
        assert len(a) == len(b) and all(
            torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
        )
    (base / "val" / "images" / "val_4.JPEG").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UserError) as e:
        list(two.batches("test", 8))
    assert e.value.problem.startswith("cannot decode image") and "val_4.JPEG" in e.value.problem
    assert "Traceback" not in e.value.problem
