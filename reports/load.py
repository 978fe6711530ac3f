"""Run records from the JSON files under ``results/<experiment>/runs`` or from an MLflow store.

A record is the dict returned by ``harness.engine.runner.run`` (and written as JSON by the tracking code),
the dict form of ``harness.engine.record.RunRecord``; each one read is checked against that model.
Each loaded record gets an ``experiment`` field naming where it came from.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.core.errors import UserError
from harness.engine.record import MAX_LABEL, RunRecord, bounded_label

RECORD_ARTIFACT = "record.json"
PROGRESS_FROM = 200  # records: a report reading this many shows its progress


def _read_json(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"run record {path} is unreadable or corrupt ({type(exc).__name__})",
                        "delete that file and re-run the run (the suite resumes missing runs)") from None
    if not isinstance(rec, dict) or "key" not in rec or "scenario" not in rec:
        raise UserError(f"{path} is not a run record (no 'key'/'scenario' field)",
                        "keep only run records in results/<experiment>/runs")
    RunRecord.from_dict(rec, str(path))  # its fields have the record's types, or a UserError names the field
    return rec


def experiment_dirs(results_dir: Path, experiment: str | None) -> list[Path]:
    """Folders ``results_dir/<name>`` holding a ``runs`` folder (only ``experiment`` when given)."""
    if experiment is not None:
        d = results_dir / experiment
        if not (d / "runs").is_dir():
            found = ", ".join(p.name for p in experiment_dirs(results_dir, None)) or "none"
            raise UserError(f"no experiment {experiment!r} under {results_dir} (found: {found})",
                            "pass one of the found names to --experiment, or run the suite first")
        return [d]
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist", "run a suite first or pass --results PATH")
    return sorted(p for p in results_dir.iterdir() if (p / "runs").is_dir())


def load_json_records(results_dir: str | Path, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every ``results_dir/<experiment>/runs/*.json`` record (all experiments when None)."""
    import sys

    from tqdm.auto import tqdm

    files = [(d, f) for d in experiment_dirs(Path(results_dir), experiment) for f in sorted((d / "runs").glob("*.json"))
             if not f.name.startswith(".")]  # a name starting with "." is a temporary file a killed writer left
    records = []
    for d, f in tqdm(files, desc="report: reading records", unit="record", file=sys.stderr,
                     disable=len(files) < PROGRESS_FROM, mininterval=1.0):
        rec = _read_json(f)
        rec.setdefault("experiment", d.name)
        records.append(rec)
    return records


