"""The sweep runner: schema and units of its rows, the float64 check, speedups, failures that do not stop it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bnbench.bench.cases import Case
from bnbench.bench.providers import INTERPRETER_MAX_NUMEL, PROVIDERS, Provider
from bnbench.bench.runner import RunContext, TimingSettings, add_speedups, results_frame, run_sweep
from bnbench.bench.timing import Timing, time_wall
from bnbench.bench.workload import make_inputs, max_rel_err, reference_outputs
from bnbench.reference import batch_norm_act_reference
from bnbench.schema import BENCH_COLUMNS, validate_bench

FAST = TimingSettings(cpu_warmup=1, cpu_warmup_s=0.0, cpu_min_samples=3, cpu_max_samples=5, cpu_budget_s=0.0)
CTX = RunContext(torch.device("cpu"), copy_gbps=10.0, provenance={"run_id": "test"}, timing=FAST)
# small cases with a reason each: BN1d with C=3 (not a power of two), BN2d channels_last (strided reduction)
SMALL = [
    Case("bn1d", "fwd_bwd", "relu", "fp32", "nchw", 16, 3),
    Case("bn2d", "fwd", "gelu", "bf16", "channels_last", 2, 4, 3, 5),
]


def _wrong(case):
    """A deliberately wrong provider: right shapes, output 5% too large (beyond even the bf16 tolerance of 2%)."""
    return lambda *args: batch_norm_act_reference(*args) * 1.05


def _broken(case):
    def fn(*args):
        raise RuntimeError("kernel exploded")

    return fn


WRONG = Provider("wrong", False, _wrong)
BROKEN = Provider("broken", False, _broken)


def test_rows_follow_the_schema_and_units():
    frame, samples = run_sweep(SMALL, [PROVIDERS["eager"]], CTX)
    assert tuple(frame.columns) == BENCH_COLUMNS
    validate_bench(frame)
    assert (frame["status"] == "ok").all() and (frame["timer"] == "wall").all()
    for _, row in frame.iterrows():
        assert row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        assert row["gbps"] == pytest.approx(row["bytes_min"] / (row["ms_p50"] * 1e-3) / 1e9)  # ms -> GB/s
        assert row["frac_of_copy_bw"] == pytest.approx(row["gbps"] / 10.0)
        assert row["speedup_vs_eager"] == 1.0 and math.isnan(row["speedup_vs_compile"])  # no compile in this run
        assert row["max_rel_err"] < 1e-2 and row["compile_s"] >= 0 and row["run_id"] == "test"
    assert frame.loc[0, "bytes_min"] == 5 * 16 * 3 * 4  # fwd_bwd fp32: 5T
    assert all(len(s) == n for s, n in zip(samples.values(), frame["n_samples"], strict=True))


def test_wrong_provider_is_incorrect_and_kept_out_of_speedups():
    frame, _ = run_sweep(SMALL, [PROVIDERS["eager"], WRONG], CTX)
    wrong = frame[frame["provider"] == "wrong"]
    assert (wrong["status"] == "incorrect").all()
    assert wrong["max_rel_err"].min() > 2e-2 and wrong["message"].str.contains("tolerance").all()
    assert wrong["speedup_vs_eager"].isna().all() and wrong["speedup_vs_compile"].isna().all()
    assert (frame[frame["provider"] == "eager"]["status"] == "ok").all()


def test_a_failing_point_is_recorded_and_the_sweep_goes_on():
    frame, _ = run_sweep(SMALL, [BROKEN, PROVIDERS["eager"]], CTX)
    assert list(frame["status"]) == ["error", "ok", "error", "ok"]
    assert frame.loc[0, "message"] == "RuntimeError: kernel exploded"


def test_triton_under_the_interpreter_is_checked_but_not_timed():
    # conftest sets TRITON_INTERPRET=1 on machines without CUDA (on a GPU the triton provider is timed for real)
    if torch.cuda.is_available():
        pytest.skip("the interpreter path is the CPU path of machines without CUDA")
    case = Case("bn2d", "fwd_bwd", "relu", "fp32", "nchw", 2, 3, 4, 4)
    big = Case("bn1d", "fwd", "relu", "fp32", "nchw", INTERPRETER_MAX_NUMEL, 2)
    frame, _ = run_sweep([case, big], [PROVIDERS["eager"], PROVIDERS["triton"]], CTX)
    tri = frame[frame["provider"] == "triton"].reset_index(drop=True)
    assert tri.loc[0, "timer"] == "interpreter" and tri.loc[0, "status"] == "ok"
    assert tri.loc[0, "max_rel_err"] < 1e-4 and math.isnan(tri.loc[0, "ms_p50"])
    assert math.isnan(tri.loc[0, "speedup_vs_eager"]) and math.isnan(tri.loc[0, "gbps"])
    assert tri.loc[0, "kernel_config"]  # the launch plan is described
    assert tri.loc[1, "status"] == "skipped" and "interpreter" in tri.loc[1, "message"]


@pytest.mark.slow  # a torch.compile of the fused op (a few seconds on CPU)
def test_fused_layer_under_torch_compile_is_a_provider():
    if torch.cuda.is_available():
        pytest.skip("the interpreter path is the CPU path of machines without CUDA")
    case = Case("bn1d", "fwd_bwd", "leaky_relu", "fp32", "nchw", 8, 3)
    frame, _ = run_sweep([case], [PROVIDERS["eager"], PROVIDERS["triton-compile"]], CTX)
    row = frame[frame["provider"] == "triton-compile"].iloc[0]
    assert row["status"] == "ok", row["message"]
    assert row["timer"] == "interpreter" and row["max_rel_err"] < 1e-4


def test_add_speedups_pairs_same_case_and_timer_only():
    base = {c: math.nan for c in BENCH_COLUMNS}
    case = dict(op="bn1d", activation="relu", dtype="fp32", layout="nchw", shape="8x8", timer="wall")
    rows = [
        {**base, **case, "pass": "fwd", "provider": "eager", "ms_p50": 2.0, "status": "ok"},
        {**base, **case, "pass": "fwd", "provider": "compile", "ms_p50": 1.0, "status": "ok"},
        {**base, **case, "pass": "fwd", "provider": "triton", "ms_p50": 0.5, "status": "ok"},
        {**base, **case, "pass": "fwd", "provider": "fast_but_wrong", "ms_p50": 0.1, "status": "incorrect"},
        {**base, **case, "pass": "fwd_bwd", "provider": "triton", "ms_p50": 0.5, "status": "ok"},  # no baseline
        {**base, **case, "pass": "fwd", "provider": "triton", "ms_p50": math.nan, "status": "ok",
         "timer": "interpreter"},
    ]  # fmt: skip
    out = add_speedups(pd.DataFrame(rows, columns=list(BENCH_COLUMNS)))
    assert list(out["speedup_vs_eager"].fillna(-1)) == [1.0, 2.0, 4.0, -1, -1, -1]
    assert list(out["speedup_vs_compile"].fillna(-1)) == [0.5, 1.0, 2.0, -1, -1, -1]


def test_results_frame_of_no_rows_has_the_schema():
    assert tuple(results_frame([]).columns) == BENCH_COLUMNS


def test_timing_quantiles_and_wall_timer():
    t = Timing("wall", (5.0, 1.0, 2.0, 4.0, 3.0))
    assert (t.ms_p20, t.ms_p50, t.ms_p80, t.n_samples) == (pytest.approx(1.8), 3.0, pytest.approx(4.2), 5)
    calls = []
    timing = time_wall(lambda: calls.append("call"), reset=lambda: calls.append("reset"), warmup=2, warmup_s=0,
                       min_samples=4, max_samples=4, budget_s=10)  # fmt: skip
    assert timing.n_samples == 4 and calls == ["reset", "call"] * 6  # reset before every call, warm-up included
    with pytest.raises(ValueError, match="min_samples"):
        time_wall(lambda: None, min_samples=0)


def test_kink_side_follows_the_implementation():
    # An element whose float64 pre-activation is -1e-9 (inside the rounding band): the implementation may put it
    # on either side of ReLU's kink. The reference follows the side its output shows, so neither is "wrong".
    case = Case("bn1d", "fwd_bwd", "relu", "fp32", "nchw", 4, 1)
    inp = make_inputs(case, "cpu")
    with torch.no_grad():
        inp.x.copy_(torch.tensor([[-1.0], [1.0], [0.0], [2.0]]))
        inp.weight.fill_(1.0)
        mean, std = inp.x.mean(), torch.sqrt(inp.x.var(unbiased=False) + 1e-5)
        inp.bias.fill_(float(-(0.0 - mean) / std) - 1e-9)  # z of the third row: -1e-9
    rm, rv = inp.running_mean.clone(), inp.running_var.clone()
    y_on = torch.tensor([[0.0], [1.0], [1e-9], [2.0]])  # the implementation rounded z3 above 0
    y_off = torch.tensor([[0.0], [1.0], [0.0], [2.0]])
    dx_on = reference_outputs(case, inp, rm, rv, y_on)["dbias"]
    dx_off = reference_outputs(case, inp, rm, rv, y_off)["dbias"]
    assert dx_on.item() == pytest.approx(dx_off.item() + inp.dy[2, 0].item())


def test_max_rel_err_missing_or_nonfinite_is_infinite():
    ref = {"y": torch.ones(3, dtype=torch.float64)}
    assert max_rel_err({"y": torch.ones(3)}, ref) == (0.0, "y")
    assert max_rel_err({"y": None}, ref)[0] == math.inf
    assert max_rel_err({"y": torch.tensor([1.0, float("nan"), 1.0])}, ref)[0] == math.inf


def test_every_pass_checks_out_with_eager_and_running_stats_are_checked():
    # each pass runs its own semantics; a provider that forgets to update the running statistics is caught in
    # the training passes only (eval reads them, bwd has no forward in the checked call)
    passes = [Case("bn1d", p, "leaky_relu", "fp32", "nchw", 8, 3) for p in ("fwd", "bwd", "fwd_bwd", "eval")]
    stale = Provider("stale", False, lambda case: lambda x, rm, rv, *rest: batch_norm_act_reference(
        x, rm.clone(), rv.clone(), *rest))  # fmt: skip
    frame, _ = run_sweep(passes, [PROVIDERS["eager"], stale], CTX)
    assert (frame[frame["provider"] == "eager"]["status"] == "ok").all()
    got = dict(zip(frame[frame["provider"] == "stale"]["pass"], frame[frame["provider"] == "stale"]["status"],
                   strict=True))  # fmt: skip
    assert got == {"fwd": "incorrect", "bwd": "ok", "fwd_bwd": "incorrect", "eval": "ok"}
    assert frame[(frame["provider"] == "stale") & (frame["pass"] == "fwd")]["message"].str.contains("running").all()


def _biased_running_var(case):
    """A subtly wrong provider: the running variance takes the biased batch variance (a 1/(N-1) relative slip
    in the batch term, which is only momentum = 0.1 of the running value)."""

    def fn(x, rm, rv, *rest):
        y = batch_norm_act_reference(x, rm, rv, *rest)
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            batch_var = x.float().transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=True)
            rv.sub_(0.1 * batch_var / n)  # unbiased -> biased: var_b = var_u * (n - 1) / n
        return y

    return fn


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_biased_running_variance_is_caught_at_any_dtype_and_batch(dtype):
    cases = [Case("bn1d", "fwd", "relu", dtype, "nchw", 2048, 8)]  # large N: the slip is 1/2048 of the batch term
    frame, _ = run_sweep(cases, [PROVIDERS["eager"], Provider("biased", False, _biased_running_var)], CTX)
    statuses = dict(zip(frame["provider"], frame["status"], strict=True))
    assert statuses == {"eager": "ok", "biased": "incorrect"}
    assert "batch_var" in frame.set_index("provider").loc["biased", "message"]


def test_inputs_are_reproducible_and_in_the_case_layout():
    case = Case("bn2d", "fwd_bwd", "relu", "bf16", "channels_last", 2, 3, 4, 5)
    a, b = make_inputs(case, "cpu", seed=7), make_inputs(case, "cpu", seed=7)
    assert torch.equal(a.x, b.x) and torch.equal(a.dy, b.dy) and not torch.equal(a.x, make_inputs(case, "cpu", 8).x)
    assert a.x.dtype == torch.bfloat16 and a.x.is_contiguous(memory_format=torch.channels_last)
    assert a.weight.dtype == torch.float32 and a.x.requires_grad and a.weight.requires_grad


@pytest.mark.gpu
def test_gpu_points_are_timed_with_cuda_events_and_report_memory():
    ctx = RunContext(torch.device("cuda"), copy_gbps=1000.0, provenance={"run_id": "gpu"},
                     timing=TimingSettings(warmup_ms=5, rep_ms=20, cuda_graph=True))  # fmt: skip
    # fwd_bwd: memory held between forward and backward; eval: a CUDA-graph replay row as well (small case)
    cases = [Case("bn2d", "fwd_bwd", "relu", "bf16", "channels_last", 8, 64, 14, 14),
             Case("bn1d", "eval", "gelu", "fp32", "nchw", 256, 1024)]  # fmt: skip
    frame, _ = run_sweep(cases, [PROVIDERS["eager"], PROVIDERS["triton"]], ctx)
    assert (frame["status"] == "ok").all(), frame[["provider", "timer", "message"]].to_string()
    events = frame[frame["timer"] == "cuda_event"]
    assert len(events) == 4 and (events["peak_mem_mb"] > 0).all() and events["speedup_vs_eager"].notna().all()
    assert set(frame[frame["timer"] == "cuda_graph"]["provider"]) == {"eager", "triton"}
    assert frame[frame["timer"] == "cuda_graph"]["speedup_vs_eager"].notna().all()  # graph rows pair with graph rows
