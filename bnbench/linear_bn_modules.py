"""LinearBatchNormAct / Conv1x1BatchNormAct2d: a Linear (or 1x1 Conv2d) + BatchNorm + activation, as one layer.

Each holds the two PyTorch modules it replaces as its children ``"0"`` (``nn.Linear(bias=False)`` /
``nn.Conv2d(1x1, bias=False)``) and ``"1"`` (``nn.BatchNorm1d`` / ``nn.BatchNorm2d``), so its ``state_dict`` is
exactly that of ``nn.Sequential(linear, bn, activation)`` (keys ``0.weight``, ``1.weight``, ``1.bias``,
``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``) and parameters, buffers, ``reset_parameters``
and initialisation are PyTorch's own. ``forward`` mirrors ``nn.BatchNorm``'s (batch counting, ``momentum=None``
as a device-side cumulative factor, eval with running statistics, ``track_running_stats=False``, affine off)
around one call of :func:`bnbench.linear_bn.linear_batch_norm_act` / ``conv1x1_batch_norm_act``.

``from_modules(linear, bn, act)`` builds the layer around existing modules (sharing their tensors). A bias on
the Linear/Conv is folded away: BatchNorm subtracts the batch mean, which removes any per-channel constant, and
the running mean is shifted by the bias (``running_mean - bias``), so eval outputs and every later running-mean
update stay the same; the folded layer then has no ``0.bias`` key and its ``1.running_mean`` differs by the bias
(new modules sharing every other tensor are made; the given modules are not modified).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnbench.activations import Activation, parse_activation
from bnbench.functional import BACKENDS
from bnbench.linear_bn import INPUT_PRECISIONS, conv1x1_batch_norm_act, linear_batch_norm_act
from bnbench.modules import count_batch

__all__ = ["Conv1x1BatchNormAct2d", "LinearBatchNormAct"]


def _activation_of(act) -> tuple[Activation, float | None]:
    """(Activation, parameter) from a name, an Activation, an activation module, or None (identity)."""
    if act is None:
        return Activation.IDENTITY, None
    if isinstance(act, nn.Module):
        from bnbench.convert import _module_activation

        found = _module_activation(act)
        if found is None:
            raise ValueError(f"{type(act).__name__} is not an activation bnbench fuses")
        if _has_hooks(act):
            raise ValueError(f"the {type(act).__name__} module has hooks, which would not run once fused")
        activation, param = found
        return activation, (param if activation is Activation.LEAKY_RELU else None)
    activation, param = parse_activation(act)
    return activation, (param if activation is Activation.LEAKY_RELU else None)


class _MatmulBatchNormAct(nn.Module):
    """The shared body: children "0" (the matmul module) and "1" (the BatchNorm), and the BatchNorm forward."""

    def __init__(self, matmul: nn.Module, bn: nn.modules.batchnorm._BatchNorm, activation, activation_param,
                 backend: str, input_precision: str) -> None:  # fmt: skip
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
        if input_precision not in INPUT_PRECISIONS:
            raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
        self.add_module("0", matmul)
        self.add_module("1", bn)
        self.activation, self.activation_param = parse_activation(activation, activation_param)
        self.backend = backend
        self.input_precision = input_precision

    @property
    def bn(self) -> nn.modules.batchnorm._BatchNorm:
        return self._modules["1"]

    def _bn_args(self) -> dict:
        """What ``nn.BatchNorm.forward`` passes to F.batch_norm (and counts the batch, as it does)."""
        bn = self.bn
        factor = count_batch(bn)
        track = not bn.training or bn.track_running_stats
        return dict(
            bn_weight=bn.weight, bn_bias=bn.bias,
            running_mean=bn.running_mean if track else None, running_var=bn.running_var if track else None,
            training=bn.training or (bn.running_mean is None and bn.running_var is None), momentum=factor,
            eps=bn.eps, activation=self.activation,
            activation_param=self.activation_param if self.activation is Activation.LEAKY_RELU else None,
            backend=self.backend, input_precision=self.input_precision,
        )  # fmt: skip

    def extra_repr(self) -> str:
        act = self.activation.value
        if self.activation is Activation.LEAKY_RELU:
            act += f"({self.activation_param:g})"
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        extra += "" if self.input_precision == "ieee" else f", input_precision={self.input_precision!r}"
        return f"activation={act}{extra}"


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _check_pair(matmul: nn.Module, bn: nn.Module, bn_cls, features: int) -> None:
    if type(bn) is not bn_cls:
        raise TypeError(f"expected an exact {bn_cls.__name__}, got {type(bn).__name__}")
    if bn.num_features != features:
        raise ValueError(f"the matmul has {features} output features but the BatchNorm has {bn.num_features}")
    for module in (matmul, bn):
        if _has_hooks(module):
            raise ValueError(f"the {type(module).__name__} module has hooks, which the fused layer would not run")


def _folded(matmul: nn.Module, bn: nn.modules.batchnorm._BatchNorm, bare_matmul: nn.Module):
    """(matmul, bn) without a bias: the modules themselves when there is none; else new modules sharing every
    tensor but the running mean, which becomes running_mean - bias (the inputs are left untouched)."""
    if matmul.bias is None:
        return matmul, bn
    bare_matmul.weight = matmul.weight
    bare_matmul.train(matmul.training)
    new_bn = type(bn)(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    new_bn.weight, new_bn.bias = bn.weight, bn.bias
    for name in ("running_var", "num_batches_tracked"):
        setattr(new_bn, name, getattr(bn, name))
    if bn.running_mean is not None:
        with torch.no_grad():
            new_bn.running_mean = bn.running_mean - matmul.bias.detach().to(bn.running_mean.dtype)
    else:
        new_bn.running_mean = None
    new_bn.train(bn.training)
    return bare_matmul, new_bn


class LinearBatchNormAct(_MatmulBatchNormAct):
    """``nn.Linear(in_features, out_features, bias=False)`` + ``nn.BatchNorm1d(out_features)`` + activation.
    Input (N, in_features); output (N, out_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | Activation = "relu",
        activation_param: float | None = None,
        backend: str = "auto",
        input_precision: str = "ieee",
        device=None,
        dtype=None,
    ) -> None:
        kw = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Linear(in_features, out_features, bias=False, **kw),
            nn.BatchNorm1d(out_features, eps, momentum, affine, track_running_stats, **kw),
            activation, activation_param, backend, input_precision,
        )  # fmt: skip

    @property
    def linear(self) -> nn.Linear:
        return self._modules["0"]

    @classmethod
    def from_modules(cls, linear: nn.Linear, bn: nn.BatchNorm1d, act=None, *, backend: str = "auto",
                     input_precision: str = "ieee") -> LinearBatchNormAct:  # fmt: skip
        """The fused layer around ``linear`` and ``bn`` (their tensors are shared; a Linear bias is folded into
        the BatchNorm's running mean, see the module docstring) and ``act`` (an activation module, a name, or
        None for identity)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"expected an exact nn.Linear, got {type(linear).__name__}")
        _check_pair(linear, bn, nn.BatchNorm1d, linear.out_features)
        activation, param = _activation_of(act)
        bare = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        linear, bn = _folded(linear, bn, bare)
        new = cls.__new__(cls)
        _MatmulBatchNormAct.__init__(new, linear, bn, activation, param, backend, input_precision)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 2:
            raise ValueError(f"LinearBatchNormAct expects 2-D input (N, in_features), got shape {tuple(input.shape)}")
        return linear_batch_norm_act(input, self.linear.weight, **self._bn_args())


class Conv1x1BatchNormAct2d(_MatmulBatchNormAct):
    """``nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)`` + ``nn.BatchNorm2d(out_channels)`` +
    activation. Input (N, C_in, H, W), best channels_last; output channels_last on the Triton path."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int | tuple[int, int] = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | Activation = "relu",
        activation_param: float | None = None,
        backend: str = "auto",
        input_precision: str = "ieee",
        device=None,
        dtype=None,
    ) -> None:
        kw = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, **kw),
            nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **kw),
            activation, activation_param, backend, input_precision,
        )  # fmt: skip

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act=None, *, backend: str = "auto",
                     input_precision: str = "ieee") -> Conv1x1BatchNormAct2d:  # fmt: skip
        """The fused layer around a 1x1 ``conv`` (no padding, one group; any stride) and ``bn`` (tensors shared;
        a conv bias is folded into the running mean) and ``act`` (a module, a name, or None)."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"expected an exact nn.Conv2d, got {type(conv).__name__}")
        if reason := conv1x1_unsupported(conv):
            raise ValueError(f"cannot fuse {conv}: {reason}")
        _check_pair(conv, bn, nn.BatchNorm2d, conv.out_channels)
        activation, param = _activation_of(act)
        bare = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False, device="meta")
        conv, bn = _folded(conv, bn, bare)
        new = cls.__new__(cls)
        _MatmulBatchNormAct.__init__(new, conv, bn, activation, param, backend, input_precision)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"Conv1x1BatchNormAct2d expects 4-D input (N, C, H, W), got shape {tuple(input.shape)}")
        return conv1x1_batch_norm_act(input, self.conv.weight, stride=self.conv.stride, **self._bn_args())


def conv1x1_unsupported(conv: nn.Conv2d) -> str | None:
    """Why a Conv2d is not a plain 1x1 matmul over its input's rows, or None when it is."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"kernel_size {tuple(conv.kernel_size)} is not 1x1"
    if conv.groups != 1:
        return f"groups={conv.groups} (only 1 is a single matmul)"
    if not isinstance(conv.padding, str) and any(conv.padding):  # "valid" and "same" pad a 1x1 kernel by 0
        return f"padding={conv.padding} (a padded 1x1 conv has extra zero rows at the border)"
    return None
