"""The direct launch of compiled kernels (``kernels/_launch.py``): never stale, and exactly Triton's own launch.

On CPU, a fresh process with TRITON_INTERPRET unset runs the real launchers under the recording driver (Triton's
binder, specialisation and compiler for sm_90; launches recorded, nothing run) through a sequence of calls that
changes one thing Triton specialises on at a time. Every launch of the second round (the direct path: Triton's
``JITFunction.run`` is not called) is then launched again through ``kernel[grid]`` with the same arguments, and the
two recorded launches must be identical: the same compiled kernel (Triton's hash of the specialisation), grid,
warps, constexprs, signature and argument values. Each change must give Triton a different specialisation (so a
launch key that missed it would launch the wrong kernel and fail the comparison). On a GPU the same changes run
natively and are checked against the float64 reference.
"""

from __future__ import annotations

import json

import pytest
import torch

_SCRIPT = r"""
import contextlib, json, sys, torch, triton, warnings
import triton.language as tl
import triton.runtime.jit as jit
from bnbench.kernels import KernelConfig, launchers
from bnbench.kernels import _launch
from bnbench.kernels._driver import recording

captured = []  # (kernel, grid, args, kwargs) of every launch the launchers make
original = launchers._launch
def spy(kernel, grid, *args, **kwargs):
    captured.append((kernel, grid, args, kwargs))
    original(kernel, grid, *args, **kwargs)
launchers._launch = spy

jit_runs = [0]  # calls of Triton's JIT path (the binder, specialisation and cache lookup)
jit_run = jit.JITFunction.run
def counted(self, *args, **kwargs):
    jit_runs[0] += 1
    return jit_run(self, *args, **kwargs)
jit.JITFunction.run = counted

def channel(C, dtype=torch.float32):
    return torch.rand(C, dtype=dtype) + 0.5

def unaligned(*shape, dtype=torch.float32):  # a view one element into its storage: data pointer not 16-aligned
    n = 1
    for s in shape:
        n *= s
    return torch.empty(n + 1, dtype=dtype)[1:].view(shape)

SPLIT = KernelConfig(block_size_n=8, block_size_c=16, block_size_s=1, num_partials=3)  # split path, tiny input

def fwd(x, affine=True, running=True, activation="relu", config=None):
    C = x.shape[1]
    w, b = (channel(C), channel(C)) if affine else (None, None)
    rm, rv = (channel(C), channel(C)) if running else (None, None)
    launchers.bn_act_fwd_train(x, w, b, rm, rv, momentum=0.1, eps=1e-5, activation=activation, config=config)

def bwd(x, training=True, config=None, saved_output=False):
    C = x.shape[1]
    mean = None if saved_output else channel(C)
    launchers.bn_act_bwd(torch.empty_like(x), x, mean, channel(C), channel(C), channel(C), training=training,
                         eps=1e-5, activation="identity", saved_output=saved_output, config=config)

# each case changes one thing from "base" (or from the case named after "<"), which Triton specialises on
CASES = {
    "base": lambda: fwd(torch.empty(32, 64)),  # (N, C) fp32 on the one-launch path
    "bf16 < base": lambda: fwd(torch.empty(32, 64, dtype=torch.bfloat16)),  # dtype of x and y
    "unaligned < base": lambda: fwd(unaligned(32, 64)),  # 16-byte alignment of x's data pointer
    "transposed < base": lambda: fwd(torch.empty(64, 32).t()),  # strides: N has unit stride
    "no affine < base": lambda: fwd(torch.empty(32, 64), affine=False),  # constexpr flags HAS_WEIGHT/HAS_BIAS
    "no running < base": lambda: fwd(torch.empty(32, 64), running=False),  # constexpr flag HAS_RUNNING
    "silu < base": lambda: fwd(torch.empty(32, 64), activation="silu"),  # constexpr ACTIVATION
    "C=1 < base": lambda: fwd(torch.empty(32, 1)),  # integers equal to 1 become constexprs
    "C=17 < base": lambda: fwd(torch.empty(32, 17)),  # C and strides not divisible by 16
    "split < base": lambda: fwd(torch.empty(32, 64), config=SPLIT),  # two launches, other kernels
    "split warps < split": lambda: fwd(torch.empty(32, 64), config=KernelConfig(8, 16, 1, 3, num_warps=2)),
    "nchw": lambda: fwd(torch.empty(4, 8, 3, 3)),  # 4-D, S = 9 along unit stride
    "channels_last < nchw": lambda: fwd(torch.empty(4, 8, 3, 3).to(memory_format=torch.channels_last)),
    "bwd": lambda: bwd(torch.empty(32, 64)),
    "bwd eval < bwd": lambda: bwd(torch.empty(32, 64), training=False),  # constexpr TRAINING
    "bwd unaligned < bwd": lambda: bwd(unaligned(32, 64)),
    "bwd from output < bwd": lambda: bwd(torch.empty(32, 64), saved_output=True),  # SAVED_OUTPUT
    "bwd split < bwd": lambda: bwd(torch.empty(32, 64), config=SPLIT),
    "eval": lambda: launchers.bn_act_fwd_eval(torch.empty(32, 64), channel(64), channel(64), None, None, eps=1e-5,
                                              activation="relu"),
}

@triton.jit
def _scale(x_ptr, SCALE: tl.constexpr):
    offs = tl.arange(0, 16)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)

def same(a, b):
    return {f: getattr(a, f) == getattr(b, f) for f in
            ("kernel", "key", "grid", "num_warps", "num_stages", "constexprs", "signature", "args", "stream")}

out = {"version": triton.__version__, "cases": {}}
with recording() as rec:
    for label, case in CASES.items():  # round 1: the first call of every launch key goes through the JIT
        case()
    captured.clear()
    rec.clear()
    for label, case in CASES.items():  # round 2: fresh tensors, the same launch keys: direct launches
        runs, first = jit_runs[0], len(captured)
        case()
        runs = jit_runs[0] - runs  # JIT calls made by the launchers themselves
        fast = rec.take()
        calls = captured[first:]
        jit_launches = []
        for kernel, grid, args, kwargs in calls:  # the same launches through Triton's own JIT path
            kernel[grid](*args, **kwargs)
            jit_launches += rec.take()
        out["cases"][label] = {
            "jit_runs": runs,
            "launches": len(fast), "calls": len(calls),
            "same": [same(a, b) for a, b in zip(fast, jit_launches)],
            "keys": [l.key for l in fast],
            "unaligned": [sorted(n for n, v in l.args.items() if getattr(v, "aligned_16", True) is False)
                          for l in fast],
        }

    # the active driver is part of the key: the same arguments under a recording for sm_80, then sm_90 again
    kernel, grid, args, kwargs = captured[0]
    archs = []
    for target in ("sm_80", "sm_80", None):
        with (recording(target) if target else contextlib.nullcontext(rec)) as r:
            _launch.launch(kernel, grid, args, kwargs)
            kernel[grid](*args, **kwargs)
            fast, slow = r.take()
        archs.append([fast.compiled.metadata.target.arch, fast.key == slow.key, fast.key])
    out["archs"] = archs

    # the stream is read on every call: the recording driver's current stream changes between two direct launches
    streams = iter([5, 7])
    rec.driver.get_current_stream = lambda device=None: next(streams)
    CASES["base"]()
    CASES["base"]()
    out["streams"] = [l.stream for l in rec.take()]
    rec.driver.get_current_stream = lambda device=None: 0

    # arguments the launch key cannot describe are refused, by name
    kernel, grid, args, kwargs = calls[0]
    try:
        _launch.launch(kernel, grid, (*args[:-1], [args[-1]]), kwargs)
        out["list_arg"] = "accepted"
    except TypeError as e:
        out["list_arg"] = str(e)

    # a float constexpr: by keyword its value is part of the key (each value its own kernel); by position, refused
    x = torch.empty(16)
    scaled = []
    for value in (0.5, 2.0, 0.5):
        _launch.launch(_scale, (1,), (x,), {"SCALE": value})
        _scale[(1,)](x, SCALE=value)
        fast, slow = rec.take()
        scaled.append([fast.key, fast.key == slow.key])
    out["float_constexpr"] = scaled
    try:
        _launch.launch(_scale, (1,), (x, 0.5), {})
        out["float_constexpr_by_position"] = "accepted"
    except TypeError as e:
        out["float_constexpr_by_position"] = str(e)

    try:
        _launch.launch(_scale, lambda meta: (1,), (x,), {"SCALE": 3.0})
        out["callable_grid"] = "accepted"
    except TypeError as e:
        out["callable_grid"] = str(e)

    # a Triton version whose launch convention was not checked: every call through the JIT, and a warning says so
    _launch._triton.cache_clear()
    real = triton.__version__
    triton.__version__ = "3.99.0"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = jit_runs[0]
            for _ in range(2):  # the second call of a launch key too
                _launch.launch(kernel, grid, args, kwargs)
            out["unsupported"] = {"jit_runs": jit_runs[0] - runs, "launches": len(rec.take()),
                                  "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}
    finally:
        triton.__version__ = real
        _launch._triton.cache_clear()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BNBENCH_TRITON_JIT_LAUNCH")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    folder = tmp_path_factory.mktemp("launch")
    script = folder / "launch.py"  # a file, not -c: triton.jit reads the kernels' source
    script.write_text(_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=folder,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_direct_path_launches_exactly_what_tritons_jit_launches(launched):
    for label, case in launched["cases"].items():
        assert case["launches"] == case["calls"] >= 1, (label, case)  # the recording driver saw every launch
        assert case["jit_runs"] == 0, (label, case)  # and none went through JITFunction.run
        for fields in case["same"]:
            assert all(fields.values()), (label, fields)
        assert len(case["same"]) == case["calls"]


def test_each_change_is_a_different_specialisation(launched):
    """A launch key that missed any of these changes would have launched the kernel of the case before it (the
    comparison above would fail): Triton compiled a different kernel for each."""
    cases = launched["cases"]
    by_name = {label.split(" < ")[0]: case for label, case in cases.items()}
    for label, case in cases.items():
        if " < " in label:
            assert case["keys"] != by_name[label.split(" < ")[1]]["keys"], label
    assert cases["base"]["unaligned"] == [[]]
    # the input view (y is allocated dense); without a residual, x stands in for its pointer (never read)
    assert cases["unaligned < base"]["unaligned"] == [["res_ptr", "x_ptr"]]
    assert cases["bwd unaligned < bwd"]["unaligned"] == [["dres_ptr", "res_ptr", "x_ptr"]]  # x stands in for both


def test_the_active_driver_and_its_target_are_part_of_the_key(launched):
    (arch1, same1, key1), (arch2, same2, key2), (arch3, same3, key3) = launched["archs"]
    assert (arch1, arch2, arch3) == (80, 80, 90) and same1 and same2 and same3
    assert key1 == key2 != key3 == launched["cases"]["base"]["keys"][0]


def test_the_stream_is_read_on_every_launch(launched):
    assert launched["streams"] == [5, 7]


def test_a_float_constexpr_is_keyed_by_its_value(launched):
    (k1, same1), (k2, same2), (k3, same3) = launched["float_constexpr"]
    assert same1 and same2 and same3  # the kernel Triton's JIT picks for each value
    assert k1 != k2 and k1 == k3


def test_refusals_are_clear(launched):
    assert "the direct launch keys tensors, int, float, bool, str and None" in launched["list_arg"]
    assert "of type list" in launched["list_arg"]
    unsupported = launched["unsupported"]
    assert unsupported["jit_runs"] == 2 and unsupported["launches"] == 2  # both calls through Triton's JIT
    (message,) = unsupported["warnings"]  # once
    assert "triton 3.99.0 is installed" in message and "(3.6, 3.9)" in message and "Triton's JIT" in message
    assert "SCALE=0.5, a float constexpr passed by position" in launched["float_constexpr_by_position"]
    assert "takes the grid as a tuple of ints" in launched["callable_grid"]


# the changes above, run natively: each case twice (the second call launches directly) against the reference
_GPU_CASES = {
    "base": ((32, 64), torch.float32, "contiguous", {}),
    "bf16": ((32, 64), torch.bfloat16, "contiguous", {}),
    "transposed": ((32, 64), torch.float32, "transposed", {}),
    "no affine": ((32, 64), torch.float32, "contiguous", {"affine": False}),
    "no running": ((32, 64), torch.float32, "contiguous", {"track": False}),
    "silu": ((32, 64), torch.float32, "contiguous", {"activation": "silu"}),
    "eval": ((32, 64), torch.float32, "contiguous", {"training": False}),
    "C=1": ((32, 1), torch.float32, "contiguous", {}),
    "C=17": ((32, 17), torch.float32, "contiguous", {}),
    "nchw": ((4, 8, 3, 3), torch.float32, "contiguous", {}),
    "channels_last": ((4, 8, 3, 3), torch.float32, "channels_last", {}),
    "split": ((4096, 64), torch.float32, "contiguous", {}),  # large enough for the planner's split path
}


def _test_kernels():
    """tests/test_kernels.py as a module, for its input maker and reference check (pytest's importlib mode gives
    test files no importable name)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_bnbench_test_kernels", Path(__file__).with_name("test_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
