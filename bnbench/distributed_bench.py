"""Distributed benchmark and data-parallel training with synchronised fused BatchNorm (run under torchrun).

:func:`bench_sync` times one training step (forward + backward) of SyncBatchNormAct against ``nn.SyncBatchNorm`` +
the activation on every rank of an initialised process group, and records how much of the step the collectives
take; :func:`train_ddp` trains a model data-parallel (DistributedDataParallel) with synchronised BN. Both return
DataFrames (one row per rank and point; long training rows). :func:`main` (``python -m bnbench.distributed_bench
bench|train`` under torchrun) initialises the group, gathers every rank's rows on rank 0 and writes them there: it is
the only part of this module that touches the disk.

Every rank must run the same number of steps (each step is a collective), so the timing loop uses a fixed number
of warm-up and timed steps, never an adaptive budget.
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
from bnbench.distributed import SyncBatchNormAct, convert_sync_bn_act
from bnbench.distributed_functional import record_collectives
from bnbench.functional import resolve_backend
from bnbench.schema import BENCH_COLUMNS, TRAIN_COLUMNS

__all__ = ["DIST_COLUMNS", "PROVIDERS", "SyncCase", "bench_sync", "train_ddp"]

#: SyncBatchNormAct (auto backend), SyncBatchNormAct on plain torch ops, nn.SyncBatchNorm + activation (baseline)
PROVIDERS = ("sync_fused", "sync_fused_torch", "sync_eager")
#: columns added to the bench schema: who measured, over how many ranks, and the collectives' share of a step
DIST_COLUMNS = ("rank", "world_size", "dist_backend", "collective_ms_p50", "collective_share")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        act, param = parse_activation(case.activation)
        for provider in providers:
            row = _row(case, provider, group, device, provenance or {})
            rows.append(row)
            if provider == "sync_eager" and device.type == "cpu":
                row.update(status="skipped", message="nn.SyncBatchNorm refuses CPU tensors (torch: GPU only)")
                continue
            try:
                gen = torch.Generator().manual_seed(seed + dist.get_rank(group))
                x = torch.randn(case.shape(), generator=gen).to(device, _DTYPES[case.dtype])
                if case.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                grad = torch.randn(case.shape(), generator=gen).to(device, _DTYPES[case.dtype])
                layer, fused = _layer(provider, case, device, group)
                if provider != "sync_eager" and resolve_backend(layer.backend, x) == "triton" and device.type == "cpu":
                    row.update(status="skipped", message="Triton runs only in the interpreter here: not timed")
                    continue

                def step(layer=layer, fused=fused, x=x, grad=grad, act=act, param=param):
                    x.grad = None
                    y = layer(x) if fused else apply_activation(layer(x), act, param)
                    y.backward(grad)

                step_ms, coll_ms = _time_steps(step, device, warmup, reps)
                p50 = float(np.median(step_ms))
                row.update(
                    ms_p20=float(np.quantile(step_ms, 0.2)), ms_p50=p50, ms_p80=float(np.quantile(step_ms, 0.8)),
                    n_samples=len(step_ms), status="ok",
                )  # fmt: skip
                if provider != "sync_eager":
                    row.update(
                        collective_ms_p50=float(np.median(coll_ms)), collective_share=float(np.median(coll_ms)) / p50
                    )
            except (RuntimeError, ValueError, TypeError) as err:
                row.update(
                    status="oom" if "out of memory" in str(err) else "error", message=f"{type(err).__name__}: {err}"
                )
    return pd.DataFrame(rows, columns=[*BENCH_COLUMNS, *DIST_COLUMNS])


# ---------------------------------------------------------------------------------------------------------------
# Data-parallel training
# ---------------------------------------------------------------------------------------------------------------


def ddp_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One data-parallel step on this rank's shard: mean cross-entropy, backward (DDP averages gradients across
    ranks; every SyncBatchNormAct adds its own two collectives), optimizer step. Returns the local loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_ddp(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    group=None,
    seed: int = 0,
    labels: dict | None = None,
) -> pd.DataFrame:
    """Train ``model`` data-parallel with SGD, in place: its BatchNorms are first converted in place with
    :func:`convert_sync_bn_act` (SyncBatchNormAct layers sharing their tensors).

    Each step draws one global batch of ``batch_size * world`` samples (the same permutation on every rank, from
    ``seed``) and gives rank r the r-th slice, so the run equals single-process training on the global batch.
    Returns this rank's long rows (the training schema: ``train_loss`` and ``step_ms`` per step); ``labels`` fills
    the schema's descriptive columns (experiment, dataset, model, ...).
    """
    from torch.nn.parallel import DistributedDataParallel

    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1, got batch_size={batch_size}, steps={steps}")
    if batch_size * world > len(x_train):
        raise ValueError(f"a global batch of {batch_size} x {world} ranks exceeds the {len(x_train)} training samples")
    model = convert_sync_bn_act(model.to(device), group, inplace=True).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=group)  # fmt: skip
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = len(x_train) // (batch_size * world)
    order, rows, wall = torch.randperm(len(x_train), generator=gen), [], 0.0
    base = {c: (labels or {}).get(c) for c in TRAIN_COLUMNS}
    base.update(batch_size=batch_size * world, lr=lr, seed=seed)
    for step in range(1, steps + 1):
        slot = (step - 1) % per_epoch
        if slot == 0 and step > 1:
            order = torch.randperm(len(x_train), generator=gen)
        start = slot * batch_size * world + rank * batch_size
        idx = order[start : start + batch_size]
        xb, yb = x_train[idx].to(device), y_train[idx].to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = ddp_step(ddp, optimizer, xb, yb)
        _sync(device)
        elapsed = time.perf_counter() - t0
        wall += elapsed
        for metric, value in (("train_loss", loss), ("step_ms", elapsed * 1e3)):
            rows.append({**base, "step": step, "wall_s": wall, "metric": metric, "value": value, "rank": rank})
    return pd.DataFrame(rows, columns=[*TRAIN_COLUMNS, "rank"])


# ---------------------------------------------------------------------------------------------------------------
# Command line (under torchrun): python -m bnbench.distributed_bench {bench,train} --world-size K --out DIR ...
# ---------------------------------------------------------------------------------------------------------------


def configure(parser) -> None:
    """Options of both commands (``bnbench bench/train --world-size K`` can reuse them)."""
    parser.add_argument("command", choices=("bench", "train"))
    parser.add_argument("--world-size", type=int, required=True, help="ranks expected (torchrun --nproc-per-node)")
    parser.add_argument("--out", required=True, help="output folder (rank 0 writes results.csv and env.json)")
    parser.add_argument("--batch", default="32", help="per-rank batch: bench a comma list, train one number")
    parser.add_argument("--width", default="64", help="channels: bench a comma list, train one number (hidden width)")
    parser.add_argument(
        "--spatial",
        default="1",
        help="bench: comma list of 1 (2-D input), HxW or H (HxH) as bnbench bench takes it, e.g. 1,14x14",
    )
    parser.add_argument("--dtype", default="fp32", help="bench: comma list of " + ", ".join(_DTYPES))
    parser.add_argument("--activation", default="relu", help="bench: comma list; train: one activation")
    parser.add_argument("--channels-last", action="store_true", help="bench: 4-D inputs in channels_last")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="bench: comma list of " + ", ".join(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dataset", default="digits", help="train: digits, mnist5k, mnist, synthetic")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


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
    bad = [d for d in items(dtype) if d not in _DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; valid: {', '.join(_DTYPES)}")
    acts = [parse_activation(a)[0].value for a in items(activation)]
    return [SyncCase(n, c, s, d, a, channels_last and len(s) == 2)
            for n, c, s, d, a in itertools.product(batches, widths, shapes, items(dtype), acts)]  # fmt: skip


def run_rank(args, device: torch.device) -> pd.DataFrame:
    """This rank's rows for the parsed ``args``, inside an initialised process group."""
    if args.command == "bench":
        from bnbench.bench.runner import provenance_from_env
        from bnbench.envinfo import collect

        cases = parse_cases(args.batch, args.width, args.spatial, args.dtype, args.activation, args.channels_last)
        prov = provenance_from_env(collect(), run_id=args.run_id)
        return bench_sync(cases, device=device, providers=tuple(args.providers.split(",")), warmup=args.warmup,
                          reps=args.reps, provenance=prov, seed=args.seed)  # fmt: skip
    from bnbench.train.data import load_dataset
    from bnbench.train.models import build_model, init_weights

    data = load_dataset(args.dataset)
    model = build_model(args.model, in_shape=data.image_shape, n_classes=data.n_classes, depth=args.depth,
                        width=int(args.width), activation=args.activation, norm="fused")  # fmt: skip
    init_weights(model, "pytorch", args.seed)
    labels = dict(experiment=f"ddp{args.world_size}", dataset=data.name, model=args.model, depth=args.depth,
                  width=int(args.width), activation=args.activation, norm="sync_fused")  # fmt: skip
    return train_ddp(model, data.x_train, data.y_train, steps=args.steps, batch_size=int(args.batch), lr=args.lr,
                     device=device, seed=args.seed, labels=labels)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    from pathlib import Path

    from bnbench._io import write_csv, write_json
    from bnbench.envinfo import collect

    parser = argparse.ArgumentParser(prog="python -m bnbench.distributed_bench", description=__doc__.split("\n\n")[0])
    configure(parser)
    args = parser.parse_args(argv)
    args.run_id = f"dist{args.world_size}-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if "RANK" not in os.environ:
        parser.error("run under torchrun, e.g. torchrun --nproc-per-node K -m bnbench.distributed_bench ...")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(minutes=10))
    try:
        if dist.get_world_size() != args.world_size:
            parser.error(f"--world-size {args.world_size} but torchrun started {dist.get_world_size()} ranks")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        run_ids = [None] * dist.get_world_size()
        dist.all_gather_object(run_ids, args.run_id)  # every rank's rows carry rank 0's run id
        args.run_id = run_ids[0]
        frames = [None] * dist.get_world_size()
        dist.all_gather_object(frames, run_rank(args, device))
        if dist.get_rank() == 0:
            out = Path(args.out)
            write_csv(out / "results.csv", pd.concat(frames, ignore_index=True))
            write_json(out / "env.json", {**collect(), "world_size": args.world_size, "argv": argv})
            print(f"wrote {out / 'results.csv'}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
