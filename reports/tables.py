"""Leaderboards and ablation tables as pandas frames, plus their markdown/HTML rendering.

Each statistic over seeds is ``mean ± std`` with the *sample* standard deviation (ddof=1; 0 for a
single seed) and the seed count. Rows are method configurations (record ``label``); a table is one
(scenario, scenario options, backbone, epochs, batch size) protocol and one evaluation setting.
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

METRICS: list[tuple[str, str]] = [
    ("final_avg_acc", "Final acc. A_T"),
    ("avg_inc_acc", "Avg. incr. acc."),
    ("forgetting", "Forgetting"),
    ("bwt", "BWT"),
    ("fwt", "FWT"),
]
SETTING_NAMES = {"class_il": "class-IL", "task_il": "task-IL", "domain_il": "domain-IL"}
BUFFER_KEYS = ("buffer_size", "memory_size", "mem_size")
Record = dict[str, Any]


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation of one statistic over ``n`` seeds."""

    mean: float
    std: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        half = 0.5 * 10.0**-digits
        mean = 0.0 if abs(self.mean) < half else self.mean  # no "-0.000"
        return f"{mean:.{digits}f} ± {self.std:.{digits}f}"


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
    hp = rec.get("config", {}).get("hparams", {}) or {}
    for k in BUFFER_KEYS:
        if hp.get(k) is not None:
            return int(hp[k])
    return None


