"""Memory that belongs to the run (issue 12, item 7): analytic footprint by hand, and a peak that
does not see what the process allocated before the run."""

from __future__ import annotations

import pytest
import torch

from harness.engine.costs import PeakMemory, read_vm_hwm, reset_peak_rss
from harness.engine.runner import RunSpec, run

from .conftest import TINY, needs_fmnist

# MLP 784-400-400-10: weights and biases, float32.
MLP_PARAMS = 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10
MIB = 2**20


@needs_fmnist
def test_footprint_is_the_hand_count_for_the_mlp_and_er_buffer():
    ft = run(RunSpec("ft", "split-fmnist", 0, scenario_set=dict(TINY)))["costs"]
    assert ft["footprint_param_bytes"] == 4 * MLP_PARAMS == 1_913_640
    assert ft["footprint_buffer_bytes"] == 0 and ft["method_state_bytes"] == 0
    assert ft["footprint_bytes"] == 4 * MLP_PARAMS
    er = run(RunSpec("er", "split-fmnist", 0, {"buffer_size": 500}, scenario_set=dict(TINY)))["costs"]
    # 500 stored images of 784 uint8 pixels (stored as the data set stores them) + 500 int64 labels.
    assert er["method_state_bytes"] == 500 * 784 + 500 * 8
    assert er["footprint_bytes"] == 4 * MLP_PARAMS + 500 * 784 + 500 * 8
    # The data set is resident before the run and stated apart (Fashion-MNIST train+test as float32).
    assert ft["dataset_bytes"]["cpu"] >= 70_000 * 784 * 4


def test_peak_counter_reset_forgets_earlier_allocations():
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs peak reset on this system")
    base = read_vm_hwm()
    big = torch.ones(600 * MIB // 4)  # 600 MiB, touched
    del big
    assert read_vm_hwm() >= base + 500 * MIB  # the kernel's counter saw it
    with PeakMemory(torch.device("cpu")) as mem:
        small = torch.ones(50 * MIB // 4)
        del small
    assert mem.kind == "vmhwm_reset"
    assert mem.increase_bytes >= 45 * MIB  # the run's own 50 MiB is seen...
    assert mem.peak_bytes < base + 300 * MIB  # ...the 600 MiB freed before the run is not


@needs_fmnist
def test_run_peak_does_not_depend_on_a_prior_big_allocation():
    spec = RunSpec("ft", "split-fmnist", 0, scenario_set=dict(TINY))
    first = run(spec)["costs"]
    big = torch.ones(800 * MIB // 4)
    del big
    second = run(spec)["costs"]
    assert first["peak_memory_kind"] == second["peak_memory_kind"] == "vmhwm_reset"
    # Without the reset the second peak would include the 800 MiB; with it the two agree closely.
    assert abs(second["peak_memory_bytes"] - first["peak_memory_bytes"]) < 100 * MIB
    assert second["peak_memory_bytes"] < first["peak_memory_bytes"] + 800 * MIB / 2


def test_sampled_fallback_is_labelled(monkeypatch):
    from harness.engine import costs

    monkeypatch.setattr(costs, "reset_peak_rss", lambda: False)
    with PeakMemory(torch.device("cpu"), interval=0.005) as mem:
        x = torch.ones(20 * MIB // 4)
        del x
    assert mem.kind == "rss_sampled" and mem.peak_bytes > 0
