"""Optuna tuning on validation data, and ablation grids (GridSampler), on one machine or many.

Tuning: the objective is the final average accuracy on the VALIDATION splits (carved from each
task's training data); tuning runs seal the test splits so that reading them raises. After each
task the running average validation accuracy is reported, so the pruner (median by default,
Hyperband as an option) stops bad trials early. Every trial is an MLflow run nested under the
study's run. Storage is sqlite under results/ by default, or any Optuna RDB URL (PostgreSQL for
many machines), or a journal file (``journal:<path>``); several processes on one study cooperate
and together run exactly the number of trials asked for.

Ablation: a grid over method switches run with GridSampler; each cell runs every seed on the
test split (these are reported results, not tuning) and is recorded like any suite run.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from harness.core.config import Document, hparams_from, split_params, validate_document
from harness.core.context import TrainingDiverged
from harness.core.errors import UserError
from harness.core.protocol import Protocol
from harness.core.streams import FIRST_TASKS, HELD_OUT_STREAM, TuningProtocol
from harness.engine.runner import RunObserver, RunSpec, check_splits, resolve_method, run
from harness.orchestration.storage import create_study, is_surplus, make_storage
from harness.orchestration.tracking import Store, atomic_write_json
from harness.orchestration.tuned import (
    best_params_path,
    load_best_params,
    load_tuned_suite,
    tuned_dir,
    tuned_file,
    tuning_from_args,
)

SETTING_FOR = {"class": "class_il", "domain": "domain_il"}


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


class _TrialObserver(RunObserver):
    """Reports the running validation accuracy to the pruner and logs the trial to MLflow."""

    def __init__(self, trial, setting: str, step_offset: int, sink, run_id: str | None) -> None:
        self.trial, self.setting, self.offset = trial, setting, step_offset
        self.sink, self.run_id = sink, run_id

    def on_task_end(self, record, task_id, state_fn) -> None:
        import optuna

        value = record["per_task"][-1]["avg_acc"][self.setting]
        if self.sink is not None:
            self.sink.log_metrics(self.run_id, {f"val/{self.setting}/avg_acc": value}, step=self.offset + task_id)
        self.trial.report(value, self.offset + task_id)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after task {task_id} (running val accuracy {value:.4f})")


def tune(method: str, scenario: str, *, trials: int, results_dir: Path, storage_url: str | None = None,
         study_name: str | None = None, seeds: list[int] | None = None, pruner: str = "median",
         protocol: Protocol | None = None, scenario_set: dict | None = None, fixed: dict | None = None,
         data_root: str | None = None, device: str = "auto", tracking_uri: str | None = None,
         show_progress: bool = True, objective: str = "auto", sampler_seed: int | None = None,
         wait_poll_s: float = 2.0, tuning: TuningProtocol | None = None,
         budget: int | None = None) -> dict[str, Any]:
    """Run (this worker's share of) a study with exactly ``trials`` finished trials in total.

    ``objective``: the setting whose validation final accuracy is maximised; ``auto`` is class-IL
    for class-incremental scenarios and domain-IL otherwise. ``sampler_seed``: seeds Optuna's TPE
    sampler (None: Optuna's unseeded default). ``tuning``: the tuning protocol, i.e. the stream the
    trials learn and are scored on (harness/core/streams.py; default end-of-stream).
    """
    import optuna
    from optuna.trial import TrialState

    cls = resolve_method(method)
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}", "ask for at least one trial")
    seeds = seeds or [0]
    protocol = protocol or Protocol()
    tuning = tuning or TuningProtocol()
    stream = tuning.stream()
    fixed = dict(fixed or {})
    hparams_from(cls.HParams, split_params(fixed)[0])  # validate early
    from harness.engine.runner import get_scenario

    probe = RunSpec(method, scenario, seeds[0], scenario_set=dict(scenario_set or {}), data_root=data_root,
                    eval_split="val", stream=stream)
    # The objective's setting: class-IL for class-incremental scenarios, domain-IL otherwise.
    probe_scenario = get_scenario(probe)
    check_splits(probe_scenario, "val")  # tuning reads validation data only: it must exist
    scenario_setting = probe_scenario.setting
    setting = SETTING_FOR[scenario_setting] if objective == "auto" else objective
    allowed = ("class_il", "task_il") if scenario_setting == "class" else ("domain_il",)
    if setting not in allowed:
        raise UserError(f"objective {setting} does not apply to {scenario} ({scenario_setting}-incremental)",
                        f"use --objective auto or one of {', '.join(allowed)}")

    if study_name is None:
        # The default name carries a hash of everything the trials share, so that a study of another
        # protocol, scenario option, fixed setting, seed list or objective is never continued.
        from harness.engine.runner import _digest

        study_name = f"{method}__{scenario}__" + _digest({
            "method": method, "scenario": scenario, "scenario_set": dict(scenario_set or {}),
            "protocol": dataclasses.asdict(protocol), "fixed": fixed, "seeds": seeds, "objective": setting,
            "pruner": pruner, **({"tuning": tuning.as_dict()} if stream is not None else {})})
    storage = make_storage(storage_url, results_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed) if sampler_seed is not None else None
    study = create_study(study_name=study_name, storage=storage, direction="maximize", pruner=make_pruner(pruner),
                          sampler=sampler)
    store = Store(results_dir, "tuning", tracking_uri)
    sink = store.mlflow
    study_run = sink.find_or_create({"dmkd.kind": "study", "dmkd.study": study_name}, f"study {study_name}") if sink \
        else None

    cap = None
    if budget is not None:  # capacity is suggested inside the memory budget; buffers are filled to it
        from harness.engine.budget import capacity_cap, fit_to_budget

        cap = capacity_cap(RunSpec(method, scenario, seeds[0], split_params(fixed)[0], dict(scenario_set or {}),
                                   protocol, data_root=data_root), budget)

    def objective(trial) -> float:
        params = {**cls.search_space(trial, cap), **fixed}
        trial.set_user_attr("params", params)  # keys as the method/protocol name them
        trial_run = sink.find_or_create({"dmkd.kind": "trial", "dmkd.study": study_name,
                                         "dmkd.trial": str(trial.number)}, f"trial {trial.number}", study_run) \
            if sink else None
        if sink:
            sink.log_params(trial_run, {**{f"hparams.{k}": v for k, v in params.items()},
                                        "method": method, "scenario": scenario, "seeds": ",".join(map(str, seeds))})
        values = []
        diverged = False
        try:
            m_params, p_params = split_params(params)
            trial_protocol = dataclasses.replace(protocol, **p_params)
            trial_protocol.validate()
            for i, seed in enumerate(seeds):
                spec = RunSpec(method, scenario, seed, m_params, dict(scenario_set or {}), trial_protocol,
                               device=device, data_root=data_root, eval_split="val", stream=stream)
                if budget is not None:
                    spec = fit_to_budget(spec, budget, split_params(fixed)[0])
                try:
                    rec = run(spec, _TrialObserver(trial, setting, i * 1000, sink, trial_run))
                    values.append(rec["metrics"][setting]["final_avg_acc"])
                except TrainingDiverged as e:
                    # A diverging configuration scores 0 rather than failing, so that the sampler
                    # learns to avoid its region (failed trials are invisible to TPE).
                    trial.set_user_attr("diverged", str(e))
                    diverged = True
                    values.append(0.0)
        except optuna.TrialPruned:
            if sink:
                sink.set_status(trial_run, "KILLED")
            raise
        except Exception:
            if sink:
                sink.set_status(trial_run, "FAILED")
            raise
        value = sum(values) / len(values)
        if sink:
            if diverged:
                sink.set_tags(trial_run, {"dmkd.diverged": "true"})
            sink.log_metrics(trial_run, {"objective_val_final_avg_acc": value}, step=0)
            sink.set_status(trial_run, "FINISHED")
        return value

    done_states = (TrialState.COMPLETE, TrialState.PRUNED)
    # Every trial of the budget counts, failed ones too, so a study holds exactly `trials` trials.
    live_states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
    from tqdm.auto import tqdm

    bar = tqdm(total=trials, desc=f"tune {study_name}", unit="trial", disable=not show_progress, file=sys.stderr)
    while True:
        ts = [t for t in study.get_trials(deepcopy=False) if not is_surplus(t)]
        if sum(t.state in live_states for t in ts) >= trials:
            break
        trial = study.ask()
        # Trial numbers are handed out atomically by the storage. If, counting the trials numbered
        # before ours, the budget is already taken (another worker asked at the same moment), give
        # the slot back, marked as surplus, so the study ends with exactly `trials` trials.
        before = [t for t in study.get_trials(deepcopy=False)
                  if t.number < trial.number and not is_surplus(t) and t.state in live_states]
        if len(before) >= trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        try:
            study.tell(trial, objective(trial))
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except (UserError, KeyboardInterrupt):
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:  # noqa: BLE001 - a diverged/failed trial does not stop the study
            print(f"trial {trial.number} failed: {type(e).__name__}: {e}", file=sys.stderr)
            trial.set_user_attr("error", str(e)[:500])
            study.tell(trial, state=TrialState.FAIL)
        bar.n = sum(t.state in done_states for t in study.get_trials(deepcopy=False))
        bar.refresh()
    bar.close()
    # Wait for the trials other workers still run (they may hold the best value), then save the best.
    _wait_for_running(study, poll_s=wait_poll_s)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not finished:
        raise UserError(f"study {study_name}: no trial completed", "see the trial errors above")
    best = max(finished, key=lambda t: t.value)
    n_done = sum(t.state in (*done_states, TrialState.FAIL) and not is_surplus(t)
                 for t in study.get_trials(deepcopy=False))
    trial_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False)
                  if t.datetime_complete and t.datetime_start and not is_surplus(t))
    reach = {FIRST_TASKS: f" of the first {tuning.first_tasks} task(s)",
             HELD_OUT_STREAM: " of a held-out stream"}.get(tuning.protocol, "")
    out = {"method": method, "scenario": scenario, "study": study_name, "params": dict(best.user_attrs["params"]),
           "value": best.value, "objective": f"final average accuracy ({setting}) on the validation split{reach}",
           "n_trials": n_done, "seeds": seeds, "best_trial": best.number, "trial_s": round(trial_s, 1),
           "tuning": tuning.as_dict()}
    atomic_write_json(best_params_path(results_dir, method, scenario), out)
    if sink and study_run:
        sink.log_params(study_run, {f"best.{k}": v for k, v in out["params"].items()})
        sink.log_metrics(study_run, {"best_value": best.value, "n_trials": n_done}, step=0)
    return out


def cmd_tune(args) -> int:
    from harness.orchestration.overrides import parse_sets, route_sets

    m_set, s_set, p_set = route_sets(parse_sets(args.set), args.method, args.scenario)
    if args.epochs is not None:
        p_set["epochs"] = args.epochs
    protocol = hparams_from(Protocol, p_set)
    protocol.validate()
    # Values the user fixes with --set win over the search space (protocol ones included).
    m_set = {**m_set, **{f"protocol.{k}": v for k, v in p_set.items()}}
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r} is not a comma-separated list of integers", "e.g. --seeds 0,1,2") \
            from None
    from harness.orchestration.suite import parse_seeds

    seeds = parse_seeds(seeds, "--seeds")
    tuning = tuning_from_args(args, None)
    out = tune(args.method, args.scenario, trials=args.trials, results_dir=Path(args.results),
               storage_url=args.storage, study_name=args.study, seeds=seeds, pruner=args.pruner, protocol=protocol,
               scenario_set=s_set, fixed=m_set, data_root=args.data_root, device=args.device,
               tracking_uri=args.tracking_uri, objective=args.objective, tuning=tuning)
    print(f"study {out['study']} (tuning protocol {tuning.slug}): {out['n_trials']} trials, "
          f"best validation final avg acc {out['value']:.4f}")
    print("best parameters: " + ", ".join(f"{k}={v}" for k, v in out["params"].items()))
    print(f"saved: {best_params_path(Path(args.results), args.method, args.scenario)}")
    return 0


# ---------------------------------------------------------------------------------------------
# Ablation grids
# ---------------------------------------------------------------------------------------------
class AblationFile(Document):
    """The structure of an ablation grid file (configs/ablation.yaml)."""

    name: str | None = None
    experiment: str | None = None
    method: str = "dmkd"
    scenario: str = "split-fmnist"
    scenario_options: dict[str, Any] | None = None
    seeds: Any = Field(default_factory=lambda: [0])  # parse_seeds
    protocol: dict[str, Any] | None = None
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(min_length=1)  # switch -> its values
    fixed: dict[str, Any] | None = None
    description: str | None = None


def load_ablation(path: str | Path) -> dict[str, Any]:
    from harness.core.yamlio import load_yaml_file
    from harness.orchestration.suite import parse_seeds
    from harness.orchestration.tracking import check_experiment_name

    path = Path(path)
    raw = load_yaml_file(path, "ablation file")
    doc = validate_document(AblationFile, raw, str(path), "see configs/ablation.yaml")
    raw = {**raw, "name": doc.name or path.stem, "method": doc.method, "scenario": doc.scenario}
    raw["experiment"] = doc.experiment or raw["name"]
    raw["seeds"] = parse_seeds(doc.seeds, str(path))
    check_experiment_name(str(raw["experiment"]))
    cls = resolve_method(raw["method"])
    for combo in _grid_cells(raw["grid"]):
        hparams_from(cls.HParams, {**(raw.get("fixed") or {}), **combo})
    return raw


def _grid_cells(grid: dict[str, list]) -> list[dict[str, Any]]:
    import itertools

    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def ablate(cfg: dict[str, Any], results_dir: Path, storage_url: str | None = None, tracking_uri: str | None = None,
           data_root: str | None = None, device: str = "auto", show_progress: bool = True,
           on_code_change: str = "refuse") -> list[dict[str, Any]]:
    """Run every grid cell (all seeds, test split) through GridSampler; cooperative across workers."""
    import optuna

    from harness.orchestration.suite import execute

    grid = cfg["grid"]
    storage = make_storage(storage_url, results_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.GridSampler({k: list(v) for k, v in grid.items()}, seed=0)
    study = create_study(study_name=f"ablation__{cfg['name']}", storage=storage, sampler=sampler,
                          direction="maximize")
    store = Store(results_dir, cfg["experiment"], tracking_uri)
    protocol = hparams_from(Protocol, cfg.get("protocol") or {})
    fixed = dict(cfg.get("fixed") or {})
    sink = store.mlflow
    parent = sink.find_or_create({"dmkd.kind": "suite", "dmkd.suite": f"ablation {cfg['name']}"},
                                 f"ablation {cfg['name']}") if sink else None
    setting = {}

    def objective(trial) -> float:
        combo = {k: trial.suggest_categorical(k, list(v)) for k, v in grid.items()}
        label = f"{cfg['method']}[" + ",".join(f"{k}={v}" for k, v in combo.items()) + "]"
        vals = []
        for seed in cfg["seeds"]:
            spec = RunSpec(cfg["method"], cfg["scenario"], int(seed), {**fixed, **combo},
                           dict(cfg.get("scenario_options") or {}), dataclasses.replace(protocol), label=label,
                           device=device, data_root=data_root)
            rec = store.load_record(spec.key())
            if rec is None or rec.get("status") != "finished":
                rec = execute(spec, store, parent, extra={"ablation": {"study": cfg["name"], "params": combo}},
                              on_code_change=on_code_change)
            if rec.get("status") != "finished":
                raise RuntimeError(rec.get("error", "run failed"))
            s = setting.setdefault("s", "class_il" if "class_il" in rec["metrics"] else "domain_il")
            vals.append(rec["metrics"][s]["final_avg_acc"])
        return sum(vals) / len(vals)

    n_cells = len(_grid_cells(grid))
    study.optimize(objective, n_trials=n_cells, show_progress_bar=show_progress,
                   callbacks=[optuna.study.MaxTrialsCallback(n_cells, states=(optuna.trial.TrialState.COMPLETE,))])
    return [r for r in store.records() if r.get("ablation", {}).get("study") == cfg["name"]]


def cmd_ablate(args) -> int:
    cfg = load_ablation(args.config)
    recs = ablate(cfg, Path(args.results), args.storage, args.tracking_uri, args.data_root, args.device,
                  on_code_change=args.on_code_change)
    from harness.orchestration.console import print_records

    print_records(recs)
    return 0


# ---------------------------------------------------------------------------------------------
# Tuning a whole suite: every method, the same budget, checked-in results
# ---------------------------------------------------------------------------------------------
SAMPLER = "optuna TPESampler"


def _wait_for_running(study, poll_s: float = 2.0) -> None:
    """Block while trials of this study run on other workers (a crashed worker's trial is failed by
    the storage's heartbeat where it has one; without one, its RUNNING trial is waited for)."""
    from optuna.trial import TrialState

    while True:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if not is_surplus(t)]
        if not running:
            return
        time.sleep(poll_s)


def _study_name(suite: str, scenario: str, row: str, trials: int, sampler_seed: int, shared: dict[str, Any]) -> str:
    """Readable study name plus a digest of everything its trials share (scenario options, protocol,
    fixed settings, seeds, pruner), so that a study made under another configuration is never continued."""
    from harness.engine.runner import _digest

    raw = f"tune-suite.{suite}.{scenario}.{row}.t{trials}.ss{sampler_seed}"
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in raw) + "." + _digest(shared)


def tune_suite(cfg, *, trials: int, results_dir: Path, out_dir: Path | None = None, seeds: list[int] | None = None,
               sampler_seed: int | list[int] = 0, pruner: str = "median", storage_url: str | None = None,
               data_root: str | None = None, device: str = "auto", tracking_uri: str | None = None,
               show_progress: bool = True, tuning: TuningProtocol | None = None, workers: int = 1,
               threads: int | None = 1, config_arg: str | None = None,
               scenario_arg: str | None = None) -> list[Path]:
    """Tune every method row of a suite on every scenario with one budget; write one file per scenario
    (and per sampler seed).

    Every row gets the same number of trials, the same sampler (TPE) with the same seed, the same
    pruner, the same seeds, the suite's protocol, the same tuning protocol (``tuning``, default the
    suite file's ``tuning:``, else end-of-stream) and the validation split only (tuning runs seal the
    test split); the search space is the method's own plus the learning rate (``Method.search_space``),
    and the row's ``set:`` values stay fixed.

    Reproducible: each (sampler seed, scenario, row) is one study run start to end by one process, its
    trials one after another, so TPE and the pruner see the same history on every rerun. ``workers``
    processes share the rows (never a study); ``threads`` torch threads each (float rounding depends on
    it, so it is part of the recorded command). The written files hold no time or place: rerunning the
    ``command:`` a file records, in a fresh results folder, writes the identical file. When and where it
    ran (date, wall time, storage) go to ``<scenario>.run.yaml`` beside it. Returns the written files.
    """
    from harness.engine.runner import git_revision
    from harness.orchestration.suite import protocol_from

    seeds = list(seeds if seeds else cfg.seeds[:1])
    sampler_seeds = [sampler_seed] if isinstance(sampler_seed, int) else list(sampler_seed)
    if not sampler_seeds or len(set(sampler_seeds)) != len(sampler_seeds):
        raise UserError(f"--sampler-seed {sampler_seeds} must list distinct seeds", "e.g. --sampler-seed 0,1,2")
    tuning = tuning or TuningProtocol.from_dict(getattr(cfg, "tuning", None))
    protocol_from(cfg.protocol)  # validate early
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}", "e.g. --workers 2")
    from harness.engine.runner import get_scenario

    for sc_name, sc_opts in cfg.scenarios:  # every tuning stream builds here, before any worker starts
        check_splits(get_scenario(RunSpec(cfg.methods[0][0], sc_name, seeds[0], scenario_set=dict(sc_opts),
                                          data_root=data_root, eval_split="val", stream=tuning.stream())), "val")
    revision = git_revision()  # the code the trials ran, read once (HEAD may move while tuning runs)
    # The memory budget of each scenario (planned on the evaluation stream's structure; None: none).
    budgets = {sc_name: cfg.budget_bytes(sc_name, dict(sc_opts)) for sc_name, sc_opts in cfg.scenarios}
    jobs = []
    for ss in sampler_seeds:
        for sc_name, sc_opts in cfg.scenarios:
            for m_name, label, overrides in cfg.methods:
                row = label or m_name
                shared = {"method": m_name, "scenario_set": dict(sc_opts), "protocol": dict(cfg.protocol),
                          "fixed": dict(overrides), "seeds": seeds, "pruner": pruner}
                if budgets[sc_name] is not None:
                    shared["budget_bytes"] = budgets[sc_name]
                if tuning.stream() is not None:  # end-of-stream studies keep the names they always had
                    shared["tuning"] = tuning.as_dict()
                jobs.append({"sampler_seed": ss, "scenario": sc_name, "scenario_set": dict(sc_opts), "method": m_name,
                             "row": row, "fixed": dict(overrides),
                             "study": _study_name(cfg.name, sc_name, row, trials, ss, shared),
                             "kwargs": {"trials": trials, "results_dir": Path(results_dir), "storage_url": storage_url,
                                        "seeds": seeds, "pruner": pruner, "protocol": protocol_from(cfg.protocol),
                                        "data_root": data_root, "device": device, "tracking_uri": tracking_uri,
                                        "show_progress": show_progress and workers == 1, "sampler_seed": ss,
                                        "tuning": tuning, "budget": budgets[sc_name]}, "threads": threads})
    results = _run_jobs(jobs, workers, threads)
    written = []
    for ss in sampler_seeds:
        where = Path(out_dir) / f"seed{ss}" if out_dir is not None and len(sampler_seeds) > 1 else (
            Path(out_dir) if out_dir is not None else tuned_dir(cfg, None, tuning, ss))
        for sc_name, sc_opts in cfg.scenarios:
            entries: dict[str, Any] = {}
            timing: dict[str, Any] = {}
            objective_text = ""
            for job, res in zip(jobs, results):
                if job["sampler_seed"] != ss or job["scenario"] != sc_name:
                    continue
                out = res["out"]
                objective_text = out["objective"]
                entries[job["row"]] = {
                    "method": job["method"], "fixed": dict(job["fixed"]), "params": _plain(out["params"]),
                    "provenance": {"trials": int(out["n_trials"]), "best_validation_score": float(out["value"]),
                                   "best_trial": int(out["best_trial"]), "study": job["study"],
                                   "objective": out["objective"], "git_revision": revision}}
                timing[job["row"]] = {"date": res["date"], "wall_s": res["wall_s"], "trial_s": out["trial_s"],
                                      "storage": storage_url or str(Path(results_dir) / "optuna.db")}
            command = (f"dmkd tune-suite {config_arg or cfg.source or cfg.name} --protocol {tuning.protocol}"
                       + (f" --first-tasks {tuning.first_tasks}" if tuning.protocol == FIRST_TASKS else "")
                       + f" --trials {trials} --sampler-seed {ss} --seeds {','.join(map(str, seeds))}"
                       f" --pruner {pruner} --threads {threads}" + (f" --out {where}" if out_dir is not None else "")
                       + (f" --budget {cfg.budget_memory or 'none'}" if getattr(cfg, "budget_overridden", False)
                          else "")
                       + (f" --scenario {scenario_arg}" if scenario_arg else ""))
            doc = {"suite": cfg.name, "scenario": sc_name, "scenario_options": dict(sc_opts),
                   "protocol": dict(cfg.protocol), "tuning": tuning.as_dict(),
                   "tuning_note": tuning.describe(), "trials": trials, "sampler": SAMPLER,
                   "sampler_seed": ss, "pruner": pruner, "seeds": seeds, "torch_threads": threads,
                   "split": "validation (test split sealed)", "objective": objective_text,
                   "budget_memory": getattr(cfg, "budget_memory", None), "budget_bytes": budgets[sc_name],
                   "search": "each method's search_space plus protocol.lr",
                   "reproduce": "one study per row, its trials in sequence; rerun the command in a fresh results "
                                "folder (any --workers) and the same code writes this file again, byte for byte",
                   "command": command, "entries": entries}
            written.append(_write_yaml(tuned_file(where, sc_name), doc,
                                       "# Written by `dmkd tune-suite`; do not edit by hand (re-run the command "
                                       "instead).\n"))
            _write_yaml(tuned_file(where, sc_name).with_suffix(".run.yaml"),
                        {"tuned_file": tuned_file(where, sc_name).name, "workers": workers, "rows": timing},
                        "# When and where `dmkd tune-suite` made the tuned file beside this one (not part of "
                        "the result).\n")
    return written


