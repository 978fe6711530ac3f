"""The guides stay true: the examples of methods/README.md and scenarios/README.md run as written.

A block marked ``<!-- test: NAME -->`` right before its code fence is extracted and used as the README
says: the method and scenario blocks are saved as ``methods/l2.py`` / ``scenarios/blobs.py`` (in a
temporary folder appended to the package's ``__path__``, so they import under those names), the
``dmkd ...`` lines of a run block go through the CLI's ``main``, the suite block is a suite file and
the test block is run by pytest. All of it happens in one subprocess per README, so registering the
example method or scenario never leaks into other tests. The subprocess writes what it saw as JSON
and the tests below assert on it (values computed by hand where there are values).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent
METHODS_README = REPO / "methods" / "README.md"
SCENARIOS_README = REPO / "scenarios" / "README.md"
BLOCK = re.compile(r"<!-- test: (\w+) -->\s*\n```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)
TINY = ["--set", "max_train_per_task=200", "--set", "max_test_per_task=100"]


def marked_blocks(readme: Path) -> dict[str, tuple[str, str]]:
    """``{name: (language, code)}`` of every block marked ``<!-- test: name -->``; a name used twice is an error."""
    out: dict[str, tuple[str, str]] = {}
    for name, lang, code in BLOCK.findall(readme.read_text(encoding="utf-8")):
        assert name not in out, f"{readme}: two blocks marked {name!r}"
        out[name] = (lang, code)
    return out


def dmkd_lines(code: str) -> list[list[str]]:
    """The argument lists of the ``dmkd ...`` command lines of a shell block."""
    return [shlex.split(line)[1:] for line in code.splitlines() if line.strip().startswith("dmkd ")]


# ---------------------------------------------------------------------------------------------
# Run inside the subprocess
# ---------------------------------------------------------------------------------------------
def _install(package: str, module: str, code: str, tmp: Path) -> Any:
    """Save ``code`` as ``<package>/<module>.py`` in ``tmp`` and import it as ``package.module``."""
    pkg = importlib.import_module(package)
    folder = tmp / package
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(code, encoding="utf-8")
    pkg.__path__.append(str(folder))
    return importlib.import_module(f"{package}.{module}")


def _cli(argv: list[str], tmp: Path) -> dict[str, Any]:
    """One ``dmkd`` command through the CLI's main, results and tracking kept in ``tmp``."""
    from harness.cli.dmkd import main

    out, err = io.StringIO(), io.StringIO()
    argv = [*argv, "--results", str(tmp / "results"), "--tracking-uri", "none"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    record = None
    for line in out.getvalue().splitlines():
        if line.startswith("record: "):
            record = json.loads(Path(line[len("record: "):]).read_text())
    return {"argv": argv, "rc": rc, "stderr": err.getvalue()[-2000:], "record": record}


def _summary(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {"status": rec["status"], "n_tasks": rec["n_tasks"], "label": rec["label"], "tasks": rec["tasks"],
            "hparams": rec["config"]["hparams"], "scenario_options": rec["config"]["scenario_options"],
            "acc": rec["acc"], "metrics": rec["metrics"], "costs": rec["costs"], "eval_split": rec["eval_split"]}


def _tiny_context(model_factory):
    """Two tasks of 4 samples (2-d inputs, classes {0, 1} then {0, 1}) around a given model."""
    import torch

    from harness.core.context import RunContext
    from harness.core.data import Scenario, Task, TensorSource
    from harness.core.protocol import Protocol

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]] * 2)
    y = torch.tensor([0, 1, 1, 0] * 2)
    src = TensorSource(x, y)
    tasks = [Task(t, [0, 1], src, torch.arange(4 * t, 4 * t + 4), torch.arange(0), torch.arange(4 * t, 4 * t + 4))
             for t in range(2)]
    sc = Scenario("tiny", "domain", tasks, 2, (2,), "mlp")
    return RunContext(sc, Protocol(epochs=3, batch_size=2, lr=0.1, momentum=0.0), torch.device("cpu"), 0,
                      model_factory)


