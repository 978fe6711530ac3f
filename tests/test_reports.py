"""Reports: hand-computed leaderboard numbers, grouping, Pareto fronts, self-contained HTML, loading."""

from __future__ import annotations

import base64
import copy
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from harness.core.errors import UserError
from harness.engine import metrics
from reports.build import METHODS_DOC, make_report, report_from_results
from reports.load import latest_per_key, load_json_records, load_mlflow_records, load_records
from reports.plots import pareto_front
from reports.tables import ablation_tables, display_frame, failed_runs, fmt_si, leaderboards, mean_std

from .conftest import TINY, needs_fmnist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def acc_matrix(final: float, T: int = 3) -> list[list[float]]:
    """A lower-triangular-ish matrix whose last row averages to ``final``."""
    R = [[0.9 if j <= k else 0.1 for j in range(T)] for k in range(T)]
    R[-1] = [final] * T
    return R


def fake_record(label: str, seed: int, final: float, *, scenario: str = "split-fmnist", setting: str = "class",
                tuned: bool = False, status: str = "finished", epochs: int = 1, hparams: dict | None = None,
                flops: float = 1e9, mem: float = 2**20, comm: float = 0.0, params: int = 1000,
                train_s: float = 1.0, eval_s: float = 0.5, **extra) -> dict:
    """A run record with the runner's shape; metrics computed from the matrices like the runner does."""
    settings = ["class_il", "task_il"] if setting == "class" else ["domain_il"]
    acc = {s: acc_matrix(final if i == 0 else min(final + 0.3, 1.0)) for i, s in enumerate(settings)}
    b = {s: [0.1, 0.1, 0.1] for s in settings}
    rec = {
        "key": f"{label}__{scenario}__ep{epochs}__s{seed}", "method": label.split("[")[0], "label": label,
        "scenario": scenario, "setting": setting, "settings": settings, "seed": seed, "status": status,
        "tuned": tuned, "tuned_trials": 20 if tuned else 0, "eval_split": "test",
        "config": {"method": label, "hparams": hparams or {}, "scenario": scenario,
                   "scenario_options": {"max_train_per_task": 600},
                   "protocol": {"epochs": epochs, "batch_size": 128, "lr": 0.01, "optimizer": "sgd",
                                "momentum": 0.9, "backbone": "mlp"},
                   "seed": seed, "env": {"python": "3.11.7", "torch": "2.14.1", "git_revision": "abc123",
                                         "platform": "Linux", "processor": "x86_64", "device": "cpu"}},
        "n_tasks": 3, "tasks": [{"id": t, "name": f"task {t}", "classes": [2 * t, 2 * t + 1]} for t in range(3)],
        "acc": acc, "random_init_acc": b, "per_task": [], "method_metrics": [], "artifacts": {},
        "started_at": f"2025-01-0{seed + 1}T10:00:00", "finished_at": f"2025-01-0{seed + 1}T10:05:00",
    }
    if status == "finished":
        rec["metrics"] = {s: metrics.summary(acc[s], b[s]) for s in settings}
        rec["costs"] = {"params_total": params, "train_flops_total": flops, "peak_memory_bytes": mem,
                        "peak_memory_kind": "process_rss", "comm_bytes": comm, "train_time_s": train_s,
                        "eval_time_s": eval_s}
    rec.update(extra)
    return rec


def dmkd_artifacts(n_experts: int = 3, n_classes: int = 6, T: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"entropy_per_task": [[float(x) for x in rng.uniform(0.2, 1.7, n_experts)] for _ in range(T)],
            "usage_per_task": [[1 / n_experts] * n_experts for _ in range(T)],
            "routing_matrix": rng.dirichlet(np.ones(n_experts), n_classes).tolist(),
            "routing_matrix_kind": "mean gate weight", "class_names": [f"class {c}" for c in range(n_classes)],
            "importance_hist": {f"expert_{i}": {"bin_edges": np.logspace(-8, -2, 11).tolist(),
                                                "counts": rng.integers(0, 500, 10).tolist()}
                                for i in range(n_experts)}}


