"""Deterministic speed properties of the launch plans and the compiled kernels (no timings, no GPU needed).

For MEASURE.md's baseline shapes and ResNet-50's BatchNorm shapes at batch 256 (NCHW and channels_last, fp32 and
bf16), planned for a 132-SM Hopper part. Three readings, each checking what only it can see:

1. **Plans.** The launchers run on ``meta`` tensors with the launch itself recorded instead of executed: the
   launches per pass (1 each way on the small path, 2 on the split path), CUDA's grid limits, and the
   elementwise passes' programs and tiles per program (``_plan._elementwise_grid``'s model).
2. **Compiled kernels.** Each distinct recorded launch is compiled for sm_90 by Triton's real compiler with the
   specialisation Triton would give it (pointers 16-byte aligned, integer arguments equal to 1 or divisible by
   16 marked as such; other integers typed i64), and ptxas and the SASS are read: registers (<= 128 in the
   kernels that stream the activation tensor), spills (none), pipelined loads (LDGSTS inside the reduction
   loops), barriers inside those loops, and the load widths of NCHW with a small S.
3. **``bnbench inspect``** end to end (its launch recorder, Triton's binder and cache, its JSON): every pass
   planned and compiled, no spills, launches per pass, the forward launching no ATen kernel, fwd_bwd = fwd then
   bwd.

The cp.async pipeline of a ``tl.range(..., num_stages=...)`` loop hands its shared-memory stage from the copying
threads to the reading ones with a CTA barrier: that handoff (2 BAR.SYNC per iteration) is what remains of the
loop's barriers; the per-tile cross-warp reductions (6 per iteration under Triton 3.6, 16 under 3.9) are gone.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import triton.language as tl

from bnbench.bench.model_cases import model_cases
from bnbench.kernels import _plan, _sass, launchers

SMS = 132
BASELINE = [(256, 1024), (32768, 1024), (262144, 256), (401408, 64), (16384, 8192), (128, 256, 28, 28)]
#: ResNet-50's BatchNorm inputs at batch 256, (channels, spatial side), read off the model as the resnet50 preset is
RESNET50 = sorted({c.shape[1:3] for c in model_cases("resnet50", [256], ["fp32"], ["nchw"], ["fwd"])})
CASES = [(shape, layout, dtype) for shape in BASELINE for layout in ("nchw", "channels_last") for dtype in ("float32",)]
CASES = [c for c in CASES if len(c[0]) == 4 or c[1] == "nchw"]  # 2-D inputs have one layout
CASES += [((256, c, s, s), layout, dtype) for c, s in RESNET50 for layout in ("nchw", "channels_last")
          for dtype in ("float32", "bfloat16")]  # fmt: skip
#: a representative subset compiled in the default run (the rest is marked slow): both paths, both layouts, and
#: the elementwise passes with one tile per program (256x512x7x7 channels_last) and with several (the others;
#: 256x64x112x112 channels_last bf16 holds the most registers, 8 tiles per program)
DEFAULT = [((256, 1024), "nchw", "float32"), ((32768, 1024), "nchw", "float32"),
           ((128, 256, 28, 28), "nchw", "float32"), ((128, 256, 28, 28), "channels_last", "float32"),
           ((256, 512, 7, 7), "channels_last", "bfloat16"), ((256, 64, 112, 112), "channels_last", "bfloat16")]  # fmt: skip
#: the kernels that stream the activation tensor; the reduction ones loop over tiles
HOT = {"_bn_act_fwd_stats_kernel", "_bn_act_fwd_apply_kernel", "_bn_act_bwd_reduce_kernel", "_bn_act_bwd_dx_kernel",
       "_bn_act_fwd_fused_kernel", "_bn_act_bwd_fused_kernel"}  # fmt: skip
REDUCTIONS = {"_bn_act_fwd_stats_kernel", "_bn_act_bwd_reduce_kernel"}
ELEMENTWISE = {"_bn_act_fwd_apply_kernel", "_bn_act_bwd_dx_kernel"}
MAX_REGISTERS = 128


def _case_id(case) -> str:
    shape, layout, dtype = case
    return f"{'x'.join(map(str, shape))}-{layout}-{dtype}"


# --- 1. plans -----------------------------------------------------------------------------------------------------


def _record(shape, layout, dtype, monkeypatch, residual=None) -> dict[str, list[dict]]:
    """Launches of a training forward and backward, by pass: kernel, grid, warps, the compile arguments and (in
    ``args``, not a compile argument) the tile counts. ``residual``: the layout of a residual (act(BN(x) +
    residual)), or None for none."""
    monkeypatch.setattr(_plan, "_sm_count", lambda device: SMS)
    passes: dict[str, list[dict]] = {"forward": [], "backward": []}
    current = passes["forward"]

    def record(kernel, grid, *args, num_warps, **constexprs):
        params = inspect.signature(kernel.fn).parameters.values()
        values = dict(zip((p.name for p in params if p.annotation is not tl.constexpr), args, strict=True))
        ints = {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}
        element = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        current.append({
            "name": kernel.__name__, "grid": list(grid), "num_warps": num_warps, "dtype": dtype,
            "ones": sorted(k for k, v in ints.items() if v == 1),
            "divisible": sorted(k for k, v in ints.items() if v != 1 and v % 16 == 0),
            "constexprs": {k: v for k, v in constexprs.items()}, "element_size": torch.empty((), dtype=element).element_size(),
            "args": {k: ints[k] for k in ("n_tiles", "tiles_per_program") if k in ints},
        })  # fmt: skip

    monkeypatch.setattr(launchers, "_launch", record)
    x = torch.empty(shape, device="meta", dtype=getattr(torch, dtype))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    r = None
    if residual is not None:
        r = torch.empty(shape, device="meta", dtype=x.dtype)
        r = r.to(memory_format=torch.channels_last) if residual == "channels_last" else r
    C = shape[1]
    w = torch.empty(C, device="meta")
    y, mean, rstd = launchers.bn_act_fwd_train(
        x, w, w, torch.empty(C, device="meta"), torch.empty(C, device="meta"), momentum=0.1, eps=1e-5,
        activation="relu", residual=r,
    )  # fmt: skip
    current = passes["backward"]
    launchers.bn_act_bwd(y, x, mean, rstd, w, w, training=True, eps=1e-5, activation="relu", residual=r)
    return passes


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_launches_per_pass(case, monkeypatch):
    shape, layout, dtype = case
    passes = _record(shape, layout, dtype, monkeypatch)
    fwd, bwd = ([launch["name"] for launch in passes[p]] for p in ("forward", "backward"))
    if fwd == ["_bn_act_fwd_fused_kernel"]:  # the small path: one launch each way
        assert bwd == ["_bn_act_bwd_fused_kernel"]
    else:  # the split path: statistics (merged in-kernel) + apply; reduce (summed in-kernel) + dx
        assert fwd == ["_bn_act_fwd_stats_kernel", "_bn_act_fwd_apply_kernel"]
        assert bwd == ["_bn_act_bwd_reduce_kernel", "_bn_act_bwd_dx_kernel"]
    for launch in passes["forward"] + passes["backward"]:
        assert all(0 < g <= 65535 for g in launch["grid"][1:]), launch  # CUDA's limit on grid axes 1 and 2


def _elementwise_launches(case, monkeypatch) -> list[dict]:
    passes = _record(*case, monkeypatch)
    return [launch for p in passes.values() for launch in p if launch["name"] in ELEMENTWISE]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_elementwise_passes_amortise_tiles_and_keep_full_waves(case, monkeypatch):
    """The model of ``_plan._elementwise_grid``: k tiles per program (a power of two, at most 8), as many as keep
    at least 4 full waves of programs at the most an SM holds by its thread limit (so the grid never falls
    below the SM count), and k = 1 only where k = 2 would break that."""
    for launch in _elementwise_launches(case, monkeypatch):
        n_tiles, k = launch["args"]["n_tiles"], launch["args"]["tiles_per_program"]
        programs, c_blocks = launch["grid"]
        wave = SMS * (2048 // (32 * launch["num_warps"]))
        what = (launch["name"], launch["grid"], n_tiles, k, wave)
        assert k & (k - 1) == 0 and 1 <= k <= 8, what
        assert programs == -(-n_tiles // k), what  # every tile has one program; no program is empty
        if k > 1:
            assert programs * c_blocks >= 4 * wave >= SMS, what
        if k < 8:
            assert -(-n_tiles // (2 * k)) * c_blocks < 4 * wave, what  # doubling k would leave fewer waves


#: (programs, tiles per program) of the apply pass on baseline and ResNet-50 shapes (the dx pass plans the same)
PLANNED = {
    ((32768, 1024), "nchw", "float32"): (1024, 2),  # 2048 tiles x 8 channel blocks: 15.5 waves at k = 1
    ((262144, 256), "nchw", "float32"): (4096, 4),
    ((401408, 64), "nchw", "float32"): (6272, 2),  # one channel block: 12544 tiles
    ((16384, 8192), "nchw", "float32"): (128, 8),  # 64 channel blocks: 62 waves at k = 1, 7.8 at the cap
    ((128, 256, 28, 28), "nchw", "float32"): (416, 2),
    ((128, 256, 28, 28), "channels_last", "float32"): (3136, 2),
    ((256, 64, 112, 112), "channels_last", "bfloat16"): (12544, 8),
    ((256, 1024, 14, 14), "nchw", "bfloat16"): (104, 4),
    ((256, 256, 14, 14), "nchw", "float32"): (416, 1),  # 6656 programs: 6.3 waves at k = 1, 3.2 at k = 2
    ((256, 512, 7, 7), "channels_last", "bfloat16"): (1568, 1),
}


@pytest.mark.parametrize("case", sorted(PLANNED), ids=_case_id)
def test_elementwise_plan_of_baseline_and_resnet50_shapes(case, monkeypatch):
    launches = _elementwise_launches(case, monkeypatch)
    assert [launch["name"] for launch in launches] == sorted(ELEMENTWISE, reverse=True)  # apply, then dx
    for launch in launches:
        assert (launch["grid"][0], launch["args"]["tiles_per_program"]) == PLANNED[case], launch


# --- 2. compiled kernels ------------------------------------------------------------------------------------------

_SCRIPT = r"""
import json, sys, torch
from bnbench.kernels.aot import compile_kernel
out = []
for v in json.loads(sys.argv[1]):
    r = compile_kernel(v["name"], dtype=getattr(torch, v["dtype"]), num_warps=v["num_warps"], ones=tuple(v["ones"]),
                       divisible=tuple(v["divisible"]), **v["constexprs"])
    out.append({"name": r.name, "registers": r.registers, "spill_stores": r.spill_stores, "sass": r.sass})