def _write_yaml(path: Path, doc: dict[str, Any], header: str) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    import os

    import torch

    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(n)
    torch.set_num_threads(n)


def _tune_job(job: dict[str, Any]) -> dict[str, Any]:
    """One row's whole study, in this process (a worker of tune_suite or the caller itself)."""
    from datetime import UTC, datetime

    _set_threads(job["threads"])
    t0 = time.perf_counter()
    _warn_if_continued(job)
    out = tune(job["method"], job["scenario"], study_name=job["study"], scenario_set=job["scenario_set"],
               fixed=job["fixed"], **job["kwargs"])
    wall = round(time.perf_counter() - t0, 1)
    print(f"{job['scenario']} / {job['row']} (sampler seed {job['sampler_seed']}, {job['kwargs']['tuning'].slug}): "
          f"best validation {out['value']:.4f} after {out['n_trials']} trials ({wall:.0f} s): "
          + ", ".join(f"{k}={v}" for k, v in out["params"].items()), file=sys.stderr, flush=True)
    return {"out": out, "wall_s": wall, "date": datetime.now(UTC).isoformat(timespec="seconds")}


def _warn_if_continued(job: dict[str, Any]) -> None:
    """A study that already holds trials is read back or continued, not made afresh: its file is what
    that study gives, which a fresh run reproduces only if the study ran start to end in one process."""
    import optuna

    kw = job["kwargs"]
    try:
        old = optuna.load_study(study_name=job["study"], storage=make_storage(kw["storage_url"], kw["results_dir"]))
    except KeyError:
        return
    if old.trials:
        print(f"note: study {job['study']} already holds {len(old.trials)} trial(s) in this storage; they are "
              "reused (a fresh --results folder tunes afresh)", file=sys.stderr)


