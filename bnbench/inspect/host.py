"""Host microseconds per call: eager (``F.batch_norm`` + activation) beside bnbench's Triton path, in one run.

Both run the benchmark's own pass (:func:`bnbench.bench.workload.build_pass`) on the same small CPU input. Eager
runs its CPU kernels, so its time includes a little compute. Without CUDA the Triton path runs under the
recording driver: everything on the host happens (argument checks, planning, allocation, autograd, the launch
key of the direct launch, ``kernels/_launch.py``: Triton's binder and specialisation ran on the first call of each
key, in the warm-up) but the launch itself is recorded, not made, so its time excludes the CUDA driver's
launch call (a few microseconds per kernel on a GPU machine) and all GPU work; recording a launch there costs
under a microsecond (kernel and grid only, no argument kept). Times are the median of many calls
after warm-up, with ``perf_counter_ns`` around each call; they are measured here, on this CPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from bnbench.bench.cases import Case
from bnbench.bench.workload import build_pass, make_inputs

__all__ = ["HOST_MAX_NUMEL", "HostTime", "check_host_cases", "host_frame", "host_times"]


@dataclasses.dataclass(frozen=True)
class HostTime:
    provider: str
    pass_: str
    shape: str
    dtype: str
    layout: str
    us_p20: float
    us_p50: float
    us_p80: float
    calls: int
    launches_per_call: int | None  # bnbench's recorded launches (triton); None for eager
    aten_kernel_launches: int | None  # aten ops that would launch a CUDA kernel on the triton path
    executed: str  # what actually ran


def _time(call, reset, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        reset()
        call()
    samples = []
    for _ in range(calls):
        reset()
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1e3)
    return samples


def _row(provider: str, case: Case, samples: list[float], launches, aten, executed: str) -> HostTime:
    q = statistics.quantiles(samples, n=10)
    return HostTime(provider, case.pass_, case.shape_str, case.dtype, case.layout, q[1], statistics.median(samples),
                    q[7], len(samples), launches, aten, executed)  # fmt: skip


def host_times(case: Case, *, target="sm_90", calls: int = 300, warmup: int = 30) -> list[HostTime]:
    """Eager and triton host time per call of ``case``'s pass (use a small case: eager computes on the CPU). The
    triton path always runs on CPU tensors under the recording driver, also where CUDA is present."""
    from bnbench.bench.providers import get_providers
    from bnbench.inspect.record import record_pass, triton_function
    from bnbench.kernels._driver import recording

    if calls < 10 or warmup < 1:
        raise ValueError(f"need calls >= 10 and warmup >= 1 for a median, got calls={calls}, warmup={warmup}")
    (eager,) = get_providers("eager")
    inp = make_inputs(case, "cpu")
    run = build_pass(case, eager.make(case), inp)
    run.prepare()
    rows = [_row("eager", case, _time(run.call, inp.zero_grads, calls, warmup), None, None,
                 "eager: PyTorch's CPU kernels on this input")]  # fmt: skip
    record = record_pass(case, target)  # also compiles the kernels before the timing
    inp = make_inputs(case, "cpu")
    run = build_pass(case, triton_function(case), inp)
    with recording(target, keep_args=False) as rec:  # kernel and grid only: under a microsecond per launch
        run.prepare()

        def reset() -> None:
            inp.zero_grads()
            rec.clear()

        samples = _time(run.call, reset, calls, warmup)
    name = getattr(target, "name", target)
    executed = f"triton: host path only; kernels compiled for {name}, launches recorded, nothing run on a GPU"
    aten = sum(record.aten_kernels.values())
    return [*rows, _row("triton", case, samples, len(record.launches), aten, executed)]


#: host timing is offered on small cases only: on a large one eager's time would be its CPU compute
HOST_MAX_NUMEL = 1 << 16


def check_host_cases(cases) -> None:
    """ValueError naming the cases too large for a host measurement (see :data:`HOST_MAX_NUMEL`)."""
    big = [c.label() for c in cases if c.numel > HOST_MAX_NUMEL]
    if big:
        raise ValueError(f"--host-overhead takes cases of at most {HOST_MAX_NUMEL} elements (eager computes on the "
                         f"CPU, so a large case times its compute, not its host path); too large: {big}")  # fmt: skip


def host_frame(cases, *, target="sm_90", calls: int = 300, warmup: int = 30):
    """Host times of every case (each at most :data:`HOST_MAX_NUMEL` elements) as a DataFrame, with each
    provider's median over eager's (``ratio_vs_eager``)."""
    import pandas as pd

    check_host_cases(cases)
    rows = []
    for case in cases:
        times = host_times(case, target=target, calls=calls, warmup=warmup)
        eager_us = times[0].us_p50
        for t in times:
            row = dataclasses.asdict(t)
            row["pass"] = row.pop("pass_")
            row["ratio_vs_eager"] = t.us_p50 / eager_us
            rows.append(row)
    return pd.DataFrame(rows)
