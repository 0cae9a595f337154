"""``bnbench bench --op bn_add_act``: act(BN(x) + residual) cases, the bytes model with the residual, the float64
check of the residual's gradient, the providers, the resnet50 preset's two ops and the CLI.

Shapes are tiny and fp32/bf16 with C=3 (not a power of two); eager and compile run on CPU; the triton provider under
the interpreter (a correctness check of the residual path, no timing).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bnbench.bench import cases as c
from bnbench.bench.bytes_model import bytes_min
from bnbench.bench.providers import PROVIDERS, Provider
from bnbench.bench.runner import RunContext, TimingSettings, run_sweep
from bnbench.cli import main
from bnbench.reference import batch_norm_act_reference
from bnbench.report.bn_total import call_weighted_totals
from bnbench.schema import validate_bench

FAST = TimingSettings(cpu_warmup=1, cpu_warmup_s=0.0, cpu_min_samples=3, cpu_max_samples=5, cpu_budget_s=0.0)
CTX = RunContext(torch.device("cpu"), copy_gbps=10.0, provenance={"run_id": "test"}, timing=FAST)
#: BN1d with C=3, and BN2d channels_last in bf16 (the GPU check's layout and dtype) with a gradient-bearing pass each
SMALL = [
    c.Case("bn1d", "fwd_bwd", "relu", "fp32", "nchw", 16, 3).with_residual(),
    c.Case("bn2d", "bwd", "leaky_relu", "bf16", "channels_last", 2, 3, 3, 5).with_residual(),
    c.Case("bn2d", "eval", "silu", "fp32", "nchw", 2, 3, 2, 2).with_residual(),
]


def test_a_residual_case_is_its_own_op():
    plain = c.Case("bn2d", "fwd", "relu", "bf16", "channels_last", 2, 3, 4, 4)
    res = plain.with_residual()
    assert isinstance(res, c.ResidualCase) and res.family == "bn_add_act" and res.op == "bn2d_add"
    assert (res.N, res.C, res.H, res.W, res.layout, res.dtype) == (2, 3, 4, 4, "channels_last", "bf16")
    assert res.key() != plain.key() and res != plain and len({res, plain}) == 2
    assert res.columns()["op"] == "bn2d_add" and res.label().startswith("+residual ")
    assert c.Case("bn1d", "fwd", "relu", "fp32", "nchw", 4, 3).with_residual().op == "bn1d_add"
    with pytest.raises(ValueError, match="'bn1d_add' or 'bn2d_add'"):
        c.ResidualCase("bn2d", "fwd", "relu", "fp32", "nchw", 2, 3, 2, 2)


def test_with_ops_expands_plain_cases_and_filters_a_networks():
    plain = [c.Case("bn1d", "fwd", "relu", "fp32", "nchw", 4, 3)]
    both = c.with_ops(plain, ["bn_act", "bn_add_act"], from_model=False)
    assert [x.family for x in both] == ["bn_act", "bn_add_act"]
    network = [plain[0], plain[0].with_residual()]
    assert c.with_ops(network, ["bn_add_act"], from_model=True) == [network[1]]
    with pytest.raises(ValueError, match="unknown BatchNorm op"):
        c.with_ops(plain, ["linear_bn_act"], from_model=False)


def test_bytes_model_counts_the_residual_read_and_its_gradient_write():
    T = 256 * 64 * 2
    got = [bytes_min(p, 256 * 64, "bf16", residual=True) for p in ("fwd", "bwd", "fwd_bwd", "eval")]
    assert got == [3 * T, 4 * T, 7 * T, 3 * T]


def test_eager_and_compile_are_checked_against_float64_including_the_residual_gradient():
    frame, _ = run_sweep(SMALL, [PROVIDERS["eager"]], CTX)
    compiled, _ = run_sweep(SMALL[1:2], [PROVIDERS["compile"]], CTX)  # one compile (seconds each on CPU): bf16 bwd
    assert (frame["status"] == "ok").all() and (compiled["status"] == "ok").all(), frame["message"].tolist()
    assert "dresidual" in _checked(SMALL[1])
    assert set(frame["op"]) == {"bn1d_add", "bn2d_add"}
    first = frame.iloc[0]
    assert first["bytes_min"] == 7 * 16 * 3 * 4  # fwd_bwd fp32 with a residual: 7T


def _checked(case) -> set[str]:
    """The outputs the float64 check compares for ``case``."""
    from bnbench.bench import workload

    inp = workload.make_inputs(case, "cpu")
    return set(workload.reference_outputs(case, inp, inp.running_mean.clone(), inp.running_var.clone()))


def _ignores_residual(case):
    return lambda *args, residual: batch_norm_act_reference(*args)


def _residual_gradient_dropped(case):
    return lambda *args, residual: batch_norm_act_reference(*args, residual=residual.detach())


@pytest.mark.parametrize("make", [_ignores_residual, _residual_gradient_dropped])
def test_a_provider_wrong_in_the_residual_is_incorrect(make):
    """Forward without the residual fails on y; a forward that is right but drops the residual's gradient fails
    on dresidual only (missing: an infinite error)."""
    wrong = Provider("wrong", False, make)
    frame, _ = run_sweep(SMALL[:2], [wrong], CTX)
    assert (frame["status"] == "incorrect").all(), frame["message"].tolist()
    if make is _residual_gradient_dropped:
        assert frame["message"].str.contains("dresidual").all()


def test_triton_under_the_interpreter_checks_the_residual_path(launches):
    if torch.cuda.is_available():
        pytest.skip("the interpreter path is the CPU path of machines without CUDA")
    frame, _ = run_sweep(SMALL, [PROVIDERS["triton"]], CTX)
    assert (frame["status"] == "ok").all(), frame["message"].tolist()
    assert launches["fwd_train"] >= 1 and launches["fwd_eval"] >= 1


def test_the_call_weighted_total_counts_the_residual_calls():
    calls = [{"op": "bn2d", "activation": "relu", "sample_shape": "3x2x2", "count": 2},
             {"op": "bn2d_add", "activation": "relu", "sample_shape": "3x2x2", "count": 1}]  # fmt: skip
    rows = [{"op": op, "activation": "relu", "shape": "4x3x2x2", "layout": "nchw", "N": 4, "dtype": "fp32",
             "pass": "fwd", "provider": "eager", "timer": "wall", "status": "ok", "ms_p50": ms}
            for op, ms in (("bn2d", 1.0), ("bn2d_add", 3.0))]  # fmt: skip
    totals = call_weighted_totals(pd.DataFrame(rows), calls)
    assert totals.loc[0, "ms_per_step"] == pytest.approx(2 * 1.0 + 3.0) and totals.loc[0, "shapes_measured"] == 2


# --- the command line -------------------------------------------------------------------------------------------


def test_dry_run_of_each_op_and_both(capsys):
    base = ["bench", "--batch", "8", "--width", "4", "--pass", "fwd", "--providers", "eager", "--dry-run"]
    assert main([*base, "--op", "bn_add_act"]) == 0
    assert "1 point(s)" in capsys.readouterr().out
    assert main([*base, "--op", "bn_act,bn_add_act"]) == 0
    text = capsys.readouterr().out
    assert "2 point(s)" in text and "+residual fwd fp32 relu 8x4" in text


def test_the_resnet50_preset_measures_both_ops_by_default(capsys):
    args = ["bench", "--preset", "resnet50", "--batch", "64", "--dtype", "bf16", "--pass", "fwd", "--providers",
            "eager", "--dry-run"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "16 point(s)" in text  # 12 BN + activation shapes, 4 BN + add + activation shapes
    assert text.count("+residual fwd bf16 relu") == 4 and "64x2048x7x7" in text
    assert main([*args, "--op", "bn_act"]) == 0
    assert "12 point(s)" in capsys.readouterr().out


def test_bad_op_combinations_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--op", "bn_add_act,linear_bn_act", "--dry-run"])
    assert exit_.value.code == 2 and "not both" in capsys.readouterr().err
    assert main(["bench", "--op", "bn_add_act", "--world-size", "2", "--out", "x", "--dry-run"]) == 2
    assert "--world-size measures --op bn_act only" in capsys.readouterr().err


def test_a_run_writes_the_residual_rows(tmp_path):
    out = tmp_path / "run"
    args = ["bench", "--op", "bn_add_act", "--batch", "8", "--width", "3", "--pass", "fwd_bwd", "--providers",
            "eager", "--cpu-budget-s", "0.01", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    frame = validate_bench(pd.read_csv(out / "results.csv"))
    assert list(frame["op"]) == ["bn1d_add"] and frame.loc[0, "bytes_min"] == 7 * 8 * 3 * 4
    sidecar = json.loads((out / "results.json").read_text())
    assert sidecar["run"]["op"] == "bn_add_act"
    assert sidecar["run"]["bytes_model_min_tensor_passes_residual"] == {"fwd": 3, "bwd": 4, "fwd_bwd": 7, "eval": 3}


def test_the_headline_has_a_row_per_op_family_when_a_run_has_both():
    from bnbench.report.bench import headline_table

    both = [SMALL[0], c.Case("bn1d", "fwd_bwd", "relu", "fp32", "nchw", 16, 3)]
    frame, _ = run_sweep(both, [PROVIDERS["eager"]], CTX)
    table = headline_table(frame)
    assert table["op_family"].tolist() == ["bn_add_act", "bn_act"] and (table["points"] == 1).all()
    assert "op_family" not in headline_table(frame[frame["op"] == "bn1d"]).columns  # one family: as before