@pytest.fixture
def known_runs() -> list[dict]:
    """ft: 3 seeds (final 0.2/0.3/0.4); er: 2 tuned seeds (0.5/0.7); one failed and one running run."""
    return ([fake_record("ft", s, f, flops=1e9 * (s + 1), train_s=1.0 + s) for s, f in enumerate([0.2, 0.3, 0.4])]
            + [fake_record("er[buffer_size=200]", s, f, tuned=True, hparams={"buffer_size": 200}, flops=4e9)
               for s, f in enumerate([0.5, 0.7])]
            + [fake_record("lwf", 0, 0.0, status="failed", error="TrainingDiverged: loss is nan at task 2\ntrace"),
               fake_record("ewc", 0, 0.0, status="running")])


# ------------------------------------------------------------------------------------------------
def test_mean_std_is_sample_std_by_hand():
    ms = mean_std([0.5, 0.7, 0.6])
    assert ms.n == 3 and ms.mean == pytest.approx(0.6) and ms.std == pytest.approx(0.1)  # sqrt(0.02/2)
    assert mean_std([0.42]).std == 0.0 and mean_std([0.42]).n == 1
    assert mean_std([0.2, None, 0.4]).n == 2 and mean_std([0.2, None, 0.4]).std == pytest.approx(math.sqrt(0.02))
    assert mean_std([]).n == 0 and mean_std([]).fmt() == "–"
    # 95% t half-width: t_{0.975,1} = 12.7062 x 0.14142 / sqrt(2) = 1.2706.
    assert mean_std([0.5, 0.7]).fmt() == "0.600 ± 1.271"
    assert mean_std([-1e-9, 1e-9]).fmt() == "0.000 ± 0.000"  # never "-0.000"
    assert mean_std([0.42]).fmt() == "0.420"  # one seed: no ± at all


def test_fmt_si_units():
    assert fmt_si(478410) == "478 k"
    assert fmt_si(4.8327e9, "FLOP") == "4.83 GFLOP"
    assert fmt_si(3 * 2**20, "B", 1024) == "3 MiB"
    assert fmt_si(0, "B") == "0 B"


