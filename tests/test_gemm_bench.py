"""``bnbench bench --op linear_bn_act|conv1x1_bn_act``: cases, presets, the bytes model, checked points, the CLI.

Points run on the quick preset's tiny shapes (64 rows for the Linear, 2x6x6 for the convolution); the triton
provider runs under the interpreter on CPU (correctness only).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from bnbench.bench import gemm_cases as gc
from bnbench.bench import gemm_workload as gw
from bnbench.bench import runner
from bnbench.bench.bytes_model import MATMUL_BN_ACT_FWD_PASSES, matmul_bn_act_bytes
from bnbench.bench.providers import Provider
from bnbench.cli import main
from bnbench.schema import validate_bench


def test_cases_describe_the_matmul_and_its_output():
    case = gc.MatmulCase("conv1x1_bn_act", "fwd", "relu", "bf16", "channels_last", 256, 256, 512, 56, 56, 2)
    assert case.shape == (256, 512, 28, 28) and case.rows == 256 * 28 * 28 and case.family == "conv1x1_bn_act"
    assert case.key() == ("conv1x1_bn_act", "fwd", "relu", "bf16", "channels_last", "256x256x56x56->512/s2")
    assert case.columns()["S"] == 28 * 28 and case.columns()["C"] == 512
    with pytest.raises(ValueError, match="no spatial size or stride"):
        gc.MatmulCase("linear_bn_act", "fwd", "relu", "fp32", "nchw", 8, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="not measured"):
        gc.MatmulCase("linear_bn_act", "eval", "relu", "fp32", "nchw", 8, 4, 4)
    with pytest.raises(ValueError, match="layout 'channels_last'"):
        gc.MatmulCase("conv1x1_bn_act", "fwd", "relu", "fp32", "nchw", 8, 4, 4, 2, 2)


def test_resnet50_preset_covers_its_36_one_by_one_convolutions():
    """16 bottlenecks with a reducing and an expanding 1x1 conv each, and 4 downsample branches (3 strided)."""
    assert sum(count for *_, count in gc.RESNET50_CONV1X1) == 36
    assert sum(count for _, _, _, stride, _, count in gc.RESNET50_CONV1X1 if stride == 2) == 3
    cases = gc.select_gemm_cases("conv1x1_bn_act", "resnet50", batch=[256], passes=["fwd"])
    assert len(cases) == len(gc.RESNET50_CONV1X1) and {c.dtype for c in cases} == {"bf16"}
    with pytest.raises(ValueError, match="no linear_bn_act case"):
        gc.select_gemm_cases("linear_bn_act", "resnet50")


def test_bytes_model_counts_3T_of_z_and_y_against_4T_and_6T():
    M, K, N = 1000, 64, 256
    operands = (M * K + N * K) * 2
    assert MATMUL_BN_ACT_FWD_PASSES == {"fused": 3, "compile": 4, "eager": 6}
    for impl, passes in MATMUL_BN_ACT_FWD_PASSES.items():
        assert matmul_bn_act_bytes("fwd", M, K, N, "bf16", impl) == operands + passes * M * N * 2
    fwd_bwd = matmul_bn_act_bytes("fwd_bwd", M, K, N, "fp32")
    assert fwd_bwd == (3 * (M * K + N * K) + (3 + 7) * M * N) * 4
    with pytest.raises(ValueError, match="fused op only"):
        matmul_bn_act_bytes("fwd_bwd", M, K, N, "fp32", "eager")


def _ctx(device="cpu"):
    import torch

    return runner.RunContext(
        torch.device(device), 1.0, {"run_id": "t"}, timing=runner.TimingSettings(cpu_budget_s=0.01)
    )


@pytest.mark.parametrize("provider", ["eager", "triton"])
def test_points_are_checked_against_the_float64_chain(provider):
    cases = gc.select_gemm_cases("conv1x1_bn_act", "quick") + gc.select_gemm_cases("linear_bn_act", "quick")
    for case in cases:
        (result,) = runner.measure_point(case, gw.GEMM_PROVIDERS[provider], _ctx())
        row = result.row
        assert row["status"] == "ok", (case.label(), row["message"])
        assert row["bytes_min"] == gw.bytes_min_of(case) and row["op"] == case.op
        if not torch.cuda.is_available():
            assert row["timer"] == ("interpreter" if provider == "triton" else "wall")


def test_a_wrong_provider_is_marked_incorrect():
    chain = gw._chain

    def off_by_5_percent(case):
        fn = chain(case)
        return lambda *args: fn(*args) * 1.05

    wrong = Provider("wrong", False, off_by_5_percent)
    case = gc.select_gemm_cases("linear_bn_act", "quick", passes=["fwd"])[0]
    (result,) = runner.measure_point(case, wrong, _ctx())
    assert result.row["status"] == "incorrect" and "in y" in result.row["message"]


def test_cli_runs_an_op_and_rejects_axes_it_does_not_have(tmp_path, capsys):
    out = tmp_path / "lin"
    args = ["bench", "--op", "linear_bn_act", "--pass", "fwd", "--providers", "eager,triton", "--cpu-budget-s", "0.01"]
    assert main([*args, "--out", str(out)]) == 0
    frame = validate_bench(pd.read_csv(out / "results.csv"))
    assert set(frame["op"]) == {"linear_bn_act"} and (frame["status"] == "ok").all()
    assert set(frame["provider"]) == {"eager", "triton"}
    assert main(["bench", "--op", "conv1x1_bn_act", "--preset", "resnet50", "--dry-run"]) == 0
    assert "270 point(s)" in capsys.readouterr().out  # 15 shapes x 3 batches x 2 passes x 3 providers
    assert main(["bench", "--op", "linear_bn_act", "--width", "8", "--dry-run"]) == 2
    assert "--width: not an axis of --op linear_bn_act" in capsys.readouterr().err


def test_cli_one_matmul_op_per_call_as_the_gpu_script_runs_it(capsys):
    args = ["bench", "--op", "conv1x1_bn_act", "--preset", "resnet50", "--batch", "256", "--pass", "fwd_bwd"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "45 point(s)" in out  # 15 shapes x 1 batch x 1 pass x 3 providers
    assert "conv1x1_bn_act fwd_bwd bf16" in out and "linear_bn_act" not in out
    assert main(["bench", "--op", "linear_bn_act", "--preset", "mlp", "--providers", "triton", "--dry-run"]) == 0
    assert "16 point(s)" in capsys.readouterr().out  # 4 shapes x 2 dtypes x 2 passes
    # both matmul ops in one run (the quick preset: 2 Linear and 4 conv cases), and a preset one of them lacks
    assert main(["bench", "--op", "linear_bn_act,conv1x1_bn_act", "--dry-run"]) == 0
    assert "18 point(s)" in capsys.readouterr().out
    assert main(["bench", "--op", "linear_bn_act,conv1x1_bn_act", "--preset", "mlp", "--dry-run"]) == 0
    assert "48 point(s)" in capsys.readouterr().out
    for bad in ("bn_act,linear_bn_act", "gemm"):
        with pytest.raises(SystemExit):
            main(["bench", "--op", bad, "--dry-run"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--op", "linear_bn_act", "--preset", "baseline"], "--preset baseline is the BatchNorm + activation"),
        (["--op", "conv1x1_bn_act", "--world-size", "2", "--out", "x"], "--world-size is for --op bn_act only"),
        (["--op", "linear_bn_act", "--from-model", "mlp"], "--from-model is for --op bn_act only"),
        (["--op", "linear_bn_act", "--providers", "compile-max-autotune"], "unknown provider(s)"),
        (["--preset", "mlp"], "--preset mlp is a preset of --op linear_bn_act"),
    ],
)
def test_cli_refuses_what_a_matmul_op_does_not_have(argv, says, capsys):
    assert main(["bench", *argv, "--dry-run"]) == 2
    assert says in capsys.readouterr().err


def test_resume_checks_the_op(tmp_path, capsys):
    from bnbench.bench.record import resume_mismatch

    out = tmp_path / "lin"
    args = ["bench", "--op", "linear_bn_act", "--pass", "fwd", "--providers", "eager", "--cpu-budget-s", "0.01"]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    other = ["--op", "conv1x1_bn_act", *args[3:]]
    assert main(["bench", *other, "--out", str(out), "--resume"]) == 2
    assert "--op linear_bn_act then, conv1x1_bn_act now" in capsys.readouterr().err
    # a run recorded before --op existed was a BatchNorm + activation run
    assert resume_mismatch({"options": {"preset": "quick"}}, {"op": "bn_act", "preset": "quick"}) is None
    assert "--op (not given) then" not in resume_mismatch({"options": {}}, {"op": "linear_bn_act"})


def test_epilogue_cost_tool_shapes_and_refusal_without_a_gpu(capsys):
    from bnbench.bench import gemm_epilogue

    assert len(gemm_epilogue.SHAPES) == len(gc.RESNET50_CONV1X1) + len(gc.MLP_LINEARS)
    name, M, K, N = gemm_epilogue.SHAPES[6]  # the stride-2 downsample of stage 2: 56x56 -> 28x28
    assert (M, K, N) == (256 * 28 * 28, 256, 512) and name.endswith("/s2")
    table = gemm_epilogue.to_markdown(pd.DataFrame([{"shape": "a", "ms": 1.234567}]))
    assert table.splitlines() == ["| shape | ms |", "|---|---|", "| a | 1.235 |"]
    if not torch.cuda.is_available():
        assert gemm_epilogue.main([]) == 2 and "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_epilogue_cost_tool_on_gpu():
    from bnbench.bench import gemm_epilogue

    frame = gemm_epilogue.measure_epilogue([("t", 1000, 64, 256)], rep_ms=5)
    assert len(frame) == len(gemm_epilogue.VARIANTS)
    # ours vs torch.matmul in the same mode: exact fp32 agrees to rounding; tf32 and bf16 differ by their own
    # rounding (10- and 7-bit mantissas) in either result
    limit = {("fp32", "ieee"): 1e-5, ("fp32", "tf32"): 5e-3, ("bf16", "ieee"): 1e-2}
    assert all(r.rel_err < limit[(r.dtype, r.precision)] for r in frame.itertuples()), frame
    assert (frame[["torch_ms", "gemm_ms", "gemm_stats_ms", "fused_fwd_ms"]] > 0).all().all()
