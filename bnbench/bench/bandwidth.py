"""Peak copy bandwidth of the device, measured at the start of every run: the yardstick for effective bandwidth.

A large tensor is copied into another (``dst.copy_(src)``); bandwidth = bytes read + bytes written over the time.
On a GPU the copy is timed with do_bench (L2 flushed, CUDA events) and is large enough (256 MiB each way) to
stream from HBM. On CPU it is timed with the wall clock, each side as large as the last-level cache (at least
64 MiB, at most 512 MiB), so source and destination together do not fit in it and the copy streams from memory:
a server CPU's cache can hold hundreds of MiB, and a copy that fits measures the cache, not the memory.
"""

from __future__ import annotations

import dataclasses

import torch

from bnbench.bench.timing import Timing, time_cuda_events, time_wall

__all__ = ["CopyBandwidth", "default_copy_bytes", "measure_copy_bandwidth"]


@dataclasses.dataclass(frozen=True)
class CopyBandwidth:
    """The measured copy bandwidth: ``gbps`` from the median time; ``nbytes`` is one side of the copy."""

    device: str
    nbytes: int
    timing: Timing

    @property
    def gbps(self) -> float:
        return 2 * self.nbytes / (self.timing.ms_p50 * 1e-3) / 1e9


#: bounds of one side of the CPU copy (see the module docstring)
CPU_COPY_MIN, CPU_COPY_MAX = 64 << 20, 512 << 20


def default_copy_bytes(device: torch.device) -> int:
    """One side of the copy: 256 MiB on CUDA; on CPU the last-level cache's size within [64 MiB, 512 MiB]."""
    if device.type == "cuda":
        return 256 << 20
    from bnbench.envinfo import cpu_cache_bytes

    cache = cpu_cache_bytes() or 0
    return min(max(cache, CPU_COPY_MIN), CPU_COPY_MAX) // 4 * 4


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None) -> CopyBandwidth:
    """Copy ``nbytes`` (default :func:`default_copy_bytes`) from one buffer to another and time it."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = default_copy_bytes(device)
    if nbytes < 4 or nbytes % 4:
        raise ValueError(f"nbytes must be a positive multiple of 4, got {nbytes}")
    src = torch.full((nbytes // 4,), 1.5, dtype=torch.float32, device=device)  # values do not matter; pages do
    dst = torch.empty_like(src)
    if device.type == "cuda":
        timing = time_cuda_events(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200)
    else:
        timing = time_wall(lambda: dst.copy_(src), warmup=2, min_samples=5, max_samples=50, budget_s=0.3)
    return CopyBandwidth(device.type, nbytes, timing)
