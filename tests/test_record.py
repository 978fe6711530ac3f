"""The typed run record (harness/engine/record.py): exact round trip of a real runner record, field-named
errors for malformed records, the formatter of each kind on hand-computed values, and columns of the
registry appearing in the terminal table and the report."""

from __future__ import annotations

import copy
import json

import pytest

from harness.core.errors import UserError
from harness.engine.record import (
    BYTES,
    COUNT,
    ENERGY_KWH,
    FLOPS,
    FRACTION,
    RATE,
    RATIO,
    SECONDS,
    SETTING,
    SIGNED_FRACTION,
    TRAFFIC_BYTES,
    Column,
    RunRecord,
    lookup,
    register,
    unregister,
)
from harness.engine.runner import RunObserver, RunSpec, run
from harness.orchestration.console import print_records
from reports.build import make_report
from reports.load import load_json_records
from tests.conftest import needs_fmnist

SMALL = {"max_train_per_task": 200, "max_test_per_task": 100}
MLP_PARAMS = 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10  # the default MLP backbone: 478,410
MLP_MACS = 784 * 400 + 400 * 400 + 400 * 10  # per sample; FLOPs = 2 x MACs (harness/engine/costs.py)


class _AddsSuiteFields(RunObserver):
    """What the suite's observer does at the start: add fields of its own to the record."""

    def on_start(self, record):
        record.update({"suite": "s", "worker": "w1"})


@pytest.fixture(scope="module")
def real_record() -> dict:
    return run(RunSpec("ft", "split-fmnist", 0, scenario_set=dict(SMALL)), observer=_AddsSuiteFields())


@needs_fmnist
def test_a_runner_record_round_trips_exactly(real_record):
    d = real_record
    rec = RunRecord.from_dict(d)
    out = rec.to_dict()
    assert out == d
    assert json.dumps(out) == json.dumps(d)  # same keys in the same order, ints stay ints
    assert list(d)[list(d).index("started_at") + 1:][:2] == ["suite", "worker"]  # the observer's fields kept
    assert rec.model_extra == {"suite": "s", "worker": "w1"}
    # Every field the runner writes is declared in the model (none slipped in as an unknown key).
    assert rec.config.model_extra == {} and rec.costs.model_extra == {}
    assert all(p.model_extra == {} for p in rec.per_task) and all(t.model_extra == {} for t in rec.tasks)
    assert all(m.model_extra == {} for m in rec.metrics.values())
    assert rec.costs.params_total == MLP_PARAMS and rec.per_task[0].params_total == MLP_PARAMS
    assert rec.costs.inference_flops_per_sample == 2 * MLP_MACS
    assert rec.status == "finished" and rec.settings == ["class_il", "task_il"] and rec.n_tasks == 5
    assert [t.n_train for t in rec.tasks] == [180] * 5  # 200 per task, 10% held out for validation


def test_absent_fields_stay_absent_and_key_order_is_kept():
    d = {"key": "k", "method": "ft", "label": "ft", "scenario": "split-fmnist", "seed": 0, "status": "failed",
         "error": "TrainingDiverged: loss is nan", "worker": "w", "failed_at": "2026-01-01T00:00:00"}
    rec = RunRecord.from_dict(d)
    assert rec.to_dict() == d and list(rec.to_dict()) == list(d)
    assert rec.costs is None and rec.metrics is None and rec.tuned is False  # defaults, not written
    assert "costs" not in rec.to_dict() and "tuned" not in rec.to_dict()


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d["costs"].update(params_total="many"), "costs.params_total"),
    (lambda d: d.pop("key"), "key"),
    (lambda d: d["per_task"][0].update(task=1.5), "per_task.0.task"),
    (lambda d: d["metrics"]["class_il"].pop("final_avg_acc"), "metrics.class_il.final_avg_acc"),
    (lambda d: d["acc"]["class_il"][0].__setitem__(0, "0.9"), "acc.class_il.0.0"),
    (lambda d: d.update(seed="0"), "seed"),
])
def test_a_malformed_record_is_a_user_error_naming_the_field(change, field):
    d = _small_record()
    RunRecord.from_dict(d)  # the unchanged record is fine
    bad = copy.deepcopy(d)
    change(bad)
    with pytest.raises(UserError) as e:
        RunRecord.from_dict(bad, "x.json")
    assert f"malformed run record x.json: field {field}:" in e.value.problem


