"""Data-parallel training (DistributedDataParallel) with synchronised fused BatchNorm, on every rank of a group.

:func:`train_ddp` returns this rank's long rows (the training schema) and touches no file: :mod:`bnbench.distributed_cli`
runs it under torchrun and writes the rows.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from bnbench.distributed import convert_sync_bn_act
from bnbench.schema import TRAIN_COLUMNS

__all__ = ["ddp_step", "train_ddp"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
