"""Build LEADERBOARD.md and report.html from run records (issue #7).

``make_report`` works on records in memory; ``report_from_results`` loads them first (MLflow when a
tracking URI is given, else the JSON files) and is what ``dmkd report`` calls.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from harness.core.errors import UserError, redact
from reports import html as H
from reports import plots
from reports.load import load_records
from reports.tables import (
    INTERVAL_NOTE,
    TEST_NOTE,
    Leaderboard,
    Record,
    ablation_tables,
    display_frame,
    escape,
    failed_runs,
    group_rows,
    is_ablation,
    leaderboards,
    md_escape,
    table_key,
    to_html,
    to_markdown,
)

LEGEND = ("Final acc. A_T = mean accuracy over all tasks after the last task; Avg. incr. acc. = mean of the "
          "average accuracy after each task; Forgetting (Chaudhry 2018), BWT, FWT as in docs/methods.md §1 "
          f"(divided by T−1). Each cell is {INTERVAL_NOTE}; 'Seeds' counts them. Rank by mean final accuracy "
          f"(1 = best); {TEST_NOTE}; 'p vs best (Holm)' is that test's Holm-adjusted p-value. 'Tuning spread' (rows "
          "tuned with several sampler seeds) is the sample std, over tuning sampler seeds, of the row's mean final "
          "accuracy: the variance tuning adds (Bouthillier et al., MLSys 2021), beside the seed interval. 'Final "
          "acc. on tasks unseen in tuning' (first-tasks K) averages the final accuracy over tasks K+1..T. A 'Δ … vs' column (suites with a "
          "reference row) is the mean paired-by-seed difference from the reference row with its 95% t-interval "
          "and the paired t-test's p. Passes/task = training samples drawn ÷ the task's training-set size, "
          "measured by the runner (? = not recorded); † marks a row whose measured passes differ from the "
          "caption's epochs/task (Joint's cumulative schedule is the stated exception). Costs are means over "
          "seeds: final parameter count, total training FLOPs, the run's own peak memory (kind in brackets: "
          "vmhwm_reset = the kernel's peak resident set, reset at the start of the run; rss_sampled = the "
          "process RSS sampled every 20 ms where the reset is unavailable; process_rss = older records, "
          "the process RSS including earlier runs; cuda_max_allocated = the GPU allocator peak, reset at "
          "the start of the run), Peak above start = that peak minus the level when the run started (what "
          "the run itself added), Persistent memory = the most bytes the method carried from one task to "
          "the next (parameters and buffers, stored samples as stored, importance maps, snapshots, optimiser "
          "state kept across tasks; docs/methods.md §2), % of budget = that share of the suite's memory "
          "budget, bytes sent between nodes, wall time = training + evaluation seconds. ‡ marks a row whose "
          "tasks ran under different code (a run resumed after the code changed, or seeds run at different "
          "revisions; each task's code is in its record): its numbers mix those versions.")
# The page the LEGEND cites ("docs/methods.md §1"); report.html links the citation to it by a relative path.
METHODS_DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
METHODS_CITATION = "docs/methods.md"
ENV_KEYS = ("git_revision", "python", "torch", "torchvision", "numpy", "platform", "processor", "device", "gpu",
            "torch_threads")


def _run_counts(records: list[Record]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[str(r.get("status", "?"))] += 1
    val = sum(1 for r in records if r.get("status") == "finished" and r.get("eval_split", "test") != "test")
    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return text + (f" ({val} validation-split tuning runs not ranked)" if val else "")


def run_metadata(records: list[Record]) -> dict[str, str]:
    """Versions, git revisions, hardware and dates of the runs, plus how the report was made."""
    meta: dict[str, str] = {}
    experiments = sorted({str(r.get("experiment", "")) for r in records if r.get("experiment")})
    meta["experiments"] = ", ".join(experiments) or "(records given directly)"
    meta["runs"] = _run_counts(records)
    for k in ENV_KEYS:
        vals = sorted({str(r.get("config", {}).get("env", {}).get(k)) for r in records
                       if r.get("config", {}).get("env", {}).get(k) is not None})
        if vals:
            meta[f"run {k}"] = " | ".join(vals)
    starts = [str(r["started_at"]) for r in records if r.get("started_at")]
    ends = [str(r["finished_at"]) for r in records if r.get("finished_at")]
    if starts:
        meta["runs started"] = f"{min(starts)} … {max(starts)}"
    if ends:
        meta["last run finished"] = max(ends)
    import matplotlib
    import pandas
    import seaborn

    meta["report generated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta["report made with"] = (f"python {sys.version.split()[0]}, pandas {pandas.__version__}, matplotlib "
                                f"{matplotlib.__version__}, seaborn {seaborn.__version__} on {platform.node()}")
    return meta


def md_text(text: object) -> str:
    """Text from records and suite files as markdown text: HTML escaped, one line."""
    import html

    return md_escape(html.escape(" ".join(str(text).split()), quote=False))


def leaderboard_markdown(title: str, boards: list[Leaderboard], ablations: list, failed, meta: dict[str, str]) -> str:
    """LEADERBOARD.md: protocol line above each table, then ablations, failed runs and metadata."""
    e = md_text
    out = [f"# {e(title)}", "", f"Runs: {meta['runs']}. Experiments: {e(meta['experiments'])}.", "", LEGEND, ""]
    if not boards:
        out += ["_No finished test-split runs yet._", ""]
    for b in boards:
        out += [f"## {e(b.title)}", "", f"**Protocol:** {e(b.protocol)}", "", to_markdown(display_frame(b)), ""]
    out += rank_markdown(boards)
    for a in ablations:
        out += [f"## {e(a.title)}", "", to_markdown(a.frame), ""]
    if len(failed):
        out += ["## Failed runs", "", to_markdown(failed), ""]
    out += ["## Run metadata", ""] + [f"- **{k}**: {e(v)}" for k, v in meta.items()] + [""]
    return "\n".join(out)


def _dmkd_rows(boards: list[Leaderboard]) -> list[tuple[str, str, list[Record]]]:
    """(scenario, label, records) of every row carrying DMKD artifacts, once per protocol."""
    seen, out = set(), []
    for b in boards:
        for (label, tuned), recs in sorted(group_rows(b.records).items()):
            key = (table_key(recs[0]), label, tuned)
            if key in seen or not any("dmkd" in r.get("artifacts", {}) for r in recs):
                continue
            seen.add(key)
            out.append((b.scenario, label + (" (tuned)" if tuned and "+tuned" not in label else ""), recs))
    return out


def cite_methods(text_html: str, href: str) -> str:
    """Escaped text with each "docs/methods.md" citation made a link to ``href``, the relative path from the
    report to docs/methods.md."""
    return text_html.replace(METHODS_CITATION, f'<a href="{escape(href)}">{METHODS_CITATION}</a>')
RANKS_NOTE = ("Each leaderboard (scenario × setting) of one tuning protocol is a data set; the rows every one of "
              "them holds are ranked in each by mean final accuracy (average ranks for equal means). Mean rank: "
              "their mean (1 = best). Friedman test (scipy.stats.friedmanchisquare): do the rows differ at all? "
              "Nemenyi critical difference CD = q_α·sqrt(k(k+1)/(6N)) (Demšar, JMLR 2006; q_α from scipy's "
              "studentized range): in the diagram a bar joins rows whose mean ranks differ by less than CD, i.e. "
              "rows the test cannot tell apart.")
STABILITY_NOTE = ("The same rows tuned under each tuning protocol (docs/tuning.md): each row's rank (by mean final "
                  "accuracy) under each protocol, Kendall's τ between the protocols' orders (scipy.stats.kendalltau; "
                  "1 = the same order), and the final accuracy each row gains (+) or loses (−) under a realistic "
                  "protocol against end-of-stream tuning, the optimistic bound.")


def rank_markdown(boards: list[Leaderboard]) -> list[str]:
    """LEADERBOARD.md's mean ranks, Friedman tests and rank stability (the diagrams are in the HTML)."""
    from reports.ranks import rank_stability, rank_summaries

    out: list[str] = []
    summaries = [s for s in rank_summaries(boards) if s.k >= 2]
    if summaries:
        out += ["## Ranks across scenarios", "", RANKS_NOTE, ""]
        for s in summaries:
            out += [f"**{md_text(s.text())}**", "", to_markdown(s.display()), ""]
    stab = rank_stability(boards)
    if stab:
        out += ["## Rank stability across tuning protocols", "", STABILITY_NOTE, ""]
        for st in stab:
            out += [f"### {md_text(st.title)}", "", md_text(st.tau_text()), "", to_markdown(st.frame), ""]
    return out


