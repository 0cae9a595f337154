"""Did the machine change between two runs? Copy bandwidth bands, device and GPU clocks/throttling, compared
before any time ratio is called a regression.

Each run's machine is read from its ``results.json``: ``machine.before``/``machine.after`` (probes written by the
harness, ``bnbench.bench.machine``; a resumed run's earlier sessions' probes too, from ``previous_runs``), else the run's start-of-run copy bandwidth samples (older files), else the
``peak_copy_gbps`` column (one number, no noise band). A run's copy band spans every probe's p20-p80 band, so a
machine that drifted during the run has a wide band.

The machines *differ* when the copy bands do not overlap (one number each: when they are more than
``NO_BAND_TOLERANCE`` apart), when the device names differ, or when a GPU's SM clock moved or it was throttled
(thermal, power) in one run only. Then ``slowdown`` is the most the machine change alone can explain: the
baseline's best copy bandwidth over the candidate's worst (at least 1), and the SM clock ratio on a GPU. The
comparison calls a timed point a regression only when its slowdown exceeds ``slowdown * (1 + threshold)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["NO_BAND_TOLERANCE", "MachineCheck", "RunMachine", "check_machines", "run_machine"]

#: two single copy-bandwidth numbers (no samples) further apart than this mean different machine states
NO_BAND_TOLERANCE = 0.10
#: SM clocks further apart than this (relative) mean different machine states
CLOCK_TOLERANCE = 0.03
#: NVML throttle reasons that slow a kernel (idle and application clocks are not slowdowns)
_SLOWING = ("sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")


@dataclasses.dataclass(frozen=True)
class RunMachine:
    """What is known of one run's machine: device, copy band (GB/s), where the numbers came from, GPU state."""

    device: str
    copy_lo: float
    copy_gbps: float
    copy_hi: float
    source: str
    sm_clock_mhz: tuple[float, ...] = ()
    throttled: tuple[str, ...] = ()
    load_avg: tuple[float, ...] = ()

    @property
    def has_band(self) -> bool:
        return self.copy_hi > self.copy_lo


@dataclasses.dataclass(frozen=True)
class MachineCheck:
    """The verdict on two runs' machines: whether they differ, why, and the slowdown the change can explain."""

    differs: bool
    slowdown: float
    reasons: tuple[str, ...]
    table: pd.DataFrame


def _band_from_samples(samples, nbytes) -> tuple[float, float, float] | None:
    times = np.asarray([s for s in samples or () if isinstance(s, (int, float))], dtype=float)
    times = times[np.isfinite(times) & (times > 0)]
    if not times.size or not isinstance(nbytes, (int, float)) or nbytes <= 0:
        return None
    p20, p50, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    to_gbps = 2 * nbytes / 1e6  # ms -> GB/s
    return to_gbps / p80, to_gbps / p50, to_gbps / p20


def _probes(meta: dict[str, Any]) -> list[dict]:
    """Every machine probe of a run: those of the sessions a --resume continued (``previous_runs``), then its own."""
    machines = [r.get("machine") for r in meta.get("previous_runs") or () if isinstance(r, dict)]
    machines.append(meta.get("machine"))
    return [m[k] for m in machines if isinstance(m, dict) for k in ("before", "after") if isinstance(m.get(k), dict)]


def run_machine(frame: pd.DataFrame, meta: dict[str, Any]) -> RunMachine:
    """One run's machine from its results frame and sidecar (see the module docstring for the sources)."""
    names = [str(v) for v in dict.fromkeys(frame["device_name"].dropna())]
    device = ", ".join(names) or "unknown device"
    probes = _probes(meta)
    bands = []
    for p in probes:
        copy = p.get("copy") or {}
        values = [copy.get(k) for k in ("gbps_lo", "gbps", "gbps_hi")]
        if all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in values):
            bands.append(tuple(float(v) for v in values))
    if bands:
        source = "results.json machine probes (" + ", ".join(p.get("utc", "?") for p in probes) + ")"
        gpus = [p.get("gpu") or {} for p in probes]
        clocks = tuple(float(g["sm_clock_mhz"]) for g in gpus if isinstance(g.get("sm_clock_mhz"), (int, float)))
        throttled = tuple(sorted({r for g in gpus for r in g.get("throttle_reasons") or () if r in _SLOWING}))
        loads = tuple(
            float(p["cpu"]["load_avg_1m"])
            for p in probes
            if isinstance((p.get("cpu") or {}).get("load_avg_1m"), (int, float))
        )
        return RunMachine(
            device, min(b[0] for b in bands), float(np.median([b[1] for b in bands])), max(b[2] for b in bands),
            source, clocks, throttled, loads,
        )  # fmt: skip
    copy = meta.get("copy_bandwidth") or {}
    band = _band_from_samples(copy.get("samples_ms"), copy.get("nbytes_each_way"))
    if band is not None:
        return RunMachine(device, *band, "results.json copy_bandwidth samples (start of run only)")
    values = pd.to_numeric(frame["peak_copy_gbps"], errors="coerce").dropna()
    values = values[np.isfinite(values) & (values > 0)]
    if values.empty:
        return RunMachine(device, np.nan, np.nan, np.nan, "not recorded")
    return RunMachine(device, float(values.min()), float(values.median()), float(values.max()), "peak_copy_gbps column")


