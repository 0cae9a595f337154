"""Cases, presets and the parsing of the sweep axes (pure data: no tensors)."""

from __future__ import annotations

import pytest

from bnbench.bench import cases as c
from bnbench.bench.bytes_model import bytes_min, frac_of_copy, gbps


def test_parse_spatial_one_means_bn1d_and_hxw_bn2d():
    assert c.parse_spatial("1,28x28,7,7X5") == [None, (28, 28), (7, 7), (7, 5)]


@pytest.mark.parametrize("text", ["0", "28x", "x28", "28x28x2", "a", "1,,2"])
def test_parse_spatial_rejects_bad_values_naming_them(text):
    with pytest.raises(ValueError, match="--spatial"):
        c.parse_spatial(text)


def test_parse_ints_names_the_bad_values():
    assert c.parse_ints("64, 256") == [64, 256]
    with pytest.raises(ValueError, match=r"'-3'.*'x'"):
        c.parse_ints("64,-3,x", "--batch")


def test_parse_names_accept_aliases_and_reject_unknown():
    assert c.parse_dtypes("fp32,bfloat16,half") == ["fp32", "bf16", "fp16"]
    assert c.parse_layouts("contiguous,nhwc") == ["nchw", "channels_last"]
    assert c.parse_passes("fwd+bwd,eval") == ["fwd_bwd", "eval"]
    assert c.parse_activations("ReLU,gelu") == ["relu", "gelu"]
    for parse, bad in ((c.parse_dtypes, "fp8"), (c.parse_passes, "backward"), (c.parse_layouts, "nhcw")):
        with pytest.raises(ValueError, match=bad):
            parse(bad)
    with pytest.raises(ValueError, match="swish"):
        c.parse_activations("relu,swish")


def test_case_columns_and_shape():
    case = c.Case("bn2d", "fwd_bwd", "relu", "bf16", "channels_last", 128, 256, 28, 28)
    cols = case.columns()
    assert (cols["S"], cols["shape"], cols["numel"], cols["bn_mode"]) == (
        784,
        "128x256x28x28",
        128 * 256 * 784,
        "train",
    )
    assert c.Case("bn1d", "eval", "relu", "fp32", "nchw", 1, 8).bn_mode == "eval"  # eval allows one row per channel


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(op="bn1d", layout="channels_last"), "channels_last"),  # a 2-D tensor has no channels_last form
        (dict(pass_="backward"), "unknown pass"),
        (dict(dtype="fp64"), "unknown dtype"),
        (dict(N=0), "positive"),
        (dict(N=1, H=1, W=1, op="bn1d"), "more than 1 value"),  # training needs N*S >= 2
        (dict(activation="swish"), "swish"),
    ],
)
def test_case_rejects_impossible_values(kwargs, match):
    base = dict(op="bn2d", pass_="fwd", activation="relu", dtype="fp32", layout="nchw", N=4, C=8, H=2, W=2)
    with pytest.raises(ValueError, match=match):
        c.Case(**{**base, **kwargs})


def test_grid_drops_channels_last_for_bn1d_and_deduplicates():
    cases = c.grid([2, 2], [8], [None, (4, 4)], ["fp32"], ["relu"], ["fwd"], ["nchw", "channels_last"])
    assert [(x.op, x.layout) for x in cases] == [("bn1d", "nchw"), ("bn2d", "nchw"), ("bn2d", "channels_last")]


def test_quick_preset_is_small_and_has_both_layouts():
    quick = c.preset_cases("quick")
    assert len(quick) == len(set(quick)) == 12  # sized for ~2 minutes on 2 CPU cores with compile
    assert {x.layout for x in quick if x.op == "bn2d"} == {"nchw", "channels_last"}
    assert max(x.numel for x in quick) <= 1 << 20


def test_baseline_preset_is_the_measuring_md_baseline_table_and_standard_holds_it():
    baseline = c.preset_cases("baseline")
    have = {(x.shape_str, x.dtype, x.pass_, x.layout) for x in baseline}
    expected = {
        (shape, dtype, p, "nchw")
        for shape in ("256x1024", "32768x1024", "262144x256", "401408x64", "16384x8192")
        for dtype in ("fp32", "bf16")
        for p in ("fwd", "fwd_bwd")
    } | {
        ("128x256x28x28", d, p, lay)
        for d in ("fp32", "bf16")
        for p in ("fwd", "fwd_bwd")
        for lay in ("nchw", "channels_last")
    }
    assert have == expected and len(baseline) == len(expected)  # the 7 x 2 x 2 table, nothing else
    std = c.preset_cases("standard")
    assert set(baseline) <= set(std) and len(std) > len(baseline)
    assert len(std) == len(set(std))


