"""The networks of ``bnbench step`` and ``bench --from-model``: the project's ResNet-18/50 have the published
parameter counts and the reference architecture's BatchNorm shapes, call counts and activations; the BN calls
read off a forward pass (meta device) match them; the small networks run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbench import convert_bn_act
from bnbench.models import NETWORKS, build_network, get_network, torchvision_available
from bnbench.models.bn_calls import group_calls, model_bn_calls, record_bn_calls

#: published parameter counts for 1000 classes (He et al. 2016 / torchvision's ResNet-18 and ResNet-50 v1.5)
PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032}


def _reference_bn_layers(name: str, resolution: int) -> list[tuple[int, int, str, str]]:
    """(channels, spatial size, op, activation after it) of every BatchNorm, worked out from the architecture:
    stem 7x7/2 then maxpool /2; stages of width 64..512 with strides 1, 2, 2, 2; BasicBlock [2,2,2,2] (stride on
    its first 3x3) or Bottleneck [3,4,6,3] (stride on its 3x3, expansion 4); a downsample BN on each stage's first
    block when the resolution or width changes; the last BN of a block and the downsample BN feed the add, then
    the ReLU: convert_bn_act fuses the last BN with the add and the ReLU (bn2d_add), the downsample BN alone."""

    def down(h: int, k: int, s: int, p: int) -> int:
        return (h + 2 * p - k) // s + 1

    h = down(resolution, 7, 2, 3)
    layers = [(64, h, "bn2d", "relu")]
    h = down(h, 3, 2, 1)
    bottleneck = name == "resnet50"
    blocks = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
    in_ch = 64
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            out_h = down(h, 3, stride, 1)
            out_ch = width * (4 if bottleneck else 1)
            if b == 0 and (stride != 1 or in_ch != out_ch):
                layers.append((out_ch, out_h, "bn2d", "identity"))  # downsample BN
            if bottleneck:
                layers += [
                    (width, h, "bn2d", "relu"),
                    (width, out_h, "bn2d", "relu"),
                    (out_ch, out_h, "bn2d_add", "relu"),
                ]
            else:
                layers += [(width, out_h, "bn2d", "relu"), (width, out_h, "bn2d_add", "relu")]
            h, in_ch = out_h, out_ch
    return layers


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_network(name, source="bnbench", **kwargs)[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_has_the_published_parameter_count(name):
    assert sum(p.numel() for p in _meta(name).parameters()) == PARAMETERS[name]
    # the head is the only part that depends on the classes
    fc_in = 512 if name == "resnet18" else 2048
    assert sum(p.numel() for p in _meta(name, num_classes=10).parameters()) == PARAMETERS[name] - 990 * (fc_in + 1)


@pytest.mark.parametrize("name,resolution", [("resnet18", 224), ("resnet50", 224), ("resnet18", 32), ("resnet50", 64)])
def test_bn_calls_match_the_reference_architecture(name, resolution):
    calls = model_bn_calls(name, 2, resolution=resolution, source="bnbench")
    got = sorted((c.shape[1], c.shape[2], c.op, c.activation) for c in calls)
    assert got == sorted(_reference_bn_layers(name, resolution))
    assert all(c.shape[0] == 2 and c.shape[2] == c.shape[3] for c in calls)
    assert len(calls) == {"resnet18": 20, "resnet50": 53}[name]
    assert len({c.layer for c in calls}) == len(calls)  # every BN module is called once per forward


def test_conversion_report_of_the_resnets():
    for name, converted, skipped in (("resnet18", 9, 11), ("resnet50", 33, 20)):
        _, report = convert_bn_act(_meta(name), backend="torch", return_report=True)
        assert (len(report.converted), len(report.skipped)) == (converted, skipped)
        assert set(report.converted.values()) == {"relu"}
        assert all(k.endswith(("bn2", "bn3", "downsample.1")) for k in report.skipped)


def test_grouped_counts_at_a_tiny_resolution():
    groups = group_calls(model_bn_calls("resnet18", 4, resolution=32, dtype="bf16", layout="channels_last",
                                        source="bnbench"))  # fmt: skip
    table = {(g.op, g.shape, g.activation): g.count for g in groups}
    assert table[("bn2d", (4, 64, 16, 16), "relu")] == 1  # stem
    assert table[("bn2d", (4, 64, 8, 8), "relu")] == 2 and table[("bn2d_add", (4, 64, 8, 8), "relu")] == 2
    assert table[("bn2d_add", (4, 512, 1, 1), "relu")] == 2  # the two bn2, fused with the residual add
    assert table[("bn2d", (4, 512, 1, 1), "identity")] == 1  # the downsample, the residual of the first
    assert sum(table.values()) == 20
    assert {(g.dtype, g.layout) for g in groups} == {("bf16", "channels_last")}


def test_a_real_forward_keeps_channels_last_at_every_bn():
    """On meta the layout is the run's (meta convolutions drop the memory format); on CPU it is observed."""
    model = build_network("resnet18", source="bnbench")[0].to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls = record_bn_calls(model, x)
    assert len(calls) == 20 and {c.layout for c in calls} == {"channels_last"}


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_small_networks_run_and_have_a_fusable_pair_and_a_residual_bn(name):
    spec = get_network(name)
    model, source = build_network(name)
    assert source == "bnbench"
    out = model(torch.randn(spec.input_shape(3)))
    assert out.shape == (3, spec.num_classes)
    _, report = convert_bn_act(model, backend="torch", return_report=True)
    assert report.converted and len(report.skipped) == 1
    assert "add" in next(iter(report.skipped.values()))


def test_bad_names_raise():
    with pytest.raises(ValueError, match="unknown network 'resnet34'"):
        build_network("resnet34")
    with pytest.raises(ValueError, match="no torchvision definition"):
        build_network("cnn", source="torchvision")
    with pytest.raises(ValueError, match="channels_last does not apply"):
        model_bn_calls("mlp", 2, layout="channels_last")
    assert set(NETWORKS) == {"resnet18", "resnet50", "cnn", "mlp"}


@pytest.mark.skipif(not torchvision_available(), reason="torchvision does not import here")
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_layout_as_torchvision(name):
    ours = _meta(name)
    with torch.device("meta"):
        theirs, source = build_network(name, source="torchvision")
    assert source == "torchvision"
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in theirs.state_dict().items()
    ]


def test_call_order_is_torchvisions():
    """Checked once against torchvision 0.28's resnet18/resnet50 (installed --no-deps in a throwaway folder):
    identical state_dict names and shapes, identical outputs with the same weights, identical BN call sequence;
    torchvision's blocks run the downsample branch after the main path."""
    calls = [c.layer for c in model_bn_calls("resnet18", 2, resolution=32, source="bnbench")]
    assert calls[5:8] == ["layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1"]
    calls = [c.layer for c in model_bn_calls("resnet50", 2, resolution=32, source="bnbench")]
    assert calls[:5] == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.bn3", "layer1.0.downsample.1"]
