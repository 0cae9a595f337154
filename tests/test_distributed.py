"""SyncBatchNormAct on torch.distributed: gloo process groups of 2 and 3 CPU processes on the loopback interface.

Spawning is slow (each process imports torch), so each process group runs a list of checks in one go. A check
computes its reference itself: every rank draws the same global batch from a seed and keeps its own slice.
The references are ``nn.BatchNorm*`` + the activation in float64 on the whole global batch (the definition of
``nn.SyncBatchNorm``, which refuses CPU tensors, so on CPU it is compared by definition; the gpu-marked test
compares against nn.SyncBatchNorm itself) and single-process BatchNormAct. Every process has hard time limits:
the group's collectives time out after 60 s and the parent kills whatever is left after its deadline.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnbench.activations import apply_activation, parse_activation
from bnbench.distributed import SyncBatchNormAct, convert_sync_bn_act
from bnbench.testing import call_in_file

HAS_CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------------------------------------------
# Spawning
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, checks: list[str], results) -> None:
    if not torch.cuda.is_available():  # before anything imports triton: without a GPU the kernels run interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        for name in checks:
            _check(name)(rank, world)
        results.put((rank, "ok", ""))
    except BaseException:
        results.put((rank, "failed", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(world: int, checks: list[str], timeout_s: float = 150.0) -> None:
    """Run ``checks`` on ``world`` spawned gloo ranks; fail with the first rank's traceback. Every process is
    joined or killed before this returns."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=call_in_file, args=(__file__, "_worker", r, world, port, checks, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    reports, failure = {}, None
    try:
        while len(reports) < world and failure is None:
            try:
                rank, status, text = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reports and p.exitcode not in (None, 0)]
                if dead:  # a rank that died before reporting (e.g. on import) would otherwise cost the timeout
                    failure = f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]} before reporting"
                elif time.monotonic() > deadline:
                    failure = f"timed out after {timeout_s} s; reports so far: {sorted(reports)}"
                continue
            reports[rank] = status
            if status != "ok":
                failure = f"rank {rank} failed:\n{text}"
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()) if failure is None else 1.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert failure is None, failure
    assert [p.exitcode for p in procs] == [0] * world


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------


