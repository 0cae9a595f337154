"""The ops ``linear_bn_act`` and ``conv1x1_bn_act`` in the benchmark: inputs, providers, the float64 reference.

It offers what :mod:`bnbench.bench.runner` uses of :mod:`bnbench.bench.workload` and the provider registry, for
:class:`~bnbench.bench.gemm_cases.MatmulCase` (the runner picks this module by ``case.family``). Cases and presets
are in :mod:`bnbench.bench.gemm_cases`:

- cases: ``linear_bn_act`` is X[batch, K] -> act(BN1d(X @ W^T)) [batch, C]; ``conv1x1_bn_act`` is a channels_last
  X[batch, K, H, W] -> act(BN2d(conv1x1(X, stride))) [batch, C, H/s, W/s]. Presets: ``resnet50`` (every distinct
  1x1 convolution of ResNet-50 v1.5 with the activation after its BatchNorm, batch 64/128/256, bf16: ResNet-50
  trains under bf16 autocast), ``mlp`` (Linear layers of an MLP, fp32 and bf16), ``standard`` (both at batch
  256 / the MLP sizes), ``quick`` (tiny shapes, for CPU and the interpreter).
- providers, all with one signature ``fn(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
  momentum, eps, activation, param)``: ``eager`` the module chain's functional form (F.linear / F.conv2d, then
  F.batch_norm and the activation), ``compile`` that chain under ``torch.compile(dynamic=False)``, fresh per
  case, ``triton`` :func:`bnbench.linear_batch_norm_act` / :func:`bnbench.conv1x1_batch_norm_act`, and
  ``triton-compile`` (optional) that fused call under torch.compile (its Triton path is torch.library ops).
- bytes: ``bytes_min`` of a point is the fused op's traffic from :func:`bytes_model.matmul_bn_act_bytes` (3T of
  Z/Y forward plus the matmul operands).

fp32 note: ``nn.Linear`` multiplies fp32 exactly by default and so does the fused op; cuDNN convolutions use TF32
by default (``torch.backends.cudnn.allow_tf32``), so an fp32 ``conv1x1_bn_act`` eager/compile point can exceed the
fp32 tolerance: the presets measure convolutions in bf16.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.bench.bytes_model import matmul_bn_act_bytes
from bnbench.bench.gemm_cases import (
    GEMM_OPS,
    GEMM_PRESETS,
    MatmulCase,
    select_gemm_cases,
)
from bnbench.bench.providers import Provider
from bnbench.bench.workload import (
    EPS,
    KINK_BAND,
    MOMENTUM,
    STATS_TOLERANCE,
    PassRun,
    batch_statistics,
    max_rel_err,
)
from bnbench.interpreter import interpreter_active
from bnbench.schema import torch_dtype
from bnbench.testing import tolerance

__all__ = [
    "DEFAULT_GEMM_PROVIDERS",
    "EPS",
    "GEMM_OPS",
    "GEMM_PRESETS",
    "GEMM_PROVIDERS",
    "MOMENTUM",
    "STATS_TOLERANCE",
    "MatmulCase",
    "MatmulInputs",
    "batch_statistics",
    "build_pass",
    "bytes_min_of",
    "get_gemm_providers",
    "make_inputs",
    "max_rel_err",
    "outputs",
    "reference_outputs",
    "select_cases_from_args",
    "select_gemm_cases",
    "stats_tolerance",
]


def stats_tolerance(case: MatmulCase) -> float:
    """The batch statistics are those of Z, which the module chain (eager, compile) rounds to the dtype before
    BatchNorm sees it: in fp16/bf16 they carry that rounding (about 1e-3 relative in bf16), so they are checked
    at the dtype's tolerance; in fp32 at fp32's (the fused op takes them from the fp32 accumulator)."""
    return tolerance(case.dtype) if case.dtype != "fp32" else STATS_TOLERANCE


def bytes_min_of(case: MatmulCase) -> int:
    return matmul_bn_act_bytes(case.pass_, case.rows, case.K, case.C, case.dtype, "fused")


# --- inputs, passes, reference ------------------------------------------------------------------------------------


@dataclasses.dataclass
class MatmulInputs:
    x: torch.Tensor
    weight: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    dy: torch.Tensor

    def params(self) -> list[torch.Tensor]:
        return [self.x, self.weight, self.bn_weight, self.bn_bias]

    def zero_grads(self) -> None:
        for t in self.params():
            t.grad = None


def make_inputs(case: MatmulCase, device, seed: int = 0) -> MatmulInputs:
    """x in the case's dtype (channels_last for a convolution; mean offset 0.5), weight with nn.Linear's
    default scale 1/sqrt(K), fp32 BatchNorm parameters and statistics, dy like the output."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch_dtype(case.dtype)

    def draw(*shape, scale=1.0, offset=0.0, uniform=False):
        return (torch.rand if uniform else torch.randn)(shape, generator=gen, device=device) * scale + offset

    if case.op == "linear_bn_act":
        x = draw(case.N, case.K, offset=0.5).to(dtype)
        weight = draw(case.C, case.K, scale=case.K**-0.5).to(dtype)
        dy = draw(*case.shape).to(dtype)
    else:
        x = draw(case.N, case.K, case.H, case.W, offset=0.5).to(dtype, memory_format=torch.channels_last)
        weight = draw(case.C, case.K, 1, 1, scale=case.K**-0.5).to(dtype)
        dy = draw(*case.shape).to(dtype, memory_format=torch.channels_last)
    C = case.C
    inputs = MatmulInputs(
        x, weight, draw(C, scale=1.5, offset=0.25, uniform=True), draw(C, scale=0.1), draw(C, scale=0.1),
        draw(C, offset=0.5, uniform=True), dy,
    )  # fmt: skip
    for t in inputs.params():
        t.requires_grad_(True)
    return inputs


