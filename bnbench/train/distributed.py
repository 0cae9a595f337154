"""Data-parallel training (DistributedDataParallel) with synchronised fused BatchNorm, on every rank of a group.

:func:`train_ddp` returns this rank's long rows (the training schema) and touches no file. :func:`run_ddp` is
``bnbench train --world-size K`` under torchrun: it builds the one model the options describe, trains it on every
rank (:mod:`bnbench.distributed.launch` sets up the process group) and rank 0 writes every rank's rows to
``results.csv`` and the environment to ``env.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from bnbench.device import synchronize
from bnbench.distributed import convert_sync_bn_act
from bnbench.schema import TRAIN_COLUMNS

__all__ = ["DDPRun", "ddp_step", "run_ddp", "train_ddp"]


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
        synchronize(device)
        t0 = time.perf_counter()
        loss = ddp_step(ddp, optimizer, xb, yb)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        wall += elapsed
        for metric, value in (("train_loss", loss), ("step_ms", elapsed * 1e3)):
            rows.append({**base, "step": step, "wall_s": wall, "metric": metric, "value": value, "rank": rank})
    return pd.DataFrame(rows, columns=[*TRAIN_COLUMNS, "rank"])


@dataclasses.dataclass(frozen=True)
class DDPRun:
    """One data-parallel run: the model, the data, the schedule and where rank 0 writes. ``batch_size`` is per
    rank (the global batch is ``batch_size * world_size``)."""

    world_size: int
    out: Path
    model: str = "mlp"
    depth: int = 3
    width: int = 64
    activation: str = "relu"
    lr: float = 0.1
    dataset: str = "digits"
    data_dir: Path | None = None
    batch_size: int = 32
    steps: int = 100
    seed: int = 0


def run_ddp(run: DDPRun) -> int:
    """Train ``run`` on every rank of a torchrun process group; rank 0 writes ``results.csv`` and ``env.json`` to
    ``run.out``. Returns 0 (every rank)."""
    from bnbench import _io
    from bnbench.distributed import launch
    from bnbench.envinfo import collect
    from bnbench.train.data import load_dataset
    from bnbench.train.models import build_model, init_weights

    launch.check_torchrun(run.world_size)
    data = load_dataset(run.dataset, data_dir=run.data_dir)  # bad options fail here, on every rank alike
    with launch.process_group(run.world_size, cuda=torch.cuda.is_available()) as device:
        model = build_model(run.model, in_shape=data.image_shape, n_classes=data.n_classes, depth=run.depth,
                            width=run.width, activation=run.activation, norm="fused")  # fmt: skip
        init_weights(model, "pytorch", run.seed)
        labels = dict(experiment=f"ddp{run.world_size}", dataset=data.name, model=run.model, depth=run.depth,
                      width=run.width, activation=run.activation, norm="sync_fused")  # fmt: skip
        rows = train_ddp(model, data.x_train, data.y_train, steps=run.steps, batch_size=run.batch_size, lr=run.lr,
                         device=device, seed=run.seed, labels=labels)  # fmt: skip
        results = launch.gather_frames(rows)
        if launch.is_rank_zero():
            _io.write_csv(run.out / "results.csv", results)
            _io.write_json(run.out / "env.json", {**collect(), "world_size": run.world_size, "argv": sys.argv})
            print(f"wrote {run.out / 'results.csv'}")
    return 0