def load_mlflow_records(tracking_uri: str, experiment: str | None = None,
                        known_run_ids: frozenset[str] = frozenset(),
                        complete: set[str] | None = None) -> list[dict[str, Any]]:
    """Records stored as the ``record.json`` artifact of each MLflow run (parent runs have none).

    Runs in ``known_run_ids`` are skipped: their record was already read from its JSON file (which the
    run writes after every task, so it is never older than the artifact), and each download costs a
    round trip to the store, unless MLflow has not marked the run ended (a run cut off by an outage:
    its artifact is read, or found missing). ``complete``, when given, receives the ids of the runs
    MLflow holds in full (ended and known, or with their record). MLflow is imported here, not at
    module level: importing it takes seconds.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exps = client.search_experiments()
    except MlflowException as exc:
        raise UserError(f"cannot open the MLflow store {tracking_uri} ({str(exc).splitlines()[0][:120]})",
                        "check --tracking-uri, or omit it to read the JSON records") from None
    if experiment is not None:
        exps = [e for e in exps if e.name == experiment]
        if not exps:
            raise UserError(f"no MLflow experiment named {experiment!r} in {tracking_uri}",
                            "check --experiment (names are those of the suites)")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for exp in exps:
            token = None
            while True:
                page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
                for r in page:
                    if r.info.run_id in known_run_ids and r.info.status in ("FINISHED", "FAILED"):
                        if complete is not None:
                            complete.add(r.info.run_id)
                        continue
                    try:
                        local = mlflow.artifacts.download_artifacts(
                            run_id=r.info.run_id, artifact_path=RECORD_ARTIFACT,
                            dst_path=str(Path(tmp) / r.info.run_id), tracking_uri=tracking_uri)
                    except (MlflowException, OSError):
                        continue  # a parent run (suite, study) or a run that died before its record
                    rec = _read_json(Path(local))
                    rec.setdefault("experiment", exp.name)
                    records.append(rec)
                    if complete is not None:
                        complete.add(r.info.run_id)
                token = page.token
                if not token:
                    break
    return records


def latest_per_key(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (experiment, key): a finished one if any, else the most recently started."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        k = (str(rec.get("experiment", "")), str(rec["key"]))
        old = best.get(k)
        rank = (rec.get("status") == "finished", str(rec.get("finished_at") or rec.get("started_at") or ""))
        if old is None or rank > (old.get("status") == "finished",
                                  str(old.get("finished_at") or old.get("started_at") or "")):
            best[k] = rec
    return list(best.values())


def load_records(results_dir: str | Path = "results", experiment: str | None = None,
                 tracking_uri: str | None = None, missing: list[str] | None = None) -> list[dict[str, Any]]:
    """Records from the JSON files and, when ``tracking_uri`` is given, from MLflow too (runs made
    with tracking off are in the JSON files only; runs of other machines may be in MLflow only);
    one record per run. ``missing``, when given, receives the keys (``experiment/key``) of the
    finished or failed JSON records that MLflow lacks."""
    json_records: list[dict[str, Any]] = []
    json_error: UserError | None = None
    try:
        json_records = load_json_records(results_dir, experiment)
    except UserError as e:
        json_error = e
    records: list[dict[str, Any]] = []
    mlflow_error: UserError | None = None
    complete: set[str] = set()
    if tracking_uri:
        known = frozenset(str(r["mlflow_run_id"]) for r in json_records if r.get("mlflow_run_id"))
        try:
            records = load_mlflow_records(tracking_uri, experiment, known, complete)
        except UserError as e:  # the JSON records may still hold the runs
            mlflow_error = e
    if json_error is not None and not records:
        if mlflow_error is not None:
            raise mlflow_error from None
        raise json_error
    if tracking_uri and missing is not None and mlflow_error is None:
        in_mlflow = {(str(r.get("experiment")), str(r["key"])) for r in records}
        missing += sorted(f"{r['experiment']}/{r['key']}" for r in json_records
                          if r.get("status") in ("finished", "failed")
                          and str(r.get("mlflow_run_id")) not in complete
                          and (str(r["experiment"]), str(r["key"])) not in in_mlflow)
    records += json_records
    if not records:
        where = f"experiment {experiment!r}" if experiment else str(results_dir)
        raise UserError(f"no run records found in {where}", "run a suite first (dmkd suite configs/quick.yaml)")
    return distinct_rows(latest_per_key(records))


def distinct_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of one label and scenario but different configurations (two suites of one experiment
    that differ in a protocol field, say) must not be averaged as seeds of one row: each such
    configuration gets its own label, suffixed with its configuration hash. Runs whose settings were
    tuned under different tuning protocols or sampler seeds (``tuning``) keep their label: the tables
    keep them apart (a table per protocol, sampler seeds in the tuning-spread column)."""
    groups: dict[tuple[str, str, str, str], set[str]] = {}

    def key(r: dict[str, Any]) -> tuple[str, str, str, str]:
        return (str(r.get("experiment")), str(r.get("scenario")), str(r.get("label")),
                json.dumps(r.get("tuning"), sort_keys=True))

    for r in records:
        groups.setdefault(key(r), set()).add(str(r.get("config_group", "")))
    out = []
    for r in records:
        k = key(r)
        if len(groups[k]) > 1:
            r = dict(r, label=f"{r.get('label')} [{str(r.get('config_group', ''))[:6] or 'old'}]")
        if r.get("label") is not None and len(str(r["label"])) > MAX_LABEL:  # a record older than the bound
            r = dict(r, label=bounded_label(str(r["label"])))
        out.append(r)
    return out
