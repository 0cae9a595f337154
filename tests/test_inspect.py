"""``bnbench inspect`` and the recording Triton driver under it: launches recorded (not run) through the real JIT
path on CPU tensors, real sm_90 compiled facts, the CLI's JSON, files and exit codes.

The kernels must be real JIT functions, so everything here runs in a fresh process with TRITON_INTERPRET unset.
No timing is asserted.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")

_DRIVER_SCRIPT = r"""
import json, torch, triton
import triton.language as tl
from triton.runtime.driver import driver
from bnbench import kernels
from bnbench.bench.cases import Case
from bnbench.inspect.record import empty_inputs, record_pass
from bnbench.kernels._driver import recording, recording_target
from bnbench.kernels._facts import kernel_facts
from bnbench.kernels._target import TARGETS

out = {"before": driver._active is None and recording_target() is None}
try:
    kernels.bn_act_fwd_eval(torch.ones(4, 3), torch.zeros(3), torch.ones(3), None, None, eps=1e-5, activation="relu")
    out["cpu_rejected"] = False
except ValueError:
    out["cpu_rejected"] = True
cases = {}
for shape in [(256, 64), (262144, 256), (8, 16, 7, 7)]:
    for pass_ in ("fwd", "bwd", "eval"):
        op = "bn1d" if len(shape) == 2 else "bn2d"
        case = Case(op, pass_, "relu", "bf16", "nchw", *shape)
        with recording() as rec:
            _, cfg = kernels.plan(empty_inputs(case).x.detach())
            assert recording_target().sms == 132
            with recording() as inner:  # nested: the inner one records, the outer one is restored after
                pass
            assert driver._active is rec.driver
        record = record_pass(case)
        cases[f"{pass_} {shape}"] = {
            "num_partials": cfg.num_partials, "kernels": [l.kernel for l in record.launches],
            "grids": [list(l.grid) for l in record.launches], "aten": record.aten_kernels,
        }
out["cases"] = cases
launch = record_pass(Case("bn1d", "fwd", "relu", "fp32", "nchw", 32768, 1024)).launches[0]
facts = kernel_facts(launch.compiled, TARGETS["sm_90"])
out["facts"] = {"kernel": facts.kernel, "registers": facts.registers, "local": facts.local_bytes,
                "arch": launch.compiled.metadata.target.arch, "loops": facts.sass.loops,
                "main_load_bits": facts.sass.main_load_bits, "blocks": facts.occupancy.blocks_per_sm,
                "x": next([a.shape, a.dtype] for a in launch.args.values() if hasattr(a, "nbytes")),
                "constexprs": launch.constexprs}


@triton.jit
def _register_hog(x_ptr, y_ptr, BLOCK: tl.constexpr):  # 64 values per thread live across a sum: spills at 32 regs
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x * tl.sum(x * x, 0))


with recording() as rec:
    _register_hog[(1,)](torch.empty(2048), torch.empty(2048), BLOCK=2048, num_warps=1, maxnreg=32)
