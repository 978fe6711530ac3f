"""Ranks across scenarios and across tuning protocols.

Across scenarios (Demšar, JMLR 2006): each leaderboard (scenario x evaluation setting) of one tuning
protocol is a data set; the rows they all hold are ranked in each by mean final accuracy (average
ranks for equal means), their mean rank taken, the Friedman test (``scipy.stats.friedmanchisquare``)
asks whether the rows differ at all, and the Nemenyi critical difference
CD = q_α · sqrt(k (k + 1) / (6 N)), with q_α the studentized range quantile over sqrt 2
(``scipy.stats.studentized_range``), says which mean ranks differ; the critical-difference diagram
joins the rows whose mean ranks lie within CD of each other.

Across tuning protocols: for one scenario and setting, every row's rank under each protocol,
Kendall's τ between the protocols' orders (``scipy.stats.kendalltau``) and the accuracy each row gains
or loses between end-of-stream tuning and a realistic protocol.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from reports.tables import ALPHA, SETTING_NAMES, Leaderboard, table_key

OPTIMISTIC = "end-of-stream"


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical difference of mean ranks for k rows over n data sets (Demšar 2006, eq. 5)."""
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6.0 * n))


@dataclass
class RankSummary:
    """Mean ranks of the rows every data set of one tuning protocol holds, with the tests."""

    tuning: str
    datasets: list[str]
    ranks: pd.DataFrame  # rows x data sets: each data set's rank (1 = best; average ranks for ties)
    mean_rank: pd.Series  # sorted, best first
    friedman_stat: float = math.nan
    friedman_p: float = math.nan
    cd: float = math.nan
    dropped: list[str] = field(default_factory=list)  # rows missing from some data set

    @property
    def k(self) -> int:
        return len(self.mean_rank)

    @property
    def n(self) -> int:
        return len(self.datasets)

    def cliques(self) -> list[tuple[int, int]]:
        """Maximal runs [i, j] (positions in ``mean_rank``'s order) whose mean ranks lie within CD of
        each other: the groups the diagram joins with a bar (none when CD is undefined)."""
        if math.isnan(self.cd):
            return []
        r = list(self.mean_rank.values)
        out: list[tuple[int, int]] = []
        for i in range(len(r)):
            j = i
            while j + 1 < len(r) and r[j + 1] - r[i] < self.cd:
                j += 1
            if j > i and not any(a <= i and j <= b for a, b in out):
                out.append((i, j))
        return out

    def text(self) -> str:
        name = self.tuning or "untuned"
        if self.n < 2 or self.k < 3:
            return (f"{name}: {self.k} row(s) over {self.n} data set(s): the Friedman test needs at least 3 rows "
                    "and 2 data sets")
        return (f"{name}: {self.k} rows over {self.n} data sets ({', '.join(self.datasets)}); Friedman "
                f"χ²_F = {self.friedman_stat:.2f}, p = {self.friedman_p:.2g}; Nemenyi CD (α = {ALPHA}) = "
                f"{self.cd:.2f} mean-rank units")

    def display(self) -> pd.DataFrame:
        out = pd.DataFrame({"Method": list(self.mean_rank.index),
                            "Mean rank": [f"{v:.2f}" for v in self.mean_rank.values]})
        for d in self.datasets:
            out[d] = [f"{self.ranks.loc[m, d]:g}" for m in self.mean_rank.index]
        return out


def _dataset_name(b: Leaderboard) -> str:
    return f"{b.scenario} {SETTING_NAMES.get(b.setting, b.setting)}"


def rank_summaries(boards: Sequence[Leaderboard]) -> list[RankSummary]:
    """One summary per tuning protocol over its leaderboards (data sets)."""
    by_tuning: dict[str, list[Leaderboard]] = defaultdict(list)
    for b in boards:
        by_tuning[b.tuning].append(b)
    out = []
    for tuning, bs in sorted(by_tuning.items()):
        names, means = [], {}
        for b in bs:
            name = _dataset_name(b)
            while name in means:  # the same scenario under other options or protocols
                name += "′"
            names.append(name)
            means[name] = dict(zip(b.frame["method"], b.frame["final_avg_acc_mean"]))
        everywhere = sorted(set.intersection(*({k for k, v in m.items() if not math.isnan(v)}
                                               for m in means.values())))
        dropped = sorted(set().union(*(set(m) for m in means.values())) - set(everywhere))
        table = pd.DataFrame({n: [means[n][r] for r in everywhere] for n in names}, index=everywhere)
        ranks = table.rank(ascending=False, method="average")  # per data set, 1 = best
        s = RankSummary(tuning, names, ranks, ranks.mean(axis=1).sort_values(kind="stable"), dropped=dropped)
        if s.k >= 3 and s.n >= 2:
            res = stats.friedmanchisquare(*[table.loc[r].to_numpy() for r in everywhere])
            s.friedman_stat, s.friedman_p = float(res.statistic), float(res.pvalue)
            s.cd = nemenyi_cd(s.k, s.n)
        out.append(s)
    return out


