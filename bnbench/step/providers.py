"""Step providers: how a network is prepared before its training step is timed.

- ``eager``: the network as built (``nn.BatchNorm`` then the activation);
- ``compile``: ``torch.compile(model, dynamic=False)``, after ``torch._dynamo.reset()`` (no recompile budget
  shared between configurations);
- ``fused``: :func:`bnbench.convert_bn_act` on the network, given two images of the step's batch as its example:
  every BatchNorm whose only use is a supported activation, or a residual add and then one, becomes a fused
  ``BatchNormAct`` (in a ResNet every BatchNorm: the downsample's without activation, as the residual of the
  block's last); any left alone are counted, with the reason;
- ``fused-compile``: the fused network under ``torch.compile(dynamic=False)``.

The fused layers run ``backend`` ("triton": the kernels; "torch": the layer's PyTorch reference, what runs on a
CPU without the Triton interpreter). The backend is part of every result row, never implicit.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from torch import nn

__all__ = ["DEFAULT_STEP_PROVIDERS", "STEP_PROVIDERS", "Prepared", "StepProvider", "get_step_providers",
           "register_step_provider"]  # fmt: skip


@dataclasses.dataclass
class Prepared:
    """A model ready for its step, and what was done to it: the fused backend ("" if nothing was fused), the
    BatchNorm layers fused and left alone, and why those were left alone (reason -> count)."""

    model: nn.Module
    compiled: bool
    fused_backend: str = ""
    bn_fused: int = 0
    bn_unfused: int = 0
    unfused_reasons: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepProvider:
    """``prepare(model, backend, example)`` returns the :class:`Prepared` model (it may edit ``model`` in place);
    ``example`` is a small batch of the step's input (what convert_bn_act reads the residual adds' shapes from)."""

    name: str
    is_baseline: bool
    prepare: Callable[[nn.Module, str], Prepared]


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _compile(model: nn.Module) -> nn.Module:
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(model, dynamic=False)


def _eager(model: nn.Module, backend: str, example) -> Prepared:
    return Prepared(model, compiled=False, bn_unfused=_bn_count(model))


def _compiled(model: nn.Module, backend: str, example) -> Prepared:
    return Prepared(_compile(model), compiled=True, bn_unfused=_bn_count(model))


def _fused(model: nn.Module, backend: str, example) -> Prepared:
    from bnbench.convert import convert_bn_act

    fused, report = convert_bn_act(model, inplace=True, backend=backend, return_report=True, example_inputs=example)
    reasons = collections.Counter(report.skipped.values())
    return Prepared(fused, False, backend, len(report.converted), len(report.skipped), dict(reasons))


def _fused_compiled(model: nn.Module, backend: str, example) -> Prepared:
    prepared = _fused(model, backend, example)
    return dataclasses.replace(prepared, model=_compile(prepared.model), compiled=True)


STEP_PROVIDERS: dict[str, StepProvider] = {}


def register_step_provider(provider: StepProvider) -> StepProvider:
    """Add (or replace) a provider in the registry ``bnbench step`` reads; returns it."""
    if not isinstance(provider, StepProvider):
        raise TypeError(f"expected a StepProvider, got {type(provider).__name__}")
    STEP_PROVIDERS[provider.name] = provider
    return provider


register_step_provider(StepProvider("eager", True, _eager))
register_step_provider(StepProvider("compile", True, _compiled))
register_step_provider(StepProvider("fused", False, _fused))
register_step_provider(StepProvider("fused-compile", False, _fused_compiled))

DEFAULT_STEP_PROVIDERS = ("eager", "compile", "fused", "fused-compile")


def get_step_providers(names: str | list[str]) -> list[StepProvider]:
    """Providers by name (a comma list or a list), in the order given; unknown names raise ValueError."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--providers: expected a comma-separated list of names, got {names!r}")
    unknown = [n for n in names if n not in STEP_PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown provider(s) {unknown}; valid: {', '.join(STEP_PROVIDERS)}")
    return [STEP_PROVIDERS[n] for n in dict.fromkeys(names)]
