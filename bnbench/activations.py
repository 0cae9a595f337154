"""The activations bnbench fuses after BatchNorm, and their PyTorch reference definitions."""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F


class Activation(str, enum.Enum):
    """Activations the fused layer supports. Values are the names the CLI and the layer accept."""

    IDENTITY = "identity"
    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    GELU = "gelu"  # exact, erf-based
    GELU_TANH = "gelu_tanh"  # tanh approximation
    SILU = "silu"

    def __str__(self) -> str:
        return self.value


#: activations that take a parameter, with its default
_DEFAULT_PARAM = {Activation.LEAKY_RELU: 0.01}


def valid_names() -> list[str]:
    """The activation names, in declaration order: the one list the CLI, the layer and the docs show."""
    return [a.value for a in Activation]


def parse_activation(activation: str | Activation, activation_param: float | None = None) -> tuple[Activation, float]:
    """Validate an activation and its parameter; return the enum member and the parameter as a float.

    The parameter is the negative slope of ``leaky_relu`` (default 0.01); every other activation takes none,
    and 0.0 is returned for it. The function accepts its own output: ``parse_activation(*parse_activation(a, p))``
    is ``parse_activation(a, p)`` (0.0 is accepted as "no parameter" for activations without one).
    """
    if isinstance(activation, Activation):
        act = activation
    elif isinstance(activation, str):
        try:
            act = Activation(activation.lower())
        except ValueError:
            raise ValueError(
                f"unknown activation {activation!r}; valid activations are: {', '.join(valid_names())}"
            ) from None
    else:
        raise TypeError(
            f"activation must be a str or bnbench.Activation, got {type(activation).__name__}: {activation!r}"
        )
    if act in _DEFAULT_PARAM:
        param = _DEFAULT_PARAM[act] if activation_param is None else activation_param
        if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
            raise ValueError(f"activation_param for {act.value} must be a finite number, got {param!r}")
        return act, float(param)
    if activation_param is not None and not (
        isinstance(activation_param, (int, float)) and not isinstance(activation_param, bool) and activation_param == 0
    ):
        raise ValueError(f"activation {act.value!r} takes no activation_param, got {activation_param!r}")
    return act, 0.0


def describe(activation: Activation, activation_param: float = 0.0) -> str:
    """A short label: the name, with the parameter when the activation takes one (``leaky_relu(0.2)``)."""
    return f"{activation.value}({activation_param:g})" if activation in _DEFAULT_PARAM else activation.value


def apply_activation(z: torch.Tensor, activation: Activation, activation_param: float = 0.0) -> torch.Tensor:
    """The PyTorch definition of each activation (the reference every kernel is tested against)."""
    if activation is Activation.IDENTITY:
        return z
    if activation is Activation.RELU:
        return F.relu(z)
    if activation is Activation.LEAKY_RELU:
        return F.leaky_relu(z, activation_param)
    if activation is Activation.SIGMOID:
        return torch.sigmoid(z)
    if activation is Activation.TANH:
        return torch.tanh(z)
    if activation is Activation.GELU:
        return F.gelu(z)
    if activation is Activation.GELU_TANH:
        return F.gelu(z, approximate="tanh")
    if activation is Activation.SILU:
        return F.silu(z)
    raise AssertionError(f"unhandled activation {activation}")  # pragma: no cover - enum is exhaustive
