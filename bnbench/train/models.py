"""The models the experiments train: an MLP and a small CNN made of (linear or conv) -> norm -> activation blocks.

``norm`` selects the implementation: ``none`` (no BatchNorm; the linear layer keeps its bias), ``eager``
(``nn.BatchNorm1d/2d`` then the activation: the PyTorch composition) or ``fused`` (``bnbench.BatchNormAct1d/2d``).
With BatchNorm the preceding layer has no bias (BN's shift replaces it, as in Ioffe and Szegedy).

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

__all__ = ["INITS", "MODELS", "NORMS", "Block", "Net", "build_model", "init_weights"]

MODELS = ("mlp", "cnn")
NORMS = ("none", "eager", "fused")
INITS = ("pytorch", "xavier", "kaiming", "normal")


class Block(nn.Module):
    """One hidden layer: ``layer`` (Linear or Conv2d) -> BatchNorm (or none) -> activation."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None, activation: Activation, fused: bool) -> None:
        super().__init__()
        self.layer, self.bn, self.activation, self.fused = layer, bn, activation, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.fused:  # BatchNormAct applies the activation itself
            return self.bn(h)
        return apply_activation(self.bn(h) if self.bn is not None else h, self.activation)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The activation's input z (BN output, or the layer output without BN), computed without side effects:
        in eval mode BN uses its running statistics, in training mode the batch's (running stats untouched)."""
        h = self.layer(x)
        if self.bn is None:
            return h
        bn = self.bn
        use_batch = bn.training or bn.running_mean is None
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
    def probe(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every hidden block's pre-activation z for batch ``x`` (no side effects on running statistics)."""
        out, h = [], self.prepare(x)
        for block in self.blocks:
            z = block.pre_activation(h)
            out.append(z)
            h = apply_activation(z, block.activation)
        return out


def _norm(norm: str, kind: str, features: int, activation: Activation, backend: str) -> tuple[nn.Module | None, bool]:
    if norm == "none":
        return None, False
    if norm == "eager":
        return (nn.BatchNorm1d if kind == "mlp" else nn.BatchNorm2d)(features), False
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
    blocks, bias = [], norm == "none"
    if kind == "mlp":
        fan_in = int(math.prod(in_shape))
        for _ in range(depth):
            bn, fused = _norm(norm, kind, width, act, backend)
            blocks.append(Block(nn.Linear(fan_in, width, bias=bias), bn, act, fused))
            fan_in = width
    else:
        channels, size = in_shape[0], min(in_shape[1:])
        for i in range(depth):
            stride = 2 if i % 2 == 1 and size > 4 else 1
            size = (size + 1) // stride if stride == 2 else size
            bn, fused = _norm(norm, kind, width, act, backend)
            blocks.append(Block(nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=bias), bn, act, fused))
            channels = width
    net = Net(blocks, nn.Linear(width, n_classes), kind, channels_last)
    return net.to(memory_format=torch.channels_last) if channels_last else net


@torch.no_grad()
def init_weights(model: Net, scheme: str, seed: int, std: float = 0.1) -> None:
    """Draw every weight from one CPU generator seeded with ``seed``, layer by layer; biases are zero.

    ``pytorch``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's default; ``xavier``: N(0, 2/(fan_in+fan_out));
    ``kaiming``: N(0, 2/fan_in); ``normal``: N(0, std^2). BN's scale and shift start at 1 and 0.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid inits are: {', '.join(INITS)}")
    gen = torch.Generator().manual_seed(seed)
    for layer in [b.layer for b in model.blocks] + [model.head]:
        w = layer.weight
        fan_out, fan_in = w.shape[0], int(math.prod(w.shape[1:]))
        if scheme == "pytorch":
            bound = 1.0 / math.sqrt(fan_in)
            value = torch.rand(w.shape, generator=gen) * 2 * bound - bound
        else:
            scale = {"xavier": math.sqrt(2.0 / (fan_in + fan_out)), "kaiming": math.sqrt(2.0 / fan_in)}.get(scheme, std)
            value = torch.randn(w.shape, generator=gen) * scale
        w.copy_(value)
        if layer.bias is not None:
            layer.bias.zero_()
