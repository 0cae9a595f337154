"""The machine-state probe: copy bandwidth with its noise band, the CPU's name, JSON-ready output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnbench.bench.machine import probe
from bnbench.envinfo import cpu_name


def test_the_probe_measures_copy_bandwidth_and_names_the_cpu():
    state = probe("cpu", nbytes=1 << 20)
    copy = state["copy"]
    assert 0 < copy["gbps_lo"] <= copy["gbps"] <= copy["gbps_hi"] and len(copy["samples_ms"]) >= 5
    assert state["cpu"]["name"] == cpu_name() and state["unavailable"] == []
    json.dumps(state)  # JSON-ready


def test_the_cpu_is_named_by_its_model_not_its_architecture():
    info = Path("/proc/cpuinfo")
    models = (
        [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        if info.exists()
        else []
    )
    if not models:
        pytest.skip("no model name in /proc/cpuinfo on this machine")
    assert cpu_name() == models[0] != "x86_64"


@pytest.mark.parametrize(
    ("cache", "expected"), [(None, 64 << 20), (32 << 20, 64 << 20), (480 << 20, 480 << 20), (4 << 30, 512 << 20)]
)
def test_the_cpu_copy_outgrows_the_last_level_cache(monkeypatch, cache, expected):
    import torch

    from bnbench import envinfo
    from bnbench.bench.bandwidth import default_copy_bytes

    monkeypatch.setattr(envinfo, "cpu_cache_bytes", lambda: cache)
    assert (
        default_copy_bytes(torch.device("cpu")) == expected
    )  # a 64 MiB copy inside a 480 MiB cache measured the cache
    assert default_copy_bytes(torch.device("cuda")) == 256 << 20


def test_the_cache_size_is_read_from_sysfs():
    from bnbench.envinfo import cpu_cache_bytes

    sysfs = Path("/sys/devices/system/cpu/cpu0/cache")
    if not sysfs.is_dir():
        pytest.skip("no sysfs cache information on this machine")
    sizes = [p.read_text().strip() for p in sysfs.glob("index*/size")]
    assert cpu_cache_bytes() >= max(int(s.rstrip("KMG")) for s in sizes) << 10


def test_env_names_the_cpu_and_its_cache():
    from bnbench.envinfo import format_text

    info = {"bnbench_version": "0", "git_sha": None, "python_version": "3", "torch_version": "2", "numpy_version": "2",
            "triton_version": None, "triton_interpreter": False, "backends": {},
            "device": {"type": "cpu", "name": "Intel(R) Xeon(R) Processor", "cores": 2, "cache_bytes": 480 << 20}}  # fmt: skip
    assert "CPU Intel(R) Xeon(R) Processor (2 cores, 480 MiB last-level cache)" in format_text(info)


def test_gpu_state_reads_each_nvml_field_on_its_own(monkeypatch):
    import sys
    import types

    from bnbench.bench import machine

    fake = types.ModuleType("pynvml")
    fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM, fake.NVML_TEMPERATURE_GPU = 0, 1, 0
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    fake.nvmlDeviceGetClockInfo = lambda handle, kind: (1980, 2619)[kind]
    fake.nvmlDeviceGetMaxClockInfo = lambda handle, kind: 1980
    fake.nvmlDeviceGetTemperature = lambda handle, kind: 41
    fake.nvmlDeviceGetPowerUsage = lambda handle: 123_000

    def refused(handle):
        raise RuntimeError("NVML_ERROR_NO_PERMISSION")

    fake.nvmlDeviceGetEnforcedPowerLimit = refused
    fake.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: 0x4 | 0x40
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    unavailable: list[str] = []
    state = machine._nvml_state(0, unavailable)
    assert state["sm_clock_mhz"] == 1980 and state["mem_clock_mhz"] == 2619 and state["power_w"] == 123.0
    assert state["throttle_reasons"] == ["hw_thermal", "sw_power_cap"]
    assert state["power_limit_w"] is None and unavailable == ["power_limit_w: RuntimeError: NVML_ERROR_NO_PERMISSION"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: said, not guessed
    unavailable.clear()
    assert machine._nvml_state(0, unavailable) == {} and "pynvml is not installed" in unavailable[0]
