"""Fashion-MNIST scenarios: splits, class orders, transforms and data-file handling."""

import gzip
import struct

import pytest
import torch

from harness.core.errors import UserError
from scenarios.base import build_scenario, split_train_val
from scenarios.fmnist import MEAN, STD, Permute, Rotate, read_idx
from tests.conftest import needs_fmnist


def _write_idx(path, arr: torch.Tensor, gz=True):
    header = bytes([0, 0, 8, arr.dim()]) + struct.pack(">" + "I" * arr.dim(), *arr.shape)
    payload = header + arr.to(torch.uint8).numpy().tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fmnist(folder, n_train=200, n_test=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "train-images-idx3-ubyte", torch.randint(0, 256, (n_train, 28, 28), generator=g))
    _write_idx(folder / "train-labels-idx1-ubyte", torch.arange(n_train) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte", torch.randint(0, 256, (n_test, 28, 28), generator=g))
    _write_idx(folder / "t10k-labels-idx1-ubyte", torch.arange(n_test) % 10)


def test_split_tasks_from_a_data_root(tmp_path):
    _fake_fmnist(tmp_path / "fm")
    sc = build_scenario("split-fmnist", {"val_fraction": 0.25}, 0, str(tmp_path / "fm"))
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for t in sc.tasks:
        tr, va, te = set(t.train_idx.tolist()), set(t.val_idx.tolist()), set(t.test_idx.tolist())
        assert not (tr & va) and not (tr & te) and not (va & te)
        # 20 training samples per class, 25% of each class held out for validation.
        assert len(va) == 2 * 5 and len(tr) == 2 * 15 and len(te) == 2 * 10
        labels = t.source.targets
        assert set(labels[t.val_idx].tolist()) == set(t.classes)
        assert all(i >= 200 for i in te)  # test samples come from the test files
        _, y = next(t.batches("test", 1000))
        assert set(y.tolist()) <= set(t.classes)


def test_pixels_normalised(tmp_path):
    _fake_fmnist(tmp_path / "fm")
    raw = read_idx(tmp_path / "fm" / "train-images-idx3-ubyte.gz")
    sc = build_scenario("split-fmnist", {"val_fraction": 0.0}, 0, str(tmp_path / "fm"))
    t0 = sc.tasks[0]
    x, _ = next(t0.batches("train", 1000))
    i = int(t0.train_idx[0])
    assert torch.allclose(x[0, 0], (raw[i].float() / 255 - MEAN) / STD, atol=1e-6)


def test_class_order_from_seed(tmp_path):
    _fake_fmnist(tmp_path / "fm")
    root = str(tmp_path / "fm")
    a = build_scenario("split-fmnist", {"shuffle_classes": True}, 1, root)
    b = build_scenario("split-fmnist", {"shuffle_classes": True}, 1, root)
    c = build_scenario("split-fmnist", {"shuffle_classes": True}, 2, root)
    order = lambda s: [k for t in s.tasks for k in t.classes]
    assert order(a) == order(b) and sorted(order(a)) == list(range(10))
    assert order(a) != order(c)
    assert torch.equal(a.tasks[0].val_idx, b.tasks[0].val_idx)


def test_stratified_validation_split():
    targets = torch.tensor([0] * 50 + [1] * 30)
    tr, va = split_train_val(torch.arange(80), targets, 0.1, torch.Generator().manual_seed(0))
    assert (targets[va] == 0).sum() == 5 and (targets[va] == 1).sum() == 3
    assert len(set(tr.tolist()) | set(va.tolist())) == 80


def test_permutation_transform_is_a_fixed_permutation():
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 1, 28, 28)
    out = Permute(perm)(x)
    assert out.shape == x.shape
    assert torch.equal(out.reshape(3, -1), x.reshape(3, -1)[:, perm])


def test_rotation_by_90_degrees_is_exact_and_keeps_background():
    x = torch.randn(2, 1, 28, 28)
    rot = Rotate(90.0, background=-1.5)(x)
    candidates = [torch.rot90(x, 1, (2, 3)), torch.rot90(x, -1, (2, 3))]
    assert any(torch.allclose(rot, c, atol=1e-5) for c in candidates)
    # A 45-degree rotation fills the corners with the background value.
    corner = Rotate(45.0, background=-1.5)(torch.zeros(1, 1, 28, 28) + 3.0)[0, 0, 0, 0]
    assert corner == pytest.approx(-1.5)
    assert torch.equal(Rotate(0.0, 0.0)(x), x)


def test_domain_scenarios_have_distinct_tasks(tmp_path):
    _fake_fmnist(tmp_path / "fm")
    root = str(tmp_path / "fm")
    p = build_scenario("permuted-fmnist", {"n_tasks": 3}, 0, root)
    assert p.setting == "domain" and len(p.tasks) == 3
    x0, _ = next(p.tasks[0].batches("test", 10))
    x1, _ = next(p.tasks[1].batches("test", 10))
    assert not torch.equal(x0, x1)
    assert torch.allclose(x0.reshape(10, -1).sort(1).values, x1.reshape(10, -1).sort(1).values)
    r = build_scenario("rotated-fmnist", {"n_tasks": 4}, 0, root)
    assert [t.name for t in r.tasks] == ["rotation 0 deg", "rotation 45 deg", "rotation 90 deg", "rotation 135 deg"]


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    _fake_fmnist(tmp_path / "fm")
    f = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated gzip
    with pytest.raises(UserError, match="truncated or corrupt"):
        build_scenario("split-fmnist", {}, 0, str(tmp_path / "fm"))
    bad = tmp_path / "bad"
    _fake_fmnist(bad)
    raw = gzip.decompress((bad / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    with pytest.raises(UserError, match="magic"):
        build_scenario("split-fmnist", {}, 0, str(bad))
    with pytest.raises(UserError, match="does not exist"):
        build_scenario("split-fmnist", {}, 0, str(tmp_path / "nowhere"))
    (tmp_path / "partial").mkdir()
    _write_idx(tmp_path / "partial" / "train-images-idx3-ubyte", torch.zeros(2, 28, 28))
    with pytest.raises(UserError, match="missing"):
        build_scenario("split-fmnist", {}, 0, str(tmp_path / "partial"))


def test_dmkd_data_environment_variable(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path / "env" / "fashion-mnist", n_train=120)
    monkeypatch.setenv("DMKD_DATA", str(tmp_path / "env"))
    from scenarios import fmnist

    files = fmnist.find_fmnist(None)
    assert files is not None and str(tmp_path / "env") in str(files["train_x"])


def test_bad_options_are_user_errors(tmp_path):
    _fake_fmnist(tmp_path / "fm")
    with pytest.raises(UserError, match="cannot be split"):
        build_scenario("split-fmnist", {"n_tasks": 3}, 0, str(tmp_path / "fm"))
    with pytest.raises(UserError, match="val_fraction"):
        build_scenario("split-fmnist", {"val_fraction": 1.5}, 0, str(tmp_path / "fm"))
    with pytest.raises(UserError, match="not a valid int"):
        build_scenario("split-fmnist", {"n_tasks": "five"}, 0, str(tmp_path / "fm"))


@needs_fmnist
def test_real_fashion_mnist_sizes():
    sc = build_scenario("split-fmnist", {}, 0, None)
    assert sum(len(t.test_idx) for t in sc.tasks) == 10000
    assert sum(len(t.train_idx) + len(t.val_idx) for t in sc.tasks) == 60000
    assert all(len(t.val_idx) == 1200 for t in sc.tasks)
