"""``bnbench step``: one training step of a tiny network with every provider on CPU (the fused layers' PyTorch
reference, and the Triton kernels in the interpreter), the float64 check (it can fail), failing configurations
recorded, the results schema, the CLI's files and exit codes, and ``bnbench report`` reading them."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bnbench.cli import main
from bnbench.schema import STEP_COLUMNS, validate_step
from bnbench.step import providers as sp
from bnbench.step.check import error_bound
from bnbench.step.measure import run_steps
from bnbench.step.share import is_bn_act
from bnbench.step.training import StepCase, StepSettings

PROVENANCE = {"run_id": "test", "device_name": "cpu"}
QUICK = StepSettings(fused_backend="torch", warmup=0, steps=2, profile_steps=1)


def _run(cases, names, settings=QUICK):
    frame, samples = run_steps(cases, sp.get_step_providers(names), "cpu", settings, PROVENANCE)
    validate_step(frame)
    assert list(frame.columns) == list(STEP_COLUMNS)
    return frame.set_index("provider", drop=False), samples


@pytest.fixture(autouse=True)
def one_thread():
    """One PyTorch thread, as the CLI's default: on a shared 2-core machine OpenMP pools stall for whole ticks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def provider(monkeypatch):
    """Register a step provider for one test."""

    def add(name, prepare):
        monkeypatch.setitem(sp.STEP_PROVIDERS, name, sp.StepProvider(name, False, prepare))
        return name

    return add


def test_every_provider_runs_one_step_of_the_mlp():
    frame, samples = _run([StepCase("mlp", 4, "fp32", "nchw")], "eager,compile,fused,fused-compile")
    assert (frame["status"] == "ok").all(), frame["message"].tolist()
    assert (frame["timer"] == "wall").all() and (frame["n_samples"] == 2).all()
    assert all(len(s) == 2 for s in samples.values())
    assert frame.loc["fused", "fused_backend"] == "torch" and frame.loc["eager", "fused_backend"] == ""
    # every BatchNorm fused: the residual Linear's BN with its add (convert_bn_act is given the step's batch)
    assert frame.loc["fused", ["bn_layers", "bn_fused", "bn_unfused"]].tolist() == [3, 3, 0]
    assert frame.loc["compile", ["bn_fused", "bn_unfused"]].tolist() == [0, 3]
    assert frame.loc["fused-compile", "bn_unfused"] == 0
    assert frame.loc["eager", "speedup_vs_eager"] == 1.0 and frame.loc["compile", "speedup_vs_compile"] == 1.0
    assert (frame["compile_s"] > 0).all() and (frame["images_per_s"] > 0).all()
    assert frame["peak_mem_mb"].isna().all()  # CPU: no allocator peak statistic
    assert 0 < frame.loc["eager", "bn_act_share"] < 1
    assert math.isnan(frame.loc["compile", "bn_act_share"]) and "one region" in frame.loc["compile", "message"]
    # every provider's error is measured against float64; fused on the torch backend is the eager network
    assert (
        frame.loc["fused", "grad_rel_err"]
        == frame.loc["eager", "grad_rel_err"]
        == frame.loc["eager", "eager_grad_rel_err"]
    )
    assert (frame["grad_rel_err"] <= frame["tolerance"]).all()


def test_bf16_autocast_channels_last_cnn():
    frame, _ = _run([StepCase("cnn", 2, "bf16", "channels_last", resolution=16)], "eager,fused")
    assert (frame["status"] == "ok").all(), frame["message"].tolist()
    assert frame["autocast"].all() and frame.loc["fused", "bn_fused"] == 4  # the residual block's second BN too
    assert frame.loc["eager", "tolerance"] >= 2e-2  # bf16's entry of bnbench.testing.TOLERANCE, or more


def test_fused_triton_backend_runs_the_kernels_in_the_interpreter(launches):
    settings = StepSettings(fused_backend="triton", warmup=0, steps=1, profile_steps=0)
    frame, _ = _run([StepCase("mlp", 4, "fp32", "nchw")], "fused", settings)
    row = frame.loc["fused"]
    assert row["status"] == "ok", row["message"]
    assert row["timer"] == "interpreter" and math.isnan(row["ms_p50"]) and "not timed" in row["message"]
    assert row["fused_backend"] == "triton"
    assert launches["fwd_train"] >= 2 and launches["bwd"] >= 2  # two fused BN1d layers, forward and backward