def _run_jobs(jobs: list[dict[str, Any]], workers: int, threads: int | None) -> list[dict[str, Any]]:
    """Every job's result, in job order: in this process, or spread over ``workers`` processes (each
    job, i.e. each study, runs whole in one of them)."""
    if workers == 1 or len(jobs) <= 1:
        previous = None
        if threads is not None:
            import torch

            previous = torch.get_num_threads()
        try:
            return [_tune_job(j) for j in jobs]
        finally:
            if previous is not None:
                import torch

                torch.set_num_threads(previous)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_threads, initargs=(threads,)) as pool:
        return list(pool.map(_tune_job, jobs))


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Numbers as plain Python (YAML-safe) values."""
    out = {}
    for k, v in params.items():
        out[k] = v.item() if hasattr(v, "item") else v
    return out


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        out = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of integers", f"e.g. {flag} 0,1,2") from None
    if not out or any(v < 0 for v in out):
        raise UserError(f"{flag} {text!r} must list integers >= 0", f"e.g. {flag} 0,1,2")
    return out


def cmd_tune_suite(args) -> int:
    from harness.orchestration.suite import load_suite

    from harness.engine.budget import use_probe_cache

    use_probe_cache(Path(args.results) / "budget_probes.json")
    cfg = load_suite(args.config, getattr(args, "budget", None))
    if args.data_root:
        cfg.data_root = args.data_root
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}", "ask for at least one trial")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()] if args.seeds else None
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r} is not a comma-separated list of integers", "e.g. --seeds 0") \
            from None
    if getattr(args, "scenario", None):
        names = [n for n, _ in cfg.scenarios]
        if args.scenario not in names:
            raise UserError(f"--scenario {args.scenario!r} is not in {args.config}", f"choose one of: {', '.join(names)}")
        cfg.scenarios = [(n, o) for n, o in cfg.scenarios if n == args.scenario]
    sampler_seeds = parse_int_list(args.sampler_seed, "--sampler-seed")
    tuning = tuning_from_args(args, cfg)
    threads = getattr(args, "threads", 1)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}", "e.g. --threads 1")
    try:
        workers = int(getattr(args, "workers", 1))
    except ValueError:
        raise UserError(f"--workers {args.workers!r} is not a whole number", "e.g. --workers 2") from None
    paths = tune_suite(cfg, trials=args.trials, results_dir=Path(args.results), out_dir=args.out, seeds=seeds,
                       sampler_seed=sampler_seeds, pruner=args.pruner, storage_url=args.storage,
                       data_root=cfg.data_root, device=args.device, tracking_uri=args.tracking_uri, tuning=tuning,
                       workers=workers, threads=threads, config_arg=args.config,
                       scenario_arg=getattr(args, "scenario", None))
    for p in paths:
        print(f"tuned settings ({tuning.slug}): {p}")
    return 0


__all__ = ["ablate", "best_params_path", "load_best_params", "load_tuned_suite", "tune", "tune_suite", "tuned_dir"]
