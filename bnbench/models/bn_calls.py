"""Every BatchNorm call of a network's forward pass: input shape, layout, dtype, the activation that follows it,
and how many times each distinct call occurs. The ``resnet50`` bench preset and ``bnbench bench --from-model``
are built from this, so their shapes are the model's, not a hand-typed table.

The forward runs on the ``meta`` device (no memory, no compute) with forward pre-hooks on every BatchNorm
module. Meta convolutions return contiguous outputs whatever the input's memory format (CUDA's and oneDNN's keep
channels_last through convolution, BatchNorm, ReLU and the residual add), so on meta the layout of a 4-D call is
the layout the network runs in, given by the caller; a forward on a real device observes it. The activation of a call is the one :func:`bnbench.convert_bn_act` would fuse into it ("identity" for a
BatchNorm it leaves alone, e.g. one feeding a residual add: no activation follows it directly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from bnbench.activations import parse_activation

__all__ = ["BNCall", "BNCallGroup", "group_calls", "model_bn_calls", "record_bn_calls"]

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class BNCall:
    """One call of one BatchNorm module: its qualified name, op (bn1d on (N, C), bn2d on (N, C, H, W)), input
    shape, layout ("nchw" or "channels_last"), dtype name and the activation that follows it."""

    layer: str
    op: str
    shape: tuple[int, ...]
    layout: str
    dtype: str
    activation: str


@dataclasses.dataclass(frozen=True)
class BNCallGroup:
    """Calls with the same op, shape, layout, dtype and activation: ``count`` of them, made by ``layers``."""

    op: str
    shape: tuple[int, ...]
    layout: str
    dtype: str
    activation: str
    count: int
    layers: tuple[str, ...]

    @property
    def sample_shape(self) -> str:
        """The shape without the batch dimension, e.g. ``64x56x56`` (counts do not depend on the batch)."""
        return "x".join(str(d) for d in self.shape[1:])

    def to_dict(self) -> dict[str, object]:
        return {"op": self.op, "shape": list(self.shape), "sample_shape": self.sample_shape, "layout": self.layout,
                "dtype": self.dtype, "activation": self.activation, "count": self.count, "layers": list(self.layers)}  # fmt: skip


def _layout(x: torch.Tensor) -> str:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.is_contiguous():
        return "nchw"
    raise ValueError(
        f"a BatchNorm input of shape {tuple(x.shape)} has strides {x.stride()}: neither NCHW nor channels_last"
    )


def _activations(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> the activation convert_bn_act fuses into it (its name; "identity" when it is left alone)."""
    from bnbench.convert import convert_bn_act
    from bnbench.modules import BatchNormAct1d, BatchNormAct2d

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (BatchNormAct1d, BatchNormAct2d)):
            out[name] = module.activation.value
    _, report = convert_bn_act(model, backend="torch", return_report=True)
    for name, described in report.converted.items():
        out[name] = parse_activation(described.split("(")[0])[0].value  # "leaky_relu(0.1)" -> "leaky_relu"
    for name in report.skipped:
        out[name] = "identity"
    return out


def record_bn_calls(model: nn.Module, example: torch.Tensor, *, layout: str | None = None) -> list[BNCall]:
    """Run ``model(example)`` without gradients and return every BatchNorm call, in call order. The layout of a
    4-D call is observed from its input's strides, or ``layout`` when given (for meta tensors)."""
    activations = _activations(model)
    calls: list[BNCall] = []

    def hook(name: str):
        def record(module: nn.Module, args) -> None:
            x = args[0]
            if x.dim() not in (2, 4):
                raise ValueError(
                    f"BatchNorm {name} got a {x.dim()}-D input {tuple(x.shape)}: only (N, C) and (N, C, H, W) are benchmark cases"
                )
            dtype = _DTYPE_NAMES.get(x.dtype)
            if dtype is None:
                raise ValueError(f"BatchNorm {name} got an input of dtype {x.dtype}: no benchmark dtype for it")
            op = "bn1d" if x.dim() == 2 else "bn2d"
            lay = layout if layout is not None and op == "bn2d" else _layout(x)
            calls.append(BNCall(name, op, tuple(x.shape), lay, dtype, activations.get(name, "identity")))

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def group_calls(calls: Sequence[BNCall]) -> list[BNCallGroup]:
    """Distinct calls (op, shape, layout, dtype, activation) with their counts, in order of first occurrence."""
    groups: dict[tuple, list[str]] = {}
    for call in calls:
        groups.setdefault((call.op, call.shape, call.layout, call.dtype, call.activation), []).append(call.layer)
    return [BNCallGroup(*key, count=len(layers), layers=tuple(layers)) for key, layers in groups.items()]


def model_bn_calls(
    name: str, batch: int, *, resolution: int | None = None, dtype: str = "fp32", layout: str = "nchw",
    source: str = "auto",
) -> list[BNCall]:  # fmt: skip
    """The BatchNorm calls of network ``name`` (see :data:`bnbench.models.NETWORKS`) for a batch of ``batch``
    inputs at ``resolution`` (default: the network's), with parameters and input in ``dtype`` and ``layout``
    (as under autocast, where each BatchNorm sees the low-precision output of its convolution). Runs on meta."""
    from bnbench.models import build_network, get_network

    spec = get_network(name)
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes are: {', '.join(_TORCH_DTYPES)}")
    if layout not in ("nchw", "channels_last"):
        raise ValueError(f"unknown layout {layout!r}; valid layouts are: nchw, channels_last")
    if layout == "channels_last" and not spec.spatial:
        raise ValueError(f"network {name!r} has no 4-D activations: channels_last does not apply to it")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    with torch.device("meta"):
        model, _ = build_network(name, source=source)
        example = torch.empty(spec.input_shape(batch, resolution), dtype=_TORCH_DTYPES[dtype])
    # eval: the shapes are the same, and a batch of 1 passes BatchNorm's "more than 1 value per channel" check
    model = model.to(dtype=_TORCH_DTYPES[dtype], memory_format=memory_format).eval()
    return record_bn_calls(model, example.contiguous(memory_format=memory_format), layout=layout)
