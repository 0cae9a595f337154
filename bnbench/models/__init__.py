"""Networks for whole-model benchmarks (``bnbench step``, ``bnbench bench --from-model``): ResNet-18 and ResNet-50
in torchvision's layout, and a small CNN and MLP for quick CPU runs. Inputs are synthetic images of
:attr:`NetworkSpec.input_shape`; nothing is downloaded.

``build_network(name)`` uses torchvision's ResNet definitions when torchvision imports (``source="auto"``),
else the project's own (:mod:`bnbench.models.resnet`, tested to have the same parameter counts, BatchNorm shapes
and call counts); the source used is returned, so results always say which definition ran.
"""

from __future__ import annotations

import dataclasses

from torch import nn

__all__ = ["NETWORKS", "SOURCES", "NetworkSpec", "build_network", "get_network", "torchvision_available"]

SOURCES = ("auto", "torchvision", "bnbench")


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A network's name, its default input (channels, square resolution), classes, and whether its activations
    are 4-D (so channels_last applies)."""

    name: str
    resolution: int
    num_classes: int
    spatial: bool
    description: str
    in_channels: int = 3

    def input_shape(self, batch: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        r = self.resolution if resolution is None else resolution
        if not self.spatial and r != self.resolution:  # its first layer takes exactly in_channels x res x res features
            raise ValueError(f"network {self.name!r} takes {self.resolution}x{self.resolution} inputs only, got {r}")
        return (batch, self.in_channels, r, r)


NETWORKS: dict[str, NetworkSpec] = {
    "resnet18": NetworkSpec("resnet18", 224, 1000, True, "ResNet-18 (BasicBlock [2,2,2,2]), 224x224, 1000 classes"),
    "resnet50": NetworkSpec("resnet50", 224, 1000, True, "ResNet-50 v1.5 (Bottleneck [3,4,6,3]), 224x224, 1000 classes"),
    "cnn": NetworkSpec("cnn", 32, 10, True, "small CNN: 3 conv-BN-ReLU + a residual block, 32x32, 10 classes"),
    "mlp": NetworkSpec("mlp", 8, 10, False, "small MLP: 2 Linear-BN1d-ReLU + a residual Linear-BN1d, 3x8x8 input"),
}  # fmt: skip


def get_network(name: str) -> NetworkSpec:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; valid networks are: {', '.join(NETWORKS)}") from None


def _torchvision_models():
    """torchvision.models, or None when torchvision does not import here (not installed, or built for another
    torch: its compiled ops then fail at import)."""
    try:
        import torchvision.models
    except Exception:  # ImportError, or RuntimeError/OSError from a torchvision built for another torch
        return None
    return torchvision.models


def torchvision_available() -> bool:
    return _torchvision_models() is not None


def build_network(name: str, *, num_classes: int | None = None, source: str = "auto") -> tuple[nn.Module, str]:
    """``(model, source)``: the network in training mode on CPU (fp32) and which definition built it
    ("torchvision" or "bnbench"). ``source="auto"`` takes torchvision's ResNets when torchvision imports; the small
    networks are always the project's."""
    spec = get_network(name)
    if source not in SOURCES:
        raise ValueError(f"unknown network source {source!r}; valid sources are: {', '.join(SOURCES)}")
    classes = spec.num_classes if num_classes is None else int(num_classes)
    if classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name.startswith("resnet") and source != "bnbench":
        tv = _torchvision_models()
        if tv is not None:
            return getattr(tv, name)(weights=None, num_classes=classes), "torchvision"
        if source == "torchvision":
            raise ValueError(f"network source 'torchvision' asked for {name}, but torchvision does not import here")
    elif source == "torchvision":
        raise ValueError(f"network {name!r} has no torchvision definition; use source 'auto' or 'bnbench'")
    from bnbench.models import resnet, small

    builders = {"resnet18": resnet.resnet18, "resnet50": resnet.resnet50, "cnn": small.SmallCNN, "mlp": small.SmallMLP}
    return builders[name](num_classes=classes), "bnbench"
