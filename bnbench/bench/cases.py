"""Benchmark cases: what one point measures, the presets, and parsing of the sweep axes given on the command line.

A :class:`Case` is one (op, pass, activation, dtype, layout, N, C, H, W); a point is a case times a provider. A
:class:`ResidualCase` is the same with a residual added before the activation (``bench --op bn_add_act``).
Everything here is plain data: no tensors are made and no device is touched (the ``resnet50`` preset runs the
network on one CPU input, its BatchNorms replaced by probes, to read their shapes).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import ClassVar

from bnbench.activations import parse_activation
from bnbench.schema import DTYPE_ALIASES, DTYPES, POINT_KEY

__all__ = [
    "BN_OPS",
    "GRID_DEFAULTS",
    "LAYOUTS",
    "PASSES",
    "PRESETS",
    "Case",
    "ResidualCase",
    "filter_cases",
    "grid",
    "parse_activations",
    "parse_dtypes",
    "parse_ints",
    "parse_layouts",
    "parse_passes",
    "parse_spatial",
    "preset_cases",
    "select_cases",
    "with_ops",
]

#: the BatchNorm ops of ``bnbench bench --op``: act(BN(x)) and act(BN(x) + residual); the matmul ops are elsewhere
BN_OPS = ("bn_act", "bn_add_act")

#: fwd: training forward (updates running stats); bwd: backward only, given a saved forward; eval: running stats
PASSES = ("fwd", "bwd", "fwd_bwd", "eval")
#: "nchw" is the default contiguous layout (for 2-D input: row-major (N, C)); channels_last applies to 4-D input
LAYOUTS = ("nchw", "channels_last")
_LAYOUT_ALIASES = {"contiguous": "nchw", "nhwc": "channels_last", "cl": "channels_last"}


@dataclasses.dataclass(frozen=True, order=True)
class Case:
    """One benchmark case. ``H == W == 1`` with ``spatial_dims == 0`` is BatchNorm1d on (N, C) input."""

    #: the op family (``bnbench bench --op``): BatchNorm + activation here; the matmul ops have their own case
    #: class (bnbench.bench.gemm_workload.MatmulCase). Not a dataclass field: rows and keys are unchanged.
    family: ClassVar[str] = "bn_act"
    #: the values of ``op``: BatchNorm1d on (N, C), BatchNorm2d on (N, C, H, W)
    OPS: ClassVar[tuple[str, str]] = ("bn1d", "bn2d")
    op: str  # OPS[0] (N, C) or OPS[1] (N, C, H, W)
    pass_: str
    activation: str
    dtype: str
    layout: str
    N: int
    C: int
    H: int = 1
    W: int = 1

    def __post_init__(self) -> None:
        if self.op not in self.OPS:
            raise ValueError(f"op must be {self.OPS[0]!r} or {self.OPS[1]!r}, got {self.op!r}")
        if self.pass_ not in PASSES:
            raise ValueError(f"unknown pass {self.pass_!r}; valid passes are: {', '.join(PASSES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid dtypes are: {', '.join(DTYPES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid layouts are: {', '.join(LAYOUTS)}")
        if self.is_1d and (self.H, self.W, self.layout) != (1, 1, "nchw"):
            raise ValueError(f"a {self.op} case has no spatial size or channels_last layout, got {self}")
        for name in ("N", "C", "H", "W"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Case.{name} must be a positive integer, got {value!r}")
        if self.training and self.N * self.S < 2:
            raise ValueError(f"a training pass needs more than 1 value per channel, got N={self.N}, S={self.S}")
        parse_activation(self.activation)

    @property
    def is_1d(self) -> bool:
        """BatchNorm1d on (N, C) input."""
        return self.op == self.OPS[0]

    @property
    def S(self) -> int:
        return self.H * self.W

    @property
    def training(self) -> bool:
        return self.pass_ != "eval"

    @property
    def bn_mode(self) -> str:
        return "train" if self.training else "eval"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.N, self.C) if self.is_1d else (self.N, self.C, self.H, self.W)

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def needs_grad(self) -> bool:
        """Training passes run with autograd on (as in training, even for fwd alone); eval runs under no_grad."""
        return self.training

    def label(self) -> str:
        layout = "" if self.is_1d else f" {self.layout}"
        return f"{self.pass_} {self.dtype} {self.activation} {self.shape_str}{layout}"

    def columns(self) -> dict[str, object]:
        """The case columns of a results row (see bnbench.schema.BENCH_COLUMNS)."""
        return {
            "op": self.op, "pass": self.pass_, "activation": self.activation, "bn_mode": self.bn_mode,
            "dtype": self.dtype, "layout": self.layout, "N": self.N, "C": self.C, "S": self.S,
            "shape": self.shape_str, "numel": self.numel,
        }  # fmt: skip

    def key(self) -> tuple[str, str, str, str, str, str]:
        """What identifies the case in a results file: its :data:`bnbench.schema.POINT_KEY` columns, as text."""
        columns = self.columns()
        return tuple(str(columns[c]) for c in POINT_KEY)

    def with_residual(self) -> ResidualCase:
        """The same case with a residual added before the activation."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ResidualCase(**{**fields, "op": ResidualCase.OPS[0 if self.is_1d else 1]})


