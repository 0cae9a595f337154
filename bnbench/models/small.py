"""Small networks for quick CPU runs of ``bnbench step``: a CNN and an MLP, each with BatchNorm + ReLU pairs that
``convert_bn_act`` fuses and one residual block (or skip) whose BatchNorm feeds an add, as in a ResNet.

- ``cnn``: 3x32x32 input; conv 3x3 (16) -> BN -> ReLU; conv 3x3 stride 2 (32) -> BN -> ReLU; a residual block of
  two 3x3 convolutions (32) whose second BN feeds the add; global average pool; linear to the classes.
- ``mlp``: flattened 3x8x8 input (192 features); two Linear (128) -> BN1d -> ReLU layers, a residual Linear ->
  BN1d added to its input, then the linear head.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "SmallMLP"]


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, width)
        self.down = _conv_bn_relu(width, 2 * width, stride=2)
        self.res_conv1 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(2 * width)
        self.res_conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        out = self.relu(self.res_bn1(self.res_conv1(x)))
        x = self.relu(self.res_bn2(self.res_conv2(out)) + x)
        return self.head(x.mean(dim=(2, 3)))


class SmallMLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 192, width: int = 128) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        )  # fmt: skip
        self.res_fc = nn.Linear(width, width, bias=False)
        self.res_bn = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(torch.flatten(x, 1))
        h = self.relu(self.res_bn(self.res_fc(h)) + h)
        return self.head(h)