def _fmt_options(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "defaults"


def protocol_line(recs: Sequence[Record]) -> str:
    """One line naming backbone, epochs, batch, optimiser/lr, scenario options and buffer sizes."""
    p = protocol_of(recs[0])
    parts = [f"backbone {p.get('backbone')}", f"epochs/task {p.get('epochs')}", f"batch {p.get('batch_size')}"]
    opt = sorted({f"{protocol_of(r).get('optimizer', '?')} lr={protocol_of(r).get('lr', '?')}" for r in recs})
    parts.append("optimizer " + " | ".join(opt))
    parts.append("scenario options: " + _fmt_options(recs[0].get("config", {}).get("scenario_options", {})))
    buffers = sorted({(r["label"], b) for r in recs if (b := buffer_size(r)) is not None})
    parts.append("buffer: " + (", ".join(f"{lab}={b}" for lab, b in buffers) if buffers else "none (no replay)"))
    numerics = sorted({_numerics(protocol_of(r)) for r in recs})
    if numerics != ["fp32"]:
        parts.append("precision " + " | ".join(numerics))
    if any(is_synthetic(r) for r in recs):
        parts.append("DATA: SYNTHETIC (written by dmkd synth, not the real data set)")
    return "; ".join(parts)


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

    @property
    def title(self) -> str:
        synthetic = " [synthetic data]" if any(is_synthetic(r) for r in self.records) else ""
        return f"{self.scenario}{synthetic} — {SETTING_NAMES.get(self.setting, self.setting)}"

    @property
    def anchor(self) -> str:
        raw = f"lb-{self.scenario}-{self.setting}-{zlib.crc32(self.protocol.encode()):08x}"
        return "".join(c if c.isalnum() or c == "-" else "-" for c in raw)


def group_rows(recs: Sequence[Record]) -> dict[tuple[str, bool], list[Record]]:
    rows: dict[tuple[str, bool], list[Record]] = defaultdict(list)
    for r in recs:
        rows[(str(r["label"]), bool(r.get("tuned", False)))].append(r)
    return rows


def _cost(r: Record, name: str) -> float | None:
    v = r.get("costs", {}).get(name)
    return None if v is None else float(v)


def row_stats(recs: Sequence[Record], setting: str) -> dict[str, Any]:
    """Numbers of one row: metric mean/std/n over seeds, mean costs."""
    out: dict[str, Any] = {"seeds": len({r.get("seed") for r in recs})}
    for m, _ in METRICS:
        ms = mean_std(r.get("metrics", {}).get(setting, {}).get(m) for r in recs)
        out[f"{m}_mean"], out[f"{m}_std"], out[f"{m}_n"] = ms.mean, ms.std, ms.n
    wall = [(_cost(r, "train_time_s") or 0.0) + (_cost(r, "eval_time_s") or 0.0) for r in recs]
    out["params"] = mean_std(_cost(r, "params_total") for r in recs).mean
    out["train_flops"] = mean_std(_cost(r, "train_flops_total") for r in recs).mean
    out["peak_memory_bytes"] = mean_std(_cost(r, "peak_memory_bytes") for r in recs).mean
    out["memory_kind"] = "/".join(sorted({str(r.get("costs", {}).get("peak_memory_kind", "?")) for r in recs}))
    out["comm_bytes"] = mean_std(_cost(r, "comm_bytes") for r in recs).mean
    out["energy_kwh"] = mean_std(_cost(r, "energy_kwh") for r in recs).mean
    kinds = {str(r.get("costs", {}).get("energy_kind", "")).split(" ")[0] for r in recs}
    out["energy_kind"] = "/".join(sorted(k for k in kinds if k)) or "unavailable"
    out["wall_s"] = mean_std(wall).mean
    out["tuned_trials"] = max(int(r.get("tuned_trials", 0) or 0) for r in recs)
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
        for setting in settings:
            srecs = [r for r in recs if setting in r.get("settings", [])]
            rows = []
            for (label, tuned), rr in sorted(group_rows(srecs).items()):
                rows.append({"method": label, "tuned": tuned} | row_stats(rr, setting))
            frame = pd.DataFrame(rows)
            frame["rank"] = frame["final_avg_acc_mean"].rank(ascending=False, method="min").astype("Int64")
            frame = frame.sort_values(["rank", "method"], na_position="last").reset_index(drop=True)
            boards.append(Leaderboard(key[0], setting, protocol_line(srecs), frame, srecs))
    return boards


# ------------------------------------------------------------------------------------------------
# Human-readable units
# ------------------------------------------------------------------------------------------------
def fmt_si(x: float | None, unit: str = "", base: float = 1000.0) -> str:
    """3 significant digits with k/M/G/T prefixes (binary prefixes when base is 1024)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi"] if base == 1024 else ["", "k", "M", "G", "T", "P"]
    i = 0
    v = float(x)
    while abs(v) >= base and i < len(prefixes) - 1:
        v /= base
        i += 1
    s = f"{v:.0f}" if i == 0 and v == int(v) else f"{v:.3g}"
    return f"{s} {prefixes[i]}{unit}".strip()


def display_frame(board: Leaderboard) -> pd.DataFrame:
    """The leaderboard as strings with units, the columns shown in markdown and HTML."""
    f = board.frame
    out = pd.DataFrame({"Rank": f["rank"].astype(str), "Method": f["method"], "Seeds": f["seeds"]})
    for m, title in METRICS:
        out[title] = [MeanStd(a, b, int(n)).fmt() for a, b, n in zip(f[f"{m}_mean"], f[f"{m}_std"], f[f"{m}_n"])]
    out["Params"] = [fmt_si(v) for v in f["params"]]
    out["Train FLOPs"] = [fmt_si(v, "FLOP") for v in f["train_flops"]]
    if "energy_kwh" in f:  # beside FLOPs: codecarbon's energy, measured (NVML) or estimated (CPU)
        out["Energy"] = [fmt_si(None if v is None or pd.isna(v) else v * 1000.0, "Wh") + (f" ({k})" if k else "")
                         for v, k in zip(f["energy_kwh"], f["energy_kind"])]
    kinds = set(f["memory_kind"])
    if len(kinds) == 1:
        out[f"Peak memory ({kinds.pop()})"] = [fmt_si(v, "B", 1024) for v in f["peak_memory_bytes"]]
    else:
        out["Peak memory"] = [f"{fmt_si(v, 'B', 1024)} ({k})" for v, k in zip(f["peak_memory_bytes"], f["memory_kind"])]
    out["Comm."] = [fmt_si(v, "B") for v in f["comm_bytes"]]
    out["Wall time"] = [f"{v:.3g} s" for v in f["wall_s"]]
    out["Tuned"] = [f"yes ({n} trials)" if t else "no" for t, n in zip(f["tuned"], f["tuned_trials"])]
    return out


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
            for m, title in METRICS:
                row[title] = MeanStd(stats[f"{m}_mean"], stats[f"{m}_std"], stats[f"{m}_n"]).fmt()
            row["Params"] = fmt_si(stats["params"])
            row["Train FLOPs"] = fmt_si(stats["train_flops"], "FLOP")
            row["Comm."] = fmt_si(stats["comm_bytes"], "B")
            row["_sort"] = stats["final_avg_acc_mean"]
            out.append(row)
        frame = pd.DataFrame(out).sort_values("_sort", ascending=False).drop(columns="_sort").reset_index(drop=True)
        tables.append(AblationTable(study, scenario, setting, frame))
    return tables


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def to_markdown(frame: pd.DataFrame) -> str:
    """GitHub markdown table of a frame of display values (pipes escaped)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [cell(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_html(frame: pd.DataFrame, ranked: bool = False) -> str:
    """HTML table (escaped) of a frame of display values; ``ranked`` highlights the first (best) row."""
    return frame.to_html(index=False, escape=True, border=0, classes="tbl lb" if ranked else "tbl", na_rep="–")


def escape(text: str) -> str:
    return html.escape(text, quote=True)