def methods_driver(tmp: Path) -> dict[str, Any]:
    """Everything methods/README.md shows, done to the letter; returns what was observed."""
    import optuna
    import pytest as _pytest
    import torch
    from torch import nn

    from harness.core.config import hparams_from, split_params
    from harness.core.method import METHODS
    from harness.engine.runner import RunObserver, RunSpec, run

    blocks = marked_blocks(METHODS_README)
    res: dict[str, Any] = {}
    mod = _install("methods", "l2", blocks["method"][1], tmp)
    L2 = METHODS["l2"]
    res["registered"] = L2.__module__ == "methods.l2" and L2 is mod.L2

    # The penalty on a 2x2 linear model, against the hand-computed values in the tests.
    def factory(seed=None):
        lin = nn.Linear(2, 2)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            lin.bias.copy_(torch.tensor([0.5, -0.5]))
        return lin

    ctx = _tiny_context(factory)
    t0, t1 = ctx.scenario.tasks
    m = L2(hparams_from(L2.HParams, {"strength": 0.1}), ctx)
    x, y = next(t0.batches("train", 4))
    res["penalty_before_first_boundary"] = m.penalty().item()
    res["loss_is_plain_ce_before"] = bool(m.training_loss(x, y, t0) == nn.functional.cross_entropy(m.model(x), y))
    m.after_task(t0)
    res["penalty_at_anchor"] = m.penalty().item()
    with torch.no_grad():
        m.model.weight.add_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        m.model.bias.add_(torch.tensor([0.0, -1.0]))
    pen = m.penalty()
    pen.backward()
    res["penalty_moved"] = pen.item()
    res["penalty_grad"] = {"weight": m.model.weight.grad.tolist(), "bias": m.model.bias.grad.tolist()}
    res["state_bytes_tiny"] = m.state_bytes()

    # The default schedule with the example: zero penalty through task 0, positive once task 1 trains.
    m = L2(hparams_from(L2.HParams, {"strength": 0.1}), ctx)
    seen: list[tuple[int, float]] = []
    penalty = m.penalty

    def watched():
        value = penalty()
        seen.append((ctx.current_task.id, value.item()))
        return value

    m.penalty = watched
    for task in (t0, t1):
        ctx.current_task = task
        m.before_task(task)
        m.train_task(task)
        m.after_task(task)
    res["penalty_during"] = seen

    # Bad values are one-line user errors.
    from harness.core.errors import UserError

    try:
        hparams_from(L2.HParams, {"strength": -1})
        res["negative_strength"] = "accepted"
    except UserError as e:
        res["negative_strength"] = e.line()

    # Step 2: the README's run line, through the CLI.
    res["list"] = _cli_list(tmp)
    res["runs"] = [dict(r, record=_summary(r["record"])) for r in
                   (_cli(argv, tmp) for argv in dmkd_lines(blocks["run"][1]))]

    # A checkpoint after task 1 (saved and loaded as the harness does: weights_only) resumes to the
    # numbers of the uninterrupted run; without load_extra_state it does not.
    spec = RunSpec("l2", "split-fmnist", 0, method_set={"strength": 10.0},
                   scenario_set={"max_train_per_task": 200, "max_test_per_task": 100})

    class Grab(RunObserver):
        saved = b""

        def on_task_end(self, record, task_id, state_fn):
            if task_id == 1:
                buf = io.BytesIO()
                torch.save(state_fn(), buf)
                Grab.saved = buf.getvalue()

    full = run(spec, Grab())
    resumed = run(spec, resume_state=torch.load(io.BytesIO(Grab.saved), weights_only=True))
    res["resume"] = {"full": full["acc"], "resumed": resumed["acc"], "resumed_from": resumed.get("resumed_from_task")}
    original = L2.load_extra_state
    L2.load_extra_state = lambda self, state: None
    try:
        lost = run(spec, resume_state=torch.load(io.BytesIO(Grab.saved), weights_only=True))
    finally:
        L2.load_extra_state = original
    res["resume"]["without_extra_state"] = lost["acc"]

    # Step 3: the suite file, through `dmkd suite`.
    suite = tmp / "configs" / "l2-check.yaml"
    suite.parent.mkdir()
    suite.write_text(blocks["suite"][1], encoding="utf-8")
    out = _cli(["suite", str(suite), "--no-report"], tmp)
    runs = sorted((tmp / "results" / "l2-check" / "runs").glob("*.json"))
    res["suite"] = {"rc": out["rc"], "stderr": out["stderr"],
                    "records": [_summary(json.loads(p.read_text())) for p in runs]}

    # Step 4: the search space gives valid hyperparameters and the tuned learning rate.
    spaces = []
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        method_part, protocol_part = split_params(L2.search_space(study.ask()))
        hparams_from(L2.HParams, method_part)
        spaces.append([method_part, protocol_part])
    res["search"] = spaces

    # Step 5: the README's test file passes.
    test_file = tmp / "example_tests" / "test_l2.py"
    test_file.parent.mkdir()
    test_file.write_text(blocks["test"][1], encoding="utf-8")
    res["example_test_rc"] = int(_pytest.main([str(test_file), "-q", "-p", "no:cacheprovider"]))
    return res


