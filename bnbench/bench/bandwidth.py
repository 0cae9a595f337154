"""Peak copy bandwidth of the device, measured at the start of every run: the yardstick for effective bandwidth.

A large tensor is copied into another (``dst.copy_(src)``); bandwidth = bytes read + bytes written over the time.
On a GPU the copy is timed with do_bench (L2 flushed, CUDA events) and is large enough (256 MiB each way) to
stream from HBM; on CPU it is a 64 MiB copy (bigger than any last-level cache) timed with the wall clock.
"""

from __future__ import annotations

import dataclasses

import torch

from bnbench.bench.timing import Timing, time_cuda_events, time_wall

__all__ = ["CopyBandwidth", "measure_copy_bandwidth"]


@dataclasses.dataclass(frozen=True)
class CopyBandwidth:
    """The measured copy bandwidth: ``gbps`` from the median time; ``nbytes`` is one side of the copy."""

    device: str
    nbytes: int
    timing: Timing

    @property
    def gbps(self) -> float:
        return 2 * self.nbytes / (self.timing.ms_p50 * 1e-3) / 1e9


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None) -> CopyBandwidth:
    """Copy ``nbytes`` (default 256 MiB on CUDA, 64 MiB on CPU) from one buffer to another and time it."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (256 << 20) if device.type == "cuda" else (64 << 20)
    if nbytes < 4 or nbytes % 4:
        raise ValueError(f"nbytes must be a positive multiple of 4, got {nbytes}")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        timing = time_cuda_events(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200)
    else:
        timing = time_wall(lambda: dst.copy_(src), warmup=2, min_samples=5, max_samples=50, budget_s=0.3)
    return CopyBandwidth(device.type, nbytes, timing)