hog = kernel_facts(rec.launches[0].compiled, TARGETS["sm_90"])
out["hog"] = {"registers": hog.registers, "local": hog.local_bytes, "spills": hog.spills}
out["after"] = driver._active is None and recording_target() is None
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def driver_facts(tmp_path_factory):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    folder = tmp_path_factory.mktemp("driver")
    script = folder / "record.py"  # a file, not -c: triton.jit reads the kernel's source
    script.write_text(_DRIVER_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=folder,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_recording_is_scoped_and_restores_the_previous_driver(driver_facts):
    assert driver_facts["before"] and driver_facts["after"]
    assert driver_facts["cpu_rejected"]  # outside a recording the launchers still refuse CPU tensors


def test_launch_counts_follow_the_launchers_plan(driver_facts):
    """The one-launch (fused) path when the planner picks one partial, the split path (2 launches: the partials
    are merged inside the reduction kernel) otherwise."""
    cases = driver_facts["cases"]
    paths = set()
    for label, c in cases.items():
        pass_ = label.split()[0]
        if pass_ == "eval":
            assert len(c["kernels"]) == 1, (label, c)
        else:
            assert len(c["kernels"]) == (1 if c["num_partials"] == 1 else 2), (label, c)
            paths.add(c["num_partials"] == 1)
        assert all(x >= 1 and y >= 1 and z >= 1 for x, y, z in c["grids"])
        if pass_ != "bwd":
            assert c["aten"] == {}, (label, c)  # forward passes launch nothing besides bnbench's kernels
    assert paths == {True, False}  # both paths were exercised
    fwd, bwd = cases["fwd (262144, 256)"]["kernels"], cases["bwd (262144, 256)"]["kernels"]
    assert len(set(fwd)) == 2 and not set(fwd) & set(bwd)  # two distinct kernels each way


def test_a_real_sm90_kernel_through_the_driver(driver_facts):
    f = driver_facts["facts"]
    assert f["arch"] == 90 and f["registers"] > 0 and f["local"] == 0  # compiled, no spills
    assert f["loops"] >= 1 and f["main_load_bits"] in (32, 64, 128) and f["blocks"] >= 1
    assert f["x"] == [[32768, 1024], "float32"]
    assert any(k.startswith("BLOCK_SIZE") for k in f["constexprs"])


def test_spills_are_seen(driver_facts):
    """A kernel squeezed into 32 registers spills: the cubin's local memory shows it (the no-spill checks can fail)."""
    assert driver_facts["hog"] == {"registers": 32, "local": driver_facts["hog"]["local"], "spills": True}
    assert driver_facts["hog"]["local"] > 0


def test_inspect_json_schema_and_files(tmp_path):
    from bnbench.inspect.testing import inspect_json, run_inspect

    args = ["--batch", "512", "--width", "64", "--spatial", "1,7x7", "--layout", "nchw", "--pass", "fwd,eval"]
    doc = inspect_json(*args)
    assert doc["schema"] == "bnbench-inspect/1" and doc["target"] == "sm_90"
    assert "Nothing was executed on a GPU" in doc["executed"] and doc["host"] is None
    assert {(p["shape"], p["pass"]) for p in doc["passes"]} == {
        ("512x64", "fwd"),
        ("512x64", "eval"),
        ("512x64x7x7", "fwd"),
        ("512x64x7x7", "eval"),
    }
    for p in doc["passes"]:
        assert p["status"] == "ok" and p["bytes_modelled"] >= p["bytes_floor"] > 0
        rows = [r for r in doc["launches"] if (r["shape"], r["pass"]) == (p["shape"], p["pass"])]
        assert len(rows) == p["triton_launches"] >= 1
        for r in rows:
            assert r["registers"] > 0 and r["spill_bytes"] == 0 and r["waves_modelled"] >= 1
    done = run_inspect(*args, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["inspect.json", "launches.csv", "passes.csv", "summary.md"]
    assert "## Launches" in done.stdout and "Nothing was executed on a GPU" in done.stdout


def test_host_overhead_rows():
    from bnbench.inspect.testing import inspect_json

    doc = inspect_json("--batch", "32", "--width", "16", "--pass", "fwd_bwd", "--host-overhead", "--calls", "20")
    host = {r["provider"]: r for r in doc["host"]}
    assert set(host) == {"eager", "triton"}
    assert host["triton"]["launches_per_call"] == doc["passes"][0]["triton_launches"]
    assert all(r["us_p50"] > 0 and r["calls"] == 20 for r in doc["host"])
    assert "nothing run on a GPU" in host["triton"]["executed"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "sm_12"], "unknown target"),
        (["--dtype", "fp8"], "--dtype"),
        (["--calls", "3", "--host-overhead"], "--calls"),
        (["--batch", "4096", "--width", "1024", "--host-overhead"], "at most 65536 elements"),
        (["--preset", "baseline", "--layout", "channels_last", "--width", "1024"], "no case left"),
        (["--batch", "64"], "unset TRITON_INTERPRET"),  # this test process runs the interpreter
    ],
)
def test_bad_usage_exits_2_with_a_message(args, message, capsys, monkeypatch):
    from bnbench.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["inspect", *args]) == 2
    assert message in capsys.readouterr().err


def test_help_says_what_is_executed(capsys):
    from bnbench.cli import main

    with pytest.raises(SystemExit) as done:
        main(["inspect", "--help"])
    assert done.value.code == 0
    assert "NOTHING is executed on a GPU" in " ".join(capsys.readouterr().out.split())
