"""The benchmark on every rank of a process group: synchronised BatchNorm + activation (``--world-size K``).

``bnbench bench --world-size K`` under torchrun runs the same sweep as one process (:func:`runner.run_sweep`: the
same cases from ``--preset``/axes/``--pass``, the same rows plus :data:`bnbench.schema.DIST_COLUMNS`, the same
``--seed`` rule) with :func:`measure_sync_point` in place of :func:`runner.measure_point`. What differs:

- providers (:data:`SYNC_PROVIDERS`): ``sync_fused`` (:class:`bnbench.SyncBatchNormAct`'s function on the Triton
  kernels; on CPU in the interpreter, as a correctness check of tiny cases, like ``triton``), ``sync_fused_torch``
  (the same two collectives on plain torch ops) and ``sync_eager`` (``nn.SyncBatchNorm`` + the activation, the
  baseline; training on GPUs only, as torch allows). Training passes synchronise; ``eval`` uses the running statistics and
  synchronises nothing, as the layers do.
- inputs: rank r draws x and dy from ``seed + r``; weight, bias and running statistics from ``seed`` (replicas of
  a model hold the same ones). Rank 0's tensors are those of a one-process run with the same seed.
- reference: float64 over the global batch, each rank redrawing the others' inputs (the check needs no
  collective): y, dx and the running statistics of the global batch, and dweight/dbias as this rank's local
  sums (what ``nn.SyncBatchNorm`` returns; DistributedDataParallel averages them).
- timing: exactly ``warmup`` + ``reps`` calls on every rank (:func:`bnbench.bench.timing.time_fixed`): every call
  is a collective, and an adaptive budget would let ranks disagree on how many calls to make.
  ``collective_ms_p50`` and ``collective_share`` (median time inside the collectives over the median call) are
  recorded for the fused providers (torch's own collectives cannot be timed from outside).

An error that every rank raises alike is an ``error`` row and the sweep goes on; an error on one rank only
leaves the others waiting in a collective until the process group times out.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bnbench.activations import apply_activation
from bnbench.bench import providers as single
from bnbench.bench.cases import Case
from bnbench.bench.providers import BNFunction, Provider
from bnbench.bench.runner import (
    PointResult,
    RunContext,
    base_row,
    check_outputs,
    error_message,
    fill_timing,
    is_oom,
)
from bnbench.bench.timing import interpreter_timing, time_fixed
from bnbench.bench.workload import Inputs, build_pass, make_inputs, reference_outputs
from bnbench.device import synchronize
from bnbench.distributed import record_collectives, sync_batch_norm_act
from bnbench.functional import batch_norm_act

__all__ = [
    "DEFAULT_SYNC_PROVIDERS",
    "SYNC_PROVIDERS",
    "SyncTiming",
    "get_sync_providers",
    "global_reference",
    "measure_sync_point",
    "rank_inputs",
]


@dataclasses.dataclass(frozen=True)
class SyncTiming:
    """Untimed and timed calls per point, the same on every rank."""

    warmup: int = 10
    reps: int = 30

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.reps < 1:
            raise ValueError(f"--warmup must be >= 0 and --reps >= 1, got {self.warmup} and {self.reps}")


def _make_sync_fused(use_triton: bool):
    def make(case: Case) -> BNFunction:
        backend = "triton" if use_triton else "torch"

        def fused(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param):
            if not training:  # eval: the running statistics, no collective (as SyncBatchNormAct)
                return batch_norm_act(x, running_mean, running_var, weight, bias, False, momentum, eps, activation,
                                      param, backend=backend)  # fmt: skip
            return sync_batch_norm_act(x, running_mean, running_var, weight, bias, momentum, eps, activation, param,
                                       dist.group.WORLD, use_triton)  # fmt: skip

        return fused

    return make


def _make_sync_eager(case: Case) -> BNFunction:
    layer = nn.SyncBatchNorm(case.C, device="meta")  # built once: no module construction inside the timed calls

    def eager(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param):
        # the point's own tensors, not copies (their .grad and in-place running statistics are what is checked);
        # set in the dicts directly, as nn.Module's setattr admits only nn.Parameter as a parameter
        layer._parameters.update(weight=weight, bias=bias)
        layer._buffers.update(running_mean=running_mean, running_var=running_var)
        layer.momentum, layer.eps = momentum, eps
        return apply_activation(layer.train(training)(x), activation, param)

    return eager


def _eager_skip(case: Case, device: torch.device) -> str | None:
    if device.type == "cuda" or not case.training:
        return None
    return "nn.SyncBatchNorm refuses CPU tensors in training (torch: GPU only)"


#: the providers of a ``--world-size`` run
SYNC_PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "sync_fused",
            False,
            _make_sync_fused(True),
            single.triton_skip_reason,
            single.triton_timer,
            single.triton_kernel_config,
        ),
        Provider("sync_fused_torch", False, _make_sync_fused(False), kernel_config=lambda case, x: "torch"),
        Provider("sync_eager", True, _make_sync_eager, _eager_skip, kernel_config=lambda case, x: "aten"),
    )
}
DEFAULT_SYNC_PROVIDERS = tuple(SYNC_PROVIDERS)


def get_sync_providers(names: str | list[str]) -> list[Provider]:
    """Providers of a ``--world-size`` run by name (a comma list or a list); unknown names raise ValueError."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    unknown = [n for n in names if n not in SYNC_PROVIDERS]
    if not names or unknown:
        raise ValueError(
            f"--providers with --world-size: unknown provider(s) {unknown or names}; valid: {', '.join(SYNC_PROVIDERS)}"
        )
    return [SYNC_PROVIDERS[n] for n in dict.fromkeys(names)]


