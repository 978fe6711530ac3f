"""Leaderboards and ablation tables as pandas frames, plus their markdown/HTML rendering.

Statistics over seeds (docs/methods.md §6): a cell is ``mean ± h`` where h is the half-width of the 95%
Student-t interval, h = t_{0.975, n-1} · s / sqrt(n) with the sample standard deviation s (ddof=1);
a single-seed cell shows the mean alone. Ranks are by mean final accuracy alone (a rank never
contradicts the order of the means); statistical ties are shown apart from the rank: a row is "tied
with the best" when its difference from the best row is not significant under a two-sided paired
t-test over the seeds both rows share, Holm-corrected over the rows compared (family-wise alpha =
0.05). Rows are method configurations (record ``label``); a table is one (scenario, scenario options,
backbone, epochs, batch size) protocol, one tuning protocol and one evaluation setting.
"""

from __future__ import annotations

import html
import json
import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from harness.engine.record import COLUMNS, codes_of, columns, fmt_fixed, fmt_si, passes_of

# The metrics and costs shown (record paths, headers, kinds and formats) are harness/engine/record.py's COLUMNS.
ABLATION_COSTS = ("params", "train_flops", "comm_bytes")  # the cost columns of an ablation table
SETTING_NAMES = {"class_il": "class-IL", "task_il": "task-IL", "domain_il": "domain-IL"}
BUFFER_KEYS = ("buffer_size", "memory_size", "mem_size")  # records written before costs.buffer_samples
Record = dict[str, Any]
CONFIDENCE = 0.95
ALPHA = 0.05
INTERVAL_NOTE = ("mean ± half-width of the 95% Student-t interval over seeds (t_{0.975,n−1}·s/√n, s the "
                 "sample std); one seed: the mean alone")
TEST_NOTE = ("the rank is by the mean alone (equal means share a rank), so it never contradicts the order of "
             "the means; '≈ best' marks the rows tied with the best row: their difference from it is not "
             "significant under a two-sided paired t-test over the seeds both share, Holm-corrected over the "
             "rows compared (family-wise α = 0.05); with fewer than 2 shared seeds there is no test and no mark")


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the Student-t interval of a mean of ``n`` values with sample std ``std``."""
    if n < 2 or math.isnan(std):
        return float("nan")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation of one statistic over ``n`` seeds."""

    mean: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        """Half-width of the 95% t-interval (NaN for fewer than two seeds)."""
        return t_half_width(self.std, self.n)

    def fmt(self, digits: int = 3, sign: bool = False) -> str:
        """``mean ± 95% t half-width``; the mean alone for one seed; ``–`` for none."""
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        if self.n == 1:
            return fmt_fixed(self.mean, digits, sign)
        return f"{fmt_fixed(self.mean, digits, sign)} ± {self.half_width:.{digits}f}"


@dataclass(frozen=True)
class PairedDiff:
    """Mean of a − b over the seeds both have, its 95% t-interval and a two-sided paired t-test."""

    mean: float
    std: float
    n: int
    p_value: float

    @property
    def half_width(self) -> float:
        return t_half_width(self.std, self.n)

    @property
    def significant(self) -> bool:
        return self.n >= 2 and not math.isnan(self.p_value) and self.p_value < ALPHA

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        text = MeanStd(self.mean, self.std, self.n).fmt(digits, sign=True)
        return text + ("" if self.n < 2 else f" (p={self.p_value:.2g})")