@dataclasses.dataclass(frozen=True, order=True)
class ResidualCase(Case):
    """act(BN(x) + residual), the tail of a ResNet block: the residual has x's shape, dtype and layout, and its
    gradient is an output of the backward. Its ops are ``bn1d_add`` and ``bn2d_add``, so its rows and keys never
    meet a :class:`Case`'s of the same shape."""

    family: ClassVar[str] = "bn_add_act"
    OPS: ClassVar[tuple[str, str]] = ("bn1d_add", "bn2d_add")

    def label(self) -> str:
        return f"+residual {super().label()}"


def _case(N: int, C: int, spatial: tuple[int, int] | None, dtype: str, activation: str, pass_: str, layout: str):
    """A Case, or None for a combination that does not exist (channels_last of a 2-D tensor)."""
    if spatial is None:
        if layout != "nchw":
            return None
        return Case("bn1d", pass_, activation, dtype, "nchw", N, C)
    return Case("bn2d", pass_, activation, dtype, layout, N, C, *spatial)


def grid(
    batch: Sequence[int],
    width: Sequence[int],
    spatial: Sequence[tuple[int, int] | None],
    dtypes: Sequence[str],
    activations: Sequence[str],
    passes: Sequence[str],
    layouts: Sequence[str],
) -> list[Case]:
    """Every combination of the axes, in order, without duplicates. A spatial entry of None means BN1d (2-D
    input); channels_last is dropped for it (a 2-D tensor has no channels_last form)."""
    cases = []
    for N, C, sp, dt, act, ps, lay in itertools.product(batch, width, spatial, dtypes, activations, passes, layouts):
        case = _case(N, C, sp, dt, act, ps, lay)
        if case is not None:
            cases.append(case)
    return _unique(cases)


def _unique(cases: Iterable[Case]) -> list[Case]:
    return list(dict.fromkeys(cases))


# --- parsing of comma lists ------------------------------------------------------------------------------------


def _items(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_ints(text: str, what: str = "--batch") -> list[int]:
    """``"64,256,1024"`` -> [64, 256, 1024]; every value a positive integer."""
    bad, values = [], []
    for item in _items(text, what):
        try:
            value = int(item)
        except ValueError:
            value = 0
        (values if value >= 1 else bad).append(value if value >= 1 else item)
    if bad:
        raise ValueError(f"{what}: expected positive integers, got {', '.join(map(repr, bad))} in {text!r}")
    return values


def parse_spatial(text: str) -> list[tuple[int, int] | None]:
    """``"1,28x28,7"`` -> [None, (28, 28), (7, 7)]. ``1`` means BatchNorm1d on (N, C) input; ``HxW`` (or a
    single size H > 1, meaning HxH) means BatchNorm2d on (N, C, H, W)."""
    out: list[tuple[int, int] | None] = []
    for item in _items(text, "--spatial"):
        parts = item.lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            dims = []
        if len(dims) not in (1, 2) or any(d < 1 for d in dims):
            raise ValueError(f"--spatial: {item!r} is not 1, a size H or HxW with positive integers (in {text!r})")
        if dims == [1]:
            out.append(None)
        else:
            out.append((dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1]))
    return out