def _cli_list(tmp: Path) -> str:
    from harness.cli.dmkd import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["list"])
        main(["list", "--method", "l2"])
    return out.getvalue()


def scenarios_driver(tmp: Path) -> dict[str, Any]:
    """Everything scenarios/README.md shows, done to the letter; returns what was observed."""
    import torch

    from harness.core.data import Task
    from harness.engine.runner import RunSpec, get_scenario, run
    from scenarios.base import SCENARIOS, build_scenario

    blocks = marked_blocks(SCENARIOS_README)
    res: dict[str, Any] = {}
    _install("scenarios", "blobs", blocks["scenario"][1], tmp)
    res["registered"] = "blobs" in SCENARIOS and SCENARIOS["blobs"].default_backbone == "mlp"

    def describe(options: dict[str, Any], seed: int) -> dict[str, Any]:
        sc = build_scenario("blobs", options, seed, None)
        tasks = []
        for t in sc.tasks:
            tr, va, te = (set(ix.tolist()) for ix in (t.train_idx, t.val_idx, t.test_idx))
            _, y = next(t.source.batches(t.val_idx, 10**6, shuffle=False, generator=None,
                                         device=torch.device("cpu")))
            tasks.append({"id": t.id, "classes": t.classes, "n": [len(tr), len(va), len(te)],
                          "disjoint": not (tr & va or tr & te or va & te),
                          "val_per_class": torch.bincount(sc.tasks[0].source.targets[t.val_idx]).tolist(),
                          "test_labels": sorted(set(t.source.targets[t.test_idx].tolist())),
                          "batch_labels_match": bool((y == t.source.targets[t.val_idx]).all()),
                          "val": sorted(va), "test": sorted(te)})
        all_val = set().union(*(set(t["val"]) for t in tasks))
        all_test = set().union(*(set(t["test"]) for t in tasks))
        for t in tasks:
            t.pop("val")
            t.pop("test")
        return {"name": sc.name, "setting": sc.setting, "settings": sc.settings, "num_classes": sc.num_classes,
                "input_shape": list(sc.input_shape), "backbone": sc.default_backbone, "tasks": tasks,
                "val_test_disjoint_across_tasks": not (all_val & all_test),
                "val_set": sorted(all_val), "data_sum": float(sc.tasks[0].source.data.sum())}

    res["default"] = describe({}, 0)
    res["seed1"] = describe({}, 1)
    res["variant"] = describe({"n_tasks": 2, "classes_per_task": 3, "val_fraction": 0.2}, 0)

    res["list"] = _cli_list_scenarios()
    res["runs"] = [dict(r, record=_summary(r["record"])) for r in
                   (_cli(argv, tmp) for argv in dmkd_lines(blocks["run"][1]))]
    res["bad_option"] = _cli(["run", "--method", "ft", "--scenario", "blobs", "--set", "n_tasks=0"], tmp)

    # While tuning (eval_split=val) the runner seals every task's test split.
    spec = RunSpec("ft", "blobs", 0, eval_split="val")
    rec = run(spec)
    task: Task = get_scenario(spec).tasks[0]
    try:
        next(task.batches("test", 10))
        res["sealed"] = "readable"
    except PermissionError as e:
        res["sealed"] = str(e)
    res["sealed_eval_split"] = rec["eval_split"]
    return res


def _cli_list_scenarios() -> str:
    from harness.cli.dmkd import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["list"])
    return out.getvalue()