def _overlap(a: RunMachine, b: RunMachine) -> bool:
    if a.has_band and b.has_band:
        return a.copy_lo <= b.copy_hi and b.copy_lo <= a.copy_hi
    return abs(a.copy_gbps - b.copy_gbps) <= NO_BAND_TOLERANCE * max(a.copy_gbps, b.copy_gbps)


def _fmt(values) -> str:
    """Probe values before -> after (once when equal)."""
    return " -> ".join(dict.fromkeys(f"{v:.4g}" for v in values))


def check_machines(baseline: RunMachine, candidate: RunMachine) -> MachineCheck:
    """Whether the two runs' machines differ beyond their noise, why, and the slowdown that alone explains."""
    reasons: list[str] = []
    slowdown = 1.0
    known = np.isfinite([baseline.copy_gbps, candidate.copy_gbps]).all()
    if baseline.device != candidate.device:
        reasons.append(f"different devices ({baseline.device} vs {candidate.device})")
    if known and not _overlap(baseline, candidate):
        reasons.append(
            f"copy bandwidth {baseline.copy_gbps:.4g} GB/s (band {baseline.copy_lo:.4g}-{baseline.copy_hi:.4g}) in "
            f"the baseline vs {candidate.copy_gbps:.4g} GB/s (band {candidate.copy_lo:.4g}-{candidate.copy_hi:.4g}) "
            "in the candidate: the bands do not overlap"
        )
        slowdown = max(slowdown, baseline.copy_hi / candidate.copy_lo)
    if baseline.sm_clock_mhz and candidate.sm_clock_mhz:
        fast, slow = max(baseline.sm_clock_mhz), min(candidate.sm_clock_mhz)
        spread = max(
            abs(fast - min(candidate.sm_clock_mhz)), abs(max(candidate.sm_clock_mhz) - min(baseline.sm_clock_mhz))
        )
        if spread > CLOCK_TOLERANCE * fast:
            reasons.append(
                f"SM clock {_fmt(baseline.sm_clock_mhz)} MHz in the baseline vs {_fmt(candidate.sm_clock_mhz)} MHz "
                "in the candidate"
            )
            slowdown = max(slowdown, fast / slow)
    if set(baseline.throttled) != set(candidate.throttled):
        reasons.append(
            f"GPU throttling: baseline {', '.join(baseline.throttled) or 'none'}, candidate "
            f"{', '.join(candidate.throttled) or 'none'}"
        )
    rows = [
        ("device", baseline.device, candidate.device),
        ("copy bandwidth GB/s (median)", baseline.copy_gbps, candidate.copy_gbps),
        ("copy bandwidth band GB/s", f"{baseline.copy_lo:.4g}-{baseline.copy_hi:.4g}",
         f"{candidate.copy_lo:.4g}-{candidate.copy_hi:.4g}"),
        ("SM clock MHz", _fmt(baseline.sm_clock_mhz), _fmt(candidate.sm_clock_mhz)),
        ("throttle reasons", ", ".join(baseline.throttled), ", ".join(candidate.throttled)),
        ("CPU load (1 min)", _fmt(baseline.load_avg), _fmt(candidate.load_avg)),
        ("recorded in", baseline.source, candidate.source),
    ]  # fmt: skip
    rows = [r for r in rows if r[1] != "" or r[2] != ""]  # a CPU run has no GPU clocks to show
    table = pd.DataFrame(rows, columns=["machine", "baseline", "candidate"])
    if not known:
        reasons_unknown = "copy bandwidth not recorded in one of the runs: the machine cannot be checked"
        table.loc[len(table)] = ["note", reasons_unknown, ""]
    return MachineCheck(bool(reasons), float(slowdown), tuple(reasons), table)