def paired_diff(a: dict[Any, float], b: dict[Any, float]) -> PairedDiff:
    """a − b paired by key (seed); scipy's ``ttest_rel`` gives the p-value.

    Differences that are all equal have zero variance: p is 1 when they are all 0, else 0.
    """
    keys = sorted(set(a) & set(b), key=str)
    d = np.asarray([float(a[k]) - float(b[k]) for k in keys], dtype=float)
    if d.size == 0:
        return PairedDiff(float("nan"), float("nan"), 0, float("nan"))
    if d.size == 1:
        return PairedDiff(float(d[0]), float("nan"), 1, float("nan"))
    std = float(d.std(ddof=1))
    if std == 0.0:
        p = 1.0 if float(d.mean()) == 0.0 else 0.0
    else:
        p = float(stats.ttest_rel([float(a[k]) for k in keys], [float(b[k]) for k in keys]).pvalue)
    return PairedDiff(float(d.mean()), std, int(d.size), p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted): the i-th smallest
    of m p-values is multiplied by m − i + 1, made non-decreasing, and capped at 1."""
    idx = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    out = [float("nan")] * len(p_values)
    running = 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - k) * float(p_values[i])))
        out[i] = running
    return out


def mean_std(values: Iterable[float | None]) -> MeanStd:
    """Mean ± sample std (ddof=1) of the non-missing values; std is 0 for one value."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=float)
    if v.size == 0:
        return MeanStd(float("nan"), float("nan"), 0)
    return MeanStd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


# ------------------------------------------------------------------------------------------------
# Grouping
# ------------------------------------------------------------------------------------------------
def finished(records: Iterable[Record]) -> list[Record]:
    """Finished runs evaluated on the test split: the only ones that enter a leaderboard."""
    return [r for r in records if r.get("status") == "finished" and r.get("eval_split", "test") == "test"]


def protocol_of(rec: Record) -> dict[str, Any]:
    return dict(rec.get("config", {}).get("protocol", {}))


def table_key(rec: Record) -> tuple[str, str, str]:
    """(scenario, scenario options, core protocol): runs sharing it are comparable in one table."""
    p = protocol_of(rec)
    core = {k: p.get(k) for k in ("backbone", "epochs", "batch_size")}
    if _numerics(p) != "fp32":  # bf16 / fp16 / channels_last / compile runs get their own tables
        core["numerics"] = _numerics(p)
    opts = rec.get("config", {}).get("scenario_options", {})
    return rec["scenario"], json.dumps(opts, sort_keys=True, default=str), json.dumps(core, sort_keys=True)


def buffer_size(rec: Record) -> int | None:
    """Examples the run's method stores for replay: ``costs.buffer_samples``, which the runner reads
    from the hyperparameter declared ``role="buffer_size"``. Records written before that field existed
    fall back to the hyperparameter names those methods used (BUFFER_KEYS)."""
    costs = rec.get("costs", {}) or {}
    if "buffer_samples" in costs:
        return None if costs["buffer_samples"] is None else int(costs["buffer_samples"])
    hp = rec.get("config", {}).get("hparams", {}) or {}
    for k in BUFFER_KEYS:
        if hp.get(k) is not None:
            return int(hp[k])
    return None


