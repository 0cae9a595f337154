"""Every kernel compiles for Hopper (sm_90) through Triton's real compiler, without a GPU.

The interpreter cannot see compile-only problems (types, constexpr misuse, the specialisation of integer
arguments equal to 1) nor register pressure. These tests compile in a subprocess where TRITON_INTERPRET is unset
and read registers and spills from ptxas. Which kernels, and which constexpr variants of each, come from the
kernel registry (``bnbench.kernels.KERNELS``): here its BatchNorm kernels (phase forward or backward); the matmul
kernels (phase matmul) compile with the launcher's real tiles in tests/test_gemm_compile.py.
"""

from __future__ import annotations

import inspect
import json

import pytest
import triton.language as tl

from bnbench.kernels import KERNELS, _backward, _forward, _gemm

#: the BatchNorm + activation kernels, which one set of tile constexprs fits
BN_KERNELS = tuple(spec for spec in KERNELS if spec.phase in ("forward", "backward"))

_SCRIPT = r"""
import json, sys, torch
from bnbench.kernels import kernel_spec
from bnbench.kernels.aot import compile_kernel
ONES = ("S", "W", "n_tiles_s", "tiles_per_program", "stride_x_s", "stride_y_s", "stride_dy_s", "stride_dx_s",
        "stride_res_s", "stride_dres_s")
variants = json.loads(sys.argv[1])
out = []
for v in variants:
    name = v.pop("name")
    dtype = getattr(torch, v.pop("dtype"))
    ones = tuple(a for a in ONES if a in kernel_spec(name).fn.arg_names) if v.pop("ones") else ()
    r = compile_kernel(name, dtype=dtype, ones=ones, **v)
    out.append({"name": r.name, "registers": r.registers, "spill_stores": r.spill_stores})
print(json.dumps(out))
"""


def _compile(run_python, variants: list[dict]) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    result = run_python(
        "-c", _SCRIPT, json.dumps(variants), drop=("TRITON_INTERPRET",), env={"TRITON_DEFAULT_FP_FUSION": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _constexprs(fn) -> set[str]:
    """The constexpr parameters of a kernel, read from its signature (works for JIT and interpreted kernels)."""
    params = inspect.signature(fn.fn).parameters.values()
    return {p.name for p in params if p.annotation is tl.constexpr}


def test_the_registry_lists_every_kernel_with_a_default_for_each_constexpr():
    defined = {
        name
        for module, prefix in ((_forward, "_bn_act_"), (_backward, "_bn_act_"), (_gemm, "_gemm_"))
        for name in dir(module)
        if name.startswith(prefix) and name.endswith("_kernel")
    }
    assert sorted(spec.name for spec in KERNELS) == sorted(defined)
    assert {spec.phase for spec in KERNELS} == {"forward", "backward", "matmul"}
    matmul = {spec.name for spec in KERNELS if spec.phase == "matmul"}
    assert matmul == {name for name in defined if name.startswith("_gemm_")}
    assert all(spec.tensor_passes is None for spec in KERNELS if spec.phase == "matmul")
    for spec in KERNELS:
        assert set(spec.defaults) == _constexprs(spec.fn), spec.name
        for variant in spec.variants.values():
            assert set(variant) <= set(spec.defaults), spec.name
    # the backward from the saved output is a variant of each backward data kernel, with an invertible activation
    from_output = [spec.name for spec in KERNELS if "from_output" in spec.variants]
    assert from_output == ["_bn_act_bwd_reduce_kernel", "_bn_act_bwd_dx_kernel", "_bn_act_bwd_fused_kernel"]
    assert all(
        spec.variants["from_output"]["ACTIVATION"] == "leaky_relu" for spec in KERNELS if spec.name in from_output
    )
    # the small path's register-resident form is a variant of both fused kernels
    resident = [spec.name for spec in KERNELS if "resident" in spec.variants]
    assert resident == ["_bn_act_fwd_fused_kernel", "_bn_act_bwd_fused_kernel"]
    # act(BN(x) + residual): a variant of every kernel that forms z (not of the statistics kernel), off by default;
    # the fused kernels also with their resident form
    residual = [spec.name for spec in KERNELS if "residual" in spec.variants]
    assert set(residual) == {name for name in defined if name.startswith("_bn_act_") and "stats" not in name}
    assert all(spec.defaults["HAS_RESIDUAL"] is False for spec in KERNELS if spec.name in residual)
    assert [spec.name for spec in KERNELS if "resident_residual" in spec.variants] == resident


def test_every_kernel_and_variant_compiles_for_sm90_in_both_index_widths_and_with_unit_specialisation(run_python):
    variants = []
    for spec in BN_KERNELS:
        for variant in (None, *spec.variants):
            # int64 indexing, every integer a runtime value; NCHW-style fp32 tile of 2048 elements, at the 8 warps
            # the planner gives it
            variants.append(
                dict(name=spec.name, variant=variant, dtype="float32", ones=False, INDEX_64=True, num_warps=8)
            )
            # int32 indexing with S, W, unit strides and one tile per program specialised to 1: (N, C) rows tile
            variants.append(
                dict(
                    name=spec.name,
                    variant=variant,
                    dtype="bfloat16",
                    ones=True,
                    INDEX_64=False,
                    BLOCK_SIZE_N=16,
                    BLOCK_SIZE_C=128,
                    BLOCK_SIZE_S=1,
                    num_warps=8,
                )
            )
    # the three backward data kernels also compile from y, the two fused kernels register-resident, and the kernels
    # that take a residual with one (the fused kernels also resident with one)
    residual = [spec.name for spec in BN_KERNELS if "residual" in spec.variants]
    assert len(variants) == 2 * (len(BN_KERNELS) + 3 + 2 + len(residual) + 2)
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
    # the backward from the saved output with its other invertible activation (the variant's default is leaky_relu)
    from_output = [spec.name for spec in KERNELS if "from_output" in spec.variants]
    variants += [
        dict(name=name, variant="from_output", dtype="float16", ones=False, ACTIVATION="identity", INDEX_64=False)
        for name in from_output
    ]
    assert len(_compile(run_python, variants)) == 2 * len(activations) + len(from_output)
