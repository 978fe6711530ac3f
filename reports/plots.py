"""Figures of a report as PNG bytes (matplotlib Agg + seaborn), labelled with units.

Every function takes plain data (a :class:`reports.tables.Leaderboard` or a DMKD artifact dict) and
returns the encoded PNG, so the HTML builder can embed it and tests can decode it.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.image import AxesImage
from matplotlib.ticker import EngFormatter, MaxNLocator

from reports.tables import SETTING_NAMES, Leaderboard, Record, group_rows

DPI = 96


def styled(fn: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    """Run a plot function under seaborn's whitegrid style without changing global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> bytes | None:
        rc = dict(sns.axes_style("whitegrid")) | dict(sns.plotting_context("notebook", font_scale=0.9))
        with plt.rc_context(rc):
            return fn(*args, **kwargs)

    return wrapper


def to_png(fig: plt.Figure) -> bytes:
    """Encode and close a figure, cropped to its artists plus a margin (as ``bbox_inches="tight"``).

    The crop box is computed here from the laid-out figure: ``savefig(bbox_inches="tight")`` would first
    draw the whole figure once more just to find it.
    """
    fig.set_dpi(DPI)
    bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches=bbox)
    plt.close(fig)
    return buf.getvalue()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _call(job: tuple[Callable[..., bytes | None], Any]) -> bytes | None:
    fn, arg = job
    return fn(arg)


def render_all(jobs: Sequence[tuple[Callable[..., bytes | None], Any]], workers: int | None = None) -> list[bytes | None]:
    """``fn(arg)`` of every (fn, arg) job, in order. Drawing a figure is single-threaded matplotlib work,
    independent of the other figures, so with several cores the figures are drawn at once in forked
    worker processes (the same code on the same inputs: the same PNG bytes); in this process with one
    core, one job, or where processes cannot be forked. The default is this process: forking a process
    that holds torch's and MLflow's threads (the end of `dmkd suite`) is not known safe, and on a busy
    2-core machine the workers were measured slower; ``workers`` or $DMKD_REPORT_WORKERS asks for more."""
    import os

    workers = min(len(jobs), workers or int(os.environ.get("DMKD_REPORT_WORKERS", "1") or 1))
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_call(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_call, jobs))


def _grid(n: int, ncols: int = 4, size: tuple[float, float] = (3.6, 3.1)) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = max(1, min(n, ncols))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def mean_matrices(board: Leaderboard) -> dict[str, np.ndarray]:
    """Per method row: the accuracy matrix averaged over seeds (matrices of one shape only)."""
    out = {}
    for (label, tuned), recs in sorted(group_rows(board.records).items()):
        mats = [np.asarray(r["acc"][board.setting], dtype=float) for r in recs if r.get("acc", {}).get(board.setting)]
        if mats:
            shape = mats[0].shape
            out[label + (" (tuned)" if tuned and "+tuned" not in label else "")] = np.mean([m for m in mats if m.shape == shape], axis=0)
    return out


def _setting(board: Leaderboard) -> str:
    return SETTING_NAMES.get(board.setting, board.setting)


