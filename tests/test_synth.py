"""`dmkd synth`: files in the real on-disk formats, read by the real loaders; marked synthetic everywhere.

Every data set is written at a small scale into tmp_path and loaded through the same builders as
real data (torchvision's CIFAR classes, the Tiny-ImageNet and domain folder scans, the streaming
decoder). The images must carry their class: a nearest-class-mean classifier on simple image
statistics is well above chance, and the same classifier on shuffled labels is at chance.
"""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli.dmkd import main
from harness.core.errors import UserError
from harness.engine.runner import RunSpec, run
from scenarios import cifar
from scenarios.base import build_scenario
from scenarios.synth import (
    OFFICEHOME_CLASSES,
    OFFICEHOME_COUNTS,
    PACS_COUNTS,
    Prototypes,
    generate,
    render,
    synthetic_marker,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate("all", out, scale=0.01, seed=0)
    return out


def test_cifar10_pickles_are_python2_batches_torchvision_reads(root):
    folder = root / "cifar-10-batches-py"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["SYNTHETIC", "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                     "data_batch_5", "readme.html", "test_batch"]
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # Python 2 str keys come back as bytes
    assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (100, 3072)
    sc = build_scenario("split-cifar10", {"val_fraction": 0.0}, 0, str(root))
    assert sum(len(t.train_idx) for t in sc.tasks) == 500 and sum(len(t.test_idx) for t in sc.tasks) == 100
    assert sc.class_names[0] == "airplane"
    assert sc.synthetic is not None and sc.synthetic["dataset"] == "cifar10"
    assert sc.options["synthetic_data"] is True
    # pixels: the loader's NCHW tensor is the pickle's row-major RGB planes
    data, targets, n_train, _, _ = cifar.load_cifar(10, str(root), True)
    assert torch.equal(data[0].flatten(), torch.from_numpy(raw[b"data"][0]))
    assert targets[0] == raw[b"labels"][0]
    # balanced classes: 50 train images each at this scale
    assert torch.bincount(targets[:n_train]).tolist() == [50] * 10


def test_cifar100_train_test_meta(root):
    with open(root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert {"fine_labels", "coarse_labels", "data", "filenames", "batch_label"} == set(raw)
    assert max(raw["coarse_labels"]) == 19 and raw["coarse_labels"][0] == raw["fine_labels"][0] // 5
    sc = build_scenario("split-cifar100", {}, 0, str(root))
    assert sc.num_classes == 100 and len(sc.tasks) == 10 and sc.synthetic is not None


def test_tinyimagenet_tree(root):
    from scenarios.tinyimagenet import scan_tinyimagenet

    tin = root / "tiny-imagenet-200"
    files = scan_tinyimagenet(str(root))
    assert len(files.wnids) == 200 and files.n_train == 1000 and len(files.paths) == 1200
    lines = (tin / "val" / "val_annotations.txt").read_text().splitlines()
    assert len(lines) == 200 and lines[0].split("\t")[1] in files.wnids and len(lines[0].split("\t")) == 6
    w = files.wnids[3]
    assert (tin / "train" / w / f"{w}_boxes.txt").is_file()
    assert len(list((tin / "test" / "images").glob("*.JPEG"))) == 200
    with Image.open(files.paths[0]) as im:  # every 97th image is grayscale, as some real ones are
        assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "L"
    sc = build_scenario("split-tinyimagenet", {"max_train_per_task": 8, "max_test_per_task": 4}, 0, str(root))
    assert sc.synthetic is not None and sc.options["synthetic_data"] is True
    x, y = next(sc.tasks[0].batches("train", 8))
    assert x.shape == (8, 3, 64, 64) and set(y.tolist()) <= set(sc.tasks[0].classes)


def test_pacs_and_officehome_folders(root):
    pacs = build_scenario("pacs", {"image_size": 32}, 0, str(root))
    assert pacs.num_classes == 7 and [t.name for t in pacs.tasks] == list(PACS_COUNTS)
    assert sum(len(t.train_idx) + len(t.val_idx) + len(t.test_idx) for t in pacs.tasks) == 17 + 20 + 23 + 39
    assert list((root / "PACS" / "sketch" / "dog").glob("*.png")) and list((root / "PACS" / "photo" / "dog").glob("*.jpg"))
    oh = build_scenario("officehome", {"image_size": 32}, 0, str(root))
    assert oh.num_classes == 65 and oh.class_names == sorted(OFFICEHOME_CLASSES)
    assert (root / "OfficeHome" / "Real World").is_dir()  # the official folder name, with its space
    assert [t.name for t in oh.tasks] == ["Art", "Clipart", "Product", "Real_World"]
    with Image.open(next((root / "OfficeHome" / "Art" / "Mug").iterdir())) as im:
        assert im.size == (300, 225)  # non-square, resized by the loader
    assert pacs.synthetic is not None and oh.synthetic is not None
    assert synthetic_marker(root / "PACS")["counts"] == {"photo": 17, "art_painting": 20, "cartoon": 23, "sketch": 39}


def test_full_size_counts_are_the_real_ones():
    assert sum(PACS_COUNTS.values()) == 9991 and sum(OFFICEHOME_COUNTS.values()) == 15588
    assert len(OFFICEHOME_CLASSES) == 65


def test_images_carry_their_class():
    protos = Prototypes(10, 0)
    rng = np.random.default_rng(1)
    y = np.arange(400) % 10
    x = render(protos, y, 32, 32, rng).astype(np.float32) / 255
    spec = np.abs(np.fft.rfft2(x.mean(-1)))[:, :8, :8].reshape(len(x), -1) / 100
    feats = np.concatenate([x.mean((1, 2)), spec], 1)
    train = np.arange(len(y)) % 4 != 0

    def ncm_accuracy(labels):
        mu = np.stack([feats[train & (labels == c)].mean(0) for c in range(10)])
        pred = ((feats[~train][:, None] - mu[None]) ** 2).sum(-1).argmin(1)
        return float((pred == labels[~train]).mean())

    assert ncm_accuracy(y) > 0.4  # chance is 0.1
    shuffled = y.copy()
    rng.shuffle(shuffled)
    assert ncm_accuracy(shuffled) < 0.25


def test_run_records_say_synthetic(root, tmp_path):
    spec = RunSpec("ft", "split-cifar10", 0, {}, {"max_train_per_task": 40, "max_test_per_task": 10},
                   data_root=str(root))
    spec.protocol.backbone = "mlp"
    rec = run(spec)
    assert rec["synthetic_data"] is True and rec["config"]["synthetic_data"]["synthetic"] is True
    assert rec["config"]["scenario_options"]["synthetic_data"] is True
    from reports.tables import leaderboards

    board = leaderboards([rec])[0]
    assert "[synthetic data]" in board.title and "DATA: SYNTHETIC" in board.protocol


def test_cli_synth_and_bad_name(tmp_path, capsys):
    assert main(["synth", "cifar10", "--out", str(tmp_path), "--scale", "0.002"]) == 0
    assert "cifar10: train 100, test 20 images (synthetic)" in capsys.readouterr().out
    assert main(["synth", "imagenet", "--out", str(tmp_path)]) == 2
    assert "unknown synthetic data set 'imagenet'" in capsys.readouterr().err
    assert main(["synth", "cifar10", "--out", str(tmp_path), "--scale", "2"]) == 2


# ---- getting the real data ------------------------------------------------------------------
@pytest.mark.parametrize("scenario, must_name", [
    ("split-cifar10", ["cifar-10-python.tar.gz", "cifar-10-batches-py", "--download", "dmkd synth cifar10"]),
    ("split-cifar100", ["cifar-100-python.tar.gz", "cifar-100-python", "--download", "dmkd synth cifar100"]),
    ("split-tinyimagenet", ["tiny-imagenet-200.zip", "wnids.txt", "dmkd synth tinyimagenet"]),
    ("pacs", ["PACS", "<root>/PACS/<domain>/<class>/<image>", "dmkd synth pacs"]),
    ("officehome", ["OfficeHomeDataset_10072016.zip", "<root>/OfficeHome/<domain>/<class>/<image>",
                    "dmkd synth officehome"]),
])
def test_missing_data_error_says_what_to_fetch_and_where(scenario, must_name, tmp_path, monkeypatch):
    monkeypatch.delenv("DMKD_DATA", raising=False)
    with pytest.raises(UserError) as e:
        build_scenario(scenario, {}, 0, str(tmp_path))
    for s in must_name:
        assert s in e.value.fix, (s, e.value.fix)


def test_download_uses_torchvision_download_into_the_data_root(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:  # stands in for torchvision's class: "downloads" by writing the files
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            generate("cifar10", tmp_path, scale=0.002)

    monkeypatch.setattr(cifar, "_torchvision_class", lambda n: FakeCIFAR10)
    cifar.load_cifar.cache_clear()
    sc = build_scenario("split-cifar10", {"download": True}, 0, str(tmp_path))
    assert calls == [(str(tmp_path), True, True)] and len(sc.tasks) == 5
    cifar.load_cifar.cache_clear()
    build_scenario("split-cifar10", {"download": True}, 1, str(tmp_path))  # present now: no second download
    assert len(calls) == 1


def test_download_failure_is_a_user_error(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, root, train, download):
            raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(cifar, "_torchvision_class", lambda n: Offline)
    with pytest.raises(UserError) as e:
        build_scenario("split-cifar100", {"download": True}, 0, str(tmp_path))
    assert "downloading cifar-100-python.tar.gz" in e.value.problem and "offline" in e.value.fix


def test_cli_download_flag_only_where_it_applies(capsys):
    assert main(["run", "--method", "ft", "--scenario", "pacs", "--download", "--tracking-uri", "none"]) == 2
    assert "--download is not available for pacs" in capsys.readouterr().err


def test_dataset_device_bytes_counts_the_sources_on_the_device(root):
    from harness.engine.runner import dataset_device_bytes

    sc = build_scenario("split-cifar10", {}, 0, str(root))
    assert dataset_device_bytes(sc, torch.device("cpu")) == 0  # on the CPU it is part of the process
    src = sc.tasks[0].source
    src.data = src.data.to("meta")  # stands in for a GPU: same accounting, no memory
    assert dataset_device_bytes(sc, torch.device("meta")) == 600 * 3 * 32 * 32  # uint8, counted once
