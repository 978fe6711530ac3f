"""Metrics against hand-computed values (docs/methods.md §1)."""

import numpy as np
import pytest

from harness.engine import metrics

# R[k][j]: accuracy on task j after training task k; 3 tasks.
R = [
    [0.90, 0.10, 0.20],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]
b = [0.10, 0.15, 0.05]


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)


def test_average_incremental_accuracy():
    a1 = 0.90
    a2 = (0.60 + 0.80) / 2
    a3 = (0.50 + 0.70 + 0.95) / 3
    assert metrics.average_incremental_accuracy(R) == pytest.approx((a1 + a2 + a3) / 3)


def test_forgetting_uses_best_accuracy_since_learned():
    # task 0: best of R[0][0], R[1][0] = 0.90 -> 0.90 - 0.50 = 0.40
    # task 1: best of R[1][1] = 0.80 (R[0][1] before learning does not count) -> 0.80 - 0.70 = 0.10
    assert metrics.forgetting(R) == pytest.approx((0.40 + 0.10) / 2)


def test_forgetting_ignores_rows_before_the_task_was_learned():
    high_before = [[0.5, 0.99], [0.5, 0.60]]
    # only R[1][1]... task 1 is the last; only task 0 counts: max(R[0][0]) - R[1][0] = 0
    assert metrics.forgetting(high_before) == pytest.approx(0.0)


def test_bwt():
    assert metrics.backward_transfer(R) == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)


def test_fwt():
    assert metrics.forward_transfer(R, b) == pytest.approx(((0.10 - 0.15) + (0.30 - 0.05)) / 2)


def test_single_task_is_defined():
    assert metrics.forgetting([[0.7]]) == 0.0
    assert metrics.backward_transfer([[0.7]]) == 0.0
    assert metrics.final_average_accuracy([[0.7]]) == pytest.approx(0.7)


def test_bwt_equals_minus_forgetting_when_accuracy_only_decays():
    rng = np.random.default_rng(0)
    T = 5
    m = np.zeros((T, T))
    for j in range(T):
        m[j, j] = rng.uniform(0.8, 1.0)
        for k in range(j + 1, T):
            m[k, j] = m[k - 1, j] - rng.uniform(0, 0.1)
    assert metrics.backward_transfer(m) == pytest.approx(-metrics.forgetting(m))


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        metrics.forgetting([[0.1, 0.2]])
    with pytest.raises(ValueError):
        metrics.forward_transfer(R, [0.1])
