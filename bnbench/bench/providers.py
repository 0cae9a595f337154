"""Providers: the implementations a case is measured with, in a registry the CLI reads and tests can extend.

Each provider turns a :class:`~bnbench.bench.cases.Case` into a callable with ``F.batch_norm``'s signature plus
the activation, ``fn(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param)``,
and for a :class:`~bnbench.bench.cases.ResidualCase` (``bn_add_act``) a keyword ``residual``:

- ``eager``: :func:`bnbench.reference.batch_norm_act_reference` (``F.batch_norm`` then the activation; with a
  residual ``F.batch_norm``, the add, the activation: what a ResNet block's tail runs);
- ``compile``: ``torch.compile`` of that composition, ``dynamic=False``, built fresh for every case after
  ``torch._dynamo.reset()`` (after 8 recompiles Dynamo silently falls back to eager);
- ``compile-max-autotune``: the same with ``mode="max-autotune"`` (optional; not in the default list);
- ``triton``: :func:`bnbench.batch_norm_act` with ``backend="triton"`` (the fused kernels; the residual passed
  through, so it is added inside them). Without CUDA it runs only under ``TRITON_INTERPRET=1``, as a correctness
  check of tiny cases (timer ``interpreter``);
- ``triton-compile``: that fused call under ``torch.compile(dynamic=False)`` (optional): shows whether the
  custom-op registration costs anything when a model using the layer is compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable

import torch

from bnbench.bench.cases import Case
from bnbench.interpreter import interpreter_active

__all__ = [
    "DEFAULT_PROVIDERS",
    "INTERPRETER_MAX_NUMEL",
    "PROVIDERS",
    "BNFunction",
    "Provider",
    "get_providers",
    "register_provider",
    "triton_kernel_config",
    "triton_skip_reason",
    "triton_timer",
]

#: the largest case the triton provider runs under the interpreter (it simulates every program in numpy)
INTERPRETER_MAX_NUMEL = 1 << 16

BNFunction = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Provider:
    """An implementation to measure.

    ``make(case)`` returns a fresh callable for the case (compile-based providers compile here, lazily on the
    first call). ``skip_reason(case, device)`` says why the provider cannot run the case here (None: it can).
    ``timer(device)`` overrides the device's timer (the Triton interpreter); ``kernel_config(case, x)``
    describes the launch configuration for the CSV.
    """

    name: str
    is_baseline: bool
    make: Callable[[Case], BNFunction]
    skip_reason: Callable[[Case, torch.device], str | None] = lambda case, device: None
    timer: Callable[[torch.device], str | None] = lambda device: None
    kernel_config: Callable[[Case, torch.Tensor], str] = lambda case, x: ""


def _make_eager(case: Case) -> BNFunction:
    from bnbench.reference import batch_norm_act_reference

    return batch_norm_act_reference  # with residual=: F.batch_norm, the add, the activation


def _make_compiled(case: Case, mode: str | None = None) -> BNFunction:
    import torch._dynamo

    from bnbench.reference import batch_norm_act_reference

    torch._dynamo.reset()  # fresh per shape: no recompile budget shared across cases
    return torch.compile(batch_norm_act_reference, dynamic=False, mode=mode)


def _make_triton(case: Case) -> BNFunction:
    from bnbench.functional import batch_norm_act

    def fused(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, **residual):
        return batch_norm_act(
            x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param,
            backend="triton", **residual,
        )  # fmt: skip

    return fused


def _make_triton_compiled(case: Case) -> BNFunction:
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(_make_triton(case), dynamic=False)


def triton_skip_reason(case: Case, device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if not interpreter_active():
        return (
            "no CUDA device in use: on CPU tensors the Triton kernels run only in the interpreter; set "
            "TRITON_INTERPRET=1 to check their correctness on tiny cases (no timing)"
        )
    if case.numel > INTERPRETER_MAX_NUMEL:
        return (
            f"Triton interpreter: case has {case.numel} elements, more than the {INTERPRETER_MAX_NUMEL} the "
            "interpreter checks (it simulates every program in numpy)"
        )
    return None


def triton_timer(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "interpreter"


def triton_kernel_config(case: Case, x: torch.Tensor) -> str:
    from bnbench.kernels import plan

    return plan(x)[1].describe()


PROVIDERS: dict[str, Provider] = {}


def register_provider(provider: Provider) -> Provider:
    """Add (or replace) a provider in the registry the CLI reads; returns it."""
    if not isinstance(provider, Provider):
        raise TypeError(f"expected a Provider, got {type(provider).__name__}")
    PROVIDERS[provider.name] = provider
    return provider


register_provider(Provider("eager", True, _make_eager, kernel_config=lambda case, x: "aten"))
register_provider(Provider("compile", True, _make_compiled, kernel_config=lambda case, x: "inductor:default"))
register_provider(
    Provider(
        "compile-max-autotune",
        False,
        functools.partial(_make_compiled, mode="max-autotune"),
        kernel_config=lambda case, x: "inductor:max-autotune",
    )
)
register_provider(Provider("triton", False, _make_triton, triton_skip_reason, triton_timer, triton_kernel_config))
register_provider(
    Provider("triton-compile", False, _make_triton_compiled, triton_skip_reason, triton_timer, triton_kernel_config)
)

DEFAULT_PROVIDERS = ("eager", "compile", "triton")


def get_providers(names: str | list[str]) -> list[Provider]:
    """Providers by name (a comma list or a list), in the order given; unknown names raise ValueError."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--providers: expected a comma-separated list of names, got {names!r}")
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown provider(s) {unknown}; valid: {', '.join(PROVIDERS)}")
    return [PROVIDERS[n] for n in dict.fromkeys(names)]