def _splits(total: int, world: int) -> list[int]:
    """Unequal per-rank batch sizes; with 3 ranks the middle one gets an empty batch."""
    if world == 2:
        return [total // 2 - 1, total - total // 2 + 1]
    return [1, 0, total - 1] + [0] * (world - 3)


def _local(t: torch.Tensor, rank: int, sizes: list[int]) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _bn_class(dim: int):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-12)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def _compare_training(rank, world, *, shape, activation, param=None, momentum=0.1, channels_last=False, offset=0.0,
                      backend="torch", tol=2e-5, steps=2, affine=True, device="cpu", dtype=torch.float32,
                      residual=False):  # fmt: skip
    """SyncBatchNormAct on this rank's slice vs nn.BatchNorm + activation (float64) on the global batch: outputs,
    input/weight/bias gradients and running statistics over ``steps`` training steps, then eval outputs. With
    ``residual``: act(BN(x) + r), r contiguous (so of other strides than a channels_last x), and r's gradient."""
    act, act_param = parse_activation(activation, param)
    C, sizes = shape[1], _splits(shape[0], world)
    gen = torch.Generator().manual_seed(sum(shape) + len(activation))
    layer = SyncBatchNormAct(C, momentum=momentum, affine=affine, activation=act, activation_param=param,
                             backend=backend, device=device)  # fmt: skip
    ref = _bn_class(len(shape))(C, momentum=momentum, affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
            layer.weight.copy_(w), layer.bias.copy_(b), ref.weight.copy_(w), ref.bias.copy_(b)
    for step in range(steps):
        xg = (torch.randn(shape, generator=gen) * 2 + offset).to(dtype)  # the reference sees the same rounded input
        gg = torch.randn(shape, generator=gen).to(dtype)
        rg = torch.randn(shape, generator=gen).to(dtype) if residual else None
        x = _local(xg, rank, sizes).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        r = _local(rg, rank, sizes).to(device).requires_grad_(True) if residual else None
        layer.zero_grad(set_to_none=True)
        y = layer(x) if r is None else layer(x, r)
        y.backward(_local(gg, rank, sizes).to(device))
        xr = xg.double().requires_grad_(True)
        rr = rg.double().requires_grad_(True) if residual else None
        ref.zero_grad(set_to_none=True)
        yr = apply_activation(ref(xr) if rr is None else ref(xr) + rr, act, act_param)
        yr.backward(gg.double())
        what = f"{shape} {activation} step {step} rank {rank}"
        if x.numel():
            _close(y, _local(yr, rank, sizes), tol, f"output {what}")
            _close(x.grad, _local(xr.grad, rank, sizes), tol, f"input grad {what}")
            if r is not None:
                _close(r.grad, _local(rr.grad, rank, sizes), tol, f"residual grad {what}")
        else:
            assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
        if affine:  # local sums, as nn.SyncBatchNorm returns them: over the ranks they are the global gradient
            _close(_sum_over_ranks(layer.weight.grad), ref.weight.grad, tol, f"weight grad {what}")
            _close(_sum_over_ranks(layer.bias.grad), ref.bias.grad, tol, f"bias grad {what}")
        _close(layer.running_mean, ref.running_mean, tol, f"running_mean {what}")
        _close(layer.running_var, ref.running_var, tol, f"running_var {what}")
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    layer.eval(), ref.eval()
    x = torch.randn(shape, generator=gen) + offset
    r = torch.randn(shape, generator=gen) if residual else torch.zeros(shape)
    with torch.no_grad():
        y = layer(x.to(device), r.to(device)) if residual else layer(x.to(device))
        _close(y, apply_activation(ref(x.double()) + r.double(), act, act_param), tol, f"eval {shape}")


# ---------------------------------------------------------------------------------------------------------------
# Checks (run inside the spawned ranks)
# ---------------------------------------------------------------------------------------------------------------


def check_matches_global_batch(rank: int, world: int) -> None:
    # (N, C): the BatchNorm1d case; C=3 not a power of two; momentum=None is the cumulative average
    _compare_training(rank, world, shape=(7, 3), activation="relu", momentum=None)
    # (N, C, L) with a leaky slope, and a mean offset of 1e3 x the std: the merge must not cancel
    _compare_training(rank, world, shape=(6, 4, 5), activation="leaky_relu", param=0.2, offset=2000.0, tol=1e-4)
    # (N, C, H, W) channels_last with a smooth activation; no affine parameters
    _compare_training(rank, world, shape=(5, 3, 3, 2), activation="gelu", channels_last=True, affine=False)
    # bfloat16 input (mixed precision): fp32 statistics, output and gradients rounded to bfloat16
    _compare_training(rank, world, shape=(6, 5), activation="silu", dtype=torch.bfloat16, tol=1e-2, steps=1)
    # (N, C, D, H, W): 5-D input as nn.SyncBatchNorm accepts it
    _compare_training(rank, world, shape=(4, 2, 2, 3, 2), activation="sigmoid", steps=1)
    # act(BN(x) + residual): a channels_last x with a contiguous residual, and its gradient
    _compare_training(rank, world, shape=(5, 3, 3, 2), activation="relu", channels_last=True, residual=True, steps=1)


def check_triton_path(rank: int, world: int) -> None:
    """The Triton path on tiny inputs (on CPU in the interpreter; on a GPU natively); the kernels really run."""
    from bnbench import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"

    calls = {}
    originals = {
        n: getattr(kernels, n) for n in ("bn_act_batch_stats", "bn_act_apply", "bn_act_bwd_sums", "bn_act_bwd_dx")
    }

    def spy(name):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return wrapped

    try:
        for name in originals:
            setattr(kernels, name, spy(name))
        _compare_training(rank, world, shape=(6, 3), activation="relu", backend="triton", tol=1e-5, steps=1,
                          device=device)  # fmt: skip
        _compare_training(rank, world, shape=(4, 3, 2, 3), activation="silu", backend="triton", tol=1e-5, steps=1,
                          channels_last=True, device=device)  # fmt: skip
        # with a residual of other strides than x: read by the apply pass, its gradient written by the dx pass
        _compare_training(rank, world, shape=(4, 3, 2, 3), activation="relu", backend="triton", tol=1e-5, steps=1,
                          channels_last=True, device=device, residual=True)  # fmt: skip
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    assert set(calls) == set(originals), f"Triton launchers called: {calls}"


_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast", "barrier",
                "reduce_scatter", "all_gather_object")  # fmt: skip


