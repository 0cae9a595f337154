"""Benchmark cases taken from a network: one case per distinct BatchNorm call of its forward pass (shape,
activation) for each batch, dtype, layout and pass, and the table of how often each call occurs per step.

Used by ``bnbench bench --from-model NAME`` and by the ``resnet50`` preset. The call table goes into the run's
``results.json`` (key ``model_bn_calls``); the summary weights each case's time by its count to give the BatchNorm
+ activation time of one training step (:mod:`bnbench.report.bn_total`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from bnbench.bench.cases import Case, grid

__all__ = ["MODEL_DEFAULTS", "MODEL_PRESETS", "cases_from_model", "model_call_table", "model_cases", "run_call_table"]

#: the axes of a model's cases when the command line leaves them out (those of the resnet50 preset)
MODEL_DEFAULTS = {
    "batch": (64, 128, 256),
    "dtypes": ("bf16", "fp32"),
    "layouts": ("channels_last",),
    "passes": ("fwd", "fwd_bwd"),
}
#: presets that are a model's cases with MODEL_DEFAULTS
MODEL_PRESETS = {"resnet50": "resnet50"}


@functools.lru_cache(maxsize=8)
def _groups(name: str, resolution: int | None, source: str):
    """The model's BN call groups for a batch of 2 fp32 NCHW inputs on the CPU (counts and per-sample shapes do
    not depend on the batch, dtype or layout; the bench axes set those; 2, not 1: convert_bn_act's example forward
    trains BatchNorm1d, which needs 2 values per channel, and a batch of 1 would hide a residual that broadcasts
    over the batch). Not on meta: that would import triton, before the bench CLI switches the Triton interpreter
    on. ResNet-50 at 224x224: 3-6 s on one loaded CPU core (three forwards: the probes', and convert_bn_act's
    two to read the residual adds' shapes)."""
    from bnbench.models.bn_calls import group_calls, model_bn_calls

    return tuple(group_calls(model_bn_calls(name, 2, resolution=resolution, source=source, device="cpu")))


def model_call_table(name: str, *, resolution: int | None = None, source: str = "auto") -> dict[str, object]:
    """What ``results.json`` records under ``model_bn_calls``: the network, its definition's source, and per
    distinct call its op, per-sample shape (``CxHxW``, or ``C`` for BN1d), activation, count and layer names."""
    import torch

    from bnbench.models import build_network, get_network

    spec = get_network(name)
    with torch.device("meta"):  # only the source is needed
        _, used = build_network(name, source=source)
    calls = [
        {"op": g.op, "sample_shape": g.sample_shape, "activation": g.activation, "count": g.count,
         "layers": list(g.layers)}
        for g in _groups(name, resolution, source)
    ]  # fmt: skip
    return {"model": name, "source": used, "resolution": resolution or spec.resolution, "calls": calls}


def model_cases(
    name: str,
    batch: Sequence[int] = MODEL_DEFAULTS["batch"],
    dtypes: Sequence[str] = MODEL_DEFAULTS["dtypes"],
    layouts: Sequence[str] = MODEL_DEFAULTS["layouts"],
    passes: Sequence[str] = MODEL_DEFAULTS["passes"],
    *,
    resolution: int | None = None,
    source: str = "auto",
    residual: bool = False,
) -> list[Case]:
    """Every distinct BatchNorm call of ``name`` (with the activation that follows it) as a case, for each batch,
    dtype, layout and pass. A call convert_bn_act fuses with the residual add after it (op ``bn2d_add``) is, with
    ``residual``, a :class:`~bnbench.bench.cases.ResidualCase` (what the benchmark measures); without, the
    BatchNorm alone (a Case with activation identity: its shape, for callers that measure kernels without a
    residual, e.g. ``bnbench inspect``). BN1d calls (2-D input) keep the nchw layout only."""
    cases: list[Case] = []
    for N in batch:
        for g in _groups(name, resolution, source):
            C, *spatial = g.shape[1:]
            sp = [None] if len(g.shape) == 2 else [tuple(spatial)]
            fused_add = g.op.endswith("_add")
            activation = "identity" if fused_add and not residual else g.activation
            found = grid([N], [C], sp, dtypes, [activation], passes, layouts)
            cases += [c.with_residual() for c in found] if fused_add and residual else found
    return list(dict.fromkeys(cases))


def cases_from_model(
    name: str,
    *,
    preset: str | None = None,
    width: str | None = None,
    spatial: str | None = None,
    activation: str | None = None,
    batch: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
    layouts: Sequence[str] | None = None,
    passes: Sequence[str] | None = None,
) -> list[Case]:
    """``bench --from-model NAME``: the network's cases on the given axes (unset: :data:`MODEL_DEFAULTS`). The
    shape axes come from the network, so --preset, --width, --spatial and --activation are refused."""
    given = {"--preset": preset, "--width": width, "--spatial": spatial, "--activation": activation}
    clash = [flag for flag, value in given.items() if value is not None]
    if clash:
        raise ValueError(
            f"--from-model {name} takes its shapes and activations from the network: drop {', '.join(clash)}"
        )
    from bnbench.models import get_network

    if layouts is None and not get_network(name).spatial:  # BN1d only: the default layout is the only one
        layouts = ("nchw",)
    cases = model_cases(
        name,
        batch or MODEL_DEFAULTS["batch"],
        dtypes or MODEL_DEFAULTS["dtypes"],
        layouts or MODEL_DEFAULTS["layouts"],
        passes or MODEL_DEFAULTS["passes"],
        residual=True,
    )
    if not cases:
        raise ValueError(f"--from-model {name}: no case left (channels_last needs 4-D activations)")
    return cases


def run_call_table(preset: str | None, from_model: str | None) -> dict[str, object] | None:
    """The call table a bench run records in results.json: its network's (--from-model, or a model preset), or
    None when its cases do not come from a network."""
    name = from_model or MODEL_PRESETS.get(preset or "")
    return None if name is None else model_call_table(name)