print(json.dumps(out))
"""


def _loops(sass: str) -> list[dict]:
    """Per loop (a backward branch, :mod:`bnbench.kernels._sass`): its LDGSTS and BAR.SYNC counts."""
    code = _sass.parse_sass(sass)
    facts = []
    for loop in _sass.loops(code):
        body = [ins for ins in code if loop.contains(ins)]
        facts.append({
            "ldgsts": sum(ins.base == "LDGSTS" for ins in body),
            "bar_sync": sum(ins.opcode.startswith("BAR.SYNC") for ins in body),
        })  # fmt: skip
    return facts


def _compile_cases(cases, run_python, monkeypatch, residual=None) -> list[tuple[dict, dict]]:
    """Compile every distinct launch of ``cases``; ``residual``: None, or a function of a case giving the layout
    of its residual."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    launches = {}
    for case in cases:
        for p in _record(*case, monkeypatch, residual=residual(case) if residual else None).values():
            for launch in p:
                key = json.dumps({k: v for k, v in launch.items() if k not in ("grid", "args")}, sort_keys=True)
                launches[key] = launch  # one compile per specialisation
    todo = list(launches.values())
    result = run_python(
        "-c", _SCRIPT, json.dumps(todo), drop=("TRITON_INTERPRET",), env={"TRITON_DEFAULT_FP_FUSION": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return list(zip(todo, json.loads(result.stdout.strip().splitlines()[-1]), strict=True))


def _check_compiled(compiled):
    for launch, r in compiled:
        what = (launch["name"], launch["dtype"], launch["constexprs"], launch["num_warps"], r["registers"])
        if r["registers"] is None:  # no ptxas accepted the PTX on this machine
            continue
        assert r["spill_stores"] == 0, what
        if launch["name"] in HOT:  # every launch, NCHW with a small S (14x14, 7x7) included (issue 12 item 5)
            assert r["registers"] <= MAX_REGISTERS, what
        if launch["name"] in REDUCTIONS and r["sass"]:
            tile_loops = [loop for loop in _loops(r["sass"]) if loop["ldgsts"]]
            assert tile_loops, ("no pipelined (LDGSTS) loop", what)
            for loop in tile_loops:  # only the cp.async stage handoff, no per-tile cross-warp reduction
                assert loop["bar_sync"] <= 2, (loop, what)


def test_compiled_kernels_of_representative_shapes(run_python, monkeypatch):
    compiled = _compile_cases(DEFAULT, run_python, monkeypatch)
    _check_compiled(compiled)
    # the elementwise passes were compiled both ways: one tile per program (specialised to 1: no loop) and several
    loops = {(launch["name"], "tiles_per_program" in launch["ones"]) for launch, _ in compiled}
    assert {(name, one) for name in ELEMENTWISE for one in (True, False)} <= loops, loops


@pytest.mark.slow
def test_compiled_kernels_of_every_baseline_and_resnet50_shape(run_python, monkeypatch):
    _check_compiled(_compile_cases([c for c in CASES if c not in DEFAULT], run_python, monkeypatch))


#: ResNet-50's small-S NCHW inputs (issue 12 item 5): 14x14 (S = 196, a multiple of 4, not of 16) and 7x7 (S = 49)
SMALL_S = [((256, c, s, s), "nchw", dtype) for c, s in ((256, 14), (512, 7)) for dtype in ("float32", "bfloat16")]


def test_nchw_small_spatial_loads_and_padding(run_python, monkeypatch):
    """14x14: tiles along S with S_ALIGN = 4 told to the compiler, so the main loads of every streaming kernel are
    128-bit for fp32 (64-bit for bf16: 196 % 8 != 0). 7x7: S = 49 is odd, so no load along S can be wider than
    one element; (n, s) run as one row axis instead (flattened rows, one tile of rows spans images), with 32-bit
    (fp32) and 16-bit (bf16) loads and at most 1/8 padding. Both: <= 128 registers, no spills."""
    monkeypatch.setattr(_plan, "_sm_count", lambda device: SMS)
    for shape, _, dtype in SMALL_S:
        x = torch.empty(shape, device="meta", dtype=getattr(torch, dtype))
        geom, (strides,) = _plan.geometry_of(x)
        cfg = _plan.default_config(geom, strides, x.element_size(), x.device)
        n_tiles, _ = cfg.tiles(geom)
        padded = n_tiles * cfg.block_size_n * cfg.block_size_s
        assert padded * 8 <= geom.rows * 9, (shape, dtype, cfg.describe())  # padding <= 1/8
        S = shape[2] * shape[3]
        assert geom.flat_rows == (S == 49) and geom.align == (4 if S == 196 else 1), geom
    compiled = _compile_cases(SMALL_S, run_python, monkeypatch)
    _check_compiled(compiled)
    for launch, r in compiled:
        if r["registers"] is None or not r["sass"] or launch["name"] not in HOT:
            continue
        bits = _sass.summarize(r["sass"]).main_load_bits
        what = (launch["name"], launch["dtype"], launch["constexprs"], bits)
        if launch["constexprs"]["SPLIT_S"]:  # 7x7, flattened rows: one element per load, no padding per image
            assert launch["constexprs"]["BLOCK_SIZE_N"] == 1 and launch["constexprs"]["S_ALIGN"] == 1, what
            assert bits == 8 * launch["element_size"], what
        elif launch["dtype"] == "float32":  # 14x14 fp32
            assert launch["constexprs"]["S_ALIGN"] == 4 and bits == 128, what
        else:  # 14x14 bf16: 4 elements at most (S % 8 != 0); the stores' layout may keep the elementwise passes at 32
            assert launch["constexprs"]["S_ALIGN"] == 4 and bits in (32, 64), what
            if launch["name"] in REDUCTIONS:
                assert bits == 64, what


def _residual_layouts(case) -> str:
    """The residual of a ResNet block: laid out as x (its identity path), except NCHW for a channels_last x (the
    residual addressed through other strides than x)."""
    return "nchw" if case[1] == "channels_last" and case[0] == (128, 256, 28, 28) else case[1]


def test_compiled_kernels_with_a_residual(run_python, monkeypatch):
    """act(BN(x) + residual) (issue 15): every launch of the representative shapes with a residual, at most 128
    registers and no spills (its tile is read beside x's, its gradient written beside dx)."""
    compiled = _compile_cases(DEFAULT, run_python, monkeypatch, residual=_residual_layouts)
    assert all(launch["constexprs"].get("HAS_RESIDUAL", True) for launch, _ in compiled)
    _check_compiled(compiled)


@pytest.mark.slow
def test_compiled_kernels_with_a_residual_of_every_resnet50_shape(run_python, monkeypatch):
    resnet = [c for c in CASES if len(c[0]) == 4 and c not in DEFAULT]
    _check_compiled(_compile_cases(resnet, run_python, monkeypatch, residual=_residual_layouts))


# --- 3. bnbench inspect -------------------------------------------------------------------------------------------


def _check_inspect(doc: dict) -> None:
    by_case: dict[tuple, list[dict]] = {}
    for row in doc["launches"]:
        assert row["spill_bytes"] == 0, row  # no spills anywhere
        by_case.setdefault((row["shape"], row["dtype"], row["layout"], row["pass"]), []).append(row)
    passes = {(p["shape"], p["dtype"], p["layout"], p["pass"]): p for p in doc["passes"]}
    for (shape, dtype, layout, pass_), p in passes.items():
        assert p["status"] == "ok", p
        assert len(by_case[(shape, dtype, layout, pass_)]) == p["triton_launches"]
        if pass_ == "eval":
            assert p["triton_launches"] == 1, p
        elif pass_ in ("fwd", "bwd"):
            assert p["triton_launches"] == (1 if p["path"] == "fused" else 2), p  # the split merges in-kernel
        else:  # fwd_bwd is the forward's launches then the backward's
            fwd, bwd = (passes.get((shape, dtype, layout, q)) for q in ("fwd", "bwd"))
            if fwd and bwd:
                kernels = [r["kernel"] for r in by_case[(shape, dtype, layout, pass_)]]
                assert kernels == fwd["kernels"].split(";") + bwd["kernels"].split(";"), p
                assert p["aten_kernel_launches"] == fwd["aten_kernel_launches"] + bwd["aten_kernel_launches"], p
        if pass_ in ("fwd", "eval"):
            assert p["aten_kernel_launches"] == 0, p  # forward passes launch only bnbench's kernels


def test_inspect_small_and_large_baseline_shapes():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    from bnbench.inspect.testing import inspect_json

    doc = inspect_json("--preset", "baseline", "--batch", "256,401408", "--dtype", "fp32")
    assert {p["path"] for p in doc["passes"]} >= {"fused", "split"}
    _check_inspect(doc)


@pytest.mark.slow  # compiles every distinct kernel variant of about 190 cases: minutes on 2 cores
def test_inspect_baseline_and_resnet50_batch256_shapes():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    from bnbench.inspect.testing import inspect_json

    _check_inspect(inspect_json("--preset", "report"))
