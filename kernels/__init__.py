"""Triton kernels for fused BatchNorm + activation, and their host launchers (installed as ``bnbench.kernels``).

Importing this package imports triton; ``import bnbench`` does not import it until a Triton path runs. Every
kernel is listed once in :mod:`.registry` (``KERNELS``).
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
from .registry import KERNELS, KernelSpec, kernel_spec

__all__ = [
    "KERNELS",
    "MEMORY_SAVING_ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "Geometry",
    "KernelConfig",
    "KernelSpec",
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
    "kernel_spec",
    "plan",
]