def test_a_failing_configuration_is_recorded_and_the_run_goes_on(provider):
    def boom(model, backend, example):
        raise RuntimeError("injected failure")

    def oom(model, backend, example):
        raise MemoryError("injected")

    names = ",".join([provider("boom", boom), "eager", provider("oom", oom)])
    frame, _ = _run([StepCase("mlp", 4, "fp32", "nchw")], names)
    assert frame.loc["boom", "status"] == "error" and "RuntimeError: injected failure" in frame.loc["boom", "message"]
    assert frame.loc["oom", "status"] == "oom"
    assert frame.loc["eager", "status"] == "ok"


def test_a_wrong_model_is_incorrect(provider):
    def wrong(model, backend, example):
        with torch.no_grad():
            model.hidden[1].weight.mul_(1.01)  # a 1% error in one BatchNorm's scale
        return sp.Prepared(model, compiled=False)

    frame, _ = _run([StepCase("mlp", 4, "fp32", "nchw")], f"eager,{provider('wrong', wrong)}")
    assert frame.loc["wrong", "status"] == "incorrect"
    assert "gradient rel err" in frame.loc["wrong", "message"] and frame.loc["eager", "status"] == "ok"


def test_error_bound_is_a_multiple_of_eagers_error_never_below_the_dtype_tolerance():
    assert error_bound(1e-4, 1e-8) == 1e-4  # a well-conditioned network: the table's value
    assert error_bound(1e-4, 1e-5) == pytest.approx(1e-3)  # a network that amplifies rounding


def test_bn_and_activation_kernel_names():
    for name in ("aten::native_batch_norm", "void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>", "_bn_act_fwd_fused_kernel",
                 "triton_red_fused__native_batch_norm_legit_functional_relu_3", "aten::threshold_backward",
                 "at::native::clamp_min_scalar_kernel_impl", "batch_norm_backward_reduce_channels_last_kernel"):  # fmt: skip
        assert is_bn_act(name), name
    for name in ("aten::convolution", "sm90_xmma_fprop_implicit_gemm", "aten::add_", "multi_tensor_apply_kernel"):
        assert not is_bn_act(name), name


def test_step_schema_rejects_bad_frames():
    frame, _ = _run([StepCase("mlp", 4, "fp32", "nchw")], "eager", StepSettings(warmup=0, steps=1, profile_steps=0))
    with pytest.raises(ValueError, match="missing column"):
        validate_step(frame.drop(columns=["images_per_s"]))
    with pytest.raises(ValueError, match="column status"):
        validate_step(frame.assign(status="fine"))
    with pytest.raises(ValueError, match="column timer"):
        validate_step(frame.assign(timer="cuda_event"))


def test_cli_writes_results_and_report_reads_them(tmp_path, provider, capsys):
    from bnbench.report.assemble import results_report
    from bnbench.report.load import load_result

    out = tmp_path / "run"
    args = ["step", "--model", "mlp,cnn", "--batch", "4", "--layout", "nchw,channels_last",
            "--providers", "eager,fused", "--steps", "2", "--warmup", "0", "--profile-steps", "1", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    assert {"results.csv", "results.json", "summary.md", "step_time.png"} <= {p.name for p in out.iterdir()}
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 2 * 3  # mlp drops channels_last: mlp nchw, cnn nchw, cnn channels_last
    result = load_result(out)
    assert result.kind == "step"
    report = results_report([result])
    assert "step_time" in report.figures and "Training step" in (out / "summary.md").read_text()
    capsys.readouterr()
    # a failing configuration: recorded, the run goes on, exit 1
    provider("boom", lambda model, backend, example: (_ for _ in ()).throw(RuntimeError("injected")))
    failing = [a if a != "eager,fused" else "boom,eager" for a in args]
    assert main([*failing, "--model", "mlp", "--out", str(tmp_path / "failing")]) == 1
    frame = pd.read_csv(tmp_path / "failing" / "results.csv")
    assert sorted(frame["status"]) == ["error", "ok"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "resnet34"], "unknown value"),
        (["--model", "mlp", "--batch", "1"], "must be >= 2"),
        (["--model", "mlp", "--dtype", "fp64"], "--dtype"),
        (["--model", "mlp", "--layout", "channels_last"], "no configuration left"),
        (["--model", "mlp", "--providers", "eager,nope"], "unknown provider"),
        (["--model", "mlp", "--resolution", "16"], "takes 8x8 inputs only"),
    ],
)
def test_cli_bad_usage_exits_2(extra, message, capsys, tmp_path):
    assert main(["step", *extra, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_dry_run_lists_points(capsys):
    assert main(["step", "--model", "resnet50", "--batch", "128", "--dtype", "bf16", "--layout", "channels_last",
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "4 point(s)" in out and "fused-compile" in out and "resnet50 b128 bf16 channels_last 224px" in out