def build_pass(case: MatmulCase, fn, inp: MatmulInputs) -> PassRun:
    act, param = parse_activation(case.activation)
    state: dict[str, torch.Tensor | None] = {"y": None}

    def forward() -> torch.Tensor:
        return fn(inp.x, inp.weight, inp.bn_weight, inp.bn_bias, inp.running_mean, inp.running_var, True, MOMENTUM,
                  EPS, act, param)  # fmt: skip

    def call() -> None:
        y = forward()
        if case.pass_ == "fwd_bwd":
            y.backward(inp.dy)
        state["y"] = y

    return PassRun(lambda: None, call, lambda: state["y"], forward)


def outputs(case: MatmulCase, inp: MatmulInputs, y) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {"y": y}
    if case.pass_ == "fwd_bwd":
        out.update(dx=inp.x.grad, dweight=inp.weight.grad, dbn_weight=inp.bn_weight.grad, dbn_bias=inp.bn_bias.grad)
    out.update(running_mean=inp.running_mean, running_var=inp.running_var)
    return out


def _matmul(case: MatmulCase, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if case.op == "linear_bn_act":
        return F.linear(x, weight)
    return F.conv2d(x, weight, stride=case.stride)


def reference_outputs(case: MatmulCase, inp: MatmulInputs, running_mean0, running_var0, y_got=None):
    """Float64 module chain on upcast copies. At relu/leaky_relu's kink the side of an element whose float64
    pre-activation is within :data:`KINK_BAND` of 0 is taken from ``y_got`` (as :mod:`workload` does)."""
    act, param = parse_activation(case.activation)
    with torch.enable_grad():
        x, w, g, b = (t.detach().double().requires_grad_(True) for t in inp.params())
        rm, rv = running_mean0.double(), running_var0.double()
        z = F.batch_norm(_matmul(case, x, w), rm, rv, g, b, True, MOMENTUM, EPS)
        if act in (Activation.RELU, Activation.LEAKY_RELU):
            positive = z.detach() > 0
            if y_got is not None:
                view = (1, case.C) + (1,) * (z.dim() - 2)
                scale = (z.detach() - b.detach().view(view)).abs() + b.detach().abs().view(view)
                ambiguous = z.detach().abs() <= KINK_BAND[case.dtype] * scale
                positive = torch.where(ambiguous, y_got.detach().double() > 0, positive)
            y = torch.where(positive, z, z * param)
        else:
            y = apply_activation(z, act, param)
        ref = {"y": y.detach()}
        if case.pass_ == "fwd_bwd":
            dx, dw, dg, db = torch.autograd.grad(y, (x, w, g, b), inp.dy.double())
            ref.update(dx=dx, dweight=dw, dbn_weight=dg, dbn_bias=db)
    ref.update(running_mean=rm, running_var=rv)
    return ref


# --- providers ----------------------------------------------------------------------------------------------------


def _chain(case: MatmulCase):
    from bnbench.reference import batch_norm_act_reference

    def chain(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation, param):
        z = _matmul(case, x, weight)
        return batch_norm_act_reference(
            z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, activation, param
        )

    return chain


def _compiled(case: MatmulCase):
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(_chain(case), dynamic=False)


def _fused_compiled(case: MatmulCase):
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(_fused(case), dynamic=False)


def _fused(case: MatmulCase):
    from bnbench.linear_bn import conv1x1_batch_norm_act, linear_batch_norm_act

    def fused(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation, param):
        param = param if activation is Activation.LEAKY_RELU else None
        args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation, param)
        if case.op == "linear_bn_act":
            return linear_batch_norm_act(*args, backend="triton")
        return conv1x1_batch_norm_act(*args, backend="triton", stride=case.stride)

    return fused


