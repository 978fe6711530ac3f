"""Energy of a run, with codecarbon (optional: minimal installs and the GPU machine may lack it).

codecarbon reads GPU power through NVML (a measurement) and the CPU through RAPL where the kernel
exposes it (a measurement) or from the CPU's TDP times its load (an estimate); RAM is always an
estimate from its size. Each run records the total energy in kWh, the parts, and a label saying
whether the total rests on a measurement (``measured (NVML)`` / ``measured (RAPL)``) or is an
estimate (``estimated (CPU: cpu_load)``). Without codecarbon, a CUDA run still gets the GPU's own
energy counter through NVML (nvidia-ml-py, ``nvmlDeviceGetTotalEnergyConsumption``), labelled
``measured (NVML, GPU only)``; otherwise the energy is recorded as unavailable.
"""

from __future__ import annotations

import logging
import os
from typing import Any

MEASURED_CPU_MODES = frozenset({"intel_rapl", "intel_power_gadget", "apple_powermetrics"})


class EnergyMeter:
    """Context manager: ``result`` holds the energy record after exit ({} fields None when unavailable)."""

    def __init__(self, enabled: bool = True, interval_s: float = 5.0, device: Any = None) -> None:
        self.enabled = enabled and os.environ.get("DMKD_ENERGY", "1") not in ("0", "off", "false")
        self.interval_s = interval_s
        self.device = device
        self._tracker: Any = None
        self._nvml: tuple[Any, int] | None = None  # (device handle, energy in mJ at the start)
        self.result: dict[str, Any] = {"energy_kwh": None, "energy_kind": "unavailable (codecarbon not installed)"}

    def __enter__(self) -> EnergyMeter:  # noqa: PYI034
        if not self.enabled:
            self.result["energy_kind"] = "disabled (DMKD_ENERGY=0)"
            return self
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            self._start_nvml()
            return self
        try:
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self._tracker = OfflineEmissionsTracker(
                country_iso_code="USA", output_methods=[], log_level="error",  # no emissions.csv
                measure_power_secs=self.interval_s, tracking_mode="process", allow_multiple_runs=True,
            )
            self._tracker.start()
        except Exception as e:  # noqa: BLE001 - energy is a by-product; it must never cost the run
            self._tracker = None
            self.result["energy_kind"] = f"unavailable (codecarbon failed: {type(e).__name__})"
        return self

    def _start_nvml(self) -> None:
        """GPU energy counter of the run's device (Volta and newer), when nvidia-ml-py is there."""
        if self.device is None or getattr(self.device, "type", "") != "cuda":
            return
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(self.device)
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
            except Exception:  # noqa: BLE001 - older drivers / MIG: fall back to the index
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            self._nvml = (handle, int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
        except Exception as e:  # noqa: BLE001 - energy must never cost the run
            self.result["energy_kind"] = f"unavailable (no codecarbon; NVML failed: {type(e).__name__})"

    def __exit__(self, *exc: object) -> None:
        if self._nvml is not None:
            import pynvml

            handle, start_mj = self._nvml
            try:
                kwh = (int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) - start_mj) / 3.6e9
            except Exception as e:  # noqa: BLE001
                self.result["energy_kind"] = f"unavailable (NVML failed: {type(e).__name__})"
                return
            self.result = {"energy_kwh": kwh, "energy_gpu_kwh": kwh, "energy_kind": "measured (NVML, GPU only)",
                           "energy_tool": "nvidia-ml-py"}
            return
        if self._tracker is None:
            return
        try:
            self._tracker.stop()
            d = self._tracker.final_emissions_data
            modes = {type(h).__name__: getattr(h, "_mode", None) for h in self._tracker._hardware}
        except Exception as e:  # noqa: BLE001
            self.result["energy_kind"] = f"unavailable (codecarbon failed: {type(e).__name__})"
            return
        self.result = {
            "energy_kwh": float(d.energy_consumed),
            "energy_cpu_kwh": float(d.cpu_energy),
            "energy_gpu_kwh": float(d.gpu_energy),
            "energy_ram_kwh": float(d.ram_energy),
            "energy_kind": energy_kind(modes),
            "energy_tool": f"codecarbon {getattr(d, 'codecarbon_version', '')}".strip(),
        }


def energy_kind(modes: dict[str, Any]) -> str:
    """The label of a codecarbon reading from its hardware list ({class name: CPU mode})."""
    if any(name.startswith("GPU") for name in modes):
        return "measured (NVML)"
    cpu_mode = modes.get("CPU") or modes.get("AppleSiliconChip")
    if cpu_mode in MEASURED_CPU_MODES:
        return "measured (RAPL)" if cpu_mode == "intel_rapl" else f"measured ({cpu_mode})"
    return f"estimated (CPU: {cpu_mode or 'constant'})"
