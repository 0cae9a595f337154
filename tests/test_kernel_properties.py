"""Deterministic speed properties of the compiled kernels for sm_90, read with ``bnbench inspect`` (no GPU, no
timing): launches per pass (1 each way on the small path, 2 on the split path) and no register spills. The
register ceilings, LDGSTS in the reduction loops and the barriers left in them are checked launch by launch in
tests/test_kernels_properties.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")


def _check(doc: dict) -> None:
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


def test_small_and_large_baseline_shapes():
    from bnbench.inspect.testing import inspect_json

    doc = inspect_json("--preset", "baseline", "--batch", "256,401408", "--dtype", "fp32")
    assert {p["path"] for p in doc["passes"]} >= {"fused", "split"}
    _check(doc)


@pytest.mark.slow  # compiles every distinct kernel variant of about 190 cases: minutes on 2 cores
def test_measure_baseline_and_resnet50_batch256_shapes():
    from bnbench.inspect.testing import inspect_json

    _check(inspect_json("--preset", "report"))