def annotated_heatmap(ax: plt.Axes, m: np.ndarray, cmap: str = "viridis", vmin: float | None = None,
                      vmax: float | None = None, annot: bool = True, fmt: str = ".2f", fontsize: float = 7,
                      xticklabels: Sequence[str] | None = None, yticklabels: Sequence[str] | None = None,
                      square: bool = True) -> AxesImage:
    """Cells of ``m`` coloured by value, row 0 on top, each value written in (seaborn.heatmap's look).

    Plain ``imshow`` + ``text``: seaborn.heatmap draws the whole figure once per call (to check whether
    tick labels overlap), which made a figure of many heatmaps quadratic in their number. Tick labels
    default to 1..n; the colour scale to the data's range.
    """
    rows, cols = m.shape
    colormap = plt.get_cmap(cmap)
    finite = m[np.isfinite(m)]
    norm = plt.Normalize(vmin if vmin is not None else (finite.min() if finite.size else 0.0),
                         vmax if vmax is not None else (finite.max() if finite.size else 1.0))
    image = ax.imshow(np.ma.masked_invalid(m), cmap=colormap, norm=norm, interpolation="nearest",
                      aspect="equal" if square else "auto")
    ax.set_xticks(range(cols), xticklabels if xticklabels is not None else [str(j + 1) for j in range(cols)])
    # Short labels stand vertical (seaborn's default); longer ones horizontal so that they do not overlap.
    ylabels = list(yticklabels) if yticklabels is not None else [str(k + 1) for k in range(rows)]
    ax.set_yticks(range(rows), ylabels, va="center",
                  rotation="vertical" if max(map(len, ylabels), default=0) <= 2 else "horizontal")
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if not annot:
        return image
    rgba = colormap(norm(m))
    # Dark text on light cells, white on dark ones (relative luminance, the WCAG/sRGB formula).
    lin = np.where(rgba[..., :3] <= 0.03928, rgba[..., :3] / 12.92, ((rgba[..., :3] + 0.055) / 1.055) ** 2.4)
    lum = lin @ np.array([0.2126, 0.7152, 0.0722])
    for k in range(rows):
        for j in range(cols):
            if np.isfinite(m[k, j]):
                # Inside its cell, so left out of the crop-box and layout computations.
                ax.text(j, k, format(m[k, j], fmt), ha="center", va="center", fontsize=fontsize,
                        color=".15" if lum[k, j] > 0.408 else "w", in_layout=False)
    return image


@styled
def accuracy_heatmaps(board: Leaderboard) -> bytes:
    """R[k][j] (mean over seeds) per method: rows = after training task k, columns = task j."""
    mats = mean_matrices(board)
    fig, axes = _grid(len(mats), size=(3.4, 3.0))
    for ax, (label, m) in zip(axes, mats.items()):
        annotated_heatmap(ax, m, vmin=0.0, vmax=1.0, annot=m.shape[0] <= 6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task k" if ax.get_subplotspec().is_first_col() else "")
    # Room between rows so that a title never sits on the x-label of the heatmap above it.
    fig.subplots_adjust(hspace=0.55, wspace=0.25, top=0.9)
    fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap="viridis"), ax=axes, shrink=0.8,
                 label="accuracy (fraction correct)")
    fig.suptitle(f"Accuracy matrix R[k][j] — {board.scenario}, {_setting(board)}", y=0.97)
    return to_png(fig)


@styled
def task_accuracy_over_time(board: Leaderboard) -> bytes:
    """Accuracy on each task after every later task (from the task on which it was trained)."""
    mats = mean_matrices(board)
    fig, axes = _grid(len(mats), size=(3.6, 2.9))
    palette = sns.color_palette("tab10")
    for ax, (label, m) in zip(axes, mats.items()):
        T = m.shape[0]
        for j in range(T):
            ks = np.arange(j, T)
            ax.plot(ks + 1, m[j:, j], marker="o", ms=3, lw=1.4, color=palette[j % 10], label=f"task {j + 1}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(range(1, T + 1))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("after training task")
        ax.set_ylabel("accuracy")
    if mats:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 10), bbox_to_anchor=(0.5, 0.0),
                   frameon=False, fontsize=8)
    fig.suptitle(f"Accuracy on each task over time — {board.scenario}, {_setting(board)}", y=1.02)
    fig.tight_layout()
    return to_png(fig)


