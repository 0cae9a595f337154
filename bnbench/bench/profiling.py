"""Per-kernel profile of one case and provider with torch.profiler: what launches, how long each kernel takes,
how much of the wall time is launch overhead, and (for bnbench's Triton kernels) the launch configuration,
registers and spills, and each kernel's bandwidth for the bytes it must move.

Pure computation: returns dataclasses and DataFrames; the profiler object is kept so the CLI can export its Chrome
trace. On CPU there are no kernels: the profile lists the aten operators per call and says what it cannot show.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from typing import Any

import pandas as pd
import torch

from bnbench.bench.bytes_model import ELEMENT_SIZE, bytes_min
from bnbench.bench.cases import Case
from bnbench.bench.providers import Provider
from bnbench.bench.workload import build_pass, make_inputs

__all__ = [
    "TRITON_KERNEL_TENSOR_PASSES",  # noqa: F822 (a lazy module attribute: see __getattr__)
    "KernelStat",
    "ProviderProfile",
    "case_flags",
    "format_markdown",
    "kernels_frame",
    "minimal_bytes",
    "ncu_command",
    "profile_provider",
    "shell_join",
    "triton_launch_configs",
]


def _kernel_tensor_passes() -> dict[str, int]:
    """Full-tensor passes each of bnbench's Triton kernels makes when it streams (reads + writes of x, y, dy, dx),
    from the kernel registry; the combine kernels touch only per-channel partials and are not listed."""
    from bnbench.kernels import KERNELS

    return {spec.name: spec.tensor_passes for spec in KERNELS if spec.tensor_passes is not None}


def __getattr__(name: str):
    # TRITON_KERNEL_TENSOR_PASSES reads the kernel registry, which imports triton: computed on first use, so that
    # importing the profiler does not import triton (and fix the interpreter switch) before a Triton path runs.
    if name == "TRITON_KERNEL_TENSOR_PASSES":
        return _kernel_tensor_passes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class KernelStat:
    """One kernel (GPU) or aten operator (CPU), per call of the pass: launches, time, and bandwidth if its
    bytes are known."""

    name: str
    launches_per_call: float
    us_per_call: float  # total time of this kernel per call of the pass
    bytes_per_launch: float | None = None
    gbps: float | None = None


@dataclasses.dataclass
class ProviderProfile:
    provider: str
    status: str  # ok | skipped | error
    message: str = ""
    wall_us_per_call: float = float("nan")  # under the profiler: its own overhead is included
    device_us_per_call: float = float("nan")  # sum of kernel times (GPU only)
    kernels: list[KernelStat] = dataclasses.field(default_factory=list)
    launch_configs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    profiler: Any = None  # torch.profiler.profile, for the Chrome trace

    @property
    def launches_per_call(self) -> float:
        return sum(k.launches_per_call for k in self.kernels)

    @property
    def launch_overhead_us(self) -> float:
        """Wall time not covered by kernel time: launch and framework overhead (GPU only)."""
        return self.wall_us_per_call - self.device_us_per_call


def _device_time_us(evt) -> float:
    return float(evt.time_range.end - evt.time_range.start)


def _gpu_kernels(prof, iters: int, case: Case) -> tuple[list[KernelStat], float]:
    from torch.autograd import DeviceType

    T = case.numel * ELEMENT_SIZE[case.dtype]
    tensor_passes = _kernel_tensor_passes()
    totals: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            entry = totals.setdefault(evt.name, [0, 0.0])
            entry[0] += 1
            entry[1] += _device_time_us(evt)
    stats = []
    for name, (count, total_us) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        passes = next((p for k, p in tensor_passes.items() if k in name), None)
        nbytes = passes * T if passes is not None else None
        per_launch_us = total_us / count
        rate = nbytes / (per_launch_us * 1e-6) / 1e9 if nbytes and per_launch_us > 0 else None
        stats.append(KernelStat(name, count / iters, total_us / iters, nbytes, rate))
    return stats, sum(k.us_per_call for k in stats)


def _cpu_ops(prof, iters: int, top: int = 15) -> list[KernelStat]:
    """The operators and regions (aten ops; for compile, the compiled graph's call) by self CPU time per call."""
    rows = [
        KernelStat(evt.key, evt.count / iters, evt.self_cpu_time_total / iters)
        for evt in prof.key_averages()
        if evt.self_cpu_time_total > 0 and not evt.key.startswith(("ProfilerStep", "[memory]"))
    ]
    return sorted(rows, key=lambda k: -k.us_per_call)[:top]


def triton_launch_configs() -> list[dict[str, Any]]:
    """Every compiled variant of bnbench's Triton kernels in this process: block sizes (constexprs), warps,
    stages, shared memory, registers and spills, as far as this Triton version exposes them."""
    from bnbench.kernels import KERNELS

    out = []
    for spec in KERNELS:
        arg_names = list(getattr(spec.fn, "arg_names", []))
        for entry in getattr(spec.fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for compiled in cache.values():
                out.append(_describe_compiled(spec.name, compiled, arg_names))
    return out


def _describe_compiled(name: str, compiled, arg_names: list[str]) -> dict[str, Any]:
    md = getattr(compiled, "metadata", None)

    def meta(key):
        return md.get(key) if isinstance(md, dict) else getattr(md, key, None)

    constants = getattr(getattr(compiled, "src", None), "constants", {}) or {}
    named = {}
    for key, value in constants.items():
        index = key[0] if isinstance(key, tuple) and key else key
        label = arg_names[index] if isinstance(index, int) and index < len(arg_names) else str(index)
        if label.isupper():  # BLOCK_SIZE_*, ACTIVATION, HAS_*: the constexprs
            named[label] = value
    return {
        "kernel": name,
        "constexprs": named,
        "num_warps": meta("num_warps"),
        "num_stages": meta("num_stages"),
        "shared_bytes": meta("shared"),
        "registers": getattr(compiled, "n_regs", None),
        "spills": getattr(compiled, "n_spills", None),
    }


def profile_provider(
    case: Case, provider: Provider, device: torch.device, *, iters: int = 10, warmup: int = 3, seed: int = 0
) -> ProviderProfile:
    """Profile ``iters`` calls of the case's pass with ``provider`` after warm-up (compile happens there)."""
    from torch.profiler import ProfilerActivity, profile

    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    result = ProviderProfile(provider.name, "ok")
    if provider.name.startswith("triton") and device.type != "cuda":
        result.status = "skipped"
        result.message = (
            "no CUDA device: the Triton kernels run on CPU only in the interpreter, which simulates every program "
            "in numpy; a profile of it would show numpy, not kernels"
        )
        return result
    reason = provider.skip_reason(case, device)
    if reason:
        result.status, result.message = "skipped", reason
        return result
    try:
        inp = make_inputs(case, device, seed)
        run = build_pass(case, provider.make(case), inp)
        run.prepare()
        for _ in range(max(1, warmup)):
            inp.zero_grads()
            run.call()
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(iters):
                inp.zero_grads()
                run.call()
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
        result.profiler = prof
        result.wall_us_per_call = elapsed / iters * 1e6
        if cuda:
            result.kernels, result.device_us_per_call = _gpu_kernels(prof, iters, case)
            if provider.name.startswith("triton"):
                result.launch_configs = triton_launch_configs()
        else:
            result.kernels = _cpu_ops(prof, iters)
            result.notes.append(
                "CPU: rows are operators and compiled regions (self CPU time per call), not kernels; GPU kernel times, launch "
                "overhead (wall minus GPU time), Triton launch configurations, registers and spills need CUDA"
            )
    except KeyboardInterrupt:
        raise
    except Exception as err:
        result.status, result.message = "error", f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
    return result


def kernels_frame(case: Case, profiles: list[ProviderProfile]) -> pd.DataFrame:
    """One row per (provider, kernel): launches and time per call, bytes and GB/s where known."""
    rows = []
    for p in profiles:
        for k in p.kernels:
            rows.append({
                "provider": p.provider, "case": case.label(), "kernel": k.name,
                "launches_per_call": k.launches_per_call, "us_per_call": k.us_per_call,
                "bytes_per_launch": k.bytes_per_launch, "gbps": k.gbps,
            })  # fmt: skip
    columns = ["provider", "case", "kernel", "launches_per_call", "us_per_call", "bytes_per_launch", "gbps"]
    return pd.DataFrame(rows, columns=columns)


def case_flags(case: Case) -> list[str]:
    """The ``bnbench profile`` flags that select exactly this case."""
    spatial = "1" if case.op == "bn1d" else f"{case.H}x{case.W}"
    return [
        "--batch", str(case.N), "--width", str(case.C), "--spatial", spatial, "--dtype", case.dtype,
        "--activation", case.activation, "--pass", case.pass_, "--layout", case.layout,
    ]  # fmt: skip


def ncu_command(case: Case, providers: list[str], report_path: str) -> list[str]:
    """An Nsight Compute command profiling this case's kernels: time, DRAM bytes read and written (the real
    bytes, to compare with the minimal-bytes model), registers, grid and block sizes."""
    metrics = ",".join([
        "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
        "launch__registers_per_thread", "launch__grid_size", "launch__block_size", "launch__occupancy_limit_registers",
    ])  # fmt: skip
    return [
        "ncu", "--target-processes", "all", "--metrics", metrics, "--csv", "--log-file", report_path,
        sys.executable, "-m", "bnbench", "profile", *case_flags(case), "--providers", ",".join(providers),
        "--iters", "1", "--warmup", "1", "--no-trace",
    ]  # fmt: skip


def shell_join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def minimal_bytes(case: Case) -> int:
    return bytes_min(case.pass_, case.numel, case.dtype)


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None or value != value else format(value, fmt)


def format_markdown(case: Case, device: torch.device, profiles: list[ProviderProfile]) -> str:
    """The profile as markdown: one section per provider (summary line, kernel table, launch configurations)."""
    nbytes = minimal_bytes(case)
    cuda = device.type == "cuda"
    lines = [
        f"# Profile: {case.label()}",
        "",
        f"Device: {device}. Minimal bytes for this pass: {nbytes / 1e6:.2f} MB (bytes model: fwd 2T, bwd 3T, "
        "fwd_bwd 5T, eval 2T). Wall times are taken under the profiler (its overhead included); `bnbench bench` "
        "gives clean times.",
    ]
    for p in profiles:
        lines += ["", f"## {p.provider}", ""]
        if p.status != "ok":
            lines.append(f"{p.status}: {p.message}")
            continue
        if cuda:
            eff = nbytes / (p.device_us_per_call * 1e-6) / 1e9 if p.device_us_per_call > 0 else float("nan")
            lines.append(
                f"{p.launches_per_call:.1f} kernel launches per call; GPU time {_num(p.device_us_per_call)} us, "
                f"wall time {_num(p.wall_us_per_call)} us per call, so launch and framework overhead "
                f"{_num(p.launch_overhead_us)} us; effective bandwidth over GPU time {_num(eff)} GB/s."
            )
            header = "| kernel | launches/call | us/call | bytes/launch (model) | GB/s |"
        else:
            lines.append(
                f"wall time {_num(p.wall_us_per_call)} us per call; the operators and regions with the most self "
                "CPU time:"
            )
            header = "| operator or region | calls/call | self CPU us/call | bytes | GB/s |"
        lines += ["", header, "|---|---|---|---|---|"]
        for k in p.kernels:
            lines.append(
                f"| `{k.name[:90]}` | {k.launches_per_call:.2f} | {_num(k.us_per_call, '.2f')} | "
                f"{_num(k.bytes_per_launch, '.3g')} | {_num(k.gbps)} |"
            )
        if cuda and any(k.bytes_per_launch is None for k in p.kernels):
            lines += ["", "Kernels without a byte count are not bnbench's: their real bytes need `--ncu`."]
        if p.launch_configs:
            lines += ["", "| Triton kernel | constexprs | warps | stages | shared B | registers | spills |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for cfg in p.launch_configs:
                consts = ", ".join(f"{k}={v}" for k, v in cfg["constexprs"].items())
                lines.append(
                    f"| `{cfg['kernel']}` | {consts} | {cfg['num_warps']} | {cfg['num_stages']} | "
                    f"{cfg['shared_bytes']} | {cfg['registers']} | {cfg['spills']} |"
                )
        lines += ["", *(f"Note: {n}" for n in p.notes)] if p.notes else []
    return "\n".join(lines) + "\n"