def rank_sections(boards: list[Leaderboard], figures: bool) -> list[H.Section]:
    """report.html's mean ranks with Friedman tests and critical-difference diagrams, and rank stability."""
    from reports.ranks import cd_diagram, rank_stability, rank_summaries

    out = []
    summaries = [s for s in rank_summaries(boards) if s.k >= 2]
    if summaries:
        sec = H.Section("ranks", "Ranks across scenarios", [f'<p class="note">{escape(RANKS_NOTE)}</p>'])
        for s in summaries:
            sec.body += [f"<h3>{escape(s.text())}</h3>", f'<div class="scroll">{to_html(s.display())}</div>']
            if figures:
                sec.body.append(H.figure(cd_diagram(s), f"Critical-difference diagram, {s.text()}."))
        out.append(sec)
    stab = rank_stability(boards)
    if stab:
        sec = H.Section("stability", "Rank stability across tuning protocols", [f'<p class="note">{escape(STABILITY_NOTE)}</p>'])
        for st in stab:
            sec.body += [f"<h3>{escape(st.title)}</h3>", f"<p>{escape(st.tau_text())}</p>",
                         f'<div class="scroll">{to_html(st.frame)}</div>']
        out.append(sec)
    return out


def html_report(title: str, boards: list[Leaderboard], ablations: list, failed, meta: dict[str, str],
                figures: bool = True, methods_href: str = "../../docs/methods.md") -> str:
    """report.html: every table and figure (figures=False: tables only); images embedded as data URIs.
    ``methods_href``: the relative path from report.html to docs/methods.md (default: results/report/)."""
    sections: list[H.Section] = []
    kinds = (plots.accuracy_heatmaps, plots.task_accuracy_over_time, plots.forgetting_bwt_bars, plots.pareto_plots)
    pngs = iter(plots.render_all([(fn, b) for b in boards for fn in kinds]) if figures else [])
    for b in boards:
        s = H.Section(b.anchor, b.title)
        s.body += [f'<div class="proto"><strong>Protocol:</strong> {escape(b.protocol)}</div>',
                   f'<div class="scroll">{to_html(display_frame(b), ranked=True)}</div>', f'<p class="note">{cite_methods(escape(LEGEND), methods_href)}</p>']
        sections.append(s)
        if not figures:
            continue
        s.body.append(H.figure(next(pngs), f"Accuracy matrix per method, mean over seeds "
                               f"(row k: after training task k; column j: task j), {b.title}."))
        s.body.append(H.figure(next(pngs), f"Accuracy on each task after each later task, "
                               f"mean over seeds, {b.title}."))
        s.body.append(H.figure(next(pngs), f"Forgetting and BWT, mean ± 1 std over seeds, "
                               f"{b.title}."))
        s.body.append(H.figure(next(pngs), "Final average accuracy (mean ± std) against total "
                               "training FLOPs, persistent memory (the bytes a method carries from task to task; "
                               "dotted: the memory budget) and bytes communicated; the dashed line joins the "
                               "Pareto-optimal configurations (no other is both cheaper and more accurate)."))
    sections += rank_sections(boards, figures)
    dmkd = _dmkd_rows(boards) if figures else []
    if dmkd:
        s = H.Section("dmkd", "DMKD: specialization, routing and importance")
        for scenario, label, recs in dmkd:
            art = plots.dmkd_artifacts(recs)
            if art is None:
                continue
            name = f"{label} on {scenario} ({art['n_seeds']} seed(s))"
            s.body.append(f"<h3>{escape(name)}</h3>")
            s.body.append(H.figure(plots.dmkd_specialization(art, name), "Left: specialization entropy "
                                   "H(M_i) of each expert after each task (lower = more specialised). Right: "
                                   "class x expert routing after the last task."))
            s.body.append(H.figure(plots.dmkd_importance(art, f"Parameter importance per module — {name}"),
                                   "Histogram of the per-parameter importance Ω (diagonal Fisher) of each "
                                   "module after the last task (log-scaled axes)."))
        sections.append(s)
    if ablations:
        s = H.Section("ablations", "Ablations")
        for a in ablations:
            s.body += [f"<h3>{escape(a.title)}</h3>", f'<div class="scroll">{to_html(a.frame)}</div>']
        sections.append(s)
    if len(failed):
        sections.append(H.Section("failed", "Failed runs", [f'<div class="scroll">{to_html(failed)}</div>']))
    sections.append(H.Section("metadata", "Run metadata", [H.definition_list(meta)]))
    if not boards:
        sections.insert(0, H.Section("empty", "No results", ['<p>No finished test-split runs yet.</p>']))
    subtitle = f"Runs: {meta['runs']}. Experiments: {meta['experiments']}. Generated {meta['report generated']}."
    return H.render_page(title, subtitle, sections)


