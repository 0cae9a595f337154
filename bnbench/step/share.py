"""The share of a training step spent in BatchNorm and activation work, from torch.profiler.

With CUDA: the time of every GPU kernel (and copy) during the profiled steps; a kernel counts as BatchNorm or
activation work when its name says so (:data:`BN_ACT_PATTERN`: cuDNN's ``bn_fw``/``bn_bw``/``batchnorm``
kernels, PyTorch's ``batch_norm_*`` kernels, Inductor's ``triton_*_fused_*batch_norm*``/``*relu*`` kernels,
bnbench's ``_bn_act_*`` kernels, ReLU's ``clamp_min``/``threshold`` kernels and the other activations). An
Inductor kernel that fuses an activation with a residual add counts whole.

On CPU: the self CPU time of every operator; the BatchNorm and activation operators by the same names. A
torch.compile'd network runs its generated C++ kernels inside one region that the profiler does not break down,
so there the share cannot be measured and is left empty, saying why.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import torch

__all__ = ["BN_ACT_PATTERN", "Share", "is_bn_act", "measure_share"]

BN_ACT_PATTERN = re.compile(
    r"batch_?norm|bn_fw|bn_bw|_bn_act_|welford|relu|threshold|clamp_min|silu|sigmoid|tanh|gelu", re.IGNORECASE
)
_SKIP = ("ProfilerStep", "[memory]")


def is_bn_act(name: str) -> bool:
    return BN_ACT_PATTERN.search(name) is not None


@dataclasses.dataclass(frozen=True)
class Share:
    """BatchNorm + activation milliseconds per step, their share of the step's measured time, and a note."""

    bn_act_ms: float
    share: float
    note: str = ""


def _cuda_share(prof, steps: int) -> Share:
    from torch.autograd import DeviceType

    total = matched = 0.0
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            us = float(evt.time_range.end - evt.time_range.start)
            total += us
            matched += us if is_bn_act(evt.name) else 0.0
    if total <= 0:
        return Share(math.nan, math.nan, "the profiler recorded no GPU kernels")
    return Share(matched / steps / 1e3, matched / total, "share of GPU kernel time")


def _cpu_share(prof, steps: int) -> Share:
    total = matched = 0.0
    for evt in prof.key_averages():
        if evt.key.startswith(_SKIP):
            continue
        total += evt.self_cpu_time_total
        matched += evt.self_cpu_time_total if is_bn_act(evt.key) else 0.0
    if total <= 0:
        return Share(math.nan, math.nan, "the profiler recorded no CPU operators")
    return Share(matched / steps / 1e3, matched / total, "share of operators' self CPU time")


def measure_share(step: Callable[[], object], device: torch.device, *, steps: int = 2, compiled: bool) -> Share:
    """Profile ``steps`` calls of ``step`` (after the timed ones: never inside the timed region)."""
    if steps < 1:
        raise ValueError(f"profile steps must be >= 1, got {steps}")
    if device.type != "cuda" and compiled:
        return Share(math.nan, math.nan, "CPU: torch.compile's generated kernels run in one region the profiler "
                     "does not break down; the BN + activation share needs CUDA (kernel names)")  # fmt: skip
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    return _cuda_share(prof, steps) if cuda else _cpu_share(prof, steps)