def _count_collectives(fn) -> dict[str, int]:
    counts, originals = {}, {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

    def counting(name):
        def wrapped(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return wrapped

    try:
        for name in originals:
            setattr(dist, name, counting(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return counts


def check_two_collectives_per_step(rank: int, world: int) -> None:
    layer = SyncBatchNormAct(4, activation="tanh", backend="torch")
    x = torch.randn(3 + rank, 4, 2, requires_grad=True)
    assert _count_collectives(lambda: layer(x).sum().backward()) == {"all_gather": 1, "all_reduce": 1}
    # an input that needs no gradient: nothing to all-reduce (dweight/dbias are local), as in nn.SyncBatchNorm
    assert _count_collectives(lambda: layer(x.detach()).sum().backward()) == {"all_gather": 1}
    layer.eval()
    assert _count_collectives(lambda: layer(x).sum().backward()) == {}


def check_errors_raise_on_every_rank(rank: int, world: int) -> None:
    last = world - 1
    layer = SyncBatchNormAct(4, backend="torch")
    # one rank's input has another channel count: every rank raises (none hangs in the gather)
    x = torch.randn(3, 5 if rank == last else 4, 2)
    with pytest.raises(ValueError, match=f"rank {last}: input has 5 channels, the layer 4"):
        layer(x)
    # one rank's input on another device than the layer ("meta" stands in for a second device on CPU)
    x = torch.randn(3, 4, device="meta" if rank == last else "cpu")
    with pytest.raises(ValueError, match=f"rank {last}: input is on another device than the layer"):
        layer(x)
    # the same with the Triton backend: the backend follows the layer's device, so that rank still reports
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 4, device="meta" if rank == last else device)
    with pytest.raises(ValueError, match=f"rank {last}: input is on another device than the layer"):
        SyncBatchNormAct(4, backend="triton", device=device)(x)
    # one rank's input has no channel axis
    x = torch.randn(4) if rank == last else torch.randn(3, 4)
    with pytest.raises(ValueError, match=f"rank {last}: unsupported input"):
        layer(x)
    # one rank's residual does not match its input: reported through the gather, raised on every rank
    x = torch.randn(3, 4)
    r = torch.randn(3, 4, dtype=torch.float64 if rank == last else torch.float32)
    with pytest.raises(ValueError, match=f"rank {last}: residual does not match the input"):
        layer(x, r)
    # a single value per channel over all ranks together: the same error everywhere
    x = torch.randn(1 if rank == 0 else 0, 4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got 1 over all"):
        layer(x)
    # and the group is still in step afterwards
    y = layer(torch.randn(2, 4, requires_grad=True))
    y.sum().backward()


def check_matches_torch_sync_batch_norm(rank: int, world: int) -> None:
    """On a GPU: SyncBatchNormAct (Triton kernels) == nn.SyncBatchNorm + activation, both synchronised by gloo over
    CUDA tensors (two ranks may share one GPU): outputs, input gradient, the LOCAL weight/bias gradients, running
    statistics, over two steps with unequal batch sizes."""
    for shape, activation, channels_last in (((9, 6, 5, 4), "relu", True), ((7, 5), "gelu", False)):
        act, act_param = parse_activation(activation)
        sizes, C = _splits(shape[0], world), shape[1]
        gen = torch.Generator().manual_seed(C)
        ours = SyncBatchNormAct(C, activation=activation, device="cuda")
        theirs = nn.SyncBatchNorm(C, device="cuda")
        with torch.no_grad():
            w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
            for layer in (ours, theirs):
                layer.weight.copy_(w), layer.bias.copy_(b)
        for step in range(2):
            x = _local(torch.randn(shape, generator=gen) + 3, rank, sizes).cuda()
            g = _local(torch.randn(shape, generator=gen), rank, sizes).cuda()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ya, yb = ours(xa), apply_activation(theirs(xb), act, act_param)
            ya.backward(g), yb.backward(g)
            what = f"{shape} {activation} step {step} rank {rank}"
            for name, a, e in (("output", ya, yb), ("input grad", xa.grad, xb.grad),
                               ("weight grad", ours.weight.grad, theirs.weight.grad),
                               ("bias grad", ours.bias.grad, theirs.bias.grad),
                               ("running_mean", ours.running_mean, theirs.running_mean),
                               ("running_var", ours.running_var, theirs.running_var)):  # fmt: skip
                _close(a, e, 1e-5, f"{name} {what}")


CHECKS = {f.__name__: f for f in (check_matches_global_batch, check_triton_path, check_two_collectives_per_step,
                                  check_errors_raise_on_every_rank, check_matches_torch_sync_batch_norm)}  # fmt: skip
#: checks of the code built on the layer, kept beside that code's other tests ("FILE::FUNCTION", FILE in tests/);
#: they run in this file's process group so that CI spawns one group of two ranks, not three
OTHER_CHECKS = (
    "test_bench_distributed.py::check_sync_bench_rows",
    "test_distributed_train.py::check_ddp_equals_single_process",
)


def _check(name: str):
    if "::" not in name:
        return CHECKS[name]
    file, function = name.split("::")
    return lambda rank, world: call_in_file(str(Path(__file__).with_name(file)), function, rank, world)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_two_ranks():
    run_group(2, [*(name for name in CHECKS if name != "check_matches_torch_sync_batch_norm"), *OTHER_CHECKS])


@pytest.mark.gpu
def test_matches_torch_sync_batch_norm_on_gpu():
    run_group(2, ["check_matches_torch_sync_batch_norm"], timeout_s=400)


def test_three_ranks_with_an_empty_rank():
    run_group(3, ["check_matches_global_batch", "check_errors_raise_on_every_rank"])


def test_without_process_group_equals_batch_norm_act():
    """No initialised group: exactly BatchNormAct (same code path), training steps with momentum=None, then eval."""
    from bnbench.modules import BatchNormAct2d

    torch.manual_seed(0)
    sync, plain = (
        SyncBatchNormAct(3, momentum=None, activation="silu"),
        BatchNormAct2d(3, momentum=None, activation="silu"),
    )
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2, requires_grad=True)
        y1, y2 = sync(x), plain(x)
        assert torch.equal(y1, y2)
        g1, g2 = torch.autograd.grad(y1.sum(), (x, sync.weight)), torch.autograd.grad(y2.sum(), (x, plain.weight))
        assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert torch.equal(sync.running_var, plain.running_var) and int(sync.num_batches_tracked) == 2
    sync.eval(), plain.eval()
    assert torch.equal(sync(x), plain(x))


def test_world_size_one_runs_no_collective():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = SyncBatchNormAct(3, backend="torch")
        x = torch.randn(5, 3, requires_grad=True)
        assert _count_collectives(lambda: layer(x).sum().backward()) == {}
    finally:
        dist.destroy_process_group()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        SyncBatchNormAct(3, backend="cuda")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        SyncBatchNormAct(3, activation="swish")
    with pytest.raises(ValueError, match="expected a 2-D to 5-D input"):
        SyncBatchNormAct(3)(torch.randn(3))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        convert_sync_bn_act("resnet")


class _Block(nn.Module):
    """A forward that calls a SyncBatchNorm then a functional activation (converted through torch.fx)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.SyncBatchNorm(4)

    def forward(self, x):
        return nn.functional.leaky_relu(self.bn(self.conv(x)), 0.2)


def _model() -> nn.Module:
    from bnbench.modules import BatchNormAct2d

    torch.manual_seed(0)
    return nn.Sequential(
        _Block(), nn.BatchNorm2d(4), nn.GELU(),  # a Sequential pair
        BatchNormAct2d(4, activation="tanh"),  # already fused: keeps its activation
        nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2),  # no activation after it: identity
    )  # fmt: skip


def test_convert_sync_bn_act():
    model = _model()
    converted, report = convert_sync_bn_act(model, return_report=True)
    assert report.converted == {"0.bn": "leaky_relu(0.2)", "1": "gelu", "3": "tanh", "5": "identity"}
    assert "5" in report.skipped and all(
        isinstance(m, SyncBatchNormAct) for m in (converted[1], converted[3], converted[5])
    )
    assert isinstance(converted[2], nn.Identity) and isinstance(converted[0].bn, SyncBatchNormAct)
    # state_dict: the keys of nn.SyncBatchNorm.convert_sync_batchnorm, loadable both ways
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
    assert list(converted.state_dict()) == list(torch_sync.state_dict())
    converted.load_state_dict(torch_sync.state_dict())
    torch_sync.load_state_dict(converted.state_dict())
    # outside a process group nn.SyncBatchNorm runs as BatchNorm: same outputs and running statistics as the original
    for train in (True, False):
        model.train(train), converted.train(train)
        x = torch.randn(3, 3, 4, 4)
        torch.testing.assert_close(converted(x), model(x))
    torch.testing.assert_close(converted.state_dict(), model.state_dict())
    assert converted is not model and isinstance(model[1], nn.BatchNorm2d)  # inplace=False converts a copy
    # a BatchNorm with hooks is converted without them and without its activation (the hook would not run)
    hooked = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
    hooked[0].register_forward_hook(lambda *args: None)
    converted, report = convert_sync_bn_act(hooked, return_report=True)
    assert report.converted == {"0": "identity"} and "hooks" in report.skipped["0"]
    assert isinstance(converted[1], nn.ReLU)
    group = object()  # stored, not used outside a process group
    assert all(m.process_group is group for m in convert_sync_bn_act(_model(), group).modules()
               if isinstance(m, SyncBatchNormAct))  # fmt: skip


def test_a_5d_tensor_that_does_not_flatten_without_a_copy_is_refused_clearly():
    """Without a process group the 5-D path reads (N, C, D*H*W) views; D, H, W transposed have no such view."""
    layer = SyncBatchNormAct(3, backend="torch")
    x = torch.randn(2, 3, 2, 2, 2)
    with pytest.raises(ValueError, match=r"residual of shape \(2, 3, 2, 2, 2\) has strides"):
        layer(x, torch.randn(2, 3, 2, 2, 2).transpose(2, 4))
    with pytest.raises(ValueError, match=r"input of shape \(2, 3, 2, 2, 2\) has strides"):
        layer(x.transpose(2, 4))
    layer(x, torch.randn(2, 3, 2, 2, 2).to(memory_format=torch.channels_last_3d))  # flattens as a view: fine
