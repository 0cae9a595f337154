"""Shapes from a network for ``bnbench bench``: ``--from-model`` cases and the call-weighted BN + activation
time per training step (a pure function over a results frame and the network's call counts)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bnbench.bench.model_cases import cases_from_model, model_call_table, run_call_table
from bnbench.cli import main
from bnbench.report.bn_total import bn_total_sections, call_weighted_totals
from bnbench.report.testing import synthetic_bench

CALLS = [
    {"op": "bn1d", "sample_shape": "64", "activation": "relu", "count": 3},
    {"op": "bn1d", "sample_shape": "1024", "activation": "relu", "count": 1},
]


def _frame():
    # synthetic points (made-up times) for widths 64 and 1024 at batches 256 and 4096
    return synthetic_bench(dtypes=("fp32",), passes=("fwd_bwd",), batches=(256, 4096), widths=(64, 1024))


def test_weighted_total_is_count_times_median_summed():
    frame = _frame()
    totals = call_weighted_totals(frame, CALLS).set_index(["N", "provider"])
    ms = frame.set_index(["N", "C", "provider"])["ms_p50"]
    for N in (256, 4096):
        for provider in ("eager", "compile", "triton"):
            expected = 3 * ms[(N, 64, provider)] + 1 * ms[(N, 1024, provider)]
            assert totals.loc[(N, provider), "ms_per_step"] == pytest.approx(expected)
            assert totals.loc[(N, provider), "bn_calls"] == 4
        eager = totals.loc[(N, "eager"), "ms_per_step"]
        assert totals.loc[(N, "triton"), "speedup_vs_eager"] == pytest.approx(
            eager / totals.loc[(N, "triton"), "ms_per_step"]
        )


def test_a_call_not_measured_ok_leaves_the_total_empty():
    frame = _frame()
    broken = (frame["provider"] == "triton") & (frame["N"] == 256) & (frame["C"] == 1024)
    frame.loc[broken, "status"] = "error"
    totals = call_weighted_totals(frame, CALLS).set_index(["N", "provider"])
    assert math.isnan(totals.loc[(256, "triton"), "ms_per_step"])
    assert totals.loc[(256, "triton"), "shapes_measured"] == 1 and totals.loc[(256, "triton"), "shapes"] == 2
    assert math.isnan(totals.loc[(256, "triton"), "speedup_vs_eager"])
    assert not math.isnan(totals.loc[(4096, "triton"), "ms_per_step"])
    with pytest.raises(ValueError, match="call table is empty"):
        call_weighted_totals(frame, [])


def test_points_of_other_shapes_or_activations_are_not_counted():
    frame = _frame()
    frame.loc[frame["C"] == 1024, "activation"] = "gelu"  # no longer the network's call
    totals = call_weighted_totals(frame, CALLS)
    assert totals["ms_per_step"].isna().all() and (totals["shapes_measured"] == 1).all()
    assert bn_total_sections(frame, None) == []


def test_cases_from_model_and_the_call_table():
    table = model_call_table("resnet18")
    assert sum(c["count"] for c in table["calls"]) == 20 and table["resolution"] == 224
    cases = cases_from_model("resnet18", batch=[256], dtypes=["bf16"], passes=["fwd_bwd"])
    assert {(c.N, c.dtype, c.layout, c.pass_) for c in cases} == {(256, "bf16", "channels_last", "fwd_bwd")}
    assert len(cases) == len(table["calls"])
    mlp = cases_from_model("mlp", batch=[64])  # BN1d only: nchw
    assert {c.op for c in mlp} == {"bn1d", "bn1d_add"} and {c.layout for c in mlp} == {"nchw"}  # res_bn: + add
    with pytest.raises(ValueError, match="drop --width"):
        cases_from_model("resnet18", width="64")
    assert run_call_table("resnet50", None)["model"] == "resnet50" and run_call_table("quick", None) is None


def test_bench_from_model_writes_the_call_table_and_the_weighted_total(tmp_path, capsys):
    from bnbench.report.assemble import results_report
    from bnbench.report.document import to_markdown
    from bnbench.report.load import load_result

    out = tmp_path / "run"
    args = ["bench", "--from-model", "mlp", "--batch", "16", "--pass", "fwd_bwd", "--dtype", "fp32",
            "--providers", "eager", "--cpu-budget-s", "0.01", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    sidecar = json.loads((out / "results.json").read_text())
    assert sidecar["model_bn_calls"]["model"] == "mlp"
    summary = (out / "summary.md").read_text()
    assert "BN + activation time per training step" in summary
    frame = pd.read_csv(out / "results.csv")
    assert sorted(frame["op"]) == ["bn1d", "bn1d_add"] and set(frame["shape"]) == {"16x128"}  # both ops by default
    assert set(frame["activation"]) == {"relu"}  # the residual Linear's BN fuses its add and the ReLU after it
    report = results_report([load_result(out)])
    assert "per training step" in to_markdown(report.sections)
    capsys.readouterr()
    assert main(["bench", "--from-model", "resnet50", "--preset", "quick", "--dry-run"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert main(["bench", "--from-model", "resnet34", "--dry-run"]) == 2
    assert main(["bench", "--from-model", "resnet50", "--batch", "256", "--dry-run"]) == 0
    # 16 calls (12 BN + activation, 4 BN + add + activation) x (bf16, fp32) x (fwd, fwd_bwd) x 3 providers
    assert "192 point(s)" in capsys.readouterr().out