def test_a_malformed_record_file_stops_the_report_with_the_file_and_field(tmp_path):
    runs = tmp_path / "results" / "e" / "runs"
    runs.mkdir(parents=True)
    bad = _small_record()
    bad["costs"]["train_flops_total"] = "lots"
    (runs / "r.json").write_text(json.dumps(bad))
    with pytest.raises(UserError) as e:
        load_json_records(tmp_path / "results", "e")
    assert str(runs / "r.json") in e.value.problem and "costs.train_flops_total" in e.value.problem


def test_each_kind_formats_hand_computed_values():
    assert COUNT.fmt(478410) == "478 k" and COUNT.fmt(656595) == "657 k" and COUNT.fmt(12) == "12"
    assert FLOPS.fmt(126641025280.0) == "127 GFLOP" and FLOPS.fmt(1.2087e12) == "1.21 TFLOP"
    assert FLOPS.fmt(955200) == "955 kFLOP"
    assert BYTES.fmt(1920086016) == "1.79 GiB"  # 1920086016 / 2^30 = 1.788
    assert BYTES.fmt(3 * 2**20) == "3 MiB" and BYTES.fmt(11492645) == "11 MiB"  # 10.96 MiB
    assert TRAFFIC_BYTES.fmt(2.5e6) == "2.5 MB" and TRAFFIC_BYTES.fmt(0) == "0 B"
    assert SECONDS.fmt(6.309266) == "6.31 s" and SECONDS.fmt(38.1693) == "38.2 s"
    assert RATE.fmt(8558.84) == "8.56 k/s"
    assert RATIO.fmt(1.0) == "1" and RATIO.fmt(2.3456) == "2.35"
    assert FRACTION.fmt(0.8161) == "0.816" and FRACTION.fmt(-1e-9) == "0.000"  # never "-0.000"
    assert SIGNED_FRACTION.fmt(-0.069875) == "-0.070" and SIGNED_FRACTION.fmt(0.067625) == "+0.068"
    assert ENERGY_KWH.fmt(3.4356e-5) == "0.0344 Wh" and ENERGY_KWH.fmt(2.0) == "2 kWh"
    for kind in (COUNT, FLOPS, BYTES, SECONDS, FRACTION, SIGNED_FRACTION, ENERGY_KWH):
        assert kind.fmt(None) == "–" and kind.fmt(float("nan")) == "–"


def test_lookup_reads_dicts_and_models_alike():
    d = _small_record()
    rec = RunRecord.from_dict(d)
    for path in (("costs", "params_total"), ("metrics", SETTING, "bwt"), ("config", "protocol")):
        assert lookup(d, path, "class_il") == lookup(rec, path, "class_il") is not None
    assert lookup(d, ("costs", "nothing")) is None and lookup(d, ("metrics", SETTING, "bwt")) is None


@needs_fmnist
def test_terminal_table_writes_each_column_by_its_kind(real_record, capsys):
    print_records([real_record])
    out = capsys.readouterr().out
    c = real_record["costs"]
    assert "478 k" in out and "478410.0000" not in out  # params
    assert f"{c['train_flops_total'] / 1e9:.3g} GFLOP" in out  # FLOPs with their unit, not raw GFLOP floats
    assert f"{c['footprint_bytes'] / 2**20:.3g} MiB" in out and f"{c['train_time_s']:.3g} s" in out
    m = real_record["metrics"]["class_il"]
    assert f"{m['final_avg_acc']:.3f}" in out and f"{m['bwt']:+.3f}" in out
    header = out.splitlines()[0].split()
    assert header[:4] == ["seeds", "final_acc", "±95%", "avg_inc_acc"] and "train_FLOPs" in header


