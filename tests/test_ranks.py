"""Ranks that read right: ranks follow the means, ties are marked apart, mean ranks with the Friedman
test and Nemenyi's critical difference, rank stability across tuning protocols with Kendall's τ, the
spread tuning adds over sampler seeds, and accuracy on tasks unseen in first-tasks tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reports.build import make_report
from reports.ranks import cd_diagram, nemenyi_cd, rank_stability, rank_summaries
from reports.tables import display_frame, holm, leaderboards
from tests.test_reports import PNG_MAGIC, fake_record


def _rows(finals: dict[str, list[float]], **extra) -> list[dict]:
    return [fake_record(lab, s, f, **extra) for lab, fs in finals.items() for s, f in enumerate(fs)]


def _tuned(finals: dict[str, list[float]], tuning: dict, scenario: str = "split-fmnist", **extra) -> list[dict]:
    return [fake_record(lab, s, f, tuned=True, scenario=scenario, tuning=tuning,
                        key=f"{lab}__{scenario}__{tuning}__s{s}", **extra)
            for lab, fs in finals.items() for s, f in enumerate(fs)]


def test_the_issue_example_ranks_by_the_mean_and_marks_the_ties_apart():
    # Split task-IL as the issue reports it: er-500 0.985 ± 0.003, ft 0.952 ± 0.080, lwf 0.858 ± 0.207.
    finals = {"er-500": [0.984, 0.985, 0.986], "ft": [0.92, 0.952, 0.984], "lwf": [0.775, 0.858, 0.941]}
    board = leaderboards(_rows(finals))[0]
    f = board.frame.set_index("method")
    assert [f.loc[m, "rank"] for m in ("er-500", "ft", "lwf")] == [1, 2, 3]
    assert list(board.frame["method"]) == ["er-500", "ft", "lwf"]  # shown in the order of the means
    # Neither difference is significant on 3 seeds: both are marked tied with the best, apart from the rank.
    assert bool(f.loc["ft", "tied_with_best"]) and bool(f.loc["lwf", "tied_with_best"])
    shown = display_frame(board)
    assert list(shown["Rank"]) == ["1", "2", "3"] and list(shown["≈ best"]) == ["best", "≈ best", "≈ best"]


@pytest.mark.parametrize("case", range(40))
def test_no_rank_ever_contradicts_the_order_of_the_means(case):
    rng = np.random.default_rng(case)
    k, seeds = int(rng.integers(2, 9)), int(rng.integers(1, 5))
    # Some rows share exact values (equal means must share a rank), the others are random.
    base = rng.uniform(0.1, 0.9, k).round(2)
    base[rng.integers(0, k)] = base[0]
    finals = {f"m{i}": list(np.clip(base[i] + rng.normal(0, 0.05, seeds) * (i % 2), 0, 1)) for i in range(k)}
    f = leaderboards(_rows(finals))[0].frame
    means, ranks = list(f["final_avg_acc_mean"]), list(f["rank"])
    for i in range(len(f)):
        for j in range(len(f)):
            if means[i] > means[j]:
                assert ranks[i] < ranks[j]
            if means[i] == means[j]:
                assert ranks[i] == ranks[j]
    assert means == sorted(means, reverse=True)


def test_holm_adjustment_by_hand():
    # m = 3: sorted 0.01, 0.02, 0.04 -> 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04; NaN ignored.
    out = holm([0.04, float("nan"), 0.01, 0.02])
    assert out[2] == pytest.approx(0.03) and out[3] == pytest.approx(0.04) and out[0] == pytest.approx(0.04)
    assert math.isnan(out[1])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1


def test_nemenyi_critical_difference_matches_demsar_table():
    # Demšar (2006), Table 5(a): q_0.05 = 1.960 (k=2), 2.343 (3), 2.569 (4), 2.728 (5), 3.164 (10).
    for k, q in ((2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (10, 3.164)):
        assert nemenyi_cd(k, 1) == pytest.approx(q * math.sqrt(k * (k + 1) / 6), abs=2e-3)
    # His example: k = 4 classifiers on N = 14 data sets: CD = 1.25.
    assert nemenyi_cd(4, 14) == pytest.approx(1.25, abs=5e-3)


def test_mean_rank_friedman_and_cd_across_scenarios_by_hand():
    # Three rows on four scenarios (class-IL and task-IL of two Split scenarios): a > b > c everywhere.
    recs = []
    for sc in ("split-fmnist", "split-cifar10"):
        recs += _rows({"a": [0.6], "b": [0.5], "c": [0.4]}, scenario=sc)
    boards = leaderboards(recs)
    assert len(boards) == 4
    (s,) = rank_summaries(boards)
    assert s.n == 4 and s.k == 3 and list(s.mean_rank.index) == ["a", "b", "c"]
    assert list(s.mean_rank.values) == [1.0, 2.0, 3.0]
    # chi2_F = 12N / (k(k+1)) * (sum R_j^2 - k(k+1)^2 / 4) = 4 * (14 - 12) = 8; p = exp(-8/2) (2 df).
    assert s.friedman_stat == pytest.approx(8.0) and s.friedman_p == pytest.approx(math.exp(-4.0))
    assert s.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / 24), abs=2e-3)  # 1.657
    # Mean ranks 1, 2, 3 with CD 1.66: a-b and b-c are within CD, a-c is not.
    assert s.cliques() == [(0, 1), (1, 2)]
    png = cd_diagram(s)
    assert png is not None and png.startswith(PNG_MAGIC)


def _protocol_runs():
    eos = {"protocol": "end-of-stream", "sampler_seed": 0}
    ft2 = {"protocol": "first-tasks", "first_tasks": 2, "sampler_seed": 0}
    return (_tuned({"a": [0.9, 0.9], "b": [0.8, 0.8], "c": [0.7, 0.7], "d": [0.6, 0.6]}, eos)
            + _tuned({"a": [0.85, 0.85], "b": [0.6, 0.6], "c": [0.75, 0.75], "d": [0.5, 0.5]}, ft2))


def test_protocols_get_their_own_tables_and_the_caption_names_them():
    boards = [b for b in leaderboards(_protocol_runs()) if b.setting == "class_il"]
    assert [b.tuning for b in boards] == ["end-of-stream", "first-tasks K=2"]
    assert "tuned under first-tasks K=2" in boards[1].protocol and boards[1].title.endswith("tuned first-tasks K=2")
    assert all(len(b.frame) == 4 for b in boards)


def test_rank_stability_ranks_tau_and_accuracy_change_by_hand():
    boards = leaderboards(_protocol_runs())
    stab = {st.title: st for st in rank_stability(boards)}
    st = stab["split-fmnist — class-IL"]
    assert st.protocols == ["end-of-stream", "first-tasks K=2"]
    f = st.frame.set_index("Method")
    assert list(f["Rank (end-of-stream)"]) == [1, 2, 3, 4] and list(f["Rank (first-tasks K=2)"]) == [1, 3, 2, 4]
    # Orders a>b>c>d and a>c>b>d: one discordant pair of six, tau = (5 - 1) / 6.
    (a, b, tau, p, n) = st.taus[0]
    assert (a, b, n) == ("end-of-stream", "first-tasks K=2", 4) and tau == pytest.approx(4 / 6)
    # Exact two-sided p: of the 24 orders of 4 rows, 1 + 3 have <= 1 discordant pair and 3 + 1 have >= 5.
    assert p == pytest.approx(8 / 24)
    assert list(f["Δ acc. first-tasks K=2 − end-of-stream"]) == ["-0.050", "-0.200", "+0.050", "-0.100"]


def test_tuning_spread_over_sampler_seeds_by_hand():
    recs = []
    for ss, finals in ((0, [0.5, 0.7]), (1, [0.4, 0.6]), (2, [0.8, 0.8])):
        recs += [fake_record("ft", s, f, tuned=True, key=f"ft_ss{ss}_s{s}",
                             tuning={"protocol": "held-out-stream", "sampler_seed": ss}) for s, f in enumerate(finals)]
    board = leaderboards(recs)[0]
    f = board.frame.set_index("method")
    # Shown: sampler seed 0's runs (0.5, 0.7 -> 0.6). Spread: std of the means 0.6, 0.5, 0.8 (ddof 1).
    assert f.loc["ft", "final_avg_acc_mean"] == pytest.approx(0.6) and f.loc["ft", "seeds"] == 2
    assert f.loc["ft", "tuning_sd"] == pytest.approx(np.std([0.6, 0.5, 0.8], ddof=1))
    assert display_frame(board).iloc[0]["Tuning spread (sd over sampler seeds)"] == "± 0.153 (3)"
    assert "sampler seeds 0, 1, 2" in board.protocol


def test_accuracy_on_tasks_unseen_in_first_tasks_tuning_by_hand():
    rec = fake_record("ft", 0, 0.5, tuned=True, tuning={"protocol": "first-tasks", "first_tasks": 1, "sampler_seed": 0})
    rec["acc"]["class_il"][-1] = [0.9, 0.3, 0.6]
    board = next(b for b in leaderboards([rec]) if b.setting == "class_il")
    # Tasks 2..3 (indices 1, 2) were never seen in tuning: (0.3 + 0.6) / 2.
    assert board.frame.iloc[0]["unseen_mean"] == pytest.approx(0.45)
    assert display_frame(board).iloc[0]["Final acc. on tasks unseen in tuning"] == "0.450"


def test_report_has_ranks_cd_diagram_and_stability(tmp_path):
    recs = _protocol_runs() + _tuned({"a": [0.7], "b": [0.65], "c": [0.5], "d": [0.55]},
                                     {"protocol": "end-of-stream", "sampler_seed": 0}, scenario="permuted-fmnist",
                                     setting="domain")
    paths = make_report(recs, tmp_path)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "## Ranks across scenarios" in md and "Friedman" in md and "Nemenyi CD" in md
    assert "## Rank stability across tuning protocols" in md and "Kendall τ(end-of-stream, first-tasks K=2)" in md
    assert 'id="ranks"' in page and "Critical-difference diagram" in page and 'id="stability"' in page


def test_loading_keeps_one_label_for_a_row_tuned_under_several_protocols():
    from reports.load import distinct_rows

    eos = {"protocol": "end-of-stream", "sampler_seed": 0}
    ft2 = {"protocol": "first-tasks", "first_tasks": 2, "sampler_seed": 0}
    recs = [dict(fake_record("ft+tuned", 0, 0.5, tuned=True, tuning=t, config_group=g), experiment="e")
            for t, g in ((eos, "aaaaaa1"), (ft2, "bbbbbb2"))]
    # Another configuration under the same protocol is still told apart by its hash.
    recs.append(dict(fake_record("ft+tuned", 0, 0.4, tuned=True, tuning=eos, config_group="cccccc3"), experiment="e"))
    labels = [r["label"] for r in distinct_rows(recs)]
    assert labels == ["ft+tuned [aaaaaa]", "ft+tuned", "ft+tuned [cccccc]"]
