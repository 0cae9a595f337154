"""The models the experiments train: an MLP and a small CNN made of (linear or conv) -> norm -> activation blocks.

``norm`` selects the normalisation: ``none`` (the linear layer keeps its bias), ``eager`` (``nn.BatchNorm1d/2d``
then the activation: the PyTorch composition), ``fused`` (``bnbench.BatchNormAct1d/2d``), ``noisy`` (BatchNorm
followed, in training, by a per-unit random scale and shift drawn afresh at every step: Santurkar et al.'s 2018
"noisy BN", which injects covariate shift after the normalisation), ``layernorm`` (``nn.LayerNorm`` over the units;
``GroupNorm(1, C)`` for the CNN) or ``groupnorm`` (``nn.GroupNorm`` with :data:`GROUPS` groups where the width
allows). With a normalisation the preceding layer has no bias (its shift replaces it, as in Ioffe and Szegedy).
``dropout`` > 0 adds ``nn.Dropout`` after every hidden activation.

Weights are drawn by :func:`init_weights` from one generator in a fixed order that does not depend on ``norm``,
so the same seed gives the same initial weights with and without BN (the paper's comparison).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.modules import BatchNormAct1d, BatchNormAct2d

__all__ = ["BATCH_NORMS", "GROUPS", "INITS", "MODELS", "NORMS", "Block", "Net", "build_model", "init_weights"]

MODELS = ("mlp", "cnn")
NORMS = ("none", "eager", "fused", "noisy", "layernorm", "groupnorm")
#: norms that normalise with batch statistics (and so differ between train and eval mode)
BATCH_NORMS = ("eager", "fused", "noisy")
#: ``auto``: He (kaiming) for ReLU-like activations, Glorot (xavier) for sigmoid, tanh and the head
INITS = ("auto", "pytorch", "xavier", "kaiming", "normal")
#: groups of ``groupnorm`` (fewer when the width is not a multiple; 1 group is LayerNorm over units)
GROUPS = 4
_HE_ACTIVATIONS = (Activation.RELU, Activation.GELU, Activation.GELU_TANH, Activation.SILU)


class Block(nn.Module):
    """One hidden layer: ``layer`` (Linear or Conv2d) -> normalisation (or none) -> activation -> dropout.

    ``noise`` (noisy BN only): in training, the BN output becomes ``z * s + m`` with per-unit ``s ~ U(1, 1 +
    noise)`` and ``m ~ U(-noise, noise)`` drawn from the global generator at every forward.
    """

    def __init__(self, layer: nn.Module, bn: nn.Module | None, activation: Activation, fused: bool,
                 dropout: float = 0.0, noise: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.layer, self.bn, self.activation, self.fused = layer, bn, activation, fused
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.noise = noise

    def _noisy(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, z.shape[1]) + (1,) * (z.dim() - 2)
        scale = 1 + self.noise * torch.rand(shape, device=z.device, dtype=z.dtype)
        shift = self.noise * (2 * torch.rand(shape, device=z.device, dtype=z.dtype) - 1)
        return z * scale + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.fused:  # BatchNormAct applies the activation itself
            y = self.bn(h)
        else:
            z = self.bn(h) if self.bn is not None else h
            if self.noise > 0 and self.training:
                z = self._noisy(z)
            y = apply_activation(z, self.activation)
        return self.drop(y) if self.drop is not None else y

    def pre_activation(self, x: torch.Tensor, batch_stats: bool | None = None) -> torch.Tensor:
        """The activation's input z (the normalised output, or the layer output without a norm), computed without
        side effects: BatchNorm uses the batch's statistics when ``batch_stats`` (default: in training mode),
        its running statistics otherwise, and never updates them. No noise, no dropout."""
        h = self.layer(x)
        if self.bn is None:
            return h
        bn = self.bn
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return bn(h)
        use_batch = (bn.training if batch_stats is None else batch_stats) or bn.running_mean is None
        return F.batch_norm(
            h, None if use_batch else bn.running_mean, None if use_batch else bn.running_var,
            bn.weight, bn.bias, use_batch, 0.0, bn.eps,
        )  # fmt: skip


class Net(nn.Module):
    """Hidden blocks, then (for the CNN) global average pooling, then a linear head with bias."""

    def __init__(self, blocks: list[Block], head: nn.Linear, kind: str, channels_last: bool = False) -> None:
        super().__init__()
        self.blocks, self.head, self.kind, self.channels_last = nn.ModuleList(blocks), head, kind, channels_last

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Shape a batch (N, C, H, W) for this model: flattened for the MLP, channels_last if asked."""
        if self.kind == "mlp":
            return x.flatten(1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.prepare(x))
        if self.kind == "cnn":
            h = h.mean(dim=(2, 3))
        return self.head(h)

    @torch.no_grad()
    def probe(self, x: torch.Tensor, batch_stats: bool | None = None) -> list[torch.Tensor]:
        """Every hidden block's pre-activation z for batch ``x``, then the logits (no side effects on running
        statistics, no dropout, no noise); ``batch_stats`` as in :meth:`Block.pre_activation`."""
        out, h = [], self.prepare(x)
        for block in self.blocks:
            z = block.pre_activation(h, batch_stats)
            out.append(z)
            h = apply_activation(z, block.activation)
        if self.kind == "cnn":
            h = h.mean(dim=(2, 3))
        return [*out, self.head(h)]


