"""Synchronised BatchNorm + activation over ``torch.distributed``: the autograd function and its two collectives.

Training step of one layer, on every rank of the process group:

1. forward: local per-channel (count, mean, M2) (the Triton reduction kernel ``bn_act_batch_stats``, or plain torch
   ops on the ``torch`` backend); ONE ``all_gather`` of the packed float64 buffer
   ``[count, C_input, device_kind, problem, mean(C), M2(C)]``; every rank merges the K rows in rank order; the fused
   normalise + activation runs locally (``bn_act_apply``);
2. backward: local (sum dz, sum dz*x_hat) (``bn_act_bwd_sums``); ONE ``all_reduce`` of the packed
   ``[sum_dz, sum_dz_xhat]`` (only when the input needs a gradient, as in ``nn.SyncBatchNorm``); the local dx pass
   (``bn_act_bwd_dx``). dweight and dbias are the LOCAL sums, as ``nn.SyncBatchNorm`` returns them:
   DistributedDataParallel averages parameter gradients across ranks itself.

Merge: ``mean = sum_r n_r mean_r / n``, ``M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2`` in float64, reduced over
the gathered (K, C) rows in rank order (deterministic). Each rank's M2 is taken about its own mean and the
between-rank term uses differences of means, so nothing cancels when |mean| >> std (unlike all-reducing plain sums
and sums of squares). A gather rather than an all_reduce also carries every rank's count, so unequal batch sizes
and a rank with an empty batch (count 0) need no special case.

Errors: an input whose channel count differs from the layer's, or that sits on another device than the layer's
parameters, is NOT raised locally before the collective (the other ranks would wait in the gather until the
process group times out). The rank reports the problem in the header of the same gather (zeros for its statistics),
and after it every rank raises the same ValueError naming each offending rank. So mismatches cost no third
collective and cannot hang. Not detectable this way: layers whose ``num_features`` differ between ranks (the
buffers differ in size), or one rank in eval while another trains (it never enters the gather).

Reading the gathered header (counts, problems) on the host synchronises with the device once per layer and step, as
``nn.SyncBatchNorm`` does for its counts; the global count is needed on the host for the dx pass anyway.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from bnbench.activations import Activation, apply_activation

__all__ = ["CollectiveRecord", "record_collectives", "sync_batch_norm_act"]

_HEADER = 4  # count, C_input, device kind, problem code
_CHANNELS, _DEVICE, _UNSUPPORTED, _RESIDUAL = 1, 2, 3, 4
_DEVICE_KINDS = {"cpu": 0.0, "cuda": 1.0}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Collectives (and optional timing of them, for the benchmark)
# ---------------------------------------------------------------------------------------------------------------

_RECORDS: list | None = None


class CollectiveRecord:
    """One collective call: ``name`` ("all_gather" or "all_reduce") and its duration in ms (CUDA events on a GPU,
    the wall clock otherwise: gloo on CPU runs the collective inside the call)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._start, self._wall_ms = time.perf_counter(), None

    def stop(self) -> None:
        if self._cuda:
            self._events[1].record()
        else:
            self._wall_ms = (time.perf_counter() - self._start) * 1e3

    @property
    def ms(self) -> float:
        if self._cuda:
            self._events[1].synchronize()
            return float(self._events[0].elapsed_time(self._events[1]))
        return float(self._wall_ms)


@contextlib.contextmanager
def record_collectives() -> Iterator[list[CollectiveRecord]]:
    """Collect a :class:`CollectiveRecord` for every collective this module issues inside the block."""
    global _RECORDS
    previous, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        _RECORDS = previous


@contextlib.contextmanager
def _timed(name: str, device: torch.device) -> Iterator[None]:
    record = CollectiveRecord(name, device) if _RECORDS is not None else None
    yield
    if record is not None:
        record.stop()
        _RECORDS.append(record)


