"""Data-parallel training with SyncBatchNormAct (``bnbench.train.distributed``) and ``bnbench train --world-size``.

The multi-rank check runs in the process group of ``tests/test_distributed.py`` (one spawned group for CI).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbench import cli
from bnbench.train import distributed


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-12)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def check_ddp_equals_single_process(rank: int, world: int) -> None:
    """DDP + SyncBatchNormAct trained on shards == one process trained on the global batch (SGD, 3 steps)."""
    from bnbench.train.distributed import train_ddp

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    net = model()
    rows = train_ddp(net, x, y, steps=3, batch_size=4, lr=0.5, device=torch.device("cpu"), seed=3)
    assert set(rows["metric"]) == {"train_loss", "step_ms"} and (rows["rank"] == rank).all()
    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(48, generator=gen)
    for step in range(3):
        idx = order[step * 4 * world : (step + 1) * 4 * world]
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    for (name, p), q in zip(ref.state_dict().items(), net.state_dict().values(), strict=True):
        _close(q, p, 1e-5, f"{name} after DDP training")


@pytest.fixture
def captured(monkeypatch):
    runs = []
    monkeypatch.setattr(distributed, "run_ddp", lambda run: runs.append(run) or 0)
    return runs


def test_train_world_size_takes_one_model(captured, tmp_path):
    argv = ["train", "--world-size", "3", "--out", str(tmp_path), "--models", "cnn", "--depths", "2"]
    assert cli.main([*argv, "--batch-size", "16", "--steps", "5"]) == 0
    (run,) = captured
    assert run == distributed.DDPRun(world_size=3, out=tmp_path, model="cnn", depth=2, batch_size=16, steps=5)
    assert cli.main(["train", "--world-size", "2", "--out", str(tmp_path), "--lrs", "0.1", "0.2"]) == 2
    assert cli.main(["train", "--world-size", "2"]) == 2  # no --out: rank 0 would not know where to write


def test_train_world_size_outside_torchrun_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["train", "--world-size", "2", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "run under torchrun" in capsys.readouterr().err