def test_leaderboard_numbers_match_hand_computation(known_runs):
    boards = leaderboards(known_runs)
    assert [(b.scenario, b.setting) for b in boards] == [("split-fmnist", "class_il"), ("split-fmnist", "task_il")]
    f = boards[0].frame.set_index("method")
    # er: final 0.5, 0.7 -> 0.6, sample std sqrt(0.02) = 0.1414; ft: 0.2, 0.3, 0.4 -> 0.3, std 0.1.
    assert f.loc["er[buffer_size=200]", "final_avg_acc_mean"] == pytest.approx(0.6)
    assert f.loc["er[buffer_size=200]", "final_avg_acc_std"] == pytest.approx(math.sqrt(0.02))
    assert f.loc["ft", "final_avg_acc_mean"] == pytest.approx(0.3)
    assert f.loc["ft", "final_avg_acc_std"] == pytest.approx(0.1)
    assert f.loc["ft", "seeds"] == 3 and f.loc["er[buffer_size=200]", "seeds"] == 2
    # Paired over seeds 0, 1: er - ft = 0.3, 0.4 -> t = 0.35 / (0.0707 / sqrt 2) = 7 with 1 df; two-sided
    # p = 1 - (2/pi) atan(7) = 0.0903 >= 0.05 (one comparison: Holm leaves it), so ft is tied with the
    # best; its rank stays 2, the order of the means.
    assert f.loc["er[buffer_size=200]", "rank"] == 1 and f.loc["ft", "rank"] == 2
    assert bool(f.loc["ft", "tied_with_best"])
    assert f.loc["ft", "p_vs_best"] == pytest.approx(1 - 2 / math.pi * math.atan(7.0))
    assert f.loc["ft", "p_vs_best_holm"] == pytest.approx(1 - 2 / math.pi * math.atan(7.0))
    assert f.loc["ft", "final_avg_acc_half"] == pytest.approx(4.302652730 * 0.1 / math.sqrt(3))
    # Forgetting by hand: every task peaks at 0.9 then ends at `final` -> 0.9 - final; BWT the negative.
    assert f.loc["ft", "forgetting_mean"] == pytest.approx(np.mean([0.7, 0.6, 0.5]))
    assert f.loc["ft", "bwt_mean"] == pytest.approx(-0.6)
    # FWT: R[i-1][i] = 0.1 = b_i -> 0 for every seed.
    assert f.loc["ft", "fwt_mean"] == pytest.approx(0.0) and f.loc["ft", "fwt_std"] == pytest.approx(0.0)
    # Costs: mean over seeds; wall = train + eval seconds.
    assert f.loc["ft", "train_flops"] == pytest.approx(2e9)
    assert f.loc["ft", "wall_s"] == pytest.approx(np.mean([1.5, 2.5, 3.5]))
    assert bool(f.loc["er[buffer_size=200]", "tuned"]) and not bool(f.loc["ft", "tuned"])
    # Task-IL table: the +0.3 matrices.
    t = boards[1].frame.set_index("method")
    assert t.loc["ft", "final_avg_acc_mean"] == pytest.approx(0.6)
    assert "buffer: er[buffer_size=200]=200" in boards[0].protocol
    assert "backbone mlp" in boards[0].protocol and "epochs/task 1" in boards[0].protocol


def test_display_and_markdown_show_mean_std_seeds_and_failures(known_runs, tmp_path):
    shown = display_frame(leaderboards(known_runs)[0]).set_index("Method")
    assert shown.loc["ft", "Final acc. A_T"] == "0.300 ± 0.248"
    assert shown.loc["er[buffer_size=200]", "Final acc. A_T"] == "0.600 ± 1.271"
    assert shown.loc["er[buffer_size=200]", "Tuned"] == "yes (20 trials)" and shown.loc["ft", "Tuned"] == "no"
    assert shown.loc["ft", "Train FLOPs"] == "2 GFLOP"
    paths = make_report(known_runs, tmp_path / "rep", title="known", figures=False)
    md = paths["markdown"].read_text()
    assert "| 1 | er[buffer_size=200] | 2 | 0.600 ± 1.271 |" in md
    assert "| 2 | ft | 3 | 0.300 ± 0.248 |" in md  # ranked by the mean; its tie is marked apart
    assert md.count("**Protocol:** backbone mlp; epochs/task 1; batch 128") == 2
    assert "## Failed runs" in md and "TrainingDiverged: loss is nan at task 2" in md and "trace" not in md
    assert "| ewc |" not in md  # running runs are not ranked
    assert "1 failed, 5 finished, 1 running" in md
    fr = failed_runs(known_runs)
    assert list(fr["Method"]) == ["lwf"]


def test_tables_split_by_protocol_and_setting():
    recs = [fake_record("ft", 0, 0.3), fake_record("ft", 1, 0.5, epochs=2),
            fake_record("ft", 0, 0.8, scenario="permuted-fmnist", setting="domain")]
    boards = leaderboards(recs)
    keys = [(b.scenario, b.setting, "epochs/task 2" in b.protocol) for b in boards]
    assert sorted(keys) == [("permuted-fmnist", "domain_il", False), ("split-fmnist", "class_il", False),
                            ("split-fmnist", "class_il", True), ("split-fmnist", "task_il", False),
                            ("split-fmnist", "task_il", True)]
    for b in boards:
        assert len(b.frame) == 1 and b.frame["seeds"].iloc[0] == 1 and b.frame["final_avg_acc_std"].iloc[0] == 0.0
    val = fake_record("ft", 3, 0.99, eval_split="val")
    assert all(b.frame["seeds"].iloc[0] == 1 for b in leaderboards(recs + [val]))  # tuning runs never ranked