def _fmt_options(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "defaults"


def protocol_line(recs: Sequence[Record]) -> str:
    """The caption: backbone, epochs, batch, optimiser/lr, scenario options, buffers, tuned or
    defaults, seeds, the evaluation split and the interval."""
    p = protocol_of(recs[0])
    parts = [f"backbone {p.get('backbone')}", f"epochs/task {p.get('epochs')}", f"batch {p.get('batch_size')}"]
    lrs = {protocol_of(r).get("lr", "?") for r in recs}
    optims = sorted({str(protocol_of(r).get("optimizer", "?")) for r in recs})
    if len(lrs) > 3:
        parts.append(f"optimizer {' | '.join(optims)}, lr per row ({len(lrs)} values, see the runs' configs)")
    else:
        opt = sorted({f"{protocol_of(r).get('optimizer', '?')} lr={protocol_of(r).get('lr', '?')}" for r in recs})
        parts.append("optimizer " + " | ".join(opt))
    parts.append("scenario options: " + _fmt_options(recs[0].get("config", {}).get("scenario_options", {})))
    buffers = sorted({(r["label"], b) for r in recs if (b := buffer_size(r)) is not None})
    parts.append("buffer: " + (", ".join(f"{lab}={b}" for lab, b in buffers) if buffers else "none (no replay)"))
    parts.append("memory: " + budget_line(recs))
    compute = compute_line(recs)
    if compute:
        parts.append(compute)
    parts.append("settings: " + tuning_note(recs))
    data = [r.get("costs", {}).get("dataset_bytes") for r in recs]
    if data and all(isinstance(d, dict) for d in data):
        devs = sorted({k for d in data for k in d})
        parts.append("data set resident from before each run's peak counter starts (inside the peak): " + ", ".join(
            f"{fmt_si(max(d.get(k, 0) for d in data), 'B', 1024)} on {k}" for k in devs))
    seeds = sorted({r.get("seed") for r in recs}, key=str)
    parts.append(f"seeds {', '.join(map(str, seeds))} ({len(seeds)})")
    parts.append("evaluated on the " + " | ".join(sorted({str(r.get("eval_split", "test")) for r in recs})) + " split")
    parts.append("cells: mean ± 95% t-interval half-width over seeds" if len(seeds) > 1 else "cells: one seed, no interval")
    numerics = sorted({_numerics(protocol_of(r)) for r in recs})
    if numerics != ["fp32"]:
        parts.append("precision " + " | ".join(numerics))
    if any(is_synthetic(r) for r in recs):
        parts.append("DATA: SYNTHETIC (written by dmkd synth, not the real data set)")
    return "; ".join(parts)


def budget_line(recs: Sequence[Record]) -> str:
    """The caption's memory statement: the budget and what counts in it, or that there is none."""
    budgets = sorted({b for r in recs if (b := r.get("costs", {}).get("budget_bytes"))})
    what = ("persistent memory = the bytes carried from one task to the next (parameters and buffers, stored "
            "samples as stored, importance maps, snapshots, optimiser state kept across tasks), measured on each "
            "run's resumable state")
    if not budgets:
        return f"no budget (rows differ in memory: see Persistent memory); {what}"
    over = sorted({row_label(r) for r in recs if "OVER" in str(r.get("costs", {}).get("budget_note") or "")})
    text = "budget " + " | ".join(fmt_si(b, "B", 1024) for b in budgets) + f" for every row; {what}"
    filled = sorted({f"{row_label(r)}: {r['costs']['budget_note']}" for r in recs
                     if "filled" in str(r.get("costs", {}).get("budget_note") or "")
                     or "upper bound" in str(r.get("costs", {}).get("budget_note") or "")})
    if filled:
        text += "; " + "; ".join(filled)
    if over:
        text += "; OVER the budget: " + ", ".join(over)
    return text


def compute_line(recs: Sequence[Record]) -> str:
    """The caption's compute-budget statement ('' without one)."""
    budgets = [r.get("costs", {}).get("compute_budget") for r in recs]
    cut = [p for r in recs for p in r.get("per_task", []) if p.get("compute_budget_flops") is not None]
    if not cut:
        return ""
    rule = next((b for b in budgets if b), None)
    how = ("each task's training FLOPs capped at what a plain fine-tuning step spends on it "
           "(epochs × samples × its FLOPs per sample)") if not rule or "per_sample" in rule else \
        f"each task's training FLOPs capped at {fmt_si(rule['per_task'], 'FLOP')}"
    return (f"compute budget: {how}, after Prabhu et al. (CVPR 2023): a costlier step gets fewer steps "
            "(Passes/task below 1); work at task boundaries (a Fisher pass) is outside the cap and counted "
            "in Train FLOPs; Joint, the upper bound, is not capped")


def tuning_note(recs: Sequence[Record]) -> str:
    """'tuned (N trials per row, validation split)', 'defaults' or a count of each."""
    tuned = {row_label(r) for r in recs if r.get("tuned")}
    default = {row_label(r) for r in recs if not r.get("tuned")}
    trials = sorted({int(r.get("tuned_trials", 0) or 0) for r in recs if r.get("tuned")})
    protocols = sorted({tuning_label(r) for r in recs if r.get("tuned")})
    t_text = (f"tuned under {' | '.join(protocols)} ({'/'.join(map(str, trials))} trials per row on the "
              "validation split)")
    if tuned and not default:
        return t_text
    if default and not tuned:
        return "defaults (each method's documented defaults, untuned)"
    return f"mixed: {len(tuned)} rows {t_text}, {len(default)} rows defaults"


def tuning_of(rec: Record) -> dict[str, Any] | None:
    """The tuning protocol (and sampler seed) that chose a tuned run's settings; tuned runs recorded
    before protocols existed were tuned end-of-stream with sampler seed 0. None: an untuned run."""
    if not rec.get("tuned"):
        return None
    return {"protocol": "end-of-stream", "sampler_seed": 0, **dict(rec.get("tuning") or {})}


def tuning_label(rec: Record) -> str:
    """'end-of-stream', 'first-tasks K=2', 'held-out-stream', or '' for an untuned run."""
    t = tuning_of(rec)
    if t is None:
        return ""
    return f"first-tasks K={t.get('first_tasks')}" if t["protocol"] == "first-tasks" else str(t["protocol"])


def sampler_seed_of(rec: Record) -> int | None:
    t = tuning_of(rec)
    return None if t is None else int(t.get("sampler_seed", 0) or 0)


def split_by_tuning(recs: Sequence[Record]) -> list[tuple[str, list[Record], list[Record]]]:
    """(tuning protocol, the table's runs, every sampler seed's runs) of one table key.

    Runs tuned under different protocols go to different tables; untuned rows join each (their
    settings do not depend on a protocol). In a table, a tuned row shows the runs of its lowest
    sampler seed; the runs of its other sampler seeds measure the spread tuning adds."""
    labels = sorted({tuning_label(r) for r in recs if r.get("tuned")})
    untuned = [r for r in recs if not r.get("tuned")]
    out = []
    for lab in labels or [""]:
        tuned = [r for r in recs if r.get("tuned") and tuning_label(r) == lab]
        first: dict[str, int] = {}
        for r in tuned:
            first[row_label(r)] = min(first.get(row_label(r), 1 << 62), sampler_seed_of(r) or 0)
        shown = [r for r in tuned if sampler_seed_of(r) == first[row_label(r)]]
        out.append((lab, shown + untuned, tuned))
    return out


def unseen_accuracy(rec: Record, setting: str) -> float | None:
    """First-tasks K runs: the final accuracy averaged over tasks K+1..T, the tasks tuning never saw."""
    t = tuning_of(rec)
    if t is None or t.get("protocol") != "first-tasks":
        return None
    rows = rec.get("acc", {}).get(setting) or []
    k = int(t.get("first_tasks") or 0)
    if not rows or k >= len(rows[-1]):
        return None
    return float(np.mean(rows[-1][k:]))


def tuning_spread(recs: Sequence[Record], setting: str) -> tuple[float, int]:
    """(sample std over tuning sampler seeds of the row's mean final accuracy over run seeds, number of
    sampler seeds): the variance tuning itself adds (Bouthillier et al., MLSys 2021)."""
    by_ss: dict[int, list[float]] = defaultdict(list)
    for r in recs:
        v = r.get("metrics", {}).get(setting, {}).get("final_avg_acc")
        if v is not None and sampler_seed_of(r) is not None:
            by_ss[int(sampler_seed_of(r))].append(float(v))
    means = [float(np.mean(v)) for v in by_ss.values()]
    return (float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")), len(means)


def _numerics(p: dict[str, Any]) -> str:
    out = str(p.get("precision", "fp32"))
    return out + ("+channels_last" if p.get("channels_last") else "") + ("+compile" if p.get("compile") else "")


def is_synthetic(rec: Record) -> bool:
    """Whether a run used data written by `dmkd synth` (its SYNTHETIC marker was found)."""
    return bool(rec.get("synthetic_data") or rec.get("config", {}).get("synthetic_data"))


@dataclass
class Leaderboard:
    """One leaderboard: a scenario/protocol and one setting; ``frame`` holds numbers, not strings."""

    scenario: str
    setting: str
    protocol: str
    frame: pd.DataFrame
    records: list[Record] = field(default_factory=list, repr=False)
    tuning: str = ""  # the tuning protocol of its tuned rows ('' when none is tuned)

    @property
    def title(self) -> str:
        synthetic = " [synthetic data]" if any(is_synthetic(r) for r in self.records) else ""
        tuned = f" — tuned {self.tuning}" if self.tuning else ""
        return f"{self.scenario}{synthetic} — {SETTING_NAMES.get(self.setting, self.setting)}{tuned}"

    @property
    def anchor(self) -> str:
        raw = f"lb-{self.scenario}-{self.setting}-{zlib.crc32(self.protocol.encode()):08x}"
        return "".join(c if c.isalnum() or c == "-" else "-" for c in raw)


def row_label(rec: Record) -> str:
    """The row's name: the record's label; a DMKD row also names its router unless the label does."""
    label = str(rec.get("label") or rec.get("method", "?"))
    if rec.get("method") == "dmkd" and "router" not in label:
        routing = (rec.get("config", {}).get("hparams", {}) or {}).get("routing")
        if routing:
            label += f" ({routing} router)"
    return label


def group_rows(recs: Sequence[Record]) -> dict[tuple[str, bool], list[Record]]:
    rows: dict[tuple[str, bool], list[Record]] = defaultdict(list)
    for r in recs:
        rows[(row_label(r), bool(r.get("tuned", False)))].append(r)
    return rows


def passes_differ(rec: Record, rel_tol: float = 0.02) -> bool:
    """Whether any task's measured passes differ from the protocol's epochs/task (2% tolerance)."""
    vals, epochs = passes_of(rec), protocol_of(rec).get("epochs")
    if vals is None or epochs is None:
        return False
    return any(abs(v - float(epochs)) > rel_tol * float(epochs) for v in vals)


def final_by_seed(recs: Sequence[Record], setting: str, metric: str = "final_avg_acc") -> dict[Any, float]:
    """{seed: metric} of a row's runs (the pairing of the paired test)."""
    out = {}
    for r in recs:
        v = r.get("metrics", {}).get(setting, {}).get(metric)
        if v is not None and not math.isnan(float(v)):
            out[r.get("seed")] = float(v)
    return out


def row_stats(recs: Sequence[Record], setting: str) -> dict[str, Any]:
    """Numbers of one row: mean/std/n over seeds of each metric column, the mean of each cost column
    (harness/engine/record.py's registry; keyed by the column's name)."""
    out: dict[str, Any] = {"seeds": len({r.get("seed") for r in recs})}
    for c in columns("metrics"):
        ms = mean_std(c.value(r, setting) for r in recs)
        out[f"{c.name}_mean"], out[f"{c.name}_std"], out[f"{c.name}_n"] = ms.mean, ms.std, ms.n
        out[f"{c.name}_half"] = ms.half_width
    for c in columns("report"):
        out[c.name] = mean_std(c.value(r, setting) for r in recs).mean
    out["memory_kind"] = "/".join(sorted({str(r.get("costs", {}).get("peak_memory_kind", "?")) for r in recs}))
    passes = [p for r in recs if (p := passes_of(r)) is not None]  # unknown for one seed: unknown for the row
    out["passes_per_task"] = float(np.mean([np.mean(p) for p in passes])) if len(passes) == len(recs) else math.nan
    out["passes_differ"] = any(passes_differ(r) for r in recs)
    kinds = {str(r.get("costs", {}).get("energy_kind", "")).split(" ")[0] for r in recs}
    out["energy_kind"] = "/".join(sorted(k for k in kinds if k)) or "unavailable"
    out["tuned_trials"] = max(int(r.get("tuned_trials", 0) or 0) for r in recs)
    # Joint's cumulative rule reads every earlier task's data: no memory budget counts that.
    out["outside_memory_budget"] = any(r.get("costs", {}).get("budget_rule") == "cumulative" for r in recs)
    out["code_versions"] = len(codes_of(recs))  # > 1: the row's tasks ran under different code
    return out


def leaderboards(records: Iterable[Record]) -> list[Leaderboard]:
    """Leaderboards of the finished test-split runs, ranked by final average accuracy (1 = best)."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in finished(records):
        groups[table_key(r)].append(r)
    boards = []
    for key in sorted(groups):
        recs = groups[key]
        settings = sorted({s for r in recs for s in r.get("settings", [])},
                          key=lambda s: list(SETTING_NAMES).index(s) if s in SETTING_NAMES else 9)
        for tuning, trecs, all_tuned in split_by_tuning(recs):
            for setting in settings:
                srecs = [r for r in trecs if setting in r.get("settings", [])]
                if not srecs:
                    continue
                rows = []
                grouped = sorted(group_rows(srecs).items())
                for (label, tuned), rr in grouped:
                    row = {"method": label, "tuned": tuned} | row_stats(rr, setting)
                    sd, n = tuning_spread([r for r in all_tuned if row_label(r) == label], setting) if tuned \
                        else (float("nan"), 0)
                    unseen = mean_std(unseen_accuracy(r, setting) for r in rr)
                    row |= {"tuning_sd": sd, "tuning_n": n, "unseen_mean": unseen.mean, "unseen_std": unseen.std,
                            "unseen_n": unseen.n}
                    rows.append(row)
                frame = pd.DataFrame(rows)
                frame = _rank_and_compare(frame, [final_by_seed(rr, setting) for _, rr in grouped],
                                          _reference_label(srecs))
                caption = protocol_line(srecs)
                if setting == "task_il" and any(r.get("tuned") for r in srecs):
                    caption += ("; tuned rows' settings were chosen on class-IL validation accuracy (the tuning "
                                "objective of class-incremental scenarios), not tuned for task-IL")
                if len({sampler_seed_of(r) for r in all_tuned}) > 1:
                    seeds = sorted({sampler_seed_of(r) for r in all_tuned})
                    caption += (f"; tuned rows shown with their lowest tuning sampler seed; 'Tuning spread' over "
                                f"sampler seeds {', '.join(map(str, seeds))}")
                boards.append(Leaderboard(key[0], setting, caption, frame, srecs, tuning))
    return boards


def _reference_label(recs: Sequence[Record]) -> str | None:
    """The row every other row is compared with (a suite's ``reference:``), if the runs name one."""
    refs = {str(r["reference"]) for r in recs if r.get("reference")}
    return refs.pop() if len(refs) == 1 else None


def _rank_and_compare(frame: pd.DataFrame, by_seed: list[dict[Any, float]], reference: str | None) -> pd.DataFrame:
    """Ranks with ties to the best (paired t-test, see the module docstring) and, when a reference
    row exists, each row's paired difference from it."""
    means = frame["final_avg_acc_mean"]
    ranks = means.rank(ascending=False, method="min")  # by the mean alone: never against their order
    p_best, tested = [math.nan] * len(frame), [False] * len(frame)
    if means.notna().any():
        best = int(means.idxmax())
        for i in range(len(frame)):
            if math.isnan(means.iloc[i]) or i == best:
                continue
            d = paired_diff(by_seed[best], by_seed[i])
            tested[i] = d.n >= 2
            p_best[i] = d.p_value if tested[i] else math.nan
    p_holm = holm(p_best)
    tied = [False] * len(frame)
    if means.notna().any():
        best = int(means.idxmax())
        tied = [i == best or (tested[i] and p_holm[i] >= ALPHA) for i in range(len(frame))]
    frame["rank"] = ranks.astype("Int64")
    frame["p_vs_best"] = p_best
    frame["p_vs_best_holm"] = p_holm
    frame["tied_with_best"] = tied
    labels = list(frame["method"])
    if reference is not None and reference in labels:
        ref = labels.index(reference)
        diffs = [paired_diff(by_seed[i], by_seed[ref]) for i in range(len(frame))]
        frame["delta_ref_mean"] = [d.mean for d in diffs]
        frame["delta_ref_std"] = [d.std for d in diffs]
        frame["delta_ref_n"] = [d.n for d in diffs]
        frame["delta_ref_p"] = [d.p_value for d in diffs]
        frame.attrs["reference"] = reference
    return frame.sort_values(["final_avg_acc_mean", "method"], ascending=[False, True],
                             na_position="last").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# Human-readable units
# ------------------------------------------------------------------------------------------------
def display_frame(board: Leaderboard) -> pd.DataFrame:
    """The leaderboard as strings with units, the columns shown in markdown and HTML."""
    f = board.frame
    methods = [m + (f" ‡ ({n} code versions)" if n > 1 else "") for m, n in zip(f["method"], f["code_versions"])]
    out = pd.DataFrame({"Rank": f["rank"].astype(str), "Method": methods, "Seeds": f["seeds"]})
    for c in columns("metrics"):
        m = c.name
        out[c.title] = [MeanStd(a, b, int(n)).fmt(c.kind.digits)
                        for a, b, n in zip(f[f"{m}_mean"], f[f"{m}_std"], f[f"{m}_n"])]
    out["≈ best"] = ["≈ best" if t and i > 0 else ("best" if i == 0 and t else "")
                     for i, t in enumerate(f["tied_with_best"])]
    out["p vs best (Holm)"] = [_fmt_p(p) for p in f["p_vs_best_holm"]]
    if "tuning_n" in f and (f["tuning_n"] > 1).any():
        out["Tuning spread (sd over sampler seeds)"] = [
            f"± {sd:.3f} ({int(n)})" if n > 1 else "–" for sd, n in zip(f["tuning_sd"], f["tuning_n"])]
    if "unseen_n" in f and (f["unseen_n"] > 0).any():
        out["Final acc. on tasks unseen in tuning"] = [MeanStd(a, b, int(n)).fmt()
                                                        for a, b, n in zip(f["unseen_mean"], f["unseen_std"],
                                                                           f["unseen_n"])]
    if "delta_ref_mean" in f:
        out[f"Δ final acc. vs {f.attrs.get('reference', 'reference')}"] = [
            PairedDiff(a, b, int(n), p).fmt() if m != f.attrs.get("reference") else "(reference)"
            for a, b, n, p, m in zip(f["delta_ref_mean"], f["delta_ref_std"], f["delta_ref_n"], f["delta_ref_p"],
                                     f["method"])]
    for c in columns("report"):  # each cost column written by its kind; a few carry a note
        v = f[c.name]
        if c.name == "passes_per_task":
            out[c.title] = [("?" if math.isnan(x) else c.fmt(x)) + (" †" if d else "") for x, d in zip(v, f["passes_differ"])]
        elif c.name == "energy_kwh":  # beside FLOPs: codecarbon's energy, measured (NVML) or estimated (CPU)
            out[c.title] = [c.fmt(x) + (f" ({k})" if k else "") for x, k in zip(v, f["energy_kind"])]
        elif c.name == "peak_memory_bytes" and len(set(f["memory_kind"])) == 1:
            out[f"{c.title} ({f['memory_kind'].iloc[0]})"] = [c.fmt(x) for x in v]
        elif c.name == "peak_memory_bytes":
            out[c.title] = [f"{c.fmt(x)} ({k})" for x, k in zip(v, f["memory_kind"])]
        else:
            out[c.title] = [c.fmt(x) for x in v]
    out["Tuned"] = [f"yes ({n} trials)" if t else "no" for t, n in zip(f["tuned"], f["tuned_trials"])]
    return out


def _fmt_p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.2g}"


# ------------------------------------------------------------------------------------------------
# Failed runs and ablations
# ------------------------------------------------------------------------------------------------
def failed_runs(records: Iterable[Record]) -> pd.DataFrame:
    """Failed runs with the first line of their error, for the report's 'failed' list."""
    rows = [{"Experiment": r.get("experiment", ""), "Scenario": r.get("scenario", ""), "Method": r.get("label", ""),
             "Seed": r.get("seed", ""), "Error": (str(r.get("error") or "no error recorded").strip().splitlines()
                                                  or ["?"])[0][:300]}
            for r in records if r.get("status") == "failed"]
    return pd.DataFrame(rows, columns=["Experiment", "Scenario", "Method", "Seed", "Error"])


@dataclass
class AblationTable:
    """One ablation study on one scenario and setting: switch columns, then metrics mean ± std."""

    study: str
    scenario: str
    setting: str
    frame: pd.DataFrame  # display strings

    @property
    def title(self) -> str:
        return f"Ablation '{self.study}' — {self.scenario}, {SETTING_NAMES.get(self.setting, self.setting)}"


def is_ablation(rec: Record) -> bool:
    return isinstance(rec.get("ablation"), dict)


def ablation_tables(records: Iterable[Record]) -> list[AblationTable]:
    """One table per (study, scenario, setting); rows are switch combinations, sorted by final acc."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in finished(records):
        if is_ablation(r):
            for s in r.get("settings", []):
                groups[(str(r["ablation"].get("study", "ablation")), r["scenario"], s)].append(r)
    tables = []
    for (study, scenario, setting), recs in sorted(groups.items()):
        switches = sorted({k for r in recs for k in r["ablation"].get("params", {})})
        rows: dict[str, list[Record]] = defaultdict(list)
        for r in recs:
            rows[json.dumps([r["ablation"].get("params", {}).get(k) for k in switches], default=str)].append(r)
        out = []
        for key, rr in rows.items():
            row: dict[str, Any] = dict(zip(switches, json.loads(key)))
            stats = row_stats(rr, setting)
            row["Seeds"] = stats["seeds"]
            for c in columns("metrics"):
                row[c.title] = MeanStd(stats[f"{c.name}_mean"], stats[f"{c.name}_std"], stats[f"{c.name}_n"]).fmt(
                    c.kind.digits)
            for name in ABLATION_COSTS:
                row[COLUMNS[name].title] = COLUMNS[name].fmt(stats[name])
            row["_sort"] = stats["final_avg_acc_mean"]
            out.append(row)
        frame = pd.DataFrame(out).sort_values("_sort", ascending=False).drop(columns="_sort").reset_index(drop=True)
        tables.append(AblationTable(study, scenario, setting, frame))
    return tables


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def to_markdown(frame: pd.DataFrame) -> str:
    """GitHub markdown table of a frame of display values (HTML and pipes escaped: a label from a
    suite file is text, never markup)."""
    def cell(v: Any) -> str:
        return md_escape(html.escape(str(v), quote=False)).replace("|", "\\|").replace("\n", " ")

    cols = [cell(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def md_escape(text: str) -> str:
    """Markdown link and image syntax made literal: ``[x](javascript:…)`` stays text, never a link.
    An inline link or image needs ``](`` with nothing between; escaping that parenthesis is enough
    (``er[buffer_size=200]`` stays as it is). Autolinks (``<…>``) are HTML-escaped by the callers."""
    return text.replace("](", "]\\(")


def to_html(frame: pd.DataFrame, ranked: bool = False) -> str:
    """HTML table (escaped) of a frame of display values; ``ranked`` highlights the first (best) row."""
    return frame.to_html(index=False, escape=True, border=0, classes="tbl lb" if ranked else "tbl", na_rep="–")


def escape(text: str) -> str:
    return html.escape(text, quote=True)