def cd_diagram(s: RankSummary) -> bytes | None:
    """The critical-difference diagram (Demšar 2006, Fig. 1): the rank axis, each row at its mean
    rank, a bar joining rows whose mean ranks differ by less than CD, and the CD itself."""
    if s.k < 2 or s.n < 1:
        return None
    import matplotlib.pyplot as plt

    from reports.plots import to_png

    names, r = list(s.mean_rank.index), list(s.mean_rank.values)
    k, cliques = s.k, s.cliques()
    half = (k + 1) // 2
    # Vertical layout (data units): the axis at 0, the CD bar above it, the clique bars just below it,
    # then one line per row, the better half labelled on the left, the other half on the right.
    first = -0.22 - 0.13 * len(cliques)
    bottom = first - 0.3 * (half - 1) - 0.25
    fig, ax = plt.subplots(figsize=(9.0, 0.75 * (1.1 - bottom)))
    ax.set_xlim(0.0, k + 1.0)
    ax.set_ylim(bottom, 1.1)
    ax.axis("off")
    ax.hlines(0.0, 1, k, color="black", lw=1.2)
    for t in range(1, k + 1):
        ax.vlines(t, 0.0, 0.1, color="black", lw=1.0)
        ax.text(t, 0.14, str(t), ha="center", va="bottom", fontsize=9)
    for i, (name, x) in enumerate(zip(names, r)):
        left = i < half
        y = first - 0.3 * (i if left else k - 1 - i)
        end = 0.5 if left else k + 0.5
        ax.plot([x, x, end], [0.0, y, y], color="#24558f", lw=1.0)
        ax.text(end + (-0.08 if left else 0.08), y, f"{name} ({x:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    for j, (a, b) in enumerate(cliques):
        ax.hlines(-0.12 - 0.13 * j, r[a] - 0.05, r[b] + 0.05, color="#c0392b", lw=3.5)
    if not math.isnan(s.cd):
        ax.hlines(0.62, 1, 1 + s.cd, color="black", lw=1.5)
        ax.vlines([1, 1 + s.cd], 0.57, 0.67, color="black", lw=1.0)
        ax.text(1 + s.cd / 2, 0.7, f"CD = {s.cd:.2f}", ha="center", va="bottom", fontsize=9)
    title = (f"Mean rank over {s.n} data set(s), tuned {s.tuning}" if s.tuning else
             f"Mean rank over {s.n} data set(s)")
    if not math.isnan(s.friedman_p):
        title += f" — Friedman p = {s.friedman_p:.2g}"
    ax.set_title(title, fontsize=10, loc="left")
    return to_png(fig)


@dataclass
class Stability:
    """One scenario and setting under several tuning protocols: ranks, τ and accuracy changes."""

    title: str
    protocols: list[str]
    frame: pd.DataFrame  # display strings
    taus: list[tuple[str, str, float, float, int]]  # (protocol a, protocol b, τ, p, rows)

    def tau_text(self) -> str:
        return "; ".join(f"Kendall τ({a}, {b}) = {t:.2f} (p = {p:.2g}, {n} rows)" for a, b, t, p, n in self.taus)


def rank_stability(boards: Sequence[Leaderboard]) -> list[Stability]:
    """Per (scenario table, setting) with leaderboards under 2+ tuning protocols: every common row's
    rank and accuracy under each, Kendall's τ between each pair, and the gain or loss against
    end-of-stream tuning."""
    groups: dict[tuple, dict[str, Leaderboard]] = defaultdict(dict)
    for b in boards:
        if b.tuning and b.records:
            groups[(table_key(b.records[0]), b.setting)][b.tuning] = b
    out = []
    for (_key, setting), per in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if len(per) < 2:
            continue
        protocols = sorted(per, key=lambda p: (p != OPTIMISTIC, p))
        means = {p: dict(zip(per[p].frame["method"], per[p].frame["final_avg_acc_mean"])) for p in protocols}
        rows = sorted(set.intersection(*(set(m) for m in means.values())),
                      key=lambda r: -means[protocols[0]][r])
        frame = pd.DataFrame({"Method": rows})
        for p in protocols:
            ranks = pd.Series({r: means[p][r] for r in rows}).rank(ascending=False, method="min")
            frame[f"Rank ({p})"] = [int(ranks[r]) for r in rows]
        for p in protocols:
            frame[f"Final acc. ({p})"] = [f"{means[p][r]:.3f}" for r in rows]
        if OPTIMISTIC in per:
            for p in protocols[1:]:
                frame[f"Δ acc. {p} − {OPTIMISTIC}"] = [f"{means[p][r] - means[OPTIMISTIC][r]:+.3f}" for r in rows]
        taus = []
        for i, a in enumerate(protocols):
            for b in protocols[i + 1:]:
                if len(rows) >= 2:
                    res = stats.kendalltau([means[a][r] for r in rows], [means[b][r] for r in rows])
                    taus.append((a, b, float(res.statistic), float(res.pvalue), len(rows)))
        first = per[protocols[0]]
        out.append(Stability(f"{first.scenario} — {SETTING_NAMES.get(setting, setting)}", protocols, frame, taus))
    return out


__all__ = ["RankSummary", "Stability", "cd_diagram", "nemenyi_cd", "rank_stability", "rank_summaries"]
