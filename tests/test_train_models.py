"""The training models: same initial weights with and without BN, side-effect-free probes, input checks."""

from __future__ import annotations

import pytest
import torch

from bnbench.modules import BatchNormAct1d
from bnbench.train.models import build_model, init_weights


def _mlp(norm: str, seed: int = 3, init: str = "xavier"):
    model = build_model("mlp", in_shape=(1, 8, 8), n_classes=10, depth=3, width=7, activation="sigmoid", norm=norm)
    init_weights(model, init, seed)
    return model


@pytest.mark.parametrize("init", ["pytorch", "xavier", "kaiming", "normal"])
def test_same_initial_weights_with_and_without_bn(init):
    """The paper compares the two networks from the same initial weights; the BN net has no linear biases, so
    weights must not depend on how many random numbers biases would have consumed."""
    plain, eager, fused = (_mlp(n, init=init) for n in ("none", "eager", "fused"))
    for a, b, c in zip(plain.blocks, eager.blocks, fused.blocks, strict=True):
        torch.testing.assert_close(a.layer.weight, b.layer.weight, rtol=0, atol=0)
        torch.testing.assert_close(a.layer.weight, c.layer.weight, rtol=0, atol=0)
    assert plain.blocks[0].layer.bias is not None and eager.blocks[0].layer.bias is None
    assert isinstance(fused.blocks[0].bn, BatchNormAct1d)
    assert not torch.equal(_mlp("none", seed=4).blocks[0].layer.weight, plain.blocks[0].layer.weight)


def test_init_scales():
    """Xavier std is sqrt(2/(fan_in+fan_out)); 64x7 weights: the sample std lands within 20% of it."""
    w = _mlp("none", init="xavier").blocks[0].layer.weight
    assert abs(w.std().item() / (2 / (64 + 7)) ** 0.5 - 1) < 0.2
    w = _mlp("none", init="pytorch").blocks[0].layer.weight
    assert w.abs().max().item() <= 1 / 64**0.5


def test_eager_and_fused_forward_agree():
    eager, fused = _mlp("eager"), _mlp("fused")
    x = torch.rand(16, 1, 8, 8)
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)


def test_probe_has_no_side_effects_and_matches_forward():
    model = _mlp("eager")
    model.train()
    model(torch.rand(32, 1, 8, 8))  # move the running statistics off their initial values
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(20, 1, 8, 8)
    *zs, logits = model.probe(x)
    assert [tuple(z.shape) for z in zs] == [(20, 7)] * 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(model.head(torch.sigmoid(zs[-1])), model(x))
    torch.testing.assert_close(logits, model(x))
    # batch statistics: what train mode computes, and still no update of the running statistics
    batch_logits = model.probe(x, batch_stats=True)[-1]
    model.train()
    torch.testing.assert_close(batch_logits, model(x))
    model.eval()
    assert not torch.equal(batch_logits, logits)


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm", "noisy"])
def test_other_norms_keep_the_initial_weights_and_train(norm):
    plain, other = _mlp("none"), _mlp(norm)
    torch.testing.assert_close(plain.blocks[1].layer.weight, other.blocks[1].layer.weight, rtol=0, atol=0)
    x = torch.rand(16, 1, 8, 8)
    other(x).sum().backward()
    assert all(b.layer.weight.grad is not None for b in other.blocks)
    assert other.blocks[0].layer.bias is None


def test_noisy_bn_adds_noise_in_training_only():
    model = build_model("mlp", in_shape=(1, 8, 8), n_classes=10, depth=2, width=7, activation="relu",
                        norm="noisy", noise=1.0)  # fmt: skip
    init_weights(model, "auto", 0)
    x = torch.rand(16, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))  # a fresh scale and shift every step
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_dropout_after_each_hidden_layer():
    model = build_model("mlp", in_shape=(1, 8, 8), n_classes=10, depth=2, width=50, activation="relu",
                        norm="eager", dropout=0.5)  # fmt: skip
    init_weights(model, "auto", 0)
    model.train()
    h = model.blocks[0](model.prepare(torch.rand(16, 1, 8, 8)))
    assert 0.3 < (h == 0).double().mean().item() < 0.9  # relu zeros plus dropped units


def test_auto_init_is_he_for_relu_and_glorot_for_sigmoid():
    for act, std in (("relu", (2 / 64) ** 0.5), ("sigmoid", (2 / (64 + 50)) ** 0.5)):
        model = build_model("mlp", in_shape=(1, 8, 8), n_classes=10, depth=1, width=50, activation=act, norm="none")
        init_weights(model, "auto", 0)
        assert abs(model.blocks[0].layer.weight.std().item() / std - 1) < 0.1, act


def test_cnn_channels_last_and_downsampling():
    model = build_model(
        "cnn", in_shape=(1, 8, 8), n_classes=10, depth=3, width=4, activation="relu", norm="eager", channels_last=True
    )
    init_weights(model, "kaiming", 0)
    x = torch.rand(6, 1, 8, 8)
    assert model.prepare(x).is_contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (6, 10)
    assert [b.layer.stride for b in model.blocks] == [(1, 1), (2, 2), (1, 1)]  # 8x8 -> 4x4, then no further


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "rnn"}, "unknown model"),
        ({"norm": "layer"}, "unknown norm"),
        ({"depth": 0}, "depth"),
        ({"activation": "leaky_relu"}, "leaky_relu"),
        ({"activation": "swish"}, "unknown activation"),
        ({"channels_last": True}, "channels_last"),
        ({"dropout": 1.0}, "dropout"),
        ({"noise": 1.0}, "noise"),
    ],
)
def test_build_errors(kwargs, match):
    args = {"kind": "mlp", "in_shape": (1, 8, 8), "n_classes": 10, "depth": 2, "width": 4, "activation": "relu",
            "norm": "none"} | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=match):
        build_model(**args)