def _all_gather(buf: Tensor, group) -> Tensor:
    """(world, numel) rows of every rank's ``buf``: one collective. gloo takes the list form (torch's own
    SyncBatchNorm does the same); other backends the single-tensor form."""
    world = dist.get_world_size(group)
    with _timed("all_gather", buf.device):
        if dist.get_backend(group) == "gloo":
            rows = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(rows, buf, group=group)
            return torch.stack(rows)
        out = buf.new_empty(world * buf.numel())
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_single(out, buf, group=group)
        return out.view(world, buf.numel())


def _all_reduce(buf: Tensor, group) -> Tensor:
    with _timed("all_reduce", buf.device):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf


# ---------------------------------------------------------------------------------------------------------------
# Forward statistics
# ---------------------------------------------------------------------------------------------------------------


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_view(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _local_problem(
    x: Tensor, num_features: int, home: torch.device, use_triton: bool, residual: Tensor | None = None
) -> tuple[int, str] | None:
    """(code, message) when this rank's input (or residual) cannot join the merge, else None."""
    if x.dim() < 2 or x.dim() > 5:
        return _UNSUPPORTED, f"expected a 2-D to 5-D input (N, C, ...), got shape {tuple(x.shape)}"
    if x.shape[1] != num_features:
        return _CHANNELS, f"input has {x.shape[1]} channels (shape {tuple(x.shape)}) but the layer has {num_features}"
    if x.device != home:
        return _DEVICE, f"input is on {x.device} but the layer's parameters and buffers are on {home}"
    if use_triton and x.dtype not in _TRITON_DTYPES:
        return _UNSUPPORTED, f"input dtype {x.dtype} is not supported by the Triton kernels (float32/16, bfloat16)"
    if residual is not None and (
        not isinstance(residual, Tensor)
        or (residual.shape, residual.dtype, residual.device) != (x.shape, x.dtype, x.device)
    ):
        found = (
            f"{tuple(residual.shape)} {residual.dtype} on {residual.device}"
            if isinstance(residual, Tensor)
            else type(residual).__name__
        )
        return _RESIDUAL, f"residual {found} does not match input {tuple(x.shape)} {x.dtype} on {x.device}"
    return None


def _local_stats(x: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, M2) of the local batch; zeros for an empty one."""
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], device=x.device, dtype=torch.float64)
        return zeros, zeros.clone()
    if use_triton:
        from bnbench import kernels

        return kernels.bn_act_batch_stats(x)
    xf, dims = x.to(torch.promote_types(x.dtype, torch.float32)), _reduce_dims(x)
    mean = xf.mean(dims)
    return mean, (xf - mean.view(_channel_view(x))).square().sum(dims)


def _describe(code: int, c_input: int, num_features: int) -> str:
    if code == _CHANNELS:
        return f"input has {c_input} channels, the layer {num_features}"
    if code == _DEVICE:
        return "input is on another device than the layer"
    if code == _RESIDUAL:
        return "residual does not match the input (shape, dtype or device)"
    return "unsupported input (shape or dtype)"


def _exchange_stats(x, num_features, home, group, use_triton, residual) -> tuple[Tensor, Tensor, int]:
    """The forward collective: global (mean, M2) as float64 (C,) on ``home``, and the global count."""
    if dist.get_backend(group) == "nccl" and home.type != "cuda":
        raise ValueError(f"the process group's backend is nccl, which needs CUDA tensors; the layer is on {home}")
    problem = _local_problem(x, num_features, home, use_triton, residual)
    buf = torch.zeros(_HEADER + 2 * num_features, device=home, dtype=torch.float64)
    count = 0 if problem is not None else x.numel() // max(x.shape[1], 1)
    c_input = x.shape[1] if x.dim() >= 2 else -1
    header = [count, c_input, _DEVICE_KINDS.get(home.type, 2.0), problem[0] if problem else 0]
    buf[:_HEADER] = torch.tensor(header, dtype=torch.float64)
    if problem is None:
        mean, m2 = _local_stats(x, use_triton)
        buf[_HEADER : _HEADER + num_features] = mean
        buf[_HEADER + num_features :] = m2
    rows = _all_gather(buf, group)
    headers = rows[:, :_HEADER].tolist()  # one device-to-host copy: counts and problems of every rank
    _raise_on_problems(headers, problem, num_features, dist.get_rank(group))
    total = int(sum(h[0] for h in headers))
    if total < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} over all {len(headers)} ranks "
            f"(per rank: {[int(h[0]) for h in headers]}; this rank's input {tuple(x.shape)})"
        )
    counts = rows[:, 0:1]
    means, m2s = rows[:, _HEADER : _HEADER + num_features], rows[:, _HEADER + num_features :]
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2, total


def _raise_on_problems(headers: list[list[float]], problem, num_features: int, rank: int) -> None:
    bad = {r: (int(h[3]), int(h[1])) for r, h in enumerate(headers) if h[3] != 0}
    if bad:
        each = "; ".join(f"rank {r}: {_describe(code, c, num_features)}" for r, (code, c) in bad.items())
        here = f" This rank ({rank}): {problem[1]}." if problem else ""
        raise ValueError(f"SyncBatchNormAct: {len(bad)} rank(s) rejected their input ({each}).{here}")
    kinds = {r: h[2] for r, h in enumerate(headers)}
    if len(set(kinds.values())) > 1:
        names = {v: k for k, v in _DEVICE_KINDS.items()}
        listed = ", ".join(f"rank {r}: {names.get(v, 'other')}" for r, v in kinds.items())
        raise ValueError(f"SyncBatchNormAct: the ranks hold the layer on different device types ({listed})")


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------


def _torch_dz(z: Tensor, dy: Tensor, act: Activation, param: float) -> Tensor:
    """dy * act'(z) with PyTorch's own activation definitions (autograd of :func:`apply_activation`)."""
    if act is Activation.IDENTITY:
        return dy
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (dz,) = torch.autograd.grad(apply_activation(leaf, act, param), leaf, dy)
    return dz


class _SyncBatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, act, param, group, home,
                use_triton, num_features):  # fmt: skip
        mean64, m2_64, total = _exchange_stats(x, num_features, home, group, use_triton, residual)
        if running_mean is not None:
            with torch.no_grad():
                factor = momentum.to(home) if isinstance(momentum, Tensor) else momentum
                unbiased = m2_64 / (total - 1)
                running_mean.copy_(running_mean * (1 - factor) + mean64.to(running_mean.dtype) * factor)
                running_var.copy_(running_var * (1 - factor) + unbiased.to(running_var.dtype) * factor)
        stat_dtype = torch.float32 if use_triton else torch.promote_types(x.dtype, torch.float32)
        mean, rstd = mean64.to(stat_dtype), torch.rsqrt(m2_64 / total + eps).to(stat_dtype)
        if use_triton:
            from bnbench import kernels

            y = kernels.bn_act_apply(
                x, mean, rstd, weight, bias, activation=act.value, act_param=param, residual=residual
            )
        else:
            y = _torch_apply(x, mean, rstd, weight, bias, act, param, residual)
        ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
        ctx.config = (act, param, group, total, use_triton)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        act, param, group, total, use_triton = ctx.config
        need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
        need_dr = need_dr and residual is not None
        if use_triton:
            from bnbench import kernels
        if use_triton and x.numel() > 0:
            sum_dz, sum_dz_xhat = kernels.bn_act_bwd_sums(
                dy, x, mean, rstd, weight, bias, activation=act.value, act_param=param, residual=residual
            )
        else:
            sum_dz, sum_dz_xhat, dz, x_hat = _torch_sums(dy, x, mean, rstd, weight, bias, act, param, residual)
        dweight = sum_dz_xhat.to(weight.dtype) if need_dw and weight is not None else None
        dbias = sum_dz.to(bias.dtype) if need_db and bias is not None else None
        dx = dresidual = None
        if need_dx:  # the backward collective: global sums for dx (every rank joins, also with an empty batch)
            C = mean.numel()
            sums = _all_reduce(torch.cat([sum_dz.float(), sum_dz_xhat.float()]), group)
            g_dz, g_dz_xhat = sums[:C].to(mean.dtype), sums[C:].to(mean.dtype)
        else:  # the residual's gradient dz alone needs no global sums (the dx pass that writes it ignores them)
            g_dz, g_dz_xhat = sum_dz, sum_dz_xhat
        if (need_dx or need_dr) and x.numel() == 0:
            dx, dresidual = torch.zeros_like(x), None if residual is None else torch.zeros_like(residual)
        elif (need_dx or need_dr) and use_triton:
            grads = kernels.bn_act_bwd_dx(
                dy, x, mean, rstd, weight, bias, g_dz, g_dz_xhat, total, activation=act.value, act_param=param,
                residual=residual,
            )  # fmt: skip
            dx, dresidual = grads if residual is not None else (grads, None)
        elif need_dx or need_dr:
            w = weight.to(mean.dtype) if weight is not None else torch.ones_like(mean)
            shape = _channel_view(x)
            scale = (w * rstd).view(shape)
            dx = scale * (dz - (g_dz / total).view(shape) - x_hat * (g_dz_xhat / total).view(shape))
            dx = dx.to(x.dtype)
            dresidual = None if residual is None else dz.to(residual.dtype)
        return (dx if need_dx else None), dweight, dbias, (dresidual if need_dr else None), *([None] * 10)


def _torch_z(x_hat, weight, bias, residual, shape, dtype) -> Tensor:
    """z = x_hat * weight + bias (+ residual) in ``dtype``."""
    z = x_hat * weight.to(dtype).view(shape) if weight is not None else x_hat
    z = z + bias.to(dtype).view(shape) if bias is not None else z
    return z + residual.to(dtype) if residual is not None else z


def _torch_apply(x, mean, rstd, weight, bias, act, param, residual) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    shape = _channel_view(x)
    x_hat = (x.to(mean.dtype) - mean.view(shape)) * rstd.view(shape)
    z = _torch_z(x_hat, weight, bias, residual, shape, mean.dtype)
    return apply_activation(z, act, param).to(x.dtype)


def _torch_sums(dy, x, mean, rstd, weight, bias, act, param, residual):
    """Local (sum_dz, sum_dz_xhat, dz, x_hat) in plain torch ops (the ``torch`` backend, and empty batches)."""
    if x.numel() == 0:
        zeros = torch.zeros_like(mean)
        return zeros, zeros.clone(), None, None
    shape, dims = _channel_view(x), _reduce_dims(x)
    x_hat = (x.to(mean.dtype) - mean.view(shape)) * rstd.view(shape)
    z = _torch_z(x_hat, weight, bias, residual, shape, mean.dtype)
    dz = _torch_dz(z, dy.to(mean.dtype), act, param)
    return dz.sum(dims), (dz * x_hat).sum(dims), dz, x_hat


def sync_batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    activation: Activation,
    activation_param: float,
    process_group,
    use_triton: bool,
    residual: Tensor | None = None,
) -> Tensor:
    """Training-mode ``activation(batch_norm(input) [+ residual])`` with statistics over every rank of
    ``process_group``. A residual that does not match the input is reported through the forward collective.

    Updates the running statistics (when given) from the global batch: unbiased variance with the global count,
    ``momentum`` a number or a 0-dim tensor (``1 / num_batches_tracked`` for the cumulative average). A 5-D input
    runs on the kernels as its (N, C, D*H*W) view. The layer's home device is that of its parameters/buffers.
    """
    anchor = next((t for t in (weight, running_mean, bias, running_var) if t is not None), None)
    if anchor is None and input.dim() < 2:
        raise ValueError(f"expected a 2-D to 5-D input (N, C, ...), got shape {tuple(input.shape)}")
    num_features = anchor.numel() if anchor is not None else input.shape[1]
    anchor = input if anchor is None else anchor
    x, r = input, residual
    if use_triton and x.dim() == 5 and x.device == anchor.device:
        x = x.view(x.shape[0], x.shape[1], -1)  # both standard 5-D layouts flatten to a view, never a copy
        if isinstance(r, Tensor) and r.shape == input.shape:
            r = r.view(x.shape)
    y = _SyncBatchNormActFunction.apply(
        x, weight, bias, r, running_mean, running_var, momentum, float(eps), activation, float(activation_param),
        process_group, anchor.device, bool(use_triton), num_features,
    )  # fmt: skip
    return y.view(input.shape) if y.dim() != input.dim() else y
