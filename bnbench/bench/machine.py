"""The state of the machine at one moment: copy bandwidth with its noise band, the device, the CPU's load, and on a
GPU its clocks, temperature, power and throttle reasons (through NVML, via ``pynvml`` when it imports).

The harness probes before and after every run and records both in ``results.json`` (``machine.before``,
``machine.after``); ``bnbench report --baseline A --candidate B`` compares the two runs' machines before it calls
anything a regression (``bnbench.report.machine``). A probe returns plain JSON-ready data; a field that cannot be
read here is ``None`` and ``unavailable`` says why, never a guess.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch

from bnbench.bench.bandwidth import measure_copy_bandwidth
from bnbench.envinfo import cpu_name

__all__ = ["copy_band", "copy_record", "probe"]


def copy_band(copy) -> dict[str, float]:
    """Copy bandwidth (GB/s) at the median time and at the p80/p20 times: its run-to-run noise band."""
    nbytes, timing = copy.nbytes, copy.timing

    def gbps(ms: float) -> float:
        return 2 * nbytes / (ms * 1e-3) / 1e9

    return {"gbps": gbps(timing.ms_p50), "gbps_lo": gbps(timing.ms_p80), "gbps_hi": gbps(timing.ms_p20)}


def copy_record(copy) -> dict[str, Any]:
    """A copy-bandwidth measurement as results.json records it: the band, one side's bytes, the raw samples."""
    return {**copy_band(copy), "nbytes_each_way": copy.nbytes, "samples_ms": list(copy.timing.samples_ms)}


def _cpu_state() -> dict[str, Any]:
    state: dict[str, Any] = {"name": cpu_name(), "cores": os.cpu_count()}
    try:
        state["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        state["load_avg_1m"] = None
    return state


#: NVML's clock-throttle reason bits, by the names results.json records
_THROTTLE_BITS = {
    "gpu_idle": 0x1, "applications_clocks": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8, "sync_boost": 0x10,
    "sw_thermal": 0x20, "hw_thermal": 0x40, "hw_power_brake": 0x80,
}  # fmt: skip


def _reason_names(bits: int) -> list[str]:
    return sorted(name for name, bit in _THROTTLE_BITS.items() if bits & bit)


def _nvml_state(index: int, unavailable: list[str]) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        unavailable.append("clocks, temperature, power and throttle reasons: pynvml is not installed")
        return {}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as err:  # no NVML library or no permission: say so, measure the rest
        unavailable.append(f"NVML: {type(err).__name__}: {err}")
        return {}
    reads = {
        "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        "max_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
        "throttle_reasons": lambda: _reason_names(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
    }
    state: dict[str, Any] = {}
    for name, read in reads.items():  # each field on its own: one the driver refuses does not lose the others
        try:
            state[name] = read()
        except Exception as err:
            state[name] = None
            unavailable.append(f"{name}: {type(err).__name__}: {err}")
    return state


def _gpu_state(device: torch.device, unavailable: list[str]) -> dict[str, Any]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    state: dict[str, Any] = {"name": props.name, "index": index}
    state.update(_nvml_state(index, unavailable))
    return state


def probe(device: torch.device | str, *, nbytes: int | None = None) -> dict[str, Any]:
    """Measure and read the machine's state now: UTC time, device, copy bandwidth band, CPU load, and on CUDA
    the GPU's clocks, temperature, power and throttle reasons. JSON-ready."""
    device = torch.device(device)
    unavailable: list[str] = []
    copy = measure_copy_bandwidth(device, nbytes)
    state: dict[str, Any] = {
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "copy": copy_record(copy),
        "cpu": _cpu_state(),
    }
    if device.type == "cuda":
        state["gpu"] = _gpu_state(device, unavailable)
    state["unavailable"] = unavailable
    return state
