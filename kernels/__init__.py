"""Triton kernels for fused BatchNorm + activation, and their host launchers (installed as ``bnbench.kernels``).

Importing this package imports triton; ``import bnbench`` does not import it until a Triton path runs.
"""

from .launchers import (
    MEMORY_SAVING_ACTIVATIONS,
    SUPPORTED_DTYPES,
    Geometry,
    KernelConfig,
    Strides,
    bn_act_apply,
    bn_act_batch_stats,
    bn_act_bwd,
    bn_act_bwd_dx,
    bn_act_bwd_from_output,
    bn_act_bwd_sums,
    bn_act_fwd_eval,
    bn_act_fwd_train,
    interpreter_active,
    plan,
)

__all__ = [
    "MEMORY_SAVING_ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "Geometry",
    "KernelConfig",
    "Strides",
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
