"""One training budget (docs/methods.md §6): every registered method's measured passes per task equal the
budget it declares (protocol.epochs; Joint's cumulative schedule is the stated exception)."""

import pytest

import methods  # noqa: F401
from harness.core.errors import UserError
from harness.core.method import METHODS
from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run
from tests.conftest import needs_fmnist

SMALL = {"n_tasks": 2, "max_train_per_task": 300, "max_test_per_task": 100}
# Methods whose drawn samples include more than the task's own data, with the reason.
REPLAY_COUNTED = {"avl-replay", "avl-gdumb"}


def _run(method: str, epochs: int = 1, **mset):
    proto = Protocol(epochs=epochs, batch_size=64)
    return run(RunSpec(method, "split-fmnist", 0, method_set=mset, scenario_set=SMALL, protocol=proto))


@needs_fmnist
@pytest.mark.parametrize("name", sorted(METHODS))
def test_measured_passes_equal_the_declared_budget(name):
    if name in REPLAY_COUNTED:
        pytest.skip("Avalanche's replay minibatch mixes buffer and task samples; the meter counts both")
    rec = _run(name)
    costs = rec["costs"]
    assert costs["budget_passes"] == 1
    n = [t["n_train"] for t in rec["tasks"]]
    for p in rec["per_task"]:
        if costs["budget_rule"] == "cumulative":  # Joint: task t trains on the union of tasks 0..t
            expect = sum(n[: p["task"] + 1]) / n[p["task"]]
        else:
            expect = 1.0
        assert p["budget_passes"] == pytest.approx(expect)
        assert p["passes"] == pytest.approx(expect), (name, p["task"], p["train_samples"])
    assert costs["passes_per_task"] == pytest.approx(sum(p["passes"] for p in rec["per_task"]) / len(n))
    assert costs["train_flops_per_sample"] == pytest.approx(costs["train_flops_total"] / sum(n))


@needs_fmnist
@pytest.mark.parametrize("name", ["fedavg", "dimat"])
def test_rounds_share_the_budget_and_an_off_budget_product_is_refused(name):
    rec = _run(name, epochs=2, rounds=4)  # E = 0.5: each round trains on half a pass of the shard
    assert [p["passes"] for p in rec["per_task"]] == [pytest.approx(2.0)] * 2
    assert rec["costs"]["comm_rounds"] == 8
    with pytest.raises(UserError, match="passes per task"):
        _run(name, rounds=3, local_epochs=1)
    free = _run(name, rounds=3, local_epochs=1, free_budget=True)
    assert [p["passes"] for p in free["per_task"]] == [pytest.approx(3.0)] * 2


@needs_fmnist
def test_fedavg_client_fraction_declares_its_share_of_the_budget():
    rec = _run("fedavg", client_fraction=0.5)  # 2 of 4 clients per round: half the task's data per round
    for p in rec["per_task"]:
        assert p["budget_passes"] == 0.5 and p["passes"] == pytest.approx(0.5, abs=0.02)  # batch rounding


@needs_fmnist
def test_decentralized_dmkd_shares_the_budget():
    rec = _run("dmkd", training="decentralized", n_nodes=2, rounds=2)
    assert [p["passes"] for p in rec["per_task"]] == [pytest.approx(1.0)] * 2