def _drive(driver: str, tmp: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI="")
    code = (f"import json, sys, torch; torch.set_num_threads(1); from pathlib import Path; "
            f"from tests.test_guides import {driver}; "
            f"Path(sys.argv[1], 'out.json').write_text(json.dumps({driver}(Path(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp / "out.json").read_text())


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
def test_the_guides_mark_their_runnable_blocks():
    m = marked_blocks(METHODS_README)
    assert {k: v[0] for k, v in m.items()} == {"method": "python", "run": "bash", "suite": "yaml", "test": "python"}
    s = marked_blocks(SCENARIOS_README)
    assert {k: v[0] for k, v in s.items()} == {"scenario": "python", "run": "bash"}
    for code in (m["method"][1], s["scenario"][1]):  # the harness imports are one run of lines, in one place
        lines = code.splitlines()
        at = [i for i, ln in enumerate(lines) if "harness" in ln and ln.startswith(("from ", "import "))]
        assert at and at == list(range(at[0], at[-1] + 1))
    assert dmkd_lines(m["run"][1]) and all(a[:3] == ["run", "--method", "l2"] for a in dmkd_lines(m["run"][1]))
    assert len(dmkd_lines(s["run"][1])) == 3


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (the dev extra)")
@pytest.mark.parametrize("readme,block,path", [(METHODS_README, "method", "methods/l2.py"),
                                               (METHODS_README, "test", "tests/test_l2.py"),
                                               (SCENARIOS_README, "scenario", "scenarios/blobs.py")])
def test_the_python_examples_pass_ruff_as_the_files_they_become(readme, block, path):
    code = marked_blocks(readme)[block][1]
    # The example's own module does not exist in the checkout, so say which packages are the project's.
    first_party = "lint.isort.known-first-party = ['harness', 'methods', 'scenarios', 'reports', 'tests']"
    proc = subprocess.run(["ruff", "check", "--no-cache", "--config", first_party, "--stdin-filename", path, "-"],
                          input=code, cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def methods_guide(tmp_path_factory):
    return _drive("methods_driver", tmp_path_factory.mktemp("methods_guide"))


@pytest.fixture(scope="module")
def scenarios_guide(tmp_path_factory):
    return _drive("scenarios_driver", tmp_path_factory.mktemp("scenarios_guide"))


@needs_fmnist
def test_example_method_registers_and_its_penalty_is_the_hand_computed_value(methods_guide):
    g = methods_guide
    assert g["registered"]
    assert g["penalty_before_first_boundary"] == 0.0 and g["loss_is_plain_ce_before"]
    assert g["penalty_at_anchor"] == 0.0
    # Moved by Δ = [[1, 2], [3, 4]] (weight) and [0, -1] (bias): (λ/2) Σ Δ² = 0.05 · 31; gradient λ Δ.
    assert g["penalty_moved"] == pytest.approx(0.05 * 31)
    assert [v for row in g["penalty_grad"]["weight"] for v in row] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert g["penalty_grad"]["bias"] == pytest.approx([0.0, -0.1])
    assert g["state_bytes_tiny"] == 6 * 4  # the anchor: 4 weights + 2 biases, float32
    during = g["penalty_during"]
    assert [t for t, _ in during] == [0] * 6 + [1] * 6  # 3 epochs x 2 batches per task
    assert all(v == 0.0 for t, v in during if t == 0)
    assert during[6][1] == 0.0 < during[7][1]  # task 1 starts at the anchor, then moves away from it
    assert all(v > 0 for _, v in during[7:])
    assert g["negative_strength"].startswith("error: strength must be >= 0, got -1 — ")


@needs_fmnist
def test_example_method_runs_from_the_cli_as_the_readme_shows(methods_guide):
    g = methods_guide
    assert "l2 " in g["list"] and "L2 pull towards the weights" in g["list"]
    assert "| `strength` | `1.0` |" in g["list"] and "Kirkpatrick" in g["list"]
    assert len(g["runs"]) == 1
    r = g["runs"][0]
    assert r["rc"] == 0, r["stderr"]
    rec = r["record"]
    assert rec["status"] == "finished" and rec["n_tasks"] == 5 and rec["hparams"] == {"strength": 10.0}
    assert rec["scenario_options"]["max_train_per_task"] == 200
    assert [t["n_train"] + t["n_val"] for t in rec["tasks"]] == [200] * 5
    assert [t["n_test"] for t in rec["tasks"]] == [100] * 5
    costs = rec["costs"]
    assert costs["method_state_bytes"] == 4 * costs["params_total"]  # the anchor: one float32 per parameter
    assert costs["passes_per_task"] == pytest.approx(1.0)


@needs_fmnist
def test_example_method_resumes_only_with_its_extra_state(methods_guide):
    r = methods_guide["resume"]
    assert r["resumed_from"] == 2
    assert r["resumed"] == r["full"]
    assert r["without_extra_state"] != r["full"]  # the check has teeth: the anchor is what resumes


@needs_fmnist
def test_example_suite_file_runs_both_rows(methods_guide):
    s = methods_guide["suite"]
    assert s["rc"] == 0, s["stderr"]
    recs = {r["label"]: r for r in s["records"]}
    assert set(recs) == {"ft", "l2-10"}
    assert all(r["status"] == "finished" and r["n_tasks"] == 5 for r in recs.values())
    assert recs["l2-10"]["hparams"] == {"strength": 10.0}
    assert recs["l2-10"]["costs"]["method_state_bytes"] > 0 == recs["ft"]["costs"]["method_state_bytes"]


@needs_fmnist
def test_example_search_space_and_example_test(methods_guide):
    spaces = methods_guide["search"]
    for method_part, protocol_part in spaces:
        assert set(method_part) == {"strength"} and 1e-3 <= method_part["strength"] <= 1e2
        assert set(protocol_part) == {"lr"} and 1e-3 <= protocol_part["lr"] <= 1e-1
    assert len({m["strength"] for m, _ in spaces}) == len(spaces)
    assert methods_guide["example_test_rc"] == 0


def test_example_scenario_has_the_stated_tasks_and_disjoint_splits(scenarios_guide):
    g = scenarios_guide
    assert g["registered"]
    d = g["default"]
    assert (d["name"], d["setting"], d["settings"]) == ("blobs", "class", ["class_il", "task_il"])
    assert (d["num_classes"], d["input_shape"], d["backbone"]) == (6, [16], "mlp")
    assert [t["classes"] for t in d["tasks"]] == [[0, 1], [2, 3], [4, 5]]
    assert [t["id"] for t in d["tasks"]] == [0, 1, 2]
    for k, t in enumerate(d["tasks"]):
        assert t["n"] == [1800, 200, 400]  # 2 x 1000 train, 10 % of each class carved off; 2 x 200 test
        assert t["disjoint"] and t["batch_labels_match"]
        assert t["val_per_class"][2 * k: 2 * k + 2] == [100, 100]  # stratified
        assert sum(t["val_per_class"]) == 200
        assert t["test_labels"] == t["classes"]
    assert d["val_test_disjoint_across_tasks"]
    s1 = g["seed1"]  # the run seed draws the carve, not the data
    assert s1["data_sum"] == d["data_sum"] and s1["val_set"] != d["val_set"]
    v = g["variant"]
    assert [t["classes"] for t in v["tasks"]] == [[0, 1, 2], [3, 4, 5]]
    assert all(t["n"] == [2400, 600, 600] and t["disjoint"] for t in v["tasks"])


def test_methods_run_on_the_example_scenario_as_the_readme_says(scenarios_guide):
    g = scenarios_guide
    assert "blobs " in g["list"] and "Gaussian blobs made in code" in g["list"]
    ft, er, variant = g["runs"]
    for r in (ft, er, variant):
        assert r["rc"] == 0, r["stderr"]
        assert r["record"]["status"] == "finished"
    ft_m, er_m = ft["record"]["metrics"], er["record"]["metrics"]
    assert ft["record"]["n_tasks"] == 3 and variant["record"]["n_tasks"] == 2
    # FT forgets under class-IL (about 1/3 left: the last task's classes) but not under task-IL; ER keeps most.
    assert ft_m["class_il"]["final_avg_acc"] < 0.4 and ft_m["task_il"]["final_avg_acc"] > 0.95
    assert er_m["class_il"]["final_avg_acc"] > ft_m["class_il"]["final_avg_acc"] + 0.3
    assert er["record"]["hparams"]["buffer_size"] == 200
    assert [t["n_val"] for t in variant["record"]["tasks"]] == [600, 600]


def test_example_scenario_options_are_validated_and_its_test_split_sealed_while_tuning(scenarios_guide):
    bad = scenarios_guide["bad_option"]
    assert bad["rc"] == 2 and bad["record"] is None
    assert bad["stderr"].strip() == "error: n_tasks must be >= 1, got 0 — set n_tasks >= 1, e.g. the default n_tasks=3"
    assert scenarios_guide["sealed_eval_split"] == "val"
    assert "sealed" in scenarios_guide["sealed"]
