"""Every kernel compiles for Hopper (sm_90) through Triton's real compiler, without a GPU.

The interpreter cannot see compile-only problems (types, constexpr misuse, the specialisation of integer
arguments equal to 1) nor register pressure. These tests compile in a subprocess where TRITON_INTERPRET is unset
and read registers and spills from ptxas.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")

_SCRIPT = r"""
import json, sys, torch
from bnbench.kernels.aot import KERNELS, compile_kernel
ONES = ("S", "W", "n_tiles_s", "tiles_per_program", "stride_x_s", "stride_y_s", "stride_dy_s", "stride_dx_s")
variants = json.loads(sys.argv[1])
out = []
for v in variants:
    kernel = KERNELS[v.pop("name")]
    dtype = getattr(torch, v.pop("dtype"))
    ones = tuple(a for a in ONES if a in kernel.arg_names) if v.pop("ones") else ()
    r = compile_kernel(kernel.__name__, dtype=dtype, ones=ones, **v)
    out.append({"name": r.name, "registers": r.registers, "spill_stores": r.spill_stores})
print(json.dumps(out))
"""


def _compile(run_python, variants: list[dict]) -> list[dict]:
    result = run_python(
        "-c", _SCRIPT, json.dumps(variants), drop=("TRITON_INTERPRET",), env={"TRITON_DEFAULT_FP_FUSION": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


KERNEL_NAMES = [
    "_bn_act_fwd_stats_kernel",
    "_bn_act_fwd_combine_kernel",
    "_bn_act_fwd_apply_kernel",
    "_bn_act_fwd_fused_kernel",
    "_bn_act_bwd_reduce_kernel",
    "_bn_act_bwd_combine_kernel",
    "_bn_act_bwd_dx_kernel",
    "_bn_act_bwd_fused_kernel",
]


def test_every_kernel_compiles_for_sm90_in_both_index_widths_and_with_unit_specialisation(run_python):
    variants = []
    for name in KERNEL_NAMES:
        # int64 indexing, every integer a runtime value; NCHW-style tile
        variants.append(dict(name=name, dtype="float32", ones=False, INDEX_64=True, num_warps=4))
        # int32 indexing with S, W, unit strides and one tile per program specialised to 1: (N, C) rows tile
        variants.append(
            dict(
                name=name,
                dtype="bfloat16",
                ones=True,
                INDEX_64=False,
                BLOCK_SIZE_N=16,
                BLOCK_SIZE_C=128,
                BLOCK_SIZE_S=1,
                num_warps=8,
            )
        )
    results = _compile(run_python, variants)
    assert [r["name"] for r in results] == [v["name"] for v in variants]
    for r in results:
        if r["registers"] is not None:  # ptxas accepted the PTX: no register spills on these tiles
            assert r["spill_stores"] == 0, r


def test_every_activation_compiles_forward_and_backward(run_python):
    activations = ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"]
    variants = [
        dict(name=name, dtype="float16", ones=False, ACTIVATION=activation, SPLIT_S=True, INDEX_64=False)
        for activation in activations
        for name in ("_bn_act_fwd_fused_kernel", "_bn_act_bwd_fused_kernel")
    ]
    assert len(_compile(run_python, variants)) == 2 * len(activations)