#: the largest output the triton provider checks under the interpreter
INTERPRETER_MAX_NUMEL = 1 << 14


def _triton_skip(case: MatmulCase, device: torch.device) -> str | None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if not interpreter_active():
        return (
            "no CUDA device in use: the Triton kernels run on CPU tensors only in the interpreter (TRITON_INTERPRET=1)"
        )
    if case.numel > INTERPRETER_MAX_NUMEL:
        return f"Triton interpreter: output has {case.numel} elements, more than the {INTERPRETER_MAX_NUMEL} it checks"
    return None


def _triton_config(case: MatmulCase, x: torch.Tensor) -> str:
    from bnbench.kernels.gemm_launchers import default_gemm_config

    return default_gemm_config(case.rows, case.C, case.K, x.element_size(), x.device).describe()


GEMM_PROVIDERS: dict[str, Provider] = {
    "eager": Provider("eager", True, _chain, kernel_config=lambda case, x: "aten"),
    "compile": Provider("compile", True, _compiled, kernel_config=lambda case, x: "inductor:default"),
    "triton": Provider(
        "triton",
        False,
        _fused,
        _triton_skip,
        lambda device: None if device.type == "cuda" else "interpreter",
        _triton_config,
    ),
    "triton-compile": Provider(
        "triton-compile",
        False,
        _fused_compiled,
        _triton_skip,
        lambda device: None if device.type == "cuda" else "interpreter",
        _triton_config,
    ),
}


#: the providers a matmul op's run measures when --providers is not given
DEFAULT_GEMM_PROVIDERS = ("eager", "compile", "triton")


def get_gemm_providers(names: str | list[str]) -> list[Provider]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    unknown = [n for n in names if n not in GEMM_PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown provider(s) {unknown} for this op; valid: {', '.join(GEMM_PROVIDERS)}")
    return [GEMM_PROVIDERS[n] for n in dict.fromkeys(names)]


def select_cases_from_args(args) -> list[MatmulCase]:
    """``bnbench bench --op linear_bn_act|conv1x1_bn_act`` (or both, comma-separated): the cases of --preset
    (default quick), filtered by --batch, --dtype, --activation and --pass. --width, --spatial and --layout are
    axes of the BatchNorm op only (the matmul shapes come from the presets), and the 'baseline' preset is the
    BatchNorm baseline table of docs/measuring.md: all are refused, saying so. With both ops a preset that has
    cases of one only (resnet50, mlp) gives those."""
    from bnbench.bench import cases as c

    given = [f"--{name}" for name in ("width", "spatial", "layout") if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not an axis of --op {args.op} (its shapes come from --preset)")
    if args.preset == "baseline":
        raise ValueError(
            f"--preset baseline is the BatchNorm + activation baseline table (--op bn_act); --op {args.op} has the "
            f"presets {', '.join(GEMM_PRESETS)} (standard: ResNet-50's 1x1 convolutions at batch 256 and the MLP)"
        )

    def parsed(value, parse):
        return None if value is None else parse(value)

    axes = dict(
        batch=parsed(args.batch, lambda v: c.parse_ints(v, "--batch")),
        dtypes=parsed(args.dtype, c.parse_dtypes),
        activations=parsed(args.activation, c.parse_activations),
        passes=parsed(args.passes, c.parse_passes),
    )
    ops = args.op.split(",")
    if len(ops) == 1:
        return select_gemm_cases(ops[0], args.preset, **axes)
    cases: list[MatmulCase] = []
    for op in ops:
        try:
            cases += select_gemm_cases(op, args.preset, **axes)
        except ValueError as err:
            if "case left" not in str(err):
                raise
    if not cases:
        raise ValueError(f"no {' or '.join(ops)} case left in preset {args.preset or 'quick'!r} after filtering")
    return cases
