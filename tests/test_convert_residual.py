"""convert_bn_act's residual patterns: every way fx records ``act(bn(x) + r)`` is converted to ``bn(x, r)``, with
outputs, gradients (of x, the residual's source and every parameter) and running statistics unchanged; every
unsafe variant is left alone with its reason; the project's ResNet-18/50 (and torchvision's, where it imports)
convert with every BatchNorm fused.

The equivalence tests run the fused layers on the ``torch`` backend (the same semantics as the kernels, CPU
speed): ResNet-50 under the Triton interpreter takes minutes even at 32x32. The Triton path is exercised on a
single block (:func:`test_block_runs_the_triton_residual_path`). C=3 keeps a non-power-of-two channel count.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnbench
from bnbench.convert import convert_bn_act
from bnbench.convert_residual import fused_residual
from bnbench.models import resnet, small, torchvision_available

from .test_convert import _assert_same_training_step, _randomise


class Residual(nn.Module):
    """One BatchNorm whose output is summed with ``r`` (a convolution of x) by ``pattern``, then activated."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        r = self.conv(x)
        p = self.pattern
        if p == "act(bn + r)":
            return F.relu(self.bn(x) + r)
        if p == "act(r + bn)":
            return self.relu(r + self.bn(x))
        if p == "out += r":  # torchvision's BasicBlock / Bottleneck
            out = self.bn(x)
            out += r
            out = self.relu(out)
            return out
        if p == "torch.add":
            return torch.relu(torch.add(self.bn(x), r, alpha=1))
        if p == "Tensor.add":
            return self.bn(x).add(r).relu()
        if p == "Tensor.add_":
            return F.leaky_relu(self.bn(x).add_(r), 0.2)
        if p == "silu":
            return F.silu(r + self.bn(x))
        raise AssertionError(p)


PATTERNS = ["act(bn + r)", "act(r + bn)", "out += r", "torch.add", "Tensor.add", "Tensor.add_", "silu"]
ACTIVATION = {"Tensor.add_": "leaky_relu(0.2)", "silu": "silu"}


