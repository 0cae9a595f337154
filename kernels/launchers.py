"""Host launchers for the fused BatchNorm + activation kernels: check, allocate, launch.

No autograd here (``bnbench.functional`` wraps these). Every tensor is addressed through its strides; nothing is
copied. Statistics are fp32 whatever the input dtype; outputs take the input's dtype and memory format.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ._backward import (
    _bn_act_bwd_dx_kernel,
    _bn_act_bwd_fused_kernel,
    _bn_act_bwd_reduce_kernel,
)
from ._driver import recording_target  # CPU tensors are fine while launches are only recorded
from ._errors import ShapeError
from ._forward import (
    _bn_act_fwd_apply_kernel,
    _bn_act_fwd_fused_kernel,
    _bn_act_fwd_stats_kernel,
)
from ._launch import launch as _launch_compiled
from ._plan import Geometry, KernelConfig, Strides, cdiv, default_config, elementwise_grid, geometry_of, next_pow2

__all__ = [
    "MEMORY_SAVING_ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "bn_act_apply",
    "bn_act_batch_stats",
    "bn_act_bwd",
    "bn_act_bwd_dx",
    "bn_act_bwd_from_output",
    "bn_act_bwd_sums",
    "bn_act_fwd_eval",
    "bn_act_fwd_train",
    "interpreter_active",
    "plan",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")


@functools.cache
def interpreter_active() -> bool:
    """True when these kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import; fixed
    from then on, hence cached)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_bn_act_fwd_apply_kernel, InterpretedFunction)


def _launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Every kernel launch goes through here (tests count launches per pass by patching it): the compiled kernel
    launched directly, cached per launch key (:mod:`._launch`), or the interpreter through ``kernel[grid]``."""
    if interpreter_active():
        kernel[grid](*args, **kwargs)
    else:
        _launch_compiled(kernel, grid, args, kwargs)


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    """Output allocation (same dtype, device and, for dense inputs, strides). Tests poison it."""
    return torch.empty_like(t)


def _check_input(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; the Triton kernels support float32, float16 and bfloat16")
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"{name} must be 2-D, 3-D or 4-D (N, C, ...), got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not interpreter_active() and recording_target() is None:
        raise ValueError(
            f"{name} is on {x.device}; the Triton kernels run on CUDA tensors, or on CPU tensors only when "
            "TRITON_INTERPRET=1 was set before triton was imported"
        )


def _check_channel_tensor(t: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    C = x.shape[1]
    if t.dim() != 1 or t.shape[0] != C:
        raise ShapeError(f"{name} must have shape ({C},) to match input channels C={C}, got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32 or the input's dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
    if t.stride(0) != 1 and C > 1:
        raise ValueError(f"{name} must have unit stride, got stride {t.stride(0)}")


def _check_residual(residual: torch.Tensor | None, x: torch.Tensor) -> None:
    """A residual (of y = act(BN(x) + residual)) matches x in shape, dtype and device; any strides."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} on {residual.device} does not match input "
            f"{tuple(x.shape)} {x.dtype} on {x.device}"
        )


def _layout(tensors: tuple[torch.Tensor, ...], residuals: tuple[torch.Tensor | None, ...]):
    """(geom, strides of ``tensors``, residual pointers, residual strides flattened) of one launch: the common
    [N, C, S] view of ``tensors`` and the residual tensors (each read through its own strides). ``residuals``:
    ``(residual,)`` forward, ``(residual, its gradient)`` backward, or Nones without a residual: then the first
    tensor and its strides stand in for each (HAS_RESIDUAL off: never read; the kernel is specialised as it was
    before it took a residual)."""
    present = tuple(t for t in residuals if t is not None)
    geom, strides = geometry_of(*tensors, *present)
    own = strides[: len(tensors)]
    if present:
        pointers, theirs = present, strides[len(tensors) :]
    else:
        pointers, theirs = (tensors[0],) * len(residuals), (own[0],) * len(residuals)
    return geom, own, pointers, tuple(v for st in theirs for v in st.args())


def _activation_name(activation: str) -> str:
    name = getattr(activation, "value", activation)
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(_ACTIVATIONS)}")
    return name


