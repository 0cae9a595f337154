"""Host launcher for the memory-saving backward (:mod:`._memory_saving`): check, allocate, launch.

Same split/fused structure as :func:`bnbench.kernels.bn_act_bwd`, but the saved tensor is the output y, not x.
"""

from __future__ import annotations

import torch

from . import launchers
from ._memory_saving import _bn_act_ms_dx_kernel, _bn_act_ms_fused_kernel, _bn_act_ms_reduce_kernel
from ._plan import KernelConfig, cdiv, default_config, geometry_of
from .launchers import _activation_name, _check_channel_tensors, _check_input, _grid_tiles, _tile_kwargs

__all__ = ["MEMORY_SAVING_ACTIVATIONS", "bn_act_bwd_from_output"]

#: activations whose input the backward can recover from the output (leaky_relu needs a positive slope)
MEMORY_SAVING_ACTIVATIONS = ("identity", "leaky_relu")


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
    """Backward of y = act(BN(x)) from y: returns (dx, dweight, dbias); dweight/dbias are None without them.

    Training: ``rstd_or_var`` is the fp32 batch rstd saved by the forward. Eval: the running variance. The
    normalised input is rebuilt as x_hat = (act^-1(y) - b) / w, with |w| floored at ``min_abs_weight``.
    """
    _check_input(y, "output")
    _check_input(dy, "grad_output")
    if dy.shape != y.shape or dy.dtype != y.dtype:
        raise ValueError(f"grad_output {tuple(dy.shape)} {dy.dtype} does not match output {tuple(y.shape)} {y.dtype}")
    _check_channel_tensors(y, weight=weight, bias=bias, rstd_or_var=rstd_or_var)
    act = _activation_name(activation)
    if act not in MEMORY_SAVING_ACTIVATIONS or (act == "leaky_relu" and not act_param > 0.0):
        raise ValueError(
            f"the memory-saving backward needs an invertible activation: identity, or leaky_relu with a positive "
            f"slope; got {act} (act_param={act_param})"
        )
    if not min_abs_weight > 0.0:
        raise ValueError(f"min_abs_weight must be positive, got {min_abs_weight}")
    dx = launchers._alloc_like(y)  # looked up at call time: tests poison it
    dweight = torch.empty_like(weight) if weight is not None else None
    dbias = torch.empty_like(bias) if bias is not None else None
    if y.numel() == 0:
        return dx, *(None if g is None else g.zero_() for g in (dweight, dbias))
    geom, (ys, dys, dxs) = geometry_of(y, dy, dx)
    strides = (*ys.args(), *dys.args(), *dxs.args())
    cfg = config or default_config(geom, ys, y.element_size(), y.device)
    C = geom.C
    n_tiles, n_tiles_s = cfg.tiles(geom)
    w_arg = weight if weight is not None else rstd_or_var
    b_arg = bias if bias is not None else rstd_or_var
    flags = {"ACTIVATION": act, "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}
    tiles = _tile_kwargs(cfg, geom)
    if cfg.num_partials == 1:
        _bn_act_ms_fused_kernel[(cdiv(C, cfg.block_size_c),)](
            y, dy, dx, rstd_or_var, w_arg, b_arg,
            dweight if dweight is not None else rstd_or_var, dbias if dbias is not None else rstd_or_var,
            geom.N, C, geom.S, geom.W, n_tiles, n_tiles_s, float(geom.rows), float(eps), float(act_param),
            float(min_abs_weight), *strides, TRAINING=training, **flags, **tiles,
        )  # fmt: skip
        return dx, dweight, dbias
    P, tiles_per_program = cfg.partials(geom)
    part_dz = torch.empty((P, C), device=y.device, dtype=torch.float32)
    part_dz_xhat = torch.empty((P, C), device=y.device, dtype=torch.float32)
    _bn_act_ms_reduce_kernel[(P, cdiv(C, cfg.block_size_c))](
        y, dy, dx, rstd_or_var, w_arg, b_arg, part_dz, part_dz_xhat,
        geom.N, C, geom.S, geom.W, n_tiles, n_tiles_s, tiles_per_program, float(eps), float(act_param),
        float(min_abs_weight), *strides, TRAINING=training, **flags, **tiles,
    )  # fmt: skip
    sum_dz, sum_dz_xhat = launchers.combine_grad_sums(part_dz, part_dz_xhat, dweight, dbias)
    if training:
        programs, per_program = _grid_tiles(n_tiles)
        _bn_act_ms_dx_kernel[(programs, cdiv(C, cfg.block_size_c))](
            y, dy, dx, rstd_or_var, w_arg, b_arg, sum_dz, sum_dz_xhat,
            geom.N, C, geom.S, geom.W, n_tiles, n_tiles_s, per_program, float(geom.rows), float(act_param),
            float(min_abs_weight), *strides, **flags, **tiles,
        )  # fmt: skip
    return dx, dweight, dbias