@pytest.fixture
def extra_columns():
    """A new cost column and a new metric column, registered as a contributor would."""
    register(Column("inference_flops", "Inference FLOPs/sample", ("costs", "inference_flops_per_sample"), FLOPS,
                    short="infer_FLOPs"))
    register(Column("last_task_acc", "Last-task acc.", ("acc", SETTING), FRACTION, metric=True,
                    get=lambda r, s: lookup(r, ("acc", s))[-1][-1]), before="passes_per_task")
    yield
    unregister("inference_flops")
    unregister("last_task_acc")


@needs_fmnist
def test_a_registered_column_appears_in_the_terminal_table_and_the_report(real_record, extra_columns, capsys,
                                                                          tmp_path):
    last = real_record["acc"]["class_il"][-1][-1]
    print_records([real_record])
    out = capsys.readouterr().out
    assert "infer_FLOPs" in out.splitlines()[0] and "last_task_acc" in out.splitlines()[0]
    assert "955 kFLOP" in out and f"{last:.3f}" in out  # 2 x 477,600 MACs per sample
    md = make_report([real_record], tmp_path, figures=False)["markdown"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Rank"))
    assert "| Inference FLOPs/sample |" in header and "| Last-task acc. |" in header
    cells = dict(zip(header.split(" | "), next(line for line in md.splitlines()
                                               if line.startswith("| 1 | ft")).split(" | ")))
    assert cells["Inference FLOPs/sample"] == "955 kFLOP" and cells["Last-task acc."] == f"{last:.3f}"


def test_without_the_extra_columns_the_tables_do_not_show_them(tmp_path, capsys):
    print_records([_small_record()])
    assert "infer_FLOPs" not in capsys.readouterr().out
    md = make_report([_small_record()], tmp_path, figures=False)["markdown"].read_text()
    assert "Inference FLOPs/sample" not in md and "| Params |" in md


def _small_record() -> dict:
    """A finished two-task record in the runner's shape (numbers by hand, not measured)."""
    R = [[0.9, 0.1], [0.7, 0.8]]
    return {
        "key": "ft__split-fmnist__s0__abc", "config_hash": "abc", "config_group": "def", "method": "ft",
        "label": "ft", "scenario": "split-fmnist", "setting": "class", "settings": ["class_il"], "seed": 0,
        "status": "finished", "tuned": False, "tuned_trials": 0, "eval_split": "test", "synthetic_data": False,
        "config": {"method": "ft", "hparams": {}, "scenario": "split-fmnist", "scenario_options": {},
                   "protocol": {"epochs": 1, "batch_size": 128, "backbone": "mlp"}, "seed": 0, "data_root": None,
                   "synthetic_data": None, "env": {"python": "3.11.7"}},
        "n_tasks": 2, "tasks": [{"id": t, "name": f"task {t}", "classes": [2 * t, 2 * t + 1], "n_train": 10,
                                 "n_val": 0, "n_test": 5} for t in range(2)],
        "acc": {"class_il": R}, "random_init_acc": {"class_il": [0.5, 0.5]},
        "per_task": [{"task": t, "train_s": 1.0, "eval_s": 0.5, "train_samples": 10, "params_total": MLP_PARAMS,
                      "passes": 1.0, "avg_acc": {"class_il": 0.9}} for t in range(2)],
        "method_metrics": [], "artifacts": {}, "started_at": "2026-01-01T00:00:00",
        "costs": {"params_total": MLP_PARAMS, "train_flops_total": 2.0e9, "peak_memory_bytes": 2**30,
                  "peak_memory_kind": "vmhwm_reset", "footprint_bytes": 3 * 2**20, "train_time_s": 2.0,
                  "eval_time_s": 1.0, "passes_per_task": 1.0, "comm_bytes": 0},
        "metrics": {"class_il": {"final_avg_acc": 0.75, "avg_inc_acc": 0.825, "forgetting": 0.2, "bwt": -0.2,
                                 "fwt": -0.4}},
        "finished_at": "2026-01-01T00:01:00",
    }