def plan(x: torch.Tensor, config: KernelConfig | None = None) -> tuple[Geometry, KernelConfig]:
    """The [N, C, S] view of x and the launch configuration the launchers would use for it."""
    geom, (x_strides,) = geometry_of(x)
    return geom, config or default_config(geom, x_strides, x.element_size(), x.device)


def _tile_kwargs(cfg: KernelConfig, geom: Geometry) -> dict:
    """The tile and addressing constexprs (and warps) every data kernel takes."""
    return {
        "BLOCK_SIZE_N": cfg.block_size_n,
        "BLOCK_SIZE_C": cfg.block_size_c,
        "BLOCK_SIZE_S": cfg.block_size_s,
        "SPLIT_S": geom.split_s,
        "S_ALIGN": geom.align,
        "INDEX_64": geom.index_64,
        "num_warps": cfg.num_warps,
    }


def _check_channel_tensors(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        _check_channel_tensor(t, name, x)


#: arrival counters of the split reductions' channel blocks, per (device, stream): zero between launches (the last
#: program of a channel block resets its own), so they are allocated and zeroed once; one per stream, so that
#: kernels running concurrently on different streams never share one. Channel blocks ride on grid axis 1 (at most
#: 65535 of them), so one buffer of that size serves every launch.
_COUNTERS: dict[tuple, torch.Tensor] = {}
_MAX_CHANNEL_BLOCKS = 65535


def _arrival_counters(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None:
        counters = _COUNTERS[key] = torch.zeros(_MAX_CHANNEL_BLOCKS, device=device, dtype=torch.int32)
    return counters


def _partials_block_p(P: int, block_c: int) -> int:
    """Rows of partials the merging program holds per step: at most 1024 values per array, at most P (2048
    spilled 8 bytes in the statistics kernel on NCHW 7x7 under Triton 3.6, at 8 warps)."""
    return min(next_pow2(P), max(1, 1024 // block_c))


def _batch_stats(x, geom, xs, cfg, out_a, out_b, running_mean, running_var, *, eps, momentum, finalize):
    """One launch of the statistics kernel: partials, and their merge by the last program of each channel block.
    ``finalize``: mean and rstd into out_a/out_b and the running statistics updated; else mean and M2."""
    n_tiles, n_tiles_s = cfg.tiles(geom)
    P, tiles_per_program = cfg.partials(geom)
    C = geom.C
    count = torch.empty((P, C), device=x.device, dtype=torch.float32)
    part_mean = torch.empty((P, C), device=x.device, dtype=torch.float32)
    part_m2 = torch.empty((P, C), device=x.device, dtype=torch.float32)
    has_running = running_mean is not None
    _launch(_bn_act_fwd_stats_kernel, (P, cdiv(C, cfg.block_size_c)),
        x, count, part_mean, part_m2, _arrival_counters(x.device), out_a, out_b,
        running_mean if has_running else out_a, running_var if has_running else out_b,
        geom.N, C, geom.S, geom.W, n_tiles, n_tiles_s, tiles_per_program, float(eps), float(momentum), *xs.args(),
        HAS_RUNNING=has_running, FINALIZE=finalize, BLOCK_SIZE_P=_partials_block_p(P, cfg.block_size_c),
        **_tile_kwargs(cfg, geom),
    )  # fmt: skip


def _apply(x, y, geom, xs, ys, cfg, mean, var_or_rstd, weight, bias, res, *, has_residual, rstd_from_var, eps, act,
           act_param):  # fmt: skip
    """One launch of the elementwise pass; ``res`` is the residual's (pointers, strides) from :func:`_layout`."""
    n_tiles, n_tiles_s = cfg.tiles(geom)
    programs, tiles_per_program = elementwise_grid(cfg, geom, x.device)
    _launch(_bn_act_fwd_apply_kernel, (programs, cdiv(geom.C, cfg.block_size_c)),
        x, y, *res[0], mean, var_or_rstd, weight if weight is not None else mean,
        bias if bias is not None else mean,
        geom.N, geom.C, geom.S, geom.W, n_tiles, n_tiles_s, tiles_per_program, float(eps), float(act_param),
        *xs.args(), *ys.args(), *res[1],
        ACTIVATION=act, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RSTD_FROM_VAR=rstd_from_var,
        HAS_RESIDUAL=has_residual, **_tile_kwargs(cfg, geom),
    )  # fmt: skip
    return y


def bn_act_fwd_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    momentum: float,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    residual: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward: y = act(BN(x) [+ residual]) with batch statistics; updates running stats in place.

    Returns (y, mean, rstd): y like x, mean and rstd fp32 of shape (C,) (what backward needs). ``residual``
    (x's shape, dtype and device, any strides) is read once, in the pass that writes y.
    """
    _check_input(x)
    _check_channel_tensors(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _check_residual(residual, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    act = _activation_name(activation)
    y = _alloc_like(x)
    C = x.shape[1]
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    rstd = torch.empty(C, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.fill_(float("nan"))
    geom, (xs, ys), res, res_strides = _layout((x, y), (residual,))
    if geom.rows < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    cfg = config or default_config(geom, xs, x.element_size(), x.device)
    if cfg.num_partials > 1:
        _batch_stats(x, geom, xs, cfg, mean, rstd, running_mean, running_var, eps=eps, momentum=momentum, finalize=True)
        _apply(
            x, y, geom, xs, ys, cfg, mean, rstd, weight, bias, (res, res_strides),
            has_residual=residual is not None, rstd_from_var=False, eps=eps, act=act, act_param=act_param,
        )  # fmt: skip
        return y, mean, rstd
    has_running = running_mean is not None
    n_tiles, n_tiles_s = cfg.tiles(geom)
    _launch(_bn_act_fwd_fused_kernel, (cdiv(C, cfg.block_size_c),),
        x, y, *res, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean,
        running_mean if has_running else mean, running_var if has_running else rstd,
        geom.N, C, geom.S, geom.W, n_tiles, n_tiles_s, float(eps), float(momentum), float(act_param),
        *xs.args(), *ys.args(), *res_strides,
        ACTIVATION=act, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=has_running,
        HAS_RESIDUAL=residual is not None, RESIDENT=n_tiles == 1, **_tile_kwargs(cfg, geom),
    )  # fmt: skip
    return y, mean, rstd


def bn_act_fwd_eval(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    residual: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Eval forward: y = act((x - running_mean) / sqrt(running_var + eps) * w + b [+ residual]), one elementwise
    pass."""
    _check_input(x)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode")
    _check_channel_tensors(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _check_residual(residual, x)
    act = _activation_name(activation)
    y = _alloc_like(x)
    if x.numel() == 0:
        return y
    geom, (xs, ys), res, res_strides = _layout((x, y), (residual,))
    cfg = config or default_config(geom, xs, x.element_size(), x.device)
    return _apply(
        x, y, geom, xs, ys, cfg, running_mean, running_var, weight, bias, (res, res_strides),
        has_residual=residual is not None, rstd_from_var=True, eps=eps, act=act, act_param=act_param,
    )  # fmt: skip


def bn_act_batch_stats(x: torch.Tensor, *, config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local per-channel statistics of x for a cross-device merge: (mean, M2), fp32 of shape (C,).

    M2 is the sum of squared deviations from the mean over the N*S elements of each channel (so the biased
    variance is M2 / (N*S)). Merged in a fixed order with Chan's formula; robust when |mean| >> std.
    """
    _check_input(x)
    geom, (xs,) = geometry_of(x)
    mean = torch.empty(geom.C, device=x.device, dtype=torch.float32)
    m2 = torch.empty(geom.C, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return mean.zero_(), m2.zero_()
    cfg = config or default_config(geom, xs, x.element_size(), x.device)
    _batch_stats(x, geom, xs, cfg, mean, m2, None, None, eps=0.0, momentum=0.0, finalize=False)
    return mean, m2


def bn_act_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    activation: str,
    act_param: float = 0.0,
    residual: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y = act((x - mean) * rstd * weight + bias [+ residual]) with given fp32 per-channel mean and rstd; one
    pass."""
    _check_input(x)
    _check_channel_tensors(x, weight=weight, bias=bias, mean=mean, rstd=rstd)
    _check_residual(residual, x)
    act = _activation_name(activation)
    y = _alloc_like(x)
    if x.numel() == 0:
        return y
    geom, (xs, ys), res, res_strides = _layout((x, y), (residual,))
    cfg = config or default_config(geom, xs, x.element_size(), x.device)
    return _apply(
        x, y, geom, xs, ys, cfg, mean, rstd, weight, bias, (res, res_strides),
        has_residual=residual is not None, rstd_from_var=False, eps=0.0, act=act, act_param=act_param,
    )  # fmt: skip


#: activations whose input the backward can rebuild from the output (leaky_relu needs a positive slope)
MEMORY_SAVING_ACTIVATIONS = ("identity", "leaky_relu")


def _check_invertible(act: str, act_param: float, min_abs_weight: float) -> None:
    if act not in MEMORY_SAVING_ACTIVATIONS or (act == "leaky_relu" and not act_param > 0.0):
        raise ValueError(
            f"the backward from the output needs an invertible activation: identity, or leaky_relu with a positive "
            f"slope; got {act} (act_param={act_param})"
        )
    if not min_abs_weight > 0.0:
        raise ValueError(f"min_abs_weight must be positive, got {min_abs_weight}")


@dataclasses.dataclass(frozen=True)
class _BackwardLaunch:
    """What every data kernel of one backward takes besides its per-kernel arguments: the gradients to write
    (dx, and dres when there is a residual), the geometry and plan, the pointers and strides of the tensors
    (saved, dy, dx) and of the residual tensors (residual, dres; stand-ins without: see :func:`_layout`), and the
    constexpr switches."""

    dx: torch.Tensor
    dres: torch.Tensor | None
    geom: Geometry
    cfg: KernelConfig
    strides: tuple[int, ...]
    res: tuple[torch.Tensor, torch.Tensor]
    res_strides: tuple[int, ...]
    flags: dict


def _bwd_setup(dy, saved, weight, bias, *, activation, act_param, saved_output, min_abs_weight, config, residual):
    """Checks, gradient allocation and plan of a backward from ``saved`` (x, or y when ``saved_output``)."""
    name = "output" if saved_output else "input"
    _check_input(saved, name)
    _check_input(dy, "grad_output")
    if dy.shape != saved.shape or dy.dtype != saved.dtype:
        raise ValueError(
            f"grad_output {tuple(dy.shape)} {dy.dtype} does not match {name} {tuple(saved.shape)} {saved.dtype}"
        )
    _check_channel_tensors(saved, weight=weight, bias=bias)
    _check_residual(residual, saved)
    if saved_output and residual is not None:
        raise ValueError("the backward from the output takes no residual (memory saving does not support one)")
    act = _activation_name(activation)
    if saved_output:
        _check_invertible(act, act_param, min_abs_weight)
    dx = _alloc_like(saved)
    dres = None if residual is None else _alloc_like(residual)
    geom, (saved_strides, dys, dxs), res, res_strides = _layout((saved, dy, dx), (residual, dres))
    cfg = config or default_config(geom, saved_strides, saved.element_size(), saved.device)
    flags = {
        "ACTIVATION": act,
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "SAVED_OUTPUT": saved_output,
    }
    strides = (*saved_strides.args(), *dys.args(), *dxs.args())
    return _BackwardLaunch(dx, dres, geom, cfg, strides, res, res_strides, flags)


def _bwd_sums(saved, dy, launch, mean, rstd_or_var, weight, bias, dweight, dbias, *, training, eps, act_param,
              min_abs_weight):  # fmt: skip
    """One launch of the reduce kernel (partials, summed by the last program of each channel block): fp32
    (sum_dz, sum_dz_xhat); also writes dweight/dbias when given (and in eval dx, and the residual's gradient).
    ``mean`` is any fp32 channel tensor when the output was saved (the kernels do not read it)."""
    geom, cfg = launch.geom, launch.cfg
    n_tiles, n_tiles_s = cfg.tiles(geom)
    C = geom.C
    P, tiles_per_program = cfg.partials(geom)
    part_dz = torch.empty((P, C), device=saved.device, dtype=torch.float32)
    part_dz_xhat = torch.empty((P, C), device=saved.device, dtype=torch.float32)
    sum_dz = torch.empty(C, device=saved.device, dtype=torch.float32)
    sum_dz_xhat = torch.empty(C, device=saved.device, dtype=torch.float32)
    # without a gradient to return for a parameter, its store repeats the fp32 sum into the sum itself
    _launch(_bn_act_bwd_reduce_kernel, (P, cdiv(C, cfg.block_size_c)),
        saved, dy, launch.dx, *launch.res, mean, rstd_or_var, weight if weight is not None else mean,
        bias if bias is not None else mean, part_dz, part_dz_xhat, _arrival_counters(saved.device),
        sum_dz, sum_dz_xhat, dweight if dweight is not None else sum_dz_xhat, dbias if dbias is not None else sum_dz,
        geom.N, C, geom.S, geom.W, n_tiles, n_tiles_s, tiles_per_program, float(eps), float(act_param),
        float(min_abs_weight), *launch.strides, *launch.res_strides, TRAINING=training,
        HAS_RESIDUAL=launch.dres is not None, BLOCK_SIZE_P=_partials_block_p(P, cfg.block_size_c),
        **launch.flags, **_tile_kwargs(cfg, geom),
    )  # fmt: skip
    return sum_dz, sum_dz_xhat


def _bwd_dx(saved, dy, launch, mean, rstd, weight, bias, sum_dz, sum_dz_xhat, total, *, act_param, min_abs_weight):
    """One launch of the training dx pass (which also writes the residual's gradient)."""
    geom, cfg = launch.geom, launch.cfg
    n_tiles, n_tiles_s = cfg.tiles(geom)
    programs, tiles_per_program = elementwise_grid(cfg, geom, saved.device)
    _launch(_bn_act_bwd_dx_kernel, (programs, cdiv(geom.C, cfg.block_size_c)),
        saved, dy, launch.dx, *launch.res, mean, rstd, weight if weight is not None else mean,
        bias if bias is not None else mean, sum_dz, sum_dz_xhat,
        geom.N, geom.C, geom.S, geom.W, n_tiles, n_tiles_s, tiles_per_program, float(total), float(act_param),
        float(min_abs_weight), *launch.strides, *launch.res_strides, HAS_RESIDUAL=launch.dres is not None,
        **launch.flags, **_tile_kwargs(cfg, geom),
    )  # fmt: skip
    return launch.dx


def _with_dres(grads: tuple, launch: _BackwardLaunch) -> tuple:
    """The backward's gradients, and the residual's last when there is one."""
    return grads if launch.dres is None else (*grads, launch.dres)


def bn_act_bwd(
    dy: torch.Tensor,
    saved: torch.Tensor,
    mean: torch.Tensor | None,
    rstd_or_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    training: bool,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    saved_output: bool = False,
    min_abs_weight: float = 1e-5,
    residual: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, ...]:
    """Backward of y = act(BN(x) [+ residual]): returns (dx, dweight, dbias), dweight/dbias None without
    weight/bias; with ``residual`` (dx, dweight, dbias, dresidual).

    ``saved`` is what the forward kept: the input x, or with ``saved_output`` the output y (memory-saving mode:
    x_hat is rebuilt as (act^-1(y) - b) / w with |w| floored at ``min_abs_weight``; identity and leaky_relu with
    a positive slope only; ``mean`` is not needed and must be None; no residual). Training: ``mean``/``rstd_or_var``
    are the fp32 batch mean and rstd saved by the forward. Eval: they are the running mean and running variance
    (constants, so dx has no statistics terms). ``residual`` is the forward's (z = x_hat * w + b + residual is
    rebuilt from it); its gradient dz = dy * act'(z) is written once, in the residual's dtype and memory format.
    """
    launch = _bwd_setup(
        dy, saved, weight, bias, activation=activation, act_param=act_param, saved_output=saved_output,
        min_abs_weight=min_abs_weight, config=config, residual=residual,
    )  # fmt: skip
    if saved_output and mean is not None:
        raise ValueError("the backward from the output does not use the mean: pass mean=None with saved_output=True")
    if not saved_output and mean is None:
        raise ValueError("the backward from the input needs the mean (None is only for saved_output=True)")
    _check_channel_tensors(saved, mean=mean, rstd_or_var=rstd_or_var)
    mean = rstd_or_var if mean is None else mean  # a placeholder pointer: SAVED_OUTPUT kernels never read it
    dweight = torch.empty_like(weight) if weight is not None else None
    dbias = torch.empty_like(bias) if bias is not None else None
    geom, cfg, dx = launch.geom, launch.cfg, launch.dx
    if saved.numel() == 0:
        return _with_dres((dx, *(None if g is None else g.zero_() for g in (dweight, dbias))), launch)
    scalars = {"act_param": act_param, "min_abs_weight": min_abs_weight}
    if cfg.num_partials > 1:
        sums = _bwd_sums(
            saved, dy, launch, mean, rstd_or_var, weight, bias, dweight, dbias, training=training, eps=eps, **scalars
        )
        if training:
            _bwd_dx(saved, dy, launch, mean, rstd_or_var, weight, bias, *sums, geom.rows, **scalars)
        return _with_dres((dx, dweight, dbias), launch)
    _launch(_bn_act_bwd_fused_kernel, (cdiv(geom.C, cfg.block_size_c),),
        saved, dy, dx, *launch.res, mean, rstd_or_var, weight if weight is not None else mean,
        bias if bias is not None else mean, dweight if dweight is not None else mean,
        dbias if dbias is not None else mean,
        geom.N, geom.C, geom.S, geom.W, *cfg.tiles(geom), float(geom.rows), float(eps), float(act_param),
        float(min_abs_weight), *launch.strides, *launch.res_strides, TRAINING=training,
        HAS_RESIDUAL=launch.dres is not None, RESIDENT=cfg.tiles(geom)[0] == 1, **launch.flags,
        **_tile_kwargs(cfg, geom),
    )  # fmt: skip
    return _with_dres((dx, dweight, dbias), launch)


def bn_act_bwd_from_output(
    dy: torch.Tensor,
    y: torch.Tensor,
    rstd_or_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    training: bool,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    min_abs_weight: float = 1e-5,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Memory-saving backward: :func:`bn_act_bwd` from the saved output y (``saved_output=True``, no mean).

    Training: ``rstd_or_var`` is the fp32 batch rstd saved by the forward. Eval: the running variance.
    """
    return bn_act_bwd(
        dy, y, None, rstd_or_var, weight, bias, training=training, eps=eps, activation=activation,
        act_param=act_param, saved_output=True, min_abs_weight=min_abs_weight, config=config,
    )  # fmt: skip


def _input_bwd_setup(dy, x, weight, bias, activation, act_param, config, residual):
    """The distributed entries below always backpropagate from the input x."""
    return _bwd_setup(
        dy, x, weight, bias, activation=activation, act_param=act_param, saved_output=False, min_abs_weight=1.0,
        config=config, residual=residual,
    )  # fmt: skip


def bn_act_bwd_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    activation: str,
    act_param: float = 0.0,
    residual: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local per-channel fp32 (sum(dz), sum(dz * x_hat)) of a training backward, for a cross-device sum.

    They are dbias and dweight of the local batch; :func:`bn_act_bwd_dx` takes their global values. With the
    forward's ``residual``, z = x_hat * w + b + residual (its gradient is written by :func:`bn_act_bwd_dx`).
    """
    launch = _input_bwd_setup(dy, x, weight, bias, activation, act_param, config, residual)
    if x.numel() == 0:
        zeros = torch.zeros(launch.geom.C, device=x.device, dtype=torch.float32)
        return zeros, zeros.clone()
    return _bwd_sums(
        x, dy, launch, mean, rstd, weight, bias, None, None, training=True, eps=0.0, act_param=act_param,
        min_abs_weight=1.0,
    )  # fmt: skip


def bn_act_bwd_dx(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sum_dz: torch.Tensor,
    sum_dz_xhat: torch.Tensor,
    total: int,
    *,
    activation: str,
    act_param: float = 0.0,
    residual: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Training dx = w * rstd * (dz - sum_dz / total - x_hat * sum_dz_xhat / total), one elementwise pass;
    with the forward's ``residual`` returns (dx, dresidual), the residual's gradient dz written in the same pass.

    ``total`` is the number of elements per channel the statistics were taken over (all ranks together).
    """
    launch = _input_bwd_setup(dy, x, weight, bias, activation, act_param, config, residual)
    _check_channel_tensors(x, mean=mean, rstd=rstd, sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
    if x.numel() > 0:
        _bwd_dx(
            x, dy, launch, mean, rstd, weight, bias, sum_dz, sum_dz_xhat, total, act_param=act_param,
            min_abs_weight=1.0,
        )  # fmt: skip
    return launch.dx if launch.dres is None else (launch.dx, launch.dres)


# Re-exported for callers that plan launches themselves (the profiler, tests forcing a path).
__all__ += ["Geometry", "KernelConfig", "Strides"]