def _parse_names(text: str, what: str, valid: Iterable[str], aliases: dict[str, str]) -> list[str]:
    valid = list(valid)
    values, bad = [], []
    for item in _items(text, what):
        name = aliases.get(item.lower(), item.lower())
        (values if name in valid else bad).append(name if name in valid else item)
    if bad:
        raise ValueError(f"{what}: unknown value(s) {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(values))


def parse_dtypes(text: str) -> list[str]:
    return _parse_names(text, "--dtype", DTYPES, DTYPE_ALIASES)


def parse_passes(text: str) -> list[str]:
    return _parse_names(text, "--pass", PASSES, {"fwd+bwd": "fwd_bwd", "fwdbwd": "fwd_bwd"})


def parse_layouts(text: str) -> list[str]:
    return _parse_names(text, "--layout", LAYOUTS, _LAYOUT_ALIASES)


def parse_activations(text: str) -> list[str]:
    values = []
    for item in _items(text, "--activation"):
        try:
            values.append(parse_activation(item)[0].value)
        except ValueError as err:
            raise ValueError(f"--activation: {err}") from None
    return list(dict.fromkeys(values))


def filter_cases(cases: Sequence[Case], **axes: Sequence | None) -> list[Case]:
    """Keep the cases whose value on each given axis is in its list. Axes: batch, width, spatial, dtypes,
    activations, passes, layouts (None = no filter)."""
    getters = {
        "batch": lambda c: c.N,
        "width": lambda c: c.C,
        "spatial": lambda c: None if c.is_1d else (c.H, c.W),
        "dtypes": lambda c: c.dtype,
        "activations": lambda c: c.activation,
        "passes": lambda c: c.pass_,
        "layouts": lambda c: c.layout,
    }
    unknown = sorted(set(axes) - set(getters))
    if unknown:
        raise ValueError(f"unknown axis name(s) {unknown}; valid: {sorted(getters)}")
    kept = list(cases)
    for name, values in axes.items():
        if values is not None:
            allowed = set(values)
            kept = [c for c in kept if getters[name](c) in allowed]
    return kept


# --- presets -----------------------------------------------------------------------------------------------------


def _quick() -> list[Case]:
    """Small enough for ~2 minutes on a 2-core CPU including torch.compile's C++ builds (a few seconds per
    case): a 2x2 batch x width grid of BN1d (for the batch/width plots) and one BN2d shape in both layouts;
    fp32, relu, training forward and forward+backward."""
    return _unique(
        grid([256, 2048], [64, 256], [None], ["fp32"], ["relu"], ["fwd", "fwd_bwd"], ["nchw"])
        + grid([16], [64], [(14, 14)], ["fp32"], ["relu"], ["fwd", "fwd_bwd"], ["nchw", "channels_last"])
    )


#: the baseline shapes of docs/measuring.md: (N, C) for BN1d and (N, C, H, W) for BN2d
BASELINE_SHAPES_1D = ((256, 1024), (32768, 1024), (262144, 256), (401408, 64), (16384, 8192))
BASELINE_SHAPES_2D = ((128, 256, 28, 28),)


def _baseline() -> list[Case]:
    """The baseline table of docs/measuring.md: its seven shapes (the 4-D one in both layouts) in fp32 and bf16,
    relu, fwd and fwd_bwd. The GPU check's headline: small enough to run with every provider in a few minutes."""
    dts, acts, passes = ["fp32", "bf16"], ["relu"], ["fwd", "fwd_bwd"]
    cases: list[Case] = []
    for N, C in BASELINE_SHAPES_1D:
        cases += grid([N], [C], [None], dts, acts, passes, ["nchw"])
    for N, C, H, W in BASELINE_SHAPES_2D:
        cases += grid([N], [C], [(H, W)], dts, acts, passes, ["channels_last", "nchw"])
    return _unique(cases)


def _standard() -> list[Case]:
    """The baseline preset, a batch sweep at width 1024 and a width sweep at batch 4096 (BN1d)."""
    dts, acts, passes = ["fp32", "bf16"], ["relu"], ["fwd", "fwd_bwd"]
    cases = _baseline()
    cases += grid([64, 256, 1024, 4096, 16384, 65536], [1024], [None], dts, acts, passes, ["nchw"])
    cases += grid([4096], [64, 128, 256, 512, 1024, 2048, 4096, 8192], [None], dts, acts, passes, ["nchw"])
    return _unique(cases)


def _resnet50() -> list[Case]:
    """Every distinct BN call of ResNet-50 (with the activation that follows it; the last of each block with its
    residual add, a ResidualCase), read off the model's forward pass as convert_bn_act fuses it
    (:mod:`bnbench.bench.model_cases`), at batch 64, 128 and 256, channels_last, bf16 and fp32, training forward
    and forward+backward."""
    from bnbench.bench.model_cases import model_cases  # runs the network on one CPU input

    return model_cases("resnet50", residual=True)  # its default axes are this preset's


PRESETS = {"quick": _quick, "baseline": _baseline, "standard": _standard, "resnet50": _resnet50}


def preset_cases(name: str) -> list[Case]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}")
    return PRESETS[name]()


