"""Every BatchNorm call of a network's forward pass: input shape, layout, dtype, the activation that follows it,
and how many times each distinct call occurs. The ``resnet50`` bench preset and ``bnbench bench --from-model``
are built from this, so their shapes are the model's, not a hand-typed table.

The forward runs on the ``meta`` device (no memory, no compute), every BatchNorm module replaced by a probe that
records its input. Meta convolutions return contiguous outputs whatever the input's memory format (CUDA's and oneDNN's keep
channels_last through convolution, BatchNorm, ReLU and the residual add), so on meta the layout of a 4-D call is
the layout the network runs in, given by the caller; a forward on a real device observes it. The activation of a
call is the one :func:`bnbench.convert_bn_act` (given the example input) would fuse into it ("identity" for a
BatchNorm it leaves alone or converts without one, e.g. a ResNet's downsample); a BatchNorm it converts with the
residual add that follows it (the last of a ResNet block) is a call of op ``bn2d_add`` (``bn1d_add`` on 2-D input).
"""

from __future__ import annotations

import copy
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
    """One call of one BatchNorm module: its qualified name, op (bn1d on (N, C), bn2d on (N, C, H, W); bn1d_add
    and bn2d_add when a residual is added before the activation), input shape, layout ("nchw" or
    "channels_last"), dtype name and the activation that follows it."""

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


def _fusions(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, str], set[str]]:
    """BatchNorm name -> the activation convert_bn_act fuses into it (its name; "identity" when it is left alone),
    and the names it converts with a residual add."""
    from bnbench.convert import convert_bn_act
    from bnbench.modules import BatchNormAct1d, BatchNormAct2d

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (BatchNormAct1d, BatchNormAct2d)):
            out[name] = module.activation.value
    _, report = convert_bn_act(model, backend="torch", return_report=True, example_inputs=example)
    for name, described in report.converted.items():
        out[name] = parse_activation(described.split("(")[0])[0].value  # "leaky_relu(0.1)" -> "leaky_relu"
    for name in report.skipped:
        out[name] = "identity"
    return out, set(report.with_residual)


class _Probe(nn.Module):
    """Stands in for a BatchNorm during the recording forward: records its input, returns it unchanged (the
    shape, dtype and memory format a BatchNorm returns). The BatchNorm itself is not run: on meta tensors its
    Python decomposition would import torch._dynamo, and with it triton, before a CLI could switch the Triton
    interpreter on."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.record(x)
        return x


def record_bn_calls(
    model: nn.Module, example: torch.Tensor, *, layout: str | None = None, run_on: str | None = None
) -> list[BNCall]:
    """Run a copy of ``model`` on ``example`` without gradients, each BatchNorm replaced by a probe, and return
    every BatchNorm call in call order. The layout of a 4-D call is observed from its input's strides, or
    ``layout`` when given (for meta tensors). With ``run_on``, the copy of a meta model is given uninitialised
    storage on that device first (values do not matter: only shapes are read). ``model`` is not changed. Besides
    that forward, convert_bn_act runs the model on ``example`` (about twice) to find its residual adds."""
    threads = torch.get_num_threads()
    try:  # one input, one thread: on a shared machine a CPU thread pool can stall for whole scheduler ticks
        torch.set_num_threads(1)
        return _record(model, example, layout, run_on)
    finally:
        torch.set_num_threads(threads)


def _record(model: nn.Module, example: torch.Tensor, layout: str | None, run_on: str | None) -> list[BNCall]:
    if run_on is not None:
        model = copy.deepcopy(model).to_empty(device=run_on)
    activations, with_residual = _fusions(model, example)
    calls: list[BNCall] = []

    def recorder(name: str):
        def record(x: torch.Tensor) -> None:
            if x.dim() not in (2, 4):
                raise ValueError(f"BatchNorm {name} got a {x.dim()}-D input {tuple(x.shape)}: only (N, C) and "
                                 "(N, C, H, W) are benchmark cases")  # fmt: skip
            dtype = _DTYPE_NAMES.get(x.dtype)
            if dtype is None:
                raise ValueError(f"BatchNorm {name} got an input of dtype {x.dtype}: no benchmark dtype for it")
            op = ("bn1d" if x.dim() == 2 else "bn2d") + ("_add" if name in with_residual else "")
            lay = layout if layout is not None and x.dim() == 4 else _layout(x)
            calls.append(BNCall(name, op, tuple(x.shape), lay, dtype, activations.get(name, "identity")))

        return record

    probed = copy.deepcopy(model)
    for name, module in list(probed.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(probed.get_submodule(parent_name), child, _Probe(recorder(name)))
    with torch.no_grad():
        probed(example)
    return calls


def group_calls(calls: Sequence[BNCall]) -> list[BNCallGroup]:
    """Distinct calls (op, shape, layout, dtype, activation) with their counts, in order of first occurrence."""
    groups: dict[tuple, list[str]] = {}
    for call in calls:
        groups.setdefault((call.op, call.shape, call.layout, call.dtype, call.activation), []).append(call.layer)
    return [BNCallGroup(*key, count=len(layers), layers=tuple(layers)) for key, layers in groups.items()]


def model_bn_calls(
    name: str, batch: int, *, resolution: int | None = None, dtype: str = "fp32", layout: str = "nchw",
    source: str = "auto", device: str = "meta",
) -> list[BNCall]:  # fmt: skip
    """The BatchNorm calls of network ``name`` (see :data:`bnbench.models.NETWORKS`) for a batch of ``batch``
    inputs at ``resolution`` (default: the network's), with parameters and input in ``dtype`` and ``layout``
    (as under autocast, where each BatchNorm sees the low-precision output of its convolution). Runs on
    ``device``: "meta" costs nothing at any size; "cpu" computes the convolutions (use a batch of 1 and scale:
    counts and per-sample shapes do not depend on the batch) and, unlike meta, imports neither torch._dynamo
    nor triton (meta tensors run PyTorch's Python decompositions, which do)."""
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
    with torch.device("meta"):  # no initialisation cost at any size; run_on gives the copy storage
        model, _ = build_network(name, source=source)
    model = model.to(dtype=_TORCH_DTYPES[dtype], memory_format=memory_format)
    example = torch.zeros(spec.input_shape(batch, resolution), dtype=_TORCH_DTYPES[dtype], device=device)
    meta = torch.device(device).type == "meta"
    return record_bn_calls(
        model, example.contiguous(memory_format=memory_format), layout=layout if meta else None,
        run_on=None if meta else device,
    )  # fmt: skip
