"""The case sets ``bnbench inspect`` offers besides the benchmark's presets, built from the same data
(:data:`bnbench.bench.cases.BASELINE_SHAPES_1D`, ``BASELINE_SHAPES_2D``, and ResNet-50's BatchNorm calls read off
the model by :mod:`bnbench.bench.model_cases`)."""

from __future__ import annotations

from bnbench.bench.cases import BASELINE_SHAPES_1D, BASELINE_SHAPES_2D, Case, grid

__all__ = ["INSPECT_PRESETS", "inspect_preset"]

_PASSES = ["fwd", "bwd", "fwd_bwd", "eval"]
_DTYPES = ["fp32", "bf16"]


def _baseline() -> list[Case]:
    """MEASURE.md's baseline shapes, fp32 and bf16, relu, every pass; the 4-D shape in both layouts."""
    cases = []
    for N, C in BASELINE_SHAPES_1D:
        cases += grid([N], [C], [None], _DTYPES, ["relu"], _PASSES, ["nchw"])
    for N, C, H, W in BASELINE_SHAPES_2D:
        cases += grid([N], [C], [(H, W)], _DTYPES, ["relu"], _PASSES, ["nchw", "channels_last"])
    return cases


def _resnet50_b256() -> list[Case]:
    """Every distinct BN shape of ResNet-50 at batch 256 with the activation after it, both layouts, fp32 and bf16,
    every pass."""
    from bnbench.bench.model_cases import model_cases

    return model_cases("resnet50", [256], _DTYPES, ["nchw", "channels_last"], _PASSES)


INSPECT_PRESETS = {
    "baseline": _baseline,
    "resnet50-b256": _resnet50_b256,
    "report": lambda: list(dict.fromkeys(_baseline() + _resnet50_b256())),
}


def inspect_preset(name: str) -> list[Case]:
    if name not in INSPECT_PRESETS:
        raise ValueError(f"unknown inspect preset {name!r}; valid: {', '.join(INSPECT_PRESETS)}")
    return INSPECT_PRESETS[name]()
