"""The ``--world-size`` benchmark (``bnbench.bench.distributed``) and ``bnbench bench --world-size``.

The multi-rank check (:func:`check_sync_bench_rows`) runs in the process group of ``tests/test_distributed.py``
(one spawned group for CI); the tests here need no process group.
"""

from __future__ import annotations

import pytest
import torch

from bnbench import cli
from bnbench.bench.cases import Case
from bnbench.bench.distributed import SYNC_PROVIDERS, get_sync_providers, global_reference, rank_inputs
from bnbench.bench.workload import make_inputs, reference_outputs

#: the smallest 4-D training case: 2 ranks x 8 x 2 x 2 values per channel, tiny for the interpreter
CASE = Case("bn2d", "fwd_bwd", "relu", "fp32", "nchw", 8, 4, 2, 2)


def check_sync_bench_rows(rank: int, world: int) -> None:
    """Every rank measures the same points (a training and the eval pass x three providers); the rows carry the
    rank, pass the global-batch check and time a fixed number of calls. (bwd replays the backward of fwd_bwd; its
    reference is the same and is checked without a process group below.)"""
    import dataclasses

    from bnbench.bench.distributed import SyncTiming, measure_sync_point
    from bnbench.bench.runner import RunContext, run_sweep
    from bnbench.schema import DIST_COLUMNS, validate_bench

    cases = [dataclasses.replace(CASE, pass_=p) for p in ("fwd_bwd", "eval")]
    ctx = RunContext(device=torch.device("cpu"), copy_gbps=10.0, provenance={"run_id": "t"}, seed=3)
    frame, samples = run_sweep(cases, list(SYNC_PROVIDERS.values()), ctx,
                               measure=lambda c, p, x: measure_sync_point(c, p, x, SyncTiming(warmup=1, reps=3)))  # fmt: skip
    validate_bench(frame)
    assert set(DIST_COLUMNS) <= set(frame.columns) and (frame["rank"] == rank).all()
    assert (frame["world_size"] == world).all() and (frame["dist_backend"] == "gloo").all()
    status = {(r.provider, r["pass"]): (r.status, r.timer) for _, r in frame.iterrows()}
    for pass_ in ("fwd_bwd", "eval"):
        # Triton on CPU runs in the interpreter (conftest): checked, not timed; nn.SyncBatchNorm refuses CPU tensors
        # in training
        assert status["sync_fused", pass_] == ("ok", "interpreter"), frame.message.tolist()
        assert status["sync_fused_torch", pass_] == ("ok", "wall"), frame.message.tolist()
    assert status["sync_eager", "fwd_bwd"][0] == "skipped"
    assert status["sync_eager", "eval"] == ("ok", "wall")  # eval synchronises nothing: nn.SyncBatchNorm runs
    timed = frame[frame["timer"] == "wall"].set_index("pass")
    assert (timed["n_samples"] == 3).all() and (timed["max_rel_err"] < 1e-5).all()
    fused = timed[timed["provider"] == "sync_fused_torch"]
    assert 0 < fused.loc["fwd_bwd", "collective_share"] <= 1 and fused.loc["eval", "collective_share"] == 0
    assert timed[timed["provider"] == "sync_eager"]["collective_share"].isna().all()  # not timeable from outside
    assert sorted(len(v) for v in samples.values() if v) == [3, 3, 3]


def test_rank_zero_draws_the_single_process_inputs():
    """Rank 0 of a --world-size run sees what a one-process run with the same seed sees; other ranks draw their
    own x and dy but share the parameters and running statistics."""
    single, zero, one = make_inputs(CASE, "cpu", 5), rank_inputs(CASE, torch.device("cpu"), 5, 0), None
    one = rank_inputs(CASE, torch.device("cpu"), 5, 1)
    assert torch.equal(single.x, zero.x) and torch.equal(single.dy, zero.dy)
    assert not torch.equal(one.x, zero.x) and not torch.equal(one.dy, zero.dy)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(one, name), getattr(zero, name)), name
    assert one.x.requires_grad and one.x.is_leaf


def test_global_reference_of_one_rank_is_the_single_process_reference():
    inp = rank_inputs(CASE, torch.device("cpu"), 0, 0)
    rm0, rv0 = inp.running_mean.clone(), inp.running_var.clone()
    ours = global_reference(CASE, inp, rm0, rv0, seed=0, rank=0, world=1)
    theirs = reference_outputs(CASE, inp, rm0, rv0)
    assert ours.keys() == theirs.keys() == {"y", "dx", "dweight", "dbias", "running_mean", "running_var"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_global_reference_slices_the_global_batch():
    """Rank 1 of 2: y and dx are its rows of the global batch's; dweight/dbias only its own rows' sums."""
    inp = rank_inputs(CASE, torch.device("cpu"), 0, 1)
    rm0, rv0 = inp.running_mean.clone(), inp.running_var.clone()
    ref = global_reference(CASE, inp, rm0, rv0, seed=0, rank=1, world=2)
    x = torch.cat([rank_inputs(CASE, torch.device("cpu"), 0, 0).x, inp.x]).detach().double().requires_grad_(True)
    w, b = (t.detach().double().requires_grad_(True) for t in (inp.weight, inp.bias))
    y = torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5))
    torch.testing.assert_close(ref["y"], y[8:].detach())
    dw, db = torch.autograd.grad(y[8:], (w, b), inp.dy.double())
    torch.testing.assert_close(ref["dweight"], dw)
    torch.testing.assert_close(ref["dbias"], db)


def test_sync_providers_are_named_clearly():
    assert [p.name for p in get_sync_providers("sync_eager,sync_fused")] == ["sync_eager", "sync_fused"]
    with pytest.raises(ValueError, match=r"with --world-size: unknown provider\(s\) \['eager'\]; valid: sync_fused"):
        get_sync_providers("eager,sync_fused")


def _bench(tmp_path, *extra: str) -> list[str]:
    return ["bench", "--world-size", "2", "--out", str(tmp_path / "out"), "--batch", "8", "--width", "4", *extra]


def test_bench_world_size_refuses_what_it_cannot_honour(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(_bench(tmp_path)) == 2
    assert "run under torchrun" in capsys.readouterr().err
    assert cli.main(["bench", "--world-size", "2"]) == 2  # no --out: rank 0 would not know where to write
    assert cli.main(_bench(tmp_path, "--providers", "eager")) == 2
    assert "sync_fused" in capsys.readouterr().err
    assert cli.main(_bench(tmp_path, "--resume")) == 2
    assert "does not support --resume" in capsys.readouterr().err
    assert cli.main(_bench(tmp_path, "--reps", "0")) == 2


def test_bench_world_size_plans_every_case_option(tmp_path, capsys):
    """--pass, --dtype, --spatial, --layout and --providers reach the distributed sweep (they were dropped once)."""
    argv = _bench(tmp_path, "--spatial", "3x3", "--dtype", "bf16", "--layout", "channels_last", "--pass", "bwd,eval",
                  "--providers", "sync_fused_torch", "--dry-run")  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 point(s)" in out
    assert "sync_fused_torch      bwd bf16 relu 8x4x3x3 channels_last" in out
    assert "sync_fused_torch      eval bf16 relu 8x4x3x3 channels_last" in out