def _adds(module: fx.GraphModule) -> list[fx.Node]:
    adds = (operator.add, operator.iadd, torch.add)
    return [n for n in module.graph.nodes if n.target in adds or (n.op == "call_method" and "add" in n.target)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_residual_pattern_is_converted(seed, pattern):
    model = _randomise(nn.Sequential(Residual(pattern)))
    x = torch.randn(2, 3, 4, 3)
    converted, report = convert_bn_act(model, backend="torch", example_inputs=x, return_report=True)
    assert report.converted == {"0.bn": ACTIVATION.get(pattern, "relu")}
    assert report.with_residual == {"0.bn": "conv"} and report.skipped == {}
    assert "after + residual (conv)" in str(report)
    block = converted[0]
    assert isinstance(block, fx.GraphModule) and isinstance(block.bn, bnbench.BatchNormAct2d)
    assert _adds(block) == []  # the sum is inside the fused layer now
    (call,) = [n for n in block.graph.nodes if n.target is fused_residual]  # bn(x, r), guarded (see below)
    assert [a.target for a in call.args] == ["bn", "x", "conv"]
    _assert_same_training_step(model, converted, x)  # gradients reach the residual's conv through the fused layer
    model.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


class Unsafe(nn.Module):
    """BatchNorms feeding sums that must not fuse, one per reason."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("reused", "sum_reused", "alpha", "broadcast", "promoted", "into_r", "constant", "no_act"):
            self.add_module(name, nn.BatchNorm2d(3))
        self.shift = nn.Parameter(torch.zeros(3, 1, 1))

    def forward(self, x):
        z = self.reused(x)
        x = F.relu(z + x) * z
        s = self.sum_reused(x) + x
        x = F.relu(s) + s
        x = F.relu(torch.add(self.alpha(x), x, alpha=2))
        x = F.relu(self.broadcast(x) + self.shift)  # (3, 1, 1) against (N, 3, H, W)
        x = F.relu(self.promoted(x) + x.double()).float()
        r = x * 1.0
        x = F.relu(r.add_(self.into_r(x))) + r  # r.add_ writes the sum into r, which is used again
        x = F.relu(self.constant(x) + 1.0)
        return self.no_act(x) + x


def test_unsafe_residual_patterns_are_left_alone_with_reasons(seed):
    model = Unsafe()
    converted, report = convert_bn_act(model, backend="torch", example_inputs=torch.randn(2, 3, 2, 2),
                                       return_report=True)  # fmt: skip
    assert report.converted == {} and report.with_residual == {}
    why = report.skipped
    assert "2 uses" in why["reused"]
    assert "sum has 2 uses" in why["sum_reused"]
    assert "alpha=2" in why["alpha"]
    assert "(3, 1, 1)" in why["broadcast"] and "broadcasts" in why["broadcast"]
    assert "torch.float64" in why["promoted"] and "promotes" in why["promoted"]
    assert "in place into the residual" in why["into_r"]
    assert "constant 1.0" in why["constant"]
    assert "whose sum feeds output, not a supported activation" in why["no_act"]
    assert type(converted) is Unsafe  # nothing rewritten


def test_without_example_inputs_a_residual_add_is_skipped_saying_how_to_fuse_it():
    model = nn.Sequential(Residual("out += r"))
    converted, report = convert_bn_act(model, backend="torch", return_report=True)
    assert report.converted == {}
    assert "example_inputs" in report.skipped["0.bn"] and "residual add" in report.skipped["0.bn"]
    assert type(converted[0]) is Residual


def test_example_inputs_that_do_not_fit_the_model_raise():
    with pytest.raises(ValueError, match="example_inputs: the model's forward failed"):
        convert_bn_act(nn.Sequential(Residual("out += r")), example_inputs=torch.randn(2, 5, 4, 4))


class Optional(nn.Module):
    """A block the example forward never reaches: its residual's shape is unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
        self.unused = Residual("out += r")

    def forward(self, x):
        return self.used(x)


def test_a_block_the_example_never_runs_is_skipped():
    _, report = convert_bn_act(Optional(), backend="torch", example_inputs=torch.randn(4, 3), return_report=True)
    assert report.converted == {"used.0": "relu"}
    assert "never called in the example forward" in report.skipped["unused.bn"]


def test_the_example_forward_leaves_the_model_untouched(seed):
    model = _randomise(nn.Sequential(Residual("out += r")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_bn_act(model, inplace=True, backend="torch", example_inputs=torch.randn(2, 3, 4, 4))
    for key, value in converted.state_dict().items():  # running statistics and num_batches_tracked unchanged
        assert torch.equal(value, before[key]), key


class TwoBatchNormSum(nn.Module):
    """relu(bn_a(x) + bn_b(x)): one BatchNorm takes the other's output as its residual, which fuses alone."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn_a(x) + self.bn_b(x * 2))


def test_a_batchnorm_that_is_the_residual_is_converted_without_activation(seed):
    model = _randomise(TwoBatchNormSum())
    x = torch.randn(2, 3, 3, 3)
    converted, report = convert_bn_act(model, backend="torch", example_inputs=x, return_report=True)
    assert report.converted == {"bn_a": "relu", "bn_b": "identity"}
    assert report.with_residual == {"bn_a": "bn_b"} and report.residual_of == {"bn_b": "bn_a"}
    assert converted.bn_b.activation is bnbench.Activation.IDENTITY
    assert "(the residual of bn_a)" in str(report)
    _assert_same_training_step(model, converted, x)


# --- whole networks ---------------------------------------------------------------------------------------------

#: every BatchNorm, and how they fuse: (all, + activation, + residual add + activation, alone as a residual)
RESNET_COUNTS = {"resnet18": (20, 9, 8, 3), "resnet50": (53, 33, 16, 4)}


def _check_fully_converted(model: nn.Module, name: str, x: torch.Tensor) -> None:
    converted, report = convert_bn_act(model, backend="torch", example_inputs=x, return_report=True)
    total, plain, with_residual, alone = RESNET_COUNTS[name]
    assert report.skipped == {}, report.skipped
    assert len(report.converted) == total
    assert len(report.with_residual) == with_residual and len(report.residual_of) == alone
    assert sum(act == "relu" for act in report.converted.values()) == plain + with_residual
    assert all(k.endswith("bn2" if name == "resnet18" else "bn3") for k in report.with_residual)
    assert all(k.endswith("downsample.1") for k in report.residual_of)
    assert set(report.with_residual.values()) <= {"x", "downsample"}
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert list(converted.state_dict()) == list(model.state_dict())
    _assert_same_training_step(model, converted, x)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_the_project_resnets_convert_every_batchnorm(seed, name):
    """Batch 2 at 16x16, the smallest input whose every BatchNorm still sees 2 values per channel in training (stages
    3 and 4 run at 1x1): what a forward runs does not depend on the size, and the shapes of the residual adds match
    at any size. ResNet-50 on a loaded 2-core CPU: a few seconds (32x32 took 30 s)."""
    model = _randomise(getattr(resnet, name)(num_classes=5))
    _check_fully_converted(model, name, torch.randn(2, 3, 16, 16))


@pytest.mark.skipif(not torchvision_available(), reason="torchvision does not import here (not installed, or built "
                    "for another torch); the project's ResNets above are checked against its layout")  # fmt: skip
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnets_convert_every_batchnorm(seed, name):
    import torchvision.models

    model = _randomise(getattr(torchvision.models, name)(weights=None, num_classes=5))
    _check_fully_converted(model, name, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("network", [small.SmallCNN, small.SmallMLP])
def test_the_small_networks_convert_every_batchnorm(seed, network):
    model = _randomise(network(num_classes=4))
    x = torch.randn(3, 3, 32, 32) if network is small.SmallCNN else torch.randn(3, 3, 8, 8)
    converted, report = convert_bn_act(model, backend="torch", example_inputs=x, return_report=True)
    assert report.skipped == {} and len(report.with_residual) == 1
    _assert_same_training_step(model, converted, x)


# --- the Triton path ----------------------------------------------------------------------------------------------


def test_block_runs_the_triton_residual_path(seed, launches):
    model = _randomise(nn.Sequential(Residual("out += r")))
    x = torch.randn(2, 3, 3, 2)
    converted, report = convert_bn_act(model, backend="triton", example_inputs=x, return_report=True)
    assert report.with_residual == {"0.bn": "conv"}
    assert sum(launches.values()) == 0  # converting launches nothing (the example ran on a copy, eagerly)
    _assert_same_training_step(model, converted, x)
    assert launches["fwd_train"] == 1 and launches["bwd"] + launches["bwd_from_output"] == 1


def test_memory_saving_leaves_a_residual_add_alone():
    model = nn.Sequential(Residual("out += r"))
    _, report = convert_bn_act(model, backend="torch", memory_saving=True, example_inputs=torch.randn(2, 3, 2, 2),
                               return_report=True)  # fmt: skip
    assert report.converted == {} and "memory_saving=True does not take a residual" in report.skipped["0.bn"]


class KeywordCaller(nn.Module):
    """Calls its residual block with a keyword argument: the recorded call cannot be replayed positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Residual("out += r")

    def forward(self, x):
        return self.block(x=x)


def test_a_block_called_with_keywords_is_skipped_saying_so():
    _, report = convert_bn_act(KeywordCaller(), backend="torch", example_inputs=torch.randn(2, 3, 2, 2),
                               return_report=True)  # fmt: skip
    assert report.converted == {} and "called with keyword arguments (x)" in report.skipped["block.bn"]


# --- what the example forward could not show (found by review) --------------------------------------------------


class AliasedResidual(nn.Module):
    """``r += bn(x)`` where r has another name used after the add: fx records the in-place add as ``r + bn(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        r = x * 1.0
        keep = r
        r += self.bn(x)
        return F.relu(r), keep


def test_a_residual_used_after_the_add_is_left_alone(seed):
    model = _randomise(AliasedResidual())
    x = torch.randn(2, 3, 2, 2)
    converted, report = convert_bn_act(model, backend="torch", example_inputs=x, return_report=True)
    assert report.converted == {} and "used after the add" in report.skipped["bn"]
    for got, want in zip(converted(x), model(x), strict=True):
        torch.testing.assert_close(got, want)


class Shifted(nn.Module):
    """A residual parameter that broadcasts over the batch: the same shape as bn(x) only at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.pos = nn.Parameter(torch.randn(1, 3, 2, 2))

    def forward(self, x):
        return F.relu(self.bn(x) + self.pos)


def test_a_residual_that_broadcasts_beyond_the_example_batch_runs_unfused(seed):
    model = _randomise(Shifted())
    converted, report = convert_bn_act(model, backend="torch", example_inputs=torch.randn(1, 3, 2, 2),
                                       return_report=True)  # fmt: skip
    assert report.with_residual == {"bn": "pos"}  # batch 1: the shapes matched
    _assert_same_training_step(model, converted, torch.randn(4, 3, 2, 2))  # batch 4: pos broadcasts


def test_a_converted_block_under_autocast_keeps_eager_s_promotion(seed):
    """Under autocast a block fed float32 adds the bfloat16 BatchNorm output to a float32 identity (eager
    promotes the sum); the fused layer takes a residual of its input's dtype only, so that call runs unfused."""
    from bnbench.models.resnet import BasicBlock

    model = _randomise(BasicBlock(3, 3))
    x = torch.randn(2, 3, 4, 4)
    converted = convert_bn_act(copy.deepcopy(model), backend="torch", example_inputs=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), converted(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 convolutions: the same ops, in one order