def test_pareto_front_by_hand():
    # (cost, acc): a=(1,0.5) b=(2,0.7) c=(3,0.6) dominated by b, d=(4,0.9), e=(1,0.4) dominated by a.
    costs, accs = [1, 2, 3, 4, 1], [0.5, 0.7, 0.6, 0.9, 0.4]
    assert pareto_front(costs, accs) == [0, 1, 3]
    assert pareto_front([0, 0], [0.2, 0.2]) == [0, 1]  # ties dominate nobody
    assert pareto_front([1.0, float("nan")], [0.5, 0.9]) == [0]


def test_ablation_tables_one_per_study_with_switch_columns():
    def abl(seed, kd, pres, final):
        return fake_record(f"dmkd[kd={kd},preservation={pres}]", seed, final,
                           ablation={"study": "kd_x_pres", "params": {"kd": kd, "preservation": pres}})
    recs = [abl(0, "none", "fisher", 0.4), abl(1, "none", "fisher", 0.6), abl(0, "logits", "fisher", 0.8)]
    tables = ablation_tables(recs)
    assert [(t.study, t.setting) for t in tables] == [("kd_x_pres", "class_il"), ("kd_x_pres", "task_il")]
    f = tables[0].frame
    assert list(f.columns[:3]) == ["kd", "preservation", "Seeds"]
    assert f.iloc[0]["kd"] == "logits" and f.iloc[0]["Final acc. A_T"] == "0.800"
    assert f.iloc[1]["kd"] == "none" and f.iloc[1]["Seeds"] == 2 and f.iloc[1]["Final acc. A_T"] == "0.500 ± 1.271"
    assert leaderboards([]) == []