def rank_inputs(case: Case, device: torch.device, seed: int, rank: int) -> Inputs:
    """Rank ``rank``'s tensors: x and dy drawn from ``seed + rank``, the parameters and running statistics from
    ``seed`` (the same on every rank)."""
    shared = make_inputs(case, device, seed)
    if rank == 0:
        return shared
    own = make_inputs(case, device, seed + rank)
    x = own.x.detach().requires_grad_(case.needs_grad)
    return dataclasses.replace(shared, x=x, dy=own.dy)


def global_reference(
    case: Case, inp: Inputs, running_mean0: torch.Tensor, running_var0: torch.Tensor, *, seed: int, rank: int,
    world: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The float64 reference of this rank's outputs (the keys of :func:`bnbench.bench.workload.outputs`) when
    the statistics are taken over every rank's batch; ``inp`` is this rank's :func:`rank_inputs`."""
    if not case.training:  # eval synchronises nothing
        return reference_outputs(case, inp, running_mean0, running_var0)
    parts = [inp if r == rank else rank_inputs(case, inp.x.device, seed, r) for r in range(world)]
    x = torch.cat([p.x.detach() for p in parts])
    dy = torch.cat([p.dy for p in parts])
    whole = dataclasses.replace(case, N=case.N * world)
    everyone = dataclasses.replace(inp, x=x, dy=dy)
    ref = reference_outputs(whole, everyone, running_mean0, running_var0)
    rows = slice(rank * case.N, (rank + 1) * case.N)
    if "y" in ref:
        ref["y"] = ref["y"][rows]
    if "dx" in ref:
        mine = torch.zeros_like(dy)
        mine[rows] = dy[rows]
        local = reference_outputs(whole, dataclasses.replace(everyone, dy=mine), running_mean0, running_var0)
        ref.update(dx=ref["dx"][rows], dweight=local["dweight"], dbias=local["dbias"])
    return ref


def measure_sync_point(case: Case, provider: Provider, ctx: RunContext, timing: SyncTiming) -> list[PointResult]:
    """Check and time one point on this rank (every rank calls it with the same arguments); never raises but for
    KeyboardInterrupt."""
    device, group = ctx.device, dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    row = base_row(case, provider, ctx)
    row.update(rank=rank, world_size=world, dist_backend=dist.get_backend(group), collective_ms_p50=math.nan,
               collective_share=math.nan)  # fmt: skip
    reason = provider.skip_reason(case, device)
    if reason:
        row.update(status="skipped", message=reason)
        return [PointResult(row, [])]
    timer = provider.timer(device)
    row["timer"] = timer or ("cuda_event" if device.type == "cuda" else "wall")
    samples: list[float] = []
    inp = run = None
    try:
        inp = rank_inputs(case, device, ctx.seed, rank)
        row["kernel_config"] = provider.kernel_config(case, inp.x)
        run = build_pass(case, provider.make(case), inp)
        running0 = (inp.running_mean.clone(), inp.running_var.clone())
        synchronize(device)
        start = time.perf_counter()
        run.prepare()
        run.call()
        synchronize(device)
        row["compile_s"] = time.perf_counter() - start

        def reference(rm0, rv0, y):
            return global_reference(case, inp, rm0, rv0, seed=ctx.seed, rank=rank, world=world)

        check_outputs(row, case, inp, run, running0, reference)
        if timer == "interpreter":
            fill_timing(row, interpreter_timing(), ctx.copy_gbps)
            row["message"] = (row["message"] + "; " if row["message"] else "") + (
                "Triton interpreter: correctness only, not timed"
            )
            return [PointResult(row, [])]
        records: list[list] = []

        def call() -> None:
            with record_collectives() as recorded:
                run.call()
            records.append(recorded)

        measured = time_fixed(call, device, warmup=timing.warmup, reps=timing.reps,
                              reset=inp.zero_grads if case.needs_grad else None)  # fmt: skip
        fill_timing(row, measured, ctx.copy_gbps)
        samples = list(measured.samples_ms)
        if provider.name != "sync_eager":
            coll = [sum(r.ms for r in rec) for rec in records[timing.warmup :]]
            row["collective_ms_p50"] = float(np.median(coll))
            row["collective_share"] = row["collective_ms_p50"] / row["ms_p50"] if row["ms_p50"] > 0 else math.nan
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded; the sweep goes on (every rank meets the same error)
        row.update(status="oom" if is_oom(err) else "error", message=error_message(err))
    finally:
        inp = run = None  # drop this point's tensors before the next point
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [PointResult(row, samples)]