def _norm(norm: str, kind: str, features: int, activation: Activation, backend: str) -> tuple[nn.Module | None, bool]:
    if norm == "none":
        return None, False
    if norm in ("eager", "noisy"):
        return (nn.BatchNorm1d if kind == "mlp" else nn.BatchNorm2d)(features), False
    if norm == "layernorm":
        return (nn.LayerNorm(features) if kind == "mlp" else nn.GroupNorm(1, features)), False
    if norm == "groupnorm":
        return nn.GroupNorm(math.gcd(GROUPS, features), features), False
    cls = BatchNormAct1d if kind == "mlp" else BatchNormAct2d
    return cls(features, activation=activation, backend=backend), True


def build_model(
    kind: str,
    *,
    in_shape: tuple[int, int, int],
    n_classes: int,
    depth: int,
    width: int,
    activation: str | Activation,
    norm: str,
    backend: str = "auto",
    channels_last: bool = False,
    dropout: float = 0.0,
    noise: float = 0.0,
) -> Net:
    """An MLP (``depth`` hidden layers of ``width`` units) or a CNN (``depth`` 3x3 conv blocks of ``width``
    channels; the blocks at odd positions have stride 2 while the feature map is larger than 4x4).

    Weights are left as PyTorch made them: call :func:`init_weights` to draw them reproducibly.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; valid models are: {', '.join(MODELS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms are: {', '.join(NORMS)}")
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    act, _ = parse_activation(activation)
    if act is Activation.LEAKY_RELU:
        raise ValueError("the training models take activations without a parameter; leaky_relu is not offered")
    if channels_last and kind != "cnn":
        raise ValueError("channels_last applies to the cnn model only")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if noise < 0 or (noise > 0 and norm != "noisy"):
        raise ValueError(f"noise is the magnitude of norm 'noisy' (>= 0), got noise={noise!r} with norm={norm!r}")
    extra = {"dropout": dropout, "noise": noise}
    blocks, bias = [], norm == "none"
    if kind == "mlp":
        fan_in = int(math.prod(in_shape))
        for _ in range(depth):
            bn, fused = _norm(norm, kind, width, act, backend)
            blocks.append(Block(nn.Linear(fan_in, width, bias=bias), bn, act, fused, **extra))
            fan_in = width
    else:
        channels, size = in_shape[0], min(in_shape[1:])
        for i in range(depth):
            stride = 2 if i % 2 == 1 and size > 4 else 1
            size = (size + 1) // stride if stride == 2 else size
            bn, fused = _norm(norm, kind, width, act, backend)
            conv = nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=bias)
            blocks.append(Block(conv, bn, act, fused, **extra))
            channels = width
    net = Net(blocks, nn.Linear(width, n_classes), kind, channels_last)
    return net.to(memory_format=torch.channels_last) if channels_last else net


@torch.no_grad()
def init_weights(model: Net, scheme: str, seed: int, std: float = 0.1) -> None:
    """Draw every weight from one CPU generator seeded with ``seed``, layer by layer; biases are zero.

    ``pytorch``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's default; ``xavier``: N(0, 2/(fan_in+fan_out));
    ``kaiming``: N(0, 2/fan_in); ``normal``: N(0, std^2); ``auto``: kaiming for a block with a ReLU-like
    activation, xavier otherwise (sigmoid, tanh, the linear head). BN's scale and shift start at 1 and 0.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid inits are: {', '.join(INITS)}")
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"init std must be a positive finite number, got {std!r}")
    gen = torch.Generator().manual_seed(seed)
    layers = [(b.layer, b.activation) for b in model.blocks] + [(model.head, None)]
    for layer, activation in layers:
        w = layer.weight
        fan_out, fan_in = w.shape[0], int(math.prod(w.shape[1:]))
        scheme_here = ("kaiming" if activation in _HE_ACTIVATIONS else "xavier") if scheme == "auto" else scheme
        if scheme_here == "pytorch":
            bound = 1.0 / math.sqrt(fan_in)
            value = torch.rand(w.shape, generator=gen) * 2 * bound - bound
        else:
            scales = {"xavier": math.sqrt(2.0 / (fan_in + fan_out)), "kaiming": math.sqrt(2.0 / fan_in)}
            scale = scales.get(scheme_here, std)
            value = torch.randn(w.shape, generator=gen) * scale
        w.copy_(value)
        if layer.bias is not None:
            layer.bias.zero_()
