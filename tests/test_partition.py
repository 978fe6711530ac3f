"""Data partitions: disjoint shards covering the task, seeded, with the stated class statistics."""

import pytest
import torch

from harness.core.errors import UserError
from harness.core.partition import partition_indices, partition_stats, task_class_order


def _labels(n_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(n_classes).repeat_interleave(per_class)


def _check_cover(shards, indices):
    allidx = torch.cat(shards).sort().values
    assert torch.equal(allidx, indices.sort().values)  # disjoint and complete


def test_iid_sizes_cover_and_seed():
    idx = torch.arange(1000, 2003)
    lab = idx % 3
    p = partition_indices(idx, lab, 4, "iid", seed=1, task_id=2)
    _check_cover(p.shards, idx)
    assert max(p.sizes) - min(p.sizes) <= 1 and sum(p.sizes) == 1003
    again = partition_indices(idx, lab, 4, "iid", seed=1, task_id=2)
    assert all(torch.equal(a, b) for a, b in zip(p.shards, again.shards))
    other = partition_indices(idx, lab, 4, "iid", seed=1, task_id=3)
    assert not all(torch.equal(a, b) for a, b in zip(p.shards, other.shards))


@pytest.mark.parametrize("alpha", [0.5, 100.0])
def test_dirichlet_class_shares_follow_the_dirichlet_moments(alpha):
    """Per class, node shares ~ Dir(α·1_P): mean 1/P, variance (1/P)(1-1/P)/(αP+1)."""
    C, n, P = 300, 400, 4
    lab = _labels(C, n)
    idx = torch.arange(len(lab)) + 5
    p = partition_indices(idx, lab, P, "dirichlet", seed=0, alpha=alpha)
    _check_cover(p.shards, idx)
    counts = torch.stack([torch.bincount(lab[s - 5], minlength=C) for s in p.shards]).double()  # P x C
    shares = counts / n
    assert torch.allclose(shares.sum(0), torch.ones(C, dtype=torch.float64))
    expected_var = (1 / P) * (1 - 1 / P) / (alpha * P + 1)
    var = shares.var().item()
    assert abs(shares.mean().item() - 1 / P) < 1e-9
    assert abs(var - expected_var) < 0.15 * expected_var + 2e-4  # floor rounding adds ~1/(12 n^2)


def test_dirichlet_is_more_skewed_for_small_alpha():
    lab = _labels(10, 300)
    idx = torch.arange(len(lab))
    skew = [partition_stats(partition_indices(idx, lab, 4, "dirichlet", seed=3, alpha=a), lab, 10)
            ["mean_max_class_share"] for a in (0.1, 1000.0)]
    assert skew[0] > 0.3 and 0.1 <= skew[1] < 0.13  # near-uniform over 10 classes when alpha is large


def test_round_robin_gives_whole_classes_in_order():
    order = [7, 2, 5, 0, 9]
    lab = torch.tensor([7, 2, 5, 0, 9, 7, 2, 5, 0, 9, 9])
    idx = torch.arange(11) * 10
    p = partition_indices(idx, lab, 2, "round_robin", seed=0, class_order=order)
    # class order positions 0,2,4 (7,5,9) -> node 0; 1,3 (2,0) -> node 1
    assert p.shards[0].tolist() == [0, 20, 40, 50, 70, 90, 100]
    assert p.shards[1].tolist() == [10, 30, 60, 80]
    targets = torch.zeros(101, dtype=torch.long)
    targets[idx] = lab
    stats = partition_stats(p, targets, 10)
    assert stats["class_counts"][0] == [0, 0, 0, 0, 0, 2, 0, 2, 0, 3]
    assert stats["class_counts"][1] == [2, 0, 2, 0, 0, 0, 0, 0, 0, 0]


def test_partition_stats_counts_by_hand():
    targets = torch.tensor([0, 0, 1, 1, 1, 2])
    from harness.core.partition import Partition

    stats = partition_stats(Partition("x", [torch.tensor([0, 2, 3]), torch.tensor([1, 4, 5]), torch.tensor([],
                                       dtype=torch.long)]), targets, 3)
    assert stats["class_counts"] == [[1, 2, 0], [1, 1, 1], [0, 0, 0]]
    assert stats["sizes"] == [3, 3, 0] and stats["empty_nodes"] == 1
    assert stats["mean_max_class_share"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_class_order_and_errors():
    assert task_class_order([[3, 1], [0, 2], [1]]) == [3, 1, 0, 2]
    with pytest.raises(UserError):
        partition_indices(torch.arange(4), torch.zeros(4, dtype=torch.long), 2, "random", seed=0)
    with pytest.raises(UserError):
        partition_indices(torch.arange(4), torch.zeros(4, dtype=torch.long), 2, "dirichlet", seed=0, alpha=0.0)
