"""Cases and presets of the ops ``linear_bn_act`` and ``conv1x1_bn_act`` (``bnbench bench --op``): plain data,
no tensors. The rest of these ops' benchmark (inputs, reference, providers) is :mod:`bnbench.bench.gemm_workload`.
"""

from __future__ import annotations

import dataclasses
import math

from bnbench.activations import parse_activation
from bnbench.schema import DTYPES

__all__ = [
    "GEMM_OPS",
    "GEMM_PASSES",
    "GEMM_PRESETS",
    "MLP_LINEARS",
    "RESNET50_CONV1X1",
    "MatmulCase",
    "select_gemm_cases",
]

GEMM_OPS = ("linear_bn_act", "conv1x1_bn_act")
#: the passes these ops are measured in (the bytes model has fwd and fwd_bwd)
GEMM_PASSES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True, order=True)
class MatmulCase:
    """One case: ``N`` is the batch, ``K`` the input features (channels), ``C`` the output features; ``H``/``W``
    the convolution's input size and ``stride`` its stride (1 and 1 for a Linear)."""

    op: str
    pass_: str
    activation: str
    dtype: str
    layout: str
    N: int
    K: int
    C: int
    H: int = 1
    W: int = 1
    stride: int = 1

    def __post_init__(self) -> None:
        if self.op not in GEMM_OPS:
            raise ValueError(f"op must be one of {GEMM_OPS}, got {self.op!r}")
        if self.pass_ not in GEMM_PASSES:
            raise ValueError(f"pass {self.pass_!r} is not measured for {self.op}; valid: {', '.join(GEMM_PASSES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid dtypes are: {', '.join(DTYPES)}")
        want_layout = "nchw" if self.op == "linear_bn_act" else "channels_last"
        if self.layout != want_layout:
            raise ValueError(f"{self.op} cases are measured in layout {want_layout!r}, got {self.layout!r}")
        if self.op == "linear_bn_act" and (self.H, self.W, self.stride) != (1, 1, 1):
            raise ValueError(f"a linear_bn_act case has no spatial size or stride, got {self}")
        for name in ("N", "K", "C", "H", "W", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MatmulCase.{name} must be a positive integer, got {value!r}")
        if self.rows < 2:
            raise ValueError(f"a training pass needs more than 1 value per channel, got {self.rows} rows")
        parse_activation(self.activation)

    family = property(lambda self: self.op)
    training = property(lambda self: True)
    needs_grad = property(lambda self: True)
    bn_mode = property(lambda self: "train")

    @property
    def out_hw(self) -> tuple[int, int]:
        return -(-self.H // self.stride), -(-self.W // self.stride)

    @property
    def S(self) -> int:
        return math.prod(self.out_hw)

    @property
    def rows(self) -> int:
        """M: the matmul's rows, the elements per channel BatchNorm reduces over."""
        return self.N * self.S

    @property
    def shape(self) -> tuple[int, ...]:
        """The output's shape."""
        return (self.N, self.C) if self.op == "linear_bn_act" else (self.N, self.C, *self.out_hw)

    @property
    def shape_str(self) -> str:
        if self.op == "linear_bn_act":
            return f"{self.N}x{self.K}->{self.C}"
        return f"{self.N}x{self.K}x{self.H}x{self.W}->{self.C}" + (f"/s{self.stride}" if self.stride > 1 else "")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def label(self) -> str:
        return f"{self.op} {self.pass_} {self.dtype} {self.activation} {self.shape_str}"

    def columns(self) -> dict[str, object]:
        return {
            "op": self.op, "pass": self.pass_, "activation": self.activation, "bn_mode": self.bn_mode,
            "dtype": self.dtype, "layout": self.layout, "N": self.N, "C": self.C, "S": self.S,
            "shape": self.shape_str, "numel": self.numel,
        }  # fmt: skip

    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.op, self.pass_, self.activation, self.dtype, self.layout, self.shape_str)


# --- presets -----------------------------------------------------------------------------------------------------

#: ResNet-50 v1.5's 1x1 convolutions as (C_in, C_out, input H=W, stride, activation after the BN, count): per
#: bottleneck conv1 (reduce, then relu) and conv3 (expand; its BN feeds the residual add: identity), and each
#: stage's downsample branch (stride 2 from stage 2 on; identity)
RESNET50_CONV1X1: tuple[tuple[int, int, int, int, str, int], ...] = (
    (64, 64, 56, 1, "relu", 1), (256, 64, 56, 1, "relu", 2), (64, 256, 56, 1, "identity", 4),
    (256, 128, 56, 1, "relu", 1), (512, 128, 28, 1, "relu", 3), (128, 512, 28, 1, "identity", 4),
    (256, 512, 56, 2, "identity", 1),
    (512, 256, 28, 1, "relu", 1), (1024, 256, 14, 1, "relu", 5), (256, 1024, 14, 1, "identity", 6),
    (512, 1024, 28, 2, "identity", 1),
    (1024, 512, 14, 1, "relu", 1), (2048, 512, 7, 1, "relu", 2), (512, 2048, 7, 1, "identity", 3),
    (1024, 2048, 14, 2, "identity", 1),
)  # fmt: skip
#: an MLP's Linear layers as (batch, in, out): a 4x-expansion block and a launch-bound small batch
MLP_LINEARS = ((4096, 1024, 4096), (4096, 4096, 1024), (16384, 1024, 1024), (256, 1024, 1024))


def _resnet50(batches=(64, 128, 256)) -> list[MatmulCase]:
    return [
        MatmulCase("conv1x1_bn_act", p, act, "bf16", "channels_last", N, cin, cout, h, h, s)
        for N in batches
        for cin, cout, h, s, act, _ in RESNET50_CONV1X1
        for p in GEMM_PASSES
    ]


def _mlp() -> list[MatmulCase]:
    return [
        MatmulCase("linear_bn_act", p, "relu", dt, "nchw", N, K, C)
        for N, K, C in MLP_LINEARS
        for dt in ("fp32", "bf16")
        for p in GEMM_PASSES
    ]


def _quick() -> list[MatmulCase]:
    """Tiny: every path (Linear in fp32, conv stride 1 and 2 in bf16), fwd and fwd_bwd; the interpreter checks
    them on CPU."""
    return [
        *(MatmulCase("linear_bn_act", p, "relu", "fp32", "nchw", 64, 48, 40) for p in GEMM_PASSES),
        *(MatmulCase("conv1x1_bn_act", p, "relu", "bf16", "channels_last", 2, 16, 24, 6, 6, s)
          for p in GEMM_PASSES for s in (1, 2)),
    ]  # fmt: skip


GEMM_PRESETS = {
    "quick": _quick,
    "mlp": _mlp,
    "resnet50": _resnet50,
    "standard": lambda: _resnet50((256,)) + _mlp(),
}


def select_gemm_cases(
    op: str,
    preset: str | None,
    *,
    batch=None,
    dtypes=None,
    activations=None,
    passes=None,
) -> list[MatmulCase]:
    """The cases of ``op`` in ``preset`` (default quick), filtered by the given axes (None = no filter)."""
    if op not in GEMM_OPS:
        raise ValueError(f"unknown op {op!r}; valid: {', '.join(GEMM_OPS)}")
    name = preset or "quick"
    if name not in GEMM_PRESETS:
        raise ValueError(f"unknown preset {name!r} for --op {op}; valid: {', '.join(GEMM_PRESETS)}")
    if passes is not None and set(passes) - set(GEMM_PASSES):
        raise ValueError(f"--op {op} measures the passes {', '.join(GEMM_PASSES)}, got {', '.join(passes)}")
    cases = [c for c in GEMM_PRESETS[name]() if c.op == op]
    for values, get in ((batch, lambda c: c.N), (dtypes, lambda c: c.dtype),
                        (activations, lambda c: c.activation), (passes, lambda c: c.pass_)):  # fmt: skip
        if values is not None:
            cases = [c for c in cases if get(c) in set(values)]
    if not cases:
        raise ValueError(f"no {op} case left in preset {name!r} after filtering")
    return list(dict.fromkeys(cases))