@styled
def forgetting_bwt_bars(board: Leaderboard) -> bytes:
    """Forgetting and BWT per method, mean with ±1 std error bars over seeds."""
    f = board.frame
    labels = [m + (" (tuned)" if t and "+tuned" not in m else "") for m, t in zip(f["method"], f["tuned"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(labels) + 1.6), sharey=True)
    for ax, m, title, color in ((axes[0], "forgetting", "Forgetting (lower is better)", "#d95f02"),
                                (axes[1], "bwt", "Backward transfer BWT (higher is better)", "#1b9e77")):
        ax.barh(labels, f[f"{m}_mean"], xerr=f[f"{m}_std"].fillna(0), color=color, alpha=0.85, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("accuracy points (fraction)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))  # small values otherwise crowd the axis
    axes[0].invert_yaxis()
    fig.suptitle(f"Forgetting and BWT — {board.scenario}, {_setting(board)}", y=1.0)
    fig.tight_layout()
    return to_png(fig)


def pareto_front(costs: Sequence[float], accs: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (cost <= and acc >=, one strictly), by cost."""
    pts = [(c, a, i) for i, (c, a) in enumerate(zip(costs, accs)) if not (math.isnan(c) or math.isnan(a))]
    front = []
    for c, a, i in pts:
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2, _ in pts)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (costs[i], -accs[i]))


PARETO_AXES: list[tuple[str, str, float]] = [
    ("train_flops", "total training FLOPs (log scale when wide)", 1.0),
    ("persistent_bytes", "persistent memory (MiB; dotted: the budget)", 1024.0**2),
    ("comm_bytes", "communication (bytes sent)", 1.0),
]


@styled
def pareto_plots(board: Leaderboard) -> bytes:
    """Final accuracy vs training FLOPs, persistent memory (what a method carries between tasks; the
    process peak is mostly the data set and the runtime, the same for every row) and communication;
    the Pareto front dashed, the memory budget dotted."""
    f = board.frame
    labels = [m + (" (tuned)" if t and "+tuned" not in m else "") for m, t in zip(f["method"], f["tuned"])]
    acc = f["final_avg_acc_mean"].to_numpy(float)
    err = f["final_avg_acc_std"].fillna(0).to_numpy(float)
    palette = sns.color_palette("tab10", max(len(labels), 1))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (col, xlabel, scale) in zip(axes, PARETO_AXES):
        x = f[col].to_numpy(float) / scale
        for i, lab in enumerate(labels):
            ax.errorbar(x[i], acc[i], yerr=err[i], fmt="o", color=palette[i % len(palette)], capsize=3, ms=6,
                        label=lab)
            ax.annotate(lab, (x[i], acc[i]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        xs = x
        if col == "persistent_bytes" and "outside_memory_budget" in f:
            # Joint reads all past data, which persistent memory does not count: hollow, off the front.
            outside = f["outside_memory_budget"].fillna(False).to_numpy(bool)
            xs = np.where(outside, np.nan, x)
            for i in np.flatnonzero(outside):
                ax.plot(x[i], acc[i], "o", ms=11, mfc="none", mec="black", lw=0)
                ax.annotate("keeps all past data", (x[i], acc[i]), textcoords="offset points", xytext=(6, -10),
                            fontsize=7, color="dimgray")
        front = pareto_front(list(xs), list(acc))
        if len(front) > 1:
            ax.plot(x[front], acc[front], ls="--", color="grey", lw=1, drawstyle="steps-post", zorder=0)
        finite = x[~np.isnan(x)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
            ax.set_xscale("log")
        if col == "persistent_bytes" and "budget_used" in f:
            used = f["budget_used"].to_numpy(float)
            budgets = x / used
            budgets = budgets[np.isfinite(budgets)]
            if budgets.size:
                ax.axvline(float(np.median(budgets)), ls=":", color="black", lw=1)
        if col != "persistent_bytes":
            ax.xaxis.set_major_formatter(EngFormatter(unit="FLOP" if col == "train_flops" else "B"))
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.tick_params(axis="x", labelrotation=20)
        if finite.size and np.all(finite == 0):
            ax.set_xlim(-1, 1)
            ax.set_xticks([0])
            ax.text(0.5, 0.06, "all runs centralized: 0 bytes sent", transform=ax.transAxes, ha="center",
                    fontsize=8, color="dimgray")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final average accuracy A_T ({_setting(board)})")
    fig.suptitle(f"Accuracy vs cost (dashed: Pareto front) — {board.scenario}, {_setting(board)}", y=1.02)
    fig.tight_layout()
    return to_png(fig)


# ------------------------------------------------------------------------------------------------
# DMKD artifacts
# ------------------------------------------------------------------------------------------------
def dmkd_artifacts(recs: Sequence[Record]) -> dict[str, Any] | None:
    """The DMKD artifacts of a row, entropies and routing averaged over seeds of equal shape."""
    arts = [r["artifacts"]["dmkd"] for r in recs if isinstance(r.get("artifacts", {}).get("dmkd"), dict)]
    if not arts:
        return None
    out = dict(arts[0])
    for key in ("entropy_per_task", "usage_per_task", "routing_matrix"):
        vals = [a[key] for a in arts if key in a]
        try:
            out[key] = np.mean(np.asarray(vals, dtype=float), axis=0).tolist()
        except ValueError:  # ragged (experts grown differently per seed): keep the first seed's
            out[key] = vals[0] if vals else None
    out["n_seeds"] = len(arts)
    return out


@styled
def dmkd_specialization(art: dict[str, Any], title: str) -> bytes:
    """Expert specialization entropy H(M_i) after each task, and the class x expert routing heatmap."""
    ent = art.get("entropy_per_task") or []
    routing = art.get("routing_matrix")
    names = art.get("class_names") or []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    n_experts = max((len(row) for row in ent), default=0)
    palette = sns.color_palette("tab10", max(n_experts, 1))
    for i in range(n_experts):
        pts = [(t + 1, row[i]) for t, row in enumerate(ent) if i < len(row) and row[i] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, color=palette[i % len(palette)], label=f"expert {i}")
    n_classes = len(names) or (len(routing) if routing else 0)
    if n_classes > 1:
        ax.axhline(math.log(n_classes), ls=":", color="grey", lw=1)
        ax.text(1, math.log(n_classes), f" log C = {math.log(n_classes):.2f} (uniform)", va="bottom", fontsize=7,
                color="dimgray")
    ax.set_xlabel("after training task")
    ax.set_ylabel("specialization entropy H(M_i) (nats)")
    ax.set_title("Expert specialization (low = specialised)", fontsize=10)
    if n_experts:
        ax.legend(fontsize=7, ncol=2)
        ax.set_xticks(range(1, len(ent) + 1))
    ax = axes[1]
    if routing:
        m = np.asarray(routing, dtype=float)
        classes = names if len(names) == m.shape[0] else [str(i) for i in range(m.shape[0])]
        image = annotated_heatmap(ax, m, cmap="rocket_r", annot=m.size <= 120, square=False,
                                  yticklabels=classes, xticklabels=[str(i) for i in range(m.shape[1])])
        cbar = fig.colorbar(image, ax=ax, label=str(art.get("routing_matrix_kind") or "routing weight"))
        cbar.outline.set_linewidth(0)
        ax.set_xlabel("expert")
        ax.set_ylabel("class")
        ax.set_title("Class x expert routing", fontsize=10)
    else:
        ax.set_visible(False)
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return to_png(fig)


@styled
def dmkd_importance(art: dict[str, Any], title: str) -> bytes | None:
    """Distribution of the parameter importance Ω (Fisher) per module, as step histograms."""
    hists = art.get("importance_hist") or {}
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    palette = sns.color_palette("tab10", len(hists))
    all_pos = True
    for i, (module, h) in enumerate(sorted(hists.items())):
        edges = np.asarray(h.get("bin_edges", []), dtype=float)
        counts = np.asarray(h.get("counts", []), dtype=float)
        if edges.size != counts.size + 1 or counts.size == 0:
            continue
        all_pos &= bool(edges[0] > 0)
        ax.stairs(counts, edges, baseline=None, color=palette[i % len(palette)], lw=1.5, label=module)
    if all_pos:
        ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("importance Ω per parameter (Fisher, squared-gradient units)")
    ax.set_ylabel("number of parameters")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)
