"""Running one command on every rank under torchrun: the process group from torchrun's environment, this rank's
device, and every rank's rows gathered in rank order.

``bnbench bench --world-size K`` and ``bnbench train --world-size K`` run through here::

    torchrun --nproc-per-node 2 -m bnbench bench --world-size 2 --out reports/dist --batch 64
    torchrun --nproc-per-node 2 -m bnbench train --world-size 2 --out reports/dist-train

NCCL when the ranks run on CUDA devices (one per rank, chosen by LOCAL_RANK), gloo on CPU. This module knows
nothing of benchmarks or training (``bench/`` and ``train/`` call it; it calls neither) and writes no file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator

import pandas as pd
import torch
import torch.distributed as dist

__all__ = ["TIMEOUT", "check_torchrun", "gather_frames", "is_rank_zero", "process_group"]

#: how long a collective may wait for the other ranks before the process group gives up
TIMEOUT = _dt.timedelta(minutes=10)


def check_torchrun(world_size: int) -> None:
    """ValueError unless this process was started by torchrun and ``world_size`` is a possible rank count;
    checked before any process group exists, so every rank fails alike."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    if "RANK" not in os.environ:
        raise ValueError(
            f"--world-size {world_size}: run under torchrun, e.g. "
            f"'torchrun --nproc-per-node {world_size} -m bnbench ...' (RANK is not set)"
        )


@contextlib.contextmanager
def process_group(world_size: int, *, cuda: bool) -> Iterator[torch.device]:
    """Initialise the default process group from torchrun's environment and yield this rank's device; the group
    is destroyed on exit. ``cuda``: NCCL with one GPU per rank (by LOCAL_RANK), else gloo on CPU. ValueError when
    torchrun started another number of ranks than ``world_size``."""
    check_torchrun(world_size)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        if dist.get_world_size() != world_size:
            raise ValueError(f"--world-size {world_size} but torchrun started {dist.get_world_size()} ranks")
        yield torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    """True on rank 0 of the default group (and outside any process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather_frames(frame: pd.DataFrame) -> pd.DataFrame:
    """Every rank's ``frame``, concatenated in rank order, on every rank (one collective)."""
    frames: list[pd.DataFrame | None] = [None] * dist.get_world_size()
    dist.all_gather_object(frames, frame)
    return pd.concat(frames, ignore_index=True)
