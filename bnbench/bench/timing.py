"""Timers: CUDA events through ``triton.testing.do_bench`` on a GPU, the wall clock on CPU, and the Triton
interpreter (which is never timed: its simulated kernels run in numpy, so a time would mean nothing), and a
fixed-count timer for the ``--world-size`` benchmark.

Every timer returns a :class:`Timing` holding the raw samples (milliseconds); the statistics reported are the
20th, 50th and 80th percentiles (linear interpolation, as ``torch.quantile`` and do_bench's quantiles compute).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["Timing", "interpreter_timing", "time_cuda_events", "time_cuda_graph", "time_fixed", "time_wall"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Raw samples of one timed point, in milliseconds, and the timer that took them."""

    timer: str  # one of bnbench.schema.BENCH_TIMERS
    samples_ms: tuple[float, ...]

    def quantile(self, q: float) -> float:
        if not self.samples_ms:
            return math.nan
        return float(np.quantile(np.asarray(self.samples_ms, dtype=np.float64), q))

    @property
    def ms_p20(self) -> float:
        return self.quantile(0.2)

    @property
    def ms_p50(self) -> float:
        return self.quantile(0.5)

    @property
    def ms_p80(self) -> float:
        return self.quantile(0.8)

    @property
    def n_samples(self) -> int:
        return len(self.samples_ms)


def interpreter_timing() -> Timing:
    """The Triton interpreter: correctness only, no samples (every statistic is NaN)."""
    return Timing("interpreter", ())


def time_wall(
    fn: Callable[[], object],
    *,
    reset: Callable[[], None] | None = None,
    sync: Callable[[], None] | None = None,
    warmup: int = 3,
    warmup_s: float = 0.1,
    min_samples: int = 10,
    max_samples: int = 200,
    budget_s: float = 0.3,
) -> Timing:
    """Wall-clock samples of ``fn`` (one call each) after at least ``warmup`` calls and ``warmup_s`` seconds of
    warm-up (thread pools and caches wake up; on a shared machine the first calls can be 100x slower): at least ``min_samples``, then more
    until ``budget_s`` seconds of samples or ``max_samples``. ``reset`` runs before every call, outside the timed
    region (e.g. to drop accumulated gradients); ``sync`` runs inside it, after the call (device work)."""
    if warmup < 0 or warmup_s < 0 or min_samples < 1 or max_samples < min_samples or budget_s < 0:
        raise ValueError(
            f"bad timing settings: warmup={warmup}, warmup_s={warmup_s}, min_samples={min_samples}, max_samples={max_samples}, "
            f"budget_s={budget_s}"
        )
    calls, warm_start = 0, time.perf_counter()
    while calls < warmup or time.perf_counter() - warm_start < warmup_s:
        if reset is not None:
            reset()
        fn()
        if sync is not None:
            sync()
        calls += 1
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_samples or (spent < budget_s and len(samples) < max_samples):
        if reset is not None:
            reset()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - start
        samples.append(elapsed * 1e3)
        spent += elapsed
    return Timing("wall", tuple(samples))


def time_cuda_events(
    fn: Callable[[], object],
    *,
    grad_to_none: Sequence[object] | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> Timing:
    """``triton.testing.do_bench``: L2 flushed before each call, CUDA events, gradients set to None between calls.
    All samples are kept (return_mode="all") so the quantiles and the raw samples come from the same run."""
    from triton.testing import do_bench

    times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []), return_mode="all")
    return Timing("cuda_event", tuple(float(t) for t in times))


def time_cuda_graph(fn: Callable[[], object], *, rep_ms: float = 100.0) -> Timing:
    """CUDA-graph replay of ``fn`` (``triton.testing.do_bench_cudagraph``): what a launch-bound case costs with
    launch overhead removed. ``fn`` must be capturable (no host synchronisation, no autograd graph building)."""
    from triton.testing import do_bench_cudagraph

    times = do_bench_cudagraph(fn, rep=rep_ms, return_mode="all")
    return Timing("cuda_graph", tuple(float(t) for t in times))


def time_fixed(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    reset: Callable[[], None] | None = None,
) -> Timing:
    """Exactly ``warmup`` untimed then ``reps`` timed calls of ``fn``: CUDA events around each call on a GPU
    (timer ``cuda_event``, no L2 flush), the wall clock on CPU (``wall``). For the ``--world-size`` benchmark,
    where every call is a collective and all ranks must make the same number of calls, so no adaptive budget.
    ``reset`` runs before every call, outside the timed region."""
    if warmup < 0 or reps < 1:
        raise ValueError(f"bad timing settings: warmup={warmup} (>= 0), reps={reps} (>= 1)")
    cuda = device.type == "cuda"
    samples: list[float] = []
    for i in range(warmup + reps):
        if reset is not None:
            reset()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed_ms = float(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            elapsed_ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(elapsed_ms)
    return Timing("cuda_event" if cuda else "wall", tuple(samples))