def test_direct_launches_compute_the_reference_across_changes(unaligned, monkeypatch, device):
    import triton.runtime.jit as jit

    from bnbench import kernels
    from bnbench.kernels import launchers

    launches, jit_runs = [0], [0]
    original, jit_run = launchers._launch, jit.JITFunction.run

    def counted_launch(*args, **kwargs):
        launches[0] += 1
        original(*args, **kwargs)

    def counted_run(self, *args, **kwargs):
        jit_runs[0] += 1
        return jit_run(self, *args, **kwargs)

    monkeypatch.setattr(launchers, "_launch", counted_launch)
    monkeypatch.setattr(jit.JITFunction, "run", counted_run)
    helpers = _test_kernels()
    for label, (shape, dtype, layout, options) in _GPU_CASES.items():
        for call in range(2):
            x = helpers.make_input(shape, dtype, device, layout)
            if unaligned:  # contiguous x moved one element into a larger buffer: its data pointer is not 16-aligned
                buffer = torch.empty(x.numel() + 1, dtype=dtype, device=device)
                x = buffer[1:].view(x.shape).copy_(x) if layout == "contiguous" else x
            split = kernels.plan(x)[1].num_partials > 1
            assert split == (label == "split"), label  # the case exercises the path it is named after
            launches[0] = jit_runs[0] = 0
            helpers.run_and_check(x, **options)
            assert launches[0] == (4 if split else 2), label  # forward and backward, on the Triton path
            if call == 1:
                assert jit_runs[0] == 0, label  # second call: every launch was direct
