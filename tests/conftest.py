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


# ---- real engines, started once per session (tests/engines.py) -----------------------------------
@pytest.fixture(scope="session")
def engines_postgres():
    """A PostgreSQL server for the session; tests make their own databases with ``create_db``."""
    from tests.engines import Missing, start_postgres

    try:
        pg = start_postgres()
    except Missing as e:
        pytest.skip(str(e))
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-host Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd with this machine's
    CPUs); SLURM_CONF points the clients (sbatch, sacct, submitit) at it while the session runs."""
    from tests.engines import Missing, start_slurm

    try:
        cluster = start_slurm()
    except Missing as e:
        pytest.skip(str(e))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="session")
def mlflow_server(engines_postgres, tmp_path_factory):
    """`mlflow server` on loopback with a PostgreSQL backend store and a local artifact root."""
    from tests.engines import Missing, start_mlflow

    backend = engines_postgres.create_db("mlflow").replace("postgresql://", "postgresql+psycopg://")
    try:
        server = start_mlflow(backend, tmp_path_factory.mktemp("mlflow-server"))
    except Missing as e:
        pytest.skip(str(e))
    yield server
    server.stop()
