"""Per-rank benchmark of synchronised BatchNorm + activation (run on every rank of an initialised process group).

:func:`bench_sync` times training steps (forward + backward) of SyncBatchNormAct against ``nn.SyncBatchNorm`` + the
activation on this rank, checks each point's output against a float64 reference over the global batch, and records
how much of the step the collectives take. It returns a DataFrame (the bench schema plus :data:`DIST_COLUMNS`) and
touches no file: :mod:`bnbench.distributed_cli` runs it under torchrun and writes the rows.

Every rank must run the same number of steps (each step is a collective), so the timing loop uses a fixed number
of warm-up and timed steps, never an adaptive time budget.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from bnbench.activations import apply_activation, parse_activation
from bnbench.bench.workload import TOLERANCE
from bnbench.distributed import SyncBatchNormAct
from bnbench.distributed_functional import record_collectives
from bnbench.functional import resolve_backend
from bnbench.schema import BENCH_COLUMNS

__all__ = ["DIST_COLUMNS", "DTYPES", "PROVIDERS", "SyncCase", "bench_sync", "parse_cases"]

#: SyncBatchNormAct (auto backend), SyncBatchNormAct on plain torch ops, nn.SyncBatchNorm + activation (baseline)
PROVIDERS = ("sync_fused", "sync_fused_torch", "sync_eager")
#: columns added to the bench schema: who measured, over how many ranks, and the collectives' share of a step
DIST_COLUMNS = ("rank", "world_size", "dist_backend", "collective_ms_p50", "collective_share")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class SyncCase:
    """One point's layer and per-rank input: (batch, channels, *spatial) on every rank."""

    batch: int
    channels: int
    spatial: tuple[int, ...] = ()
    dtype: str = "fp32"
    activation: str = "relu"
    channels_last: bool = False

    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, *self.spatial)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer(provider: str, case: SyncCase, device: torch.device, group) -> tuple[nn.Module, bool]:
    """(module, applies_activation_itself)."""
    if provider == "sync_eager":
        return nn.SyncBatchNorm(case.channels, process_group=group, device=device), False
    backend = "torch" if provider == "sync_fused_torch" else "auto"
    return SyncBatchNormAct(case.channels, activation=case.activation, process_group=group, backend=backend,
                            device=device), True  # fmt: skip