#: the axis values used for an axis the command line leaves out when it builds a grid (no --preset)
GRID_DEFAULTS = {
    "batch": [256],
    "width": [256],
    "spatial": [None],
    "dtypes": ["fp32"],
    "activations": ["relu"],
    "passes": ["fwd", "fwd_bwd"],
    "layouts": ["nchw"],
}


def select_cases(preset: str | None, **axes: Sequence | None) -> list[Case]:
    """The cases of a run. With a preset, the given axes filter it; without one, given axes build a grid (the
    others from :data:`GRID_DEFAULTS`); with neither, the quick preset. An empty result raises ValueError."""
    given = {k: v for k, v in axes.items() if v is not None}
    if preset is not None:
        cases = filter_cases(preset_cases(preset), **given)
        where = f"preset {preset!r} filtered by {given}"
    elif given:
        values = {**GRID_DEFAULTS, **given}
        cases = grid(
            values["batch"], values["width"], values["spatial"], values["dtypes"], values["activations"],
            values["passes"], values["layouts"],
        )  # fmt: skip
        where = f"the grid {values}"
    else:
        cases = preset_cases("quick")
        where = "preset 'quick'"
    if not cases:
        spatial = given.get("spatial", GRID_DEFAULTS["spatial"] if preset is None else ())
        only_2d = bool(spatial) and all(sp is None for sp in spatial)
        hint = " (channels_last needs a spatial size other than 1)" if (
            set(given.get("layouts", ())) == {"channels_last"} and only_2d
        ) else ""  # fmt: skip
        raise ValueError(f"no benchmark case left in {where}{hint}")
    return cases


def with_ops(cases: Sequence[Case], ops: Sequence[str], *, from_model: bool) -> list[Case]:
    """The cases of a run measuring ``ops`` (names in :data:`BN_OPS`). A network's cases (``from_model``) are its
    BatchNorm calls, each already of its op (a BN feeding a residual add is a :class:`ResidualCase`): those of
    the ops asked are kept. Any other case is measured once per op asked."""
    unknown = [op for op in ops if op not in BN_OPS]
    if unknown:
        raise ValueError(f"unknown BatchNorm op(s) {unknown}; valid: {', '.join(BN_OPS)}")
    if from_model:
        return [case for case in cases if case.family in ops]
    return _unique(case if op == "bn_act" else case.with_residual() for case in cases for op in ops)