class _Refs(HTMLParser):
    """Collects tags and their src/href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "action", "srcset", "data", "poster") and v is not None:
                self.refs.append(v)
                if tag == "img":
                    self.imgs.append(v)


def test_html_is_self_contained_and_has_every_part(tmp_path, known_runs):
    dm = [fake_record("dmkd", s, 0.6 + 0.1 * s, artifacts={"dmkd": dmkd_artifacts()}) for s in range(2)]
    abl = [fake_record("dmkd[kd=none]", 0, 0.45, ablation={"study": "kd", "params": {"kd": "none"}})]
    dom = [fake_record("ft", 0, 0.3, scenario="permuted-fmnist", setting="domain", comm=2.5e6)]
    paths = make_report(known_runs + dm + dom, tmp_path / "out", ablation=abl)
    text = paths["html"].read_text()
    p = _Refs()
    p.feed(text)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    docs = [ref for ref in p.refs if ref.endswith("docs/methods.md")]  # the legend's citation, a relative link
    assert docs and all((paths["html"].parent / ref).resolve() == METHODS_DOC for ref in docs), docs
    for ref in p.refs:
        low = ref.strip().lower()
        assert not low.startswith(("http:", "https:", "//", "file:", "ftp:")), ref
        assert low.startswith(("#", "data:image/png;base64,")) or ref in docs, ref
    assert "url(" not in text and "@import" not in text
    # 3 boards x 4 figures + DMKD (specialization + importance) + the critical-difference diagram of the
    # mean ranks over the 3 boards = 15 embedded PNGs, each a real PNG.
    assert len(p.imgs) == 3 * 4 + 2 + 1
    for src in p.imgs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    for needle in ("DMKD: specialization, routing and importance", "Ablation &#x27;kd&#x27;", "Failed runs",
                   "Run metadata", "abc123", "0.300 ± 0.248", "0.600 ± 1.271", "permuted-fmnist — domain-IL",
                   "2.5 MB"):
        assert needle in text, needle
    assert "| kd | Seeds |" in paths["markdown"].read_text()


# ------------------------------------------------------------------------------------------------
def _write_results(root: Path, exp: str, recs: list[dict]) -> None:
    d = root / exp / "runs"
    d.mkdir(parents=True, exist_ok=True)
    for r in recs:
        (d / f"{r['key']}.json").write_text(json.dumps(r))


def test_report_from_json_results(tmp_path, known_runs):
    res = tmp_path / "results"
    _write_results(res, "quick", known_runs)
    _write_results(res, "other", [fake_record("joint", 0, 0.9)])
    assert {r["experiment"] for r in load_json_records(res)} == {"quick", "other"}
    assert len(load_json_records(res, "other")) == 1
    paths = report_from_results(res, experiment="quick")
    assert paths["html"] == res / "report" / "report.html" and paths["html"].is_file()
    md = paths["markdown"].read_text()
    assert "0.300 ± 0.248" in md and "joint" not in md and "dmkd-bench report — quick" in md
    with pytest.raises(UserError, match="no experiment 'nope'.*found: other, quick"):
        report_from_results(res, experiment="nope")
    (res / "quick" / "runs" / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_records(res, "quick")
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "missing")
    (tmp_path / "empty" / "e" / "runs").mkdir(parents=True)
    with pytest.raises(UserError, match="no run records"):
        load_records(tmp_path / "empty")


def test_latest_per_key_prefers_finished_then_latest():
    a = fake_record("ft", 0, 0.3, status="failed")
    b = fake_record("ft", 0, 0.5)
    c = copy.deepcopy(b)
    c["finished_at"] = "2030-01-01T00:00:00"
    c["metrics"]["class_il"]["final_avg_acc"] = 0.77
    out = latest_per_key([a, b, c])
    assert len(out) == 1 and out[0]["metrics"]["class_il"]["final_avg_acc"] == 0.77
    assert latest_per_key([a])[0]["status"] == "failed"


def test_mlflow_records_are_read_from_record_artifacts(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp_id = mlflow.create_experiment("quick", artifact_location=(tmp_path / "artifacts").as_uri())
    rec = fake_record("ft", 0, 0.35)
    try:
        with (mlflow.start_run(experiment_id=exp_id, run_name="suite"),  # parent without a record
              mlflow.start_run(experiment_id=exp_id, nested=True, run_name=rec["key"])):
            mlflow.log_dict(rec, "record.json")
    finally:
        mlflow.set_tracking_uri(None)
    got = load_mlflow_records(uri, "quick")
    assert len(got) == 1 and got[0]["key"] == rec["key"] and got[0]["experiment"] == "quick"
    assert got[0]["metrics"]["class_il"]["final_avg_acc"] == pytest.approx(0.35)
    with pytest.raises(UserError, match="no MLflow experiment named 'x'"):
        load_mlflow_records(uri, "x")


@needs_fmnist
def test_report_of_real_runner_records(tmp_path):
    from harness.engine.runner import RunSpec, run

    recs = [run(RunSpec("ft", "split-fmnist", s, scenario_set=dict(TINY))) for s in (0, 1)]
    finals = [r["metrics"]["class_il"]["final_avg_acc"] for r in recs]
    expect = f"{np.mean(finals):.3f} ± {12.7062047 * np.std(finals, ddof=1) / np.sqrt(2):.3f}"  # t_{0.975,1}
    md = make_report(recs, tmp_path, figures=False)["markdown"].read_text()
    assert f"| 1 | ft | 2 | {expect} |" in md
    assert f"{recs[0]['costs']['params_total'] / 1000:.3g} k" in md


# ------------------------------------------------------------------------------------------------
# Intervals, paired tests and tied ranks (issue 12), numbers computed by hand.
# With 2 degrees of freedom the t distribution has the closed form CDF F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
# so a two-sided p-value is 1 - t / sqrt(2 + t^2); t_{0.975,2} = 4.302652730.
T975_2 = 4.302652730


def _three_rows(**extra) -> list[dict]:
    finals = {"a": [0.80, 0.82, 0.84], "b": [0.78, 0.81, 0.81], "c": [0.70, 0.72, 0.71]}
    return [fake_record(lab, s, f, **extra) for lab, fs in finals.items() for s, f in enumerate(fs)]


def test_t_interval_and_paired_test_by_hand():
    from reports.tables import paired_diff, t_half_width

    # a: mean 0.82, s = 0.02 -> half-width 4.3027 * 0.02 / sqrt(3) = 0.04968.
    assert t_half_width(0.02, 3) == pytest.approx(T975_2 * 0.02 / math.sqrt(3))
    assert mean_std([0.80, 0.82, 0.84]).fmt() == "0.820 ± 0.050"
    # a - b = 0.02, 0.01, 0.03: mean 0.02, s_d = 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.4641, p = 0.0742.
    d = paired_diff({0: 0.80, 1: 0.82, 2: 0.84}, {0: 0.78, 1: 0.81, 2: 0.81})
    t = 0.02 / (0.01 / math.sqrt(3))
    assert d.n == 3 and d.mean == pytest.approx(0.02) and d.std == pytest.approx(0.01)
    assert d.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t)) and d.p_value == pytest.approx(0.0742, abs=1e-4)
    assert not d.significant and d.half_width == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    # a - c = 0.10, 0.10, 0.13: mean 0.11, s_d = sqrt(0.0003), t = 11 -> p = 1 - 11/sqrt(123) = 0.00816.
    d = paired_diff({0: 0.80, 1: 0.82, 2: 0.84}, {0: 0.70, 1: 0.72, 2: 0.71})
    assert d.p_value == pytest.approx(1 - 11 / math.sqrt(123)) and d.significant
    # Pairing is by seed: only shared seeds count; constant differences have no variance.
    assert paired_diff({0: 0.5, 1: 0.6}, {1: 0.4, 2: 0.9}).n == 1
    assert paired_diff({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}).p_value == 0.0
    assert paired_diff({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6}).p_value == 1.0


def test_rows_not_significantly_worse_than_the_best_are_marked_tied_and_keep_their_rank():
    board = leaderboards(_three_rows())[0]
    f = board.frame.set_index("method")
    # Ranks follow the means (0.82 > 0.80 > 0.71). b is 0.02 below a, p = 0.0742; c: p = 0.00816.
    # Holm over the two comparisons: c 2 x 0.00816 = 0.0163 < 0.05 (worse); b max(0.0163, 0.0742) = 0.0742
    # >= 0.05: tied with the best, shown apart from its rank 2.
    assert (f.loc["a", "rank"], f.loc["b", "rank"], f.loc["c", "rank"]) == (1, 2, 3)
    assert [bool(f.loc[m, "tied_with_best"]) for m in "abc"] == [True, True, False]
    assert math.isnan(f.loc["a", "p_vs_best"]) and f.loc["b", "p_vs_best"] == pytest.approx(0.0742, abs=1e-4)
    assert f.loc["c", "p_vs_best_holm"] == pytest.approx(2 * (1 - 11 / math.sqrt(123)))
    assert f.loc["b", "p_vs_best_holm"] == pytest.approx(f.loc["b", "p_vs_best"])
    shown = display_frame(board).set_index("Method")
    assert shown.loc["a", "Final acc. A_T"] == "0.820 ± 0.050" and shown.loc["b", "p vs best (Holm)"] == "0.074"
    assert [shown.loc[m, "≈ best"] for m in "abc"] == ["best", "≈ best", ""]
    assert "seeds 0, 1, 2 (3)" in board.protocol and "95% t-interval" in board.protocol
    assert "evaluated on the test split" in board.protocol and "defaults" in board.protocol
    # One seed per row: no test, ranks by mean, cells without ±.
    one = leaderboards([r for r in _three_rows() if r["seed"] == 0])[0]
    g = one.frame.set_index("method")
    assert (g.loc["a", "rank"], g.loc["b", "rank"], g.loc["c", "rank"]) == (1, 2, 3)
    assert display_frame(one).set_index("Method").loc["b", "Final acc. A_T"] == "0.780"
    assert "one seed, no interval" in one.protocol


def test_reference_row_deltas_with_paired_intervals(tmp_path):
    board = leaderboards(_three_rows(reference="a"))[0]
    shown = display_frame(board).set_index("Method")
    col = "Δ final acc. vs a"
    # b - a = -0.02 ± 4.3027 * 0.01 / sqrt 3 = 0.0248, p = 0.074; c - a = -0.11 ± 0.043, p = 0.0082.
    assert shown.loc["a", col] == "(reference)"
    assert shown.loc["b", col] == "-0.020 ± 0.025 (p=0.074)"
    assert shown.loc["c", col] == f"-0.110 ± {T975_2 * math.sqrt(0.0003) / math.sqrt(3):.3f} (p=0.0082)"


def test_passes_column_marks_rows_that_differ_from_the_caption():
    recs = _three_rows()
    for r in recs:
        r["costs"]["passes_per_task"] = {"a": [1.0, 1.0, 1.0], "b": 3.0}.get(r["label"])
    shown = display_frame(leaderboards(recs)[0]).set_index("Method")
    assert shown.loc["a", "Passes/task"] == "1" and shown.loc["b", "Passes/task"] == "3 †"
    assert shown.loc["c", "Passes/task"] == "?"  # not recorded: unknown, not marked


def test_dmkd_rows_name_their_router():
    from reports.tables import row_label

    rec = fake_record("dmkd", 0, 0.5, hparams={"routing": "autoencoder"})
    rec["method"] = "dmkd"
    assert row_label(rec) == "dmkd (autoencoder router)"
    assert display_frame(leaderboards([rec])[0])["Method"].tolist() == ["dmkd (autoencoder router)"]
    rec["label"] = "dmkd (learned router)"
    assert row_label(rec) == "dmkd (learned router)"  # a label that names it is kept
    assert row_label(fake_record("ft", 0, 0.5)) == "ft"


def test_records_in_json_and_mlflow_are_read_once(tmp_path, monkeypatch):
    """A run whose JSON record is there is not downloaded from MLflow again; a run found only in MLflow
    (another machine's) still is, and each run is reported once."""
    import mlflow

    from reports import load

    res = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp_id = mlflow.create_experiment("quick", artifact_location=(tmp_path / "artifacts").as_uri())
    local, remote = fake_record("ft", 0, 0.35), fake_record("ft", 1, 0.45)
    try:
        for rec in (local, remote):
            with mlflow.start_run(experiment_id=exp_id, run_name=rec["key"]) as run:
                mlflow.log_dict(rec, "record.json")
                rec["mlflow_run_id"] = run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)
    _write_results(res, "quick", [local])  # the other run's JSON record is on another machine
    downloads = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts",
                        lambda **kw: downloads.append(kw["run_id"]) or real(**kw))
    got = load.load_records(res, "quick", uri)
    assert downloads == [remote["mlflow_run_id"]]
    assert sorted(r["key"] for r in got) == sorted([local["key"], remote["key"]])


def test_figures_drawn_in_worker_processes_are_the_same_png(known_runs):
    from reports import plots

    board = leaderboards(known_runs)[0]
    jobs = [(plots.forgetting_bwt_bars, board), (plots.pareto_plots, board), (abs, -3)]
    assert plots.render_all(jobs, workers=2) == plots.render_all(jobs, workers=1)
    assert plots.render_all(jobs, workers=2)[2] == 3
