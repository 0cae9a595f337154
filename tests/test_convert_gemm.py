"""The fused layers' state_dict and loaders, bias folding, and convert_linear_bn_act.

Most of these compare the torch backend (the reference path) with the original modules: they are about
structure and BatchNorm semantics; the kernels are checked in tests/test_linear_bn.py. One test runs a
converted model on the Triton path (under the interpreter on CPU). Shapes are small; 37 rows is not a multiple
of the interpreter's 16-row tile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnbench
from bnbench.convert_gemm import convert_linear_bn_act
from bnbench.testing import rel_err, tolerance


def _randomise(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 1.5)


def test_state_dict_is_the_plain_sequentials_both_ways():
    fused = bnbench.LinearBatchNormAct(20, 19, activation="gelu", backend="torch")
    plain = nn.Sequential(nn.Linear(20, 19, bias=False), nn.BatchNorm1d(19), nn.GELU())
    assert list(fused.state_dict()) == list(plain.state_dict())
    _randomise(plain[1])
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(37, 20)
    assert torch.equal(fused(x), plain(x))
    conv = bnbench.Conv1x1BatchNormAct2d(8, 6, stride=2, backend="torch")
    plain_conv = nn.Sequential(nn.Conv2d(8, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    plain_conv.load_state_dict(conv.state_dict())  # and the other way
    assert list(conv.state_dict()) == list(plain_conv.state_dict())


def test_from_modules_shares_the_tensors_and_checks_what_it_gets():
    linear, bn = nn.Linear(20, 19, bias=False), nn.BatchNorm1d(19)
    fused = bnbench.LinearBatchNormAct.from_modules(linear, bn, nn.LeakyReLU(0.2))
    assert fused.linear.weight is linear.weight and fused.bn.running_var is bn.running_var
    assert (fused.activation.value, fused.activation_param) == ("leaky_relu", 0.2)
    with pytest.raises(ValueError, match="19 output features but the BatchNorm has 7"):
        bnbench.LinearBatchNormAct.from_modules(linear, nn.BatchNorm1d(7))
    with pytest.raises(TypeError, match="an exact BatchNorm1d, got BatchNorm2d"):
        bnbench.LinearBatchNormAct.from_modules(linear, nn.BatchNorm2d(19))
    with pytest.raises(ValueError, match="kernel_size"):
        bnbench.Conv1x1BatchNormAct2d.from_modules(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="padding"):
        bnbench.Conv1x1BatchNormAct2d.from_modules(nn.Conv2d(4, 6, 1, padding=1), nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="not an activation"):
        bnbench.LinearBatchNormAct.from_modules(linear, bn, nn.Softmax(dim=1))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_matmul_bias_folds_away_exactly_in_training_and_eval(momentum):
    """BN(Wx + b) = BN(Wx) in training (the batch mean absorbs b), and with running_mean - b in place of
    running_mean every later running update and the eval output are the same: shown over three steps."""
    linear, bn = nn.Linear(20, 19, bias=True), nn.BatchNorm1d(19, momentum=momentum)
    _randomise(bn)
    with torch.no_grad():
        linear.bias.normal_(0, 3.0)  # large, so a missed shift would show
    plain = nn.Sequential(linear, bn, nn.SiLU())
    fused = bnbench.LinearBatchNormAct.from_modules(  # copies: from_modules shares the tensors it is given
        copy.deepcopy(linear), copy.deepcopy(bn), nn.SiLU(), backend="torch"
    )
    assert linear.bias is not None and "0.bias" not in fused.state_dict()  # the given modules are untouched
    rm_before = bn.running_mean.clone()
    assert torch.allclose(fused.bn.running_mean, rm_before - linear.bias.detach())
    for step in range(3):
        x = torch.randn(37, 20) + step
        assert rel_err(fused(x), plain(x)) < tolerance(torch.float32), step
        assert torch.allclose(fused.bn.running_mean, bn.running_mean - linear.bias.detach(), atol=1e-5)
        assert rel_err(fused.bn.running_var, bn.running_var) < 1e-6
    fused.eval()
    plain.eval()
    x = torch.randn(37, 20)
    assert rel_err(fused(x), plain(x)) < tolerance(torch.float32)


def _mlp():
    return nn.Sequential(
        nn.Linear(20, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.GELU(approximate="tanh"),
        nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16),  # BN followed by a non-activation: identity
        nn.Linear(16, 5),
    )  # fmt: skip


def test_convert_an_mlp_matches_the_original_and_reports_renamed_keys():
    model = _mlp()
    for m in model:
        if isinstance(m, nn.BatchNorm1d):
            _randomise(m)
    converted, report = convert_linear_bn_act(model, backend="torch", return_report=True)
    assert list(report.converted) == ["1", "4", "7"]
    assert report.converted["4"] == "Linear+BatchNorm1d+gelu_tanh (bias folded)"
    assert report.converted["7"] == "Linear+BatchNorm1d+identity"
    assert report.renamed["1."] == "0.1." and report.renamed["0."] == "0.0."
    assert [type(m).__name__ for m in converted] == ["LinearBatchNormAct", "Identity", "Identity"] * 2 + [
        "LinearBatchNormAct", "Identity", "Linear"]  # fmt: skip
    for training in (True, False):
        model.train(training)
        converted.train(training)
        x = torch.randn(37, 20)
        assert rel_err(converted(x), model(x)) < tolerance(torch.float32), training
    assert "renamed" in str(report)


def test_convert_a_whole_conv_block_keeps_every_state_dict_key_and_runs_on_triton():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # else the interpreter
    block = nn.Sequential(nn.Conv2d(8, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    _randomise(block[1])
    model = nn.Sequential(block, nn.Conv2d(6, 4, 3)).to(device)
    converted, report = convert_linear_bn_act(model, backend="triton", return_report=True)
    assert isinstance(converted[0], bnbench.Conv1x1BatchNormAct2d) and report.renamed == {}
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 8, 7, 7, device=device).to(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(allow_tf32=False):  # the fused matmul is exact fp32; so must the conv be
        assert rel_err(converted(x), model(x)) < tolerance(torch.float32)
    assert torch.allclose(converted[0].bn.running_var, block[1].running_var, rtol=1e-5)


def test_what_convert_leaves_alone_and_why():
    shared = nn.Linear(16, 16, bias=False)
    hooked = nn.Linear(16, 16, bias=False)
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),  # 3x3 conv
        nn.Sequential(shared, nn.BatchNorm1d(16), shared),  # the Linear is used twice
        nn.Sequential(hooked, nn.BatchNorm1d(16)),
        nn.BatchNorm1d(16),  # after a Sequential, not a matmul
    )  # fmt: skip
    _, report = convert_linear_bn_act(model, return_report=True)
    assert report.converted == {}
    assert "not a plain 1x1 matmul" in report.skipped["1"]
    assert "registered more than once" in report.skipped["3.1"]
    assert "hooks" in report.skipped["4.1"]
    assert "not directly after" in report.skipped["5"]


def test_convert_skips_layers_already_fused_and_bn_act_conversion_leaves_them_alone():
    model = nn.Sequential(bnbench.LinearBatchNormAct(4, 4, backend="torch"), nn.Linear(4, 4))
    converted, report = convert_linear_bn_act(model, return_report=True)
    assert report.converted == {} and report.skipped == {}
    assert isinstance(converted[0], bnbench.LinearBatchNormAct)
    again, bn_report = bnbench.convert_bn_act(converted, return_report=True)
    assert isinstance(again[0], bnbench.LinearBatchNormAct) and bn_report.converted == {}
