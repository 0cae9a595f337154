"""convert_bn_act on ResNet-style models written here: what it converts, what it skips (and why), and that the
converted model computes the same outputs, gradients and running statistics as the original.

Shapes are tiny (the Triton kernels run under the interpreter on CPU); C=3 keeps a non-power-of-two channel count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnbench
from bnbench.convert import ConversionReport, convert_bn_act


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: bn1 -> relu is fusable; bn2 feeds the residual add; the same ReLU module
    is called twice; the downsample Sequential ends with a BatchNorm."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem (Sequential with BN + ReLU), two basic blocks, and a Sequential head with BN1d + SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 3, stride=2))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 2 * 2, 5), nn.BatchNorm1d(5), nn.SiLU(), nn.Linear(5, 2), nn.BatchNorm1d(2)
        )

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


class CallsBlock(nn.Module):
    """Activations called as functions and methods in forward, with their parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm2d(3)
        self.b = nn.BatchNorm2d(3)
        self.c = nn.BatchNorm2d(3)
        self.d = nn.BatchNorm2d(3)
        self.e = nn.BatchNorm2d(3)
        self.f = nn.BatchNorm2d(3)

    def forward(self, x):
        x = F.relu(self.a(x), inplace=True)
        x = F.leaky_relu(self.b(x), negative_slope=0.2)
        x = torch.sigmoid(self.c(x))
        x = self.d(x).tanh()
        x = F.gelu(self.e(x), approximate="tanh")
        return F.silu(self.f(x))


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so a dropped parameter would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def _assert_same_training_step(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """One forward/backward in the current mode: outputs, input and parameter gradients and buffers agree."""
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = original(xa), converted(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    params_a, params_b = dict(original.named_parameters()), dict(converted.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(original.named_buffers(), converted.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_resnet_converts_what_is_safe_and_reports_the_rest(seed, launches):
    model = _randomise(TinyResNet())
    converted, report = convert_bn_act(model, return_report=True)
    assert isinstance(report, ConversionReport)
    assert report.converted == {
        "stem.1": "relu",
        "layer1.0.bn1": "relu",
        "layer1.1.bn1": "relu",
        "head.2": "silu",
    }
    assert list(report.converted) == ["stem.1", "layer1.0.bn1", "layer1.1.bn1", "head.2"]  # model order
    assert set(report.skipped) == {
        "layer1.0.bn2",
        "layer1.1.bn2",
        "layer1.1.downsample.1",
        "head.5",
    }
    assert "add" in report.skipped["layer1.0.bn2"]
    assert "last child" in report.skipped["head.5"]
    assert "converted 4" in str(report) and "layer1.1.downsample.1" in str(report)
    # the original is untouched (inplace=False), the converted one uses the fused layer and a traced block
    assert type(model.stem[1]) is nn.BatchNorm2d and type(model.layer1[0]) is BasicBlock
    assert isinstance(converted.stem[1], bnbench.BatchNormAct2d) and isinstance(converted.stem[2], nn.Identity)
    assert isinstance(converted.layer1[0], fx.GraphModule)
    assert isinstance(converted.layer1[0].bn1, bnbench.BatchNormAct2d)
    assert type(converted.layer1[0].bn2) is nn.BatchNorm2d
    assert isinstance(converted.head[2], bnbench.BatchNormAct1d)
    # same state_dict keys and values: a checkpoint of one loads into the other
    assert list(model.state_dict()) == list(converted.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key

    x = torch.randn(2, 2, 4, 4)
    _assert_same_training_step(model, converted, x)
    assert launches["fwd_train"] == 4  # the four fused layers ran the Triton kernels
    model.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)
    assert launches["fwd_eval"] == 4


def test_inplace_shares_parameters_and_keeps_mode(seed):
    model = _randomise(TinyResNet()).eval()
    weight = model.stem[1].weight
    block = model.layer1[0]
    converted = convert_bn_act(model, inplace=True)
    assert converted is model
    assert converted.stem[1].weight is weight  # an optimizer holding `weight` still updates the fused layer
    # a traced block is replaced in its parent; the old object stays a consistent (unfused) block
    assert converted.layer1[0] is not block and type(block.bn1) is nn.BatchNorm2d
    assert converted.layer1[0].bn1.weight is block.bn1.weight
    assert not converted.stem[1].training and not converted.layer1[0].training
    assert converted.stem[1].running_mean is not None


def test_calls_in_forward_map_to_their_activations(seed, launches):
    model = _randomise(CallsBlock())
    converted, report = convert_bn_act(model, return_report=True)
    assert report.converted == {
        "a": "relu",
        "b": "leaky_relu(0.2)",
        "c": "sigmoid",
        "d": "tanh",
        "e": "gelu_tanh",
        "f": "silu",
    }
    assert report.skipped == {}
    _assert_same_training_step(model, converted, torch.randn(2, 3, 3, 2))
    assert launches["fwd_train"] == 6


def test_modules_of_every_supported_kind_in_sequential(seed):
    acts = [nn.ReLU(), nn.LeakyReLU(0.3), nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU("tanh"), nn.SiLU()]
    layers = []
    for act in acts:
        layers += [nn.BatchNorm1d(3), act]
    model = _randomise(nn.Sequential(*layers))
    converted, report = convert_bn_act(model, return_report=True)
    assert list(report.converted.values()) == [
        "relu",
        "leaky_relu(0.3)",
        "sigmoid",
        "tanh",
        "gelu",
        "gelu_tanh",
        "silu",
    ]
    _assert_same_training_step(model, converted, torch.randn(6, 3))


class Unsafe(nn.Module):
    """Four BatchNorms that must stay: output reused, shared module, unsupported activation, no activation."""

    def __init__(self) -> None:
        super().__init__()
        self.reused = nn.BatchNorm2d(3)
        self.shared = nn.BatchNorm2d(3)
        self.hard = nn.BatchNorm2d(3)
        self.plain = nn.BatchNorm2d(3)

    def forward(self, x):
        z = self.reused(x)
        x = F.relu(z) * z
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        x = F.hardtanh(self.hard(x))
        return self.plain(x) * 2


def test_unsafe_patterns_are_left_alone(seed):
    model = Unsafe()
    converted, report = convert_bn_act(model, return_report=True)
    assert report.converted == {}
    assert "2 uses" in report.skipped["reused"]
    assert "2 times" in report.skipped["shared"]
    assert "hardtanh" in report.skipped["hard"]
    assert "mul" in report.skipped["plain"]
    assert converted is not model and type(converted) is Unsafe  # nothing rewritten


def test_shared_module_in_two_sequentials_is_skipped():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Sequential(bn, nn.ReLU()), nn.Sequential(bn, nn.ReLU()))
    converted, report = convert_bn_act(model, inplace=True, return_report=True)
    assert report.converted == {}
    assert "more than once" in report.skipped["0.0"]
    assert converted[0][0] is bn


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return F.relu(self.bn(x))
        return self.bn(x)


def test_untraceable_forward_is_reported():
    converted, report = convert_bn_act(nn.Sequential(Untraceable()), return_report=True)
    assert report.converted == {}
    assert "not traceable by torch.fx" in report.skipped["0.bn"]
    assert type(converted[0]) is Untraceable


def test_other_batchnorms_and_hooks_are_skipped():
    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(nn.BatchNorm3d(3), nn.ReLU(), hooked, nn.ReLU(), bnbench.BatchNormAct2d(3), nn.ReLU())
    _, report = convert_bn_act(model, return_report=True)
    assert report.converted == {}
    assert "BatchNorm3d" in report.skipped["0"]
    assert "hooks" in report.skipped["2"]
    assert "4" not in report.skipped  # already fused: neither converted nor skipped


def test_hooked_activations_are_skipped_in_sequentials_and_in_forward():
    relu = nn.ReLU()
    relu.register_forward_hook(lambda *args: None)  # e.g. feature extraction: fusing would silence it
    _, report = convert_bn_act(nn.Sequential(nn.BatchNorm1d(3), relu), return_report=True)
    assert report.converted == {} and "activation module has hooks" in report.skipped["0"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(3), nn.ReLU()
            self.act.register_forward_pre_hook(lambda *args: None)

        def forward(self, x):
            return self.act(self.bn(x)) + 1.0

    _, report = convert_bn_act(nn.Sequential(Block()), return_report=True)
    assert report.converted == {} and "activation module has hooks" in report.skipped["0.bn"]


def test_memory_saving_conversion_skips_non_invertible_activations(seed):
    model = _randomise(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU(), nn.BatchNorm1d(3), nn.LeakyReLU(0.1)))
    converted, report = convert_bn_act(model, memory_saving=True, return_report=True)
    assert report.converted == {"2": "leaky_relu(0.1)"}
    assert "not invertible" in report.skipped["0"]
    assert converted[2].memory_saving
    _assert_same_training_step(model, converted, torch.randn(5, 3))


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert_bn_act("model")
    with pytest.raises(ValueError, match="cuda"):
        convert_bn_act(nn.Sequential(), backend="cuda")


def test_convert_is_exported():
    assert bnbench.convert_bn_act is convert_bn_act