#: ResNet-50 (v1.5) BN layers as (C, H=W, activation after the BN, count), worked out by hand from the
#: architecture: stem 64 at 112x112; each stage's first block reduces 1x1 at the input resolution, strides in
#: the 3x3, expands 4x, and its downsample branch has its own BN; bn3 and the downsample BNs feed the residual add
#: (op, C, H, activation, count): the last BatchNorm of each bottleneck is fused with the residual add (bn2d_add),
#: the downsample's runs alone (identity), as convert_bn_act converts ResNet-50
RESNET50_BN_LAYERS = (
    ("bn2d", 64, 112, "relu", 1), ("bn2d", 64, 56, "relu", 6), ("bn2d_add", 256, 56, "relu", 3),
    ("bn2d", 256, 56, "identity", 1),
    ("bn2d", 128, 56, "relu", 1), ("bn2d", 128, 28, "relu", 7), ("bn2d_add", 512, 28, "relu", 4),
    ("bn2d", 512, 28, "identity", 1),
    ("bn2d", 256, 28, "relu", 1), ("bn2d", 256, 14, "relu", 11), ("bn2d_add", 1024, 14, "relu", 6),
    ("bn2d", 1024, 14, "identity", 1),
    ("bn2d", 512, 14, "relu", 1), ("bn2d", 512, 7, "relu", 5), ("bn2d_add", 2048, 7, "relu", 3),
    ("bn2d", 2048, 7, "identity", 1),
)  # fmt: skip


def test_resnet50_preset_is_read_off_the_model_and_covers_its_53_bn_layers():
    from bnbench.bench.model_cases import model_call_table

    table = model_call_table("resnet50")
    got = sorted((g["op"], int(g["sample_shape"].split("x")[0]), int(g["sample_shape"].split("x")[1]),
                  g["activation"], g["count"]) for g in table["calls"])  # fmt: skip
    assert got == sorted(RESNET50_BN_LAYERS)
    assert sum(count for *_, count in RESNET50_BN_LAYERS) == 53
    cases = c.preset_cases("resnet50")
    assert {x.N for x in cases} == {64, 128, 256}
    assert {x.layout for x in cases} == {"channels_last"} and {x.dtype for x in cases} == {"bf16", "fp32"}
    assert len(cases) == len(RESNET50_BN_LAYERS) * 3 * 2 * 2
    assert {(x.op, x.C, x.H, x.activation) for x in cases} == {(op, C, H, a) for op, C, H, a, _ in RESNET50_BN_LAYERS}
    assert {x.family for x in cases if x.op == "bn2d_add"} == {"bn_add_act"}  # measured with a residual


def test_select_cases_filters_a_preset_or_builds_a_grid():
    assert c.select_cases(None) == c.preset_cases("quick")
    filtered = c.select_cases("quick", passes=["fwd"], spatial=[None])
    assert filtered and all(x.pass_ == "fwd" and x.op == "bn1d" for x in filtered)
    built = c.select_cases(None, batch=[64], dtypes=["bf16"])
    assert {(x.N, x.C, x.dtype) for x in built} == {(64, 256, "bf16")}  # other axes from GRID_DEFAULTS
    with pytest.raises(ValueError, match="no benchmark case"):
        c.select_cases("quick", batch=[3])
    with pytest.raises(ValueError, match="unknown preset"):
        c.select_cases("huge")


def test_bytes_model_passes_and_units():
    T = 256 * 1024 * 2  # one bf16 tensor of 256x1024
    assert [bytes_min(p, 256 * 1024, "bf16") for p in ("fwd", "bwd", "fwd_bwd", "eval")] == [2 * T, 3 * T, 5 * T, 2 * T]
    assert bytes_min("fwd", 10, "fp32") == 80
    assert gbps(1e9, 1.0) == pytest.approx(1000.0)  # 1 GB in 1 ms is 1000 GB/s
    assert gbps(1e9, 0.0) != gbps(1e9, 0.0)  # NaN: no time, no rate
    assert frac_of_copy(500.0, 1000.0) == 0.5
    with pytest.raises(ValueError, match="unknown pass"):
        bytes_min("bwd_fwd", 10, "fp32")
    with pytest.raises(ValueError, match="unknown dtype"):
        bytes_min("fwd", 10, "int8")