def _time_steps(step, device: torch.device, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """(step ms, collective ms per step) for ``reps`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    step_ms, coll_ms = [], []
    for _ in range(reps):
        with record_collectives() as records:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                step_ms.append(float(start.elapsed_time(end)))
            else:
                t0 = time.perf_counter()
                step()
                step_ms.append((time.perf_counter() - t0) * 1e3)
            coll_ms.append(sum(r.ms for r in records))
    return step_ms, coll_ms


def _row(case: SyncCase, provider: str, group, device: torch.device, provenance: dict) -> dict:
    row = dict.fromkeys((*BENCH_COLUMNS, *DIST_COLUMNS), math.nan)
    S = int(np.prod(case.spatial)) if case.spatial else 1
    row.update(provenance)
    row.update(
        timestamp_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), op="sync_bn_act",
        activation=case.activation, bn_mode="train", dtype=case.dtype, N=case.batch, C=case.channels, S=S,
        layout="channels_last" if case.channels_last else "nchw", shape="x".join(map(str, case.shape())),
        numel=int(np.prod(case.shape())), provider=provider, is_baseline=provider == "sync_eager", kernel_config="",
        timer="cuda_event" if device.type == "cuda" else "wall", n_samples=0, status="error", message="",
        rank=dist.get_rank(group), world_size=dist.get_world_size(group), dist_backend=dist.get_backend(group),
        device_name=provenance.get("device_name") or str(device), **{"pass": "fwd_bwd"},
    )  # fmt: skip
    return row


def _inputs(case: SyncCase, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's (x, grad_output) on the CPU, rounded to the case's dtype; rank r draws them from seed + r."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape(), generator=gen).to(DTYPES[case.dtype])
    return x, torch.randn(case.shape(), generator=gen).to(DTYPES[case.dtype])


def _reference_output(case: SyncCase, group, seed: int) -> torch.Tensor:
    """This rank's slice of BatchNorm (batch statistics) + activation over every rank's input, in float64 on the
    CPU: each rank redraws the others' inputs from their seeds, so the check needs no collective."""
    act, param = parse_activation(case.activation)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    x = torch.cat([_inputs(case, seed + r)[0] for r in range(world)]).double()
    y = apply_activation(nn.functional.batch_norm(x, None, None, training=True, eps=1e-5), act, param)
    return y[rank * case.batch : (rank + 1) * case.batch]


def _measure(row, case, provider, group, device, seed, reference, warmup, reps) -> None:
    """Check one point's output against ``reference``, then time its training steps; fills ``row``."""
    act, param = parse_activation(case.activation)
    x, grad = (t.to(device) for t in _inputs(case, seed + dist.get_rank(group)))
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    layer, fused = _layer(provider, case, device, group)
    if provider != "sync_eager" and resolve_backend(layer.backend, x) == "triton" and device.type == "cpu":
        row.update(status="skipped", message="Triton runs only in the interpreter here: not timed")
        return

    def forward():
        return layer(x) if fused else apply_activation(layer(x), act, param)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        forward().backward(grad)

    with torch.no_grad():
        out = forward().double().cpu()
    err = float((out - reference).norm() / reference.norm().clamp_min(1e-30))
    step_ms, coll_ms = _time_steps(step, device, warmup, reps)
    p50 = float(np.median(step_ms))
    row.update(
        ms_p20=float(np.quantile(step_ms, 0.2)), ms_p50=p50, ms_p80=float(np.quantile(step_ms, 0.8)),
        n_samples=len(step_ms), max_rel_err=err, status="ok" if err <= TOLERANCE[case.dtype] else "incorrect",
        message="" if err <= TOLERANCE[case.dtype] else f"relative error {err:.2e} > {TOLERANCE[case.dtype]:.0e}",
    )  # fmt: skip
    if provider != "sync_eager":
        row.update(collective_ms_p50=float(np.median(coll_ms)), collective_share=float(np.median(coll_ms)) / p50)


def bench_sync(
    cases: list[SyncCase],
    *,
    device: torch.device,
    group=None,
    providers: tuple[str, ...] = PROVIDERS,
    warmup: int = 10,
    reps: int = 30,
    provenance: dict | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Rows (the bench schema plus :data:`DIST_COLUMNS`) of this rank, one per case and provider.

    Must run on every rank of ``group`` (default: the world) with the same arguments. ``collective_share`` is the
    median time inside the collectives over the median step time (SyncBatchNormAct only: torch's own collectives
    cannot be timed from outside). A provider that cannot run here is a ``skipped`` row saying why; an error that
    every rank raises alike is an ``error`` row and the sweep goes on (an error on one rank only leaves the others
    waiting in a collective until the process group times out).
    """
    group = group if group is not None else dist.group.WORLD
    bad = sorted(set(providers) - set(PROVIDERS))
    if bad:
        raise ValueError(f"unknown provider(s) {bad}; valid providers are: {', '.join(PROVIDERS)}")
    rows = []
    for case in cases:
        reference = None
        for provider in providers:
            row = _row(case, provider, group, device, provenance or {})
            rows.append(row)
            if provider == "sync_eager" and device.type == "cpu":
                row.update(status="skipped", message="nn.SyncBatchNorm refuses CPU tensors (torch: GPU only)")
                continue
            try:
                if reference is None:
                    reference = _reference_output(case, group, seed)
                _measure(row, case, provider, group, device, seed, reference, warmup, reps)
            except (RuntimeError, ValueError, TypeError) as err:
                row.update(
                    status="oom" if "out of memory" in str(err) else "error", message=f"{type(err).__name__}: {err}"
                )
    return pd.DataFrame(rows, columns=[*BENCH_COLUMNS, *DIST_COLUMNS])


def parse_cases(
    batch: str, width: str, spatial: str, dtype: str, activation: str, channels_last: bool
) -> list[SyncCase]:
    """The grid of :class:`SyncCase` from comma lists (as ``bnbench bench`` takes them); ValueError names bad values."""
    import itertools

    def items(text: str) -> list[str]:
        return [v.strip() for v in str(text).split(",") if v.strip()]

    from bnbench.bench.cases import parse_spatial

    try:
        batches, widths = [int(v) for v in items(batch)], [int(v) for v in items(width)]
    except ValueError:
        raise ValueError(f"--batch and --width take comma lists of integers, got {batch!r}, {width!r}") from None
    shapes = [() if sp is None else tuple(sp) for sp in parse_spatial(spatial)]
    bad = [d for d in items(dtype) if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; valid: {', '.join(DTYPES)}")
    acts = [parse_activation(a)[0].value for a in items(activation)]
    return [SyncCase(n, c, s, d, a, channels_last and len(s) == 2)
            for n, c, s, d, a in itertools.product(batches, widths, shapes, items(dtype), acts)]  # fmt: skip
