"""Shared fixtures: one torch thread, small scenario options, skip markers for missing data."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

# Small per-task caps that keep a 5-task run to a second or two on one thread.
TINY = {"max_train_per_task": 600, "max_test_per_task": 300}


def _fmnist_present() -> bool:
    try:
        from scenarios.fmnist import find_fmnist

        return find_fmnist(None) is not None
    except Exception:  # noqa: BLE001
        return False


needs_fmnist = pytest.mark.skipif(not _fmnist_present(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture
def tiny_options():
    return dict(TINY)


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    return d
