"""Energy per run (codecarbon, optional), its label, and the report's Energy column beside FLOPs."""

from __future__ import annotations

import importlib.util

import pytest

from harness.engine.energy import EnergyMeter, energy_kind
from harness.engine.runner import RunSpec, run
from reports.tables import display_frame, leaderboards
from tests.conftest import TINY, needs_fmnist


def test_energy_kind_labels():
    assert energy_kind({"RAM": None, "CPU": "cpu_load", "GPU": None}) == "measured (NVML)"
    assert energy_kind({"RAM": None, "CPU": "intel_rapl"}) == "measured (RAPL)"
    assert energy_kind({"RAM": None, "CPU": "cpu_load"}) == "estimated (CPU: cpu_load)"
    assert energy_kind({"RAM": None, "CPU": "constant"}) == "estimated (CPU: constant)"


def test_meter_without_codecarbon_records_unavailable(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import fails as on a minimal install
    with EnergyMeter() as e:
        pass
    assert e.result == {"energy_kwh": None, "energy_kind": "unavailable (codecarbon not installed)"}


@needs_fmnist
@pytest.mark.skipif(importlib.util.find_spec("codecarbon") is None, reason="codecarbon not installed")
def test_run_records_energy_and_report_shows_it_beside_flops():
    rec = run(RunSpec("ft", "split-fmnist", 0, scenario_set=dict(TINY)))
    c = rec["costs"]
    assert c["energy_kwh"] > 0 and c["energy_kind"].startswith(("estimated (CPU", "measured"))
    assert c["energy_kwh"] == pytest.approx(c["energy_cpu_kwh"] + c["energy_gpu_kwh"] + c["energy_ram_kwh"])
    frame = display_frame(leaderboards([rec])[0])
    cols = list(frame.columns)
    assert cols[cols.index("Train FLOPs") + 1] == "Energy"
    assert frame["Energy"][0].endswith("Wh (estimated)") or frame["Energy"][0].endswith("Wh (measured)")


def test_gpu_energy_from_nvml_counter_without_codecarbon(monkeypatch):
    import sys
    import types

    import torch

    readings = iter([1_000, 3_601_000])  # mJ: 3,600 J apart = 0.001 kWh
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: ("handle", uuid),
        nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings),
    )
    monkeypatch.setitem(sys.modules, "codecarbon", None)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="abc"))
    with EnergyMeter(device=torch.device("cuda", 0)) as e:
        pass
    assert e.result["energy_kwh"] == pytest.approx(0.001) and e.result["energy_kind"] == "measured (NVML, GPU only)"


def test_precision_runs_get_their_own_table():
    from reports.tables import table_key

    def rec(**proto):
        return {"scenario": "s", "config": {"protocol": {"backbone": "mlp", "epochs": 1, "batch_size": 8, **proto}}}

    assert table_key(rec()) == table_key(rec(precision="fp32", channels_last=False))  # old records = fp32
    assert table_key(rec(precision="bf16")) != table_key(rec(precision="fp32"))
    assert table_key(rec(channels_last=True)) != table_key(rec())