def make_report(records: Iterable[Record], out_dir: str | Path, title: str = "dmkd-bench report",
                ablation: Iterable[Record] | None = None, figures: bool = True,
                notes: dict[str, str] | None = None) -> dict[str, Path]:
    """Write LEADERBOARD.md and report.html into ``out_dir``; return their paths.

    ``figures=False`` leaves the plots out of the HTML (fast; for tests and quick looks).
    Records carrying an ``ablation`` field (and those passed as ``ablation``) go to the ablation
    tables, not to the leaderboards.
    """
    records = list(records)
    abl = [r for r in records if is_ablation(r)] + list(ablation or [])
    main = [r for r in records if not is_ablation(r)]
    from reports.load import PROGRESS_FROM

    loud = len(records) >= PROGRESS_FROM  # a long report says what it is doing
    if loud:
        print(f"report: {len(records):,} records; building the tables", file=sys.stderr)
    boards = leaderboards(main)
    if loud:
        print(f"report: {len(boards)} tables; writing LEADERBOARD.md and report.html"
              f"{' with figures' if figures else ''}", file=sys.stderr)
    ablations = ablation_tables(abl)
    failed = failed_runs(records + list(ablation or []))
    meta = run_metadata(records + list(ablation or []))
    meta.update(notes or {})
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the report folder {out} ({exc.strerror})", "pass a writable --out") from None
    paths = {"markdown": out / "LEADERBOARD.md", "html": out / "report.html"}
    paths["markdown"].write_text(leaderboard_markdown(title, boards, ablations, failed, meta))
    methods_href = Path(os.path.relpath(METHODS_DOC, out.resolve())).as_posix()
    paths["html"].write_text(html_report(title, boards, ablations, failed, meta, figures, methods_href))
    return paths


def report_from_results(results_dir: str | Path = "results", experiment: str | None = None,
                        out: str | Path | None = None, tracking_uri: str | None = None) -> dict[str, Path]:
    """Load the runs of ``experiment`` (all when None) and write the report to ``out``.

    ``out`` defaults to ``<results_dir>/report``. Records come from MLflow when ``tracking_uri`` is
    given (falling back to the JSON files when it holds none), else from the JSON files.
    """
    missing: list[str] = []
    records = load_records(results_dir, experiment, tracking_uri, missing)
    title = f"dmkd-bench report — {experiment}" if experiment else "dmkd-bench report"
    notes = {}
    if missing:
        notes["missing from MLflow"] = (f"{len(missing)} recorded run(s): {', '.join(missing)} "
                                        "(`dmkd sync` copies them from the JSON records)")
        print(f"warning: MLflow at {redact(str(tracking_uri))} lacks {len(missing)} of the recorded runs: {', '.join(missing)}; "
              "the report uses the JSON records for them, and `dmkd sync` copies them into MLflow",
              file=sys.stderr)
    return make_report(records, Path(out) if out is not None else Path(results_dir) / "report", title=title,
                       notes=notes)


__all__ = ["make_report", "report_from_results"]
