"""What one point runs: its inputs, the pass as a callable, and the float64 reference it is checked against.

Inputs: x in the case's dtype and layout (standard normal plus a mean offset of 0.5, so a statistics bug that
ignores the mean shows), fp32 weight, bias and running statistics (as nn.BatchNorm keeps them under autocast), and
an upstream gradient ``dy`` like x; for a :class:`~bnbench.bench.cases.ResidualCase` (``bn_add_act``) also a
residual like x (drawn last: x and dy are those of the same case without it), whose gradient is checked too.
Outputs are checked against the tolerance table of :mod:`bnbench.testing`. Training passes run with autograd on (x, weight and bias require grad), as in
training; eval runs under ``torch.no_grad``.

Pass semantics (docs/measuring.md): fwd = training forward (updates running stats); bwd = the backward alone, of a
forward made once beforehand (``retain_graph=True``, so it can be replayed); fwd_bwd = both; eval = inference
forward with the running statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.bench.bytes_model import bytes_min
from bnbench.bench.cases import Case
from bnbench.schema import torch_dtype
from bnbench.testing import tolerance

__all__ = [
    "EPS",
    "KINK_BAND",
    "MOMENTUM",
    "STATS_TOLERANCE",
    "Inputs",
    "PassRun",
    "batch_statistics",
    "build_pass",
    "bytes_min_of",
    "make_inputs",
    "max_rel_err",
    "outputs",
    "reference_outputs",
    "stats_tolerance",
]

MOMENTUM, EPS = 0.1, 1e-5


@dataclasses.dataclass
class Inputs:
    """One point's tensors. ``running_mean``/``running_var`` are updated in place by training passes;
    ``residual`` is None unless the case adds one."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    dy: torch.Tensor
    residual: torch.Tensor | None = None

    def params(self) -> list[torch.Tensor]:
        return [self.x, self.weight, self.bias] + ([] if self.residual is None else [self.residual])

    def zero_grads(self) -> None:
        for t in self.params():
            t.grad = None


def make_inputs(case: Case, device: torch.device | str, seed: int = 0) -> Inputs:
    """Fresh inputs for ``case`` on ``device``; the same seed gives the same values (every provider of a case
    sees the same data)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: large cases stay fast
    dtype = torch_dtype(case.dtype)
    memory_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format

    def tensor(*shape: int, scale: float = 1.0, offset: float = 0.0, uniform: bool = False) -> torch.Tensor:
        draw = torch.rand if uniform else torch.randn
        return draw(shape, generator=gen, device=device) * scale + offset

    x = tensor(*case.shape, offset=0.5).to(dtype=dtype, memory_format=memory_format)
    dy = tensor(*case.shape).to(dtype=dtype, memory_format=memory_format)
    C = case.C
    inputs = Inputs(
        x=x,
        weight=tensor(C, scale=1.5, offset=0.25, uniform=True),
        bias=tensor(C, scale=0.1),
        running_mean=tensor(C, scale=0.1),
        running_var=tensor(C, scale=1.0, offset=0.5, uniform=True),
        dy=dy,
    )
    if case.family == "bn_add_act":
        inputs.residual = tensor(*case.shape).to(dtype=dtype, memory_format=memory_format)
    if case.needs_grad:
        for t in inputs.params():
            t.requires_grad_(True)
    return inputs


@dataclasses.dataclass
class PassRun:
    """A pass as callables: ``prepare()`` once before the first ``call()`` (bwd: the saved forward), then
    ``call()`` repeatedly (what is timed). ``last_output()`` is the forward output of the latest call."""

    prepare: Callable[[], None]
    call: Callable[[], None]
    last_output: Callable[[], torch.Tensor | None]
    forward: Callable[[], torch.Tensor]  # one training (or eval) forward with autograd as the pass has it


def build_pass(case: Case, fn: Callable[..., torch.Tensor], inp: Inputs) -> PassRun:
    act, param = parse_activation(case.activation)
    state: dict[str, torch.Tensor | None] = {"y": None}

    extra = {} if inp.residual is None else {"residual": inp.residual}

    def forward(training: bool) -> torch.Tensor:
        return fn(
            inp.x, inp.running_mean, inp.running_var, inp.weight, inp.bias, training, MOMENTUM, EPS, act, param, **extra
        )

    def nothing() -> None:
        return None

    if case.pass_ == "eval":

        def call() -> None:
            with torch.no_grad():
                state["y"] = forward(False)

        return PassRun(nothing, call, lambda: state["y"], lambda: forward(False))
    if case.pass_ == "fwd":

        def call() -> None:
            state["y"] = forward(True)

        return PassRun(nothing, call, lambda: state["y"], lambda: forward(True))
    if case.pass_ == "fwd_bwd":

        def call() -> None:
            y = forward(True)
            y.backward(inp.dy)
            state["y"] = y

        return PassRun(nothing, call, lambda: state["y"], lambda: forward(True))

    def prepare() -> None:  # bwd: one saved forward, replayed by every call
        state["y"] = forward(True)

    def call() -> None:
        state["y"].backward(inp.dy, retain_graph=True)

    return PassRun(prepare, call, lambda: state["y"], lambda: forward(True))


def outputs(case: Case, inp: Inputs, y: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """What a pass produced and is checked: y (not for bwd alone), the gradients (bwd, fwd_bwd) and the updated
    running statistics (training passes that run a forward in the checked call)."""
    out: dict[str, torch.Tensor | None] = {}
    if case.pass_ != "bwd":
        out["y"] = y
    if case.pass_ in ("bwd", "fwd_bwd"):
        out.update(dx=inp.x.grad, dweight=inp.weight.grad, dbias=inp.bias.grad)
        if inp.residual is not None:
            out["dresidual"] = inp.residual.grad
    if case.pass_ in ("fwd", "fwd_bwd"):
        out.update(running_mean=inp.running_mean, running_var=inp.running_var)
    return out


#: relative half-width of the band around a ReLU/leaky-ReLU kink where the sign of z is a rounding decision
KINK_BAND = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}


def reference_outputs(
    case: Case,
    inp: Inputs,
    running_mean0: torch.Tensor,
    running_var0: torch.Tensor,
    y_got: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The float64 reference of :func:`outputs`, computed from upcast copies of the inputs (running statistics
    as they were before the checked call).

    At the kink of relu and leaky_relu the gradient jumps: where the float64 pre-activation z is within
    :data:`KINK_BAND` of 0 (relative to its size), the implementation's own rounding decides which side an
    element is on, so the reference takes the side the implementation's output ``y_got`` shows. Without this a
    single element at z = -7e-8 that fp32 puts at +7e-8 flips a whole dy into dbias (seen with torch.compile).
    With a residual r, z = BN(x) + r and the size it is measured against includes |r|.
    """
    act, param = parse_activation(case.activation)
    with torch.enable_grad():
        x = inp.x.detach().double().requires_grad_(case.needs_grad)
        w = inp.weight.detach().double().requires_grad_(case.needs_grad)
        b = inp.bias.detach().double().requires_grad_(case.needs_grad)
        r = None if inp.residual is None else inp.residual.detach().double().requires_grad_(case.needs_grad)
        rm, rv = running_mean0.double(), running_var0.double()
        z = F.batch_norm(x, rm, rv, w, b, case.training, MOMENTUM, EPS)
        size = (z.detach() - b.detach().view(_channel_view(case))).abs() + b.detach().abs().view(_channel_view(case))
        if r is not None:
            z = z + r
            size = size + r.detach().abs()
        if act in (Activation.RELU, Activation.LEAKY_RELU):
            positive = z.detach() > 0
            if y_got is not None:
                ambiguous = z.detach().abs() <= KINK_BAND[case.dtype] * size
                positive = torch.where(ambiguous, y_got.detach().double() > 0, positive)
            y = torch.where(positive, z, z * param)  # relu: param is 0.0
        else:
            y = apply_activation(z, act, param)
        ref: dict[str, torch.Tensor] = {}
        if case.pass_ != "bwd":
            ref["y"] = y.detach()
        if case.pass_ in ("bwd", "fwd_bwd"):
            wrt = (x, w, b) if r is None else (x, w, b, r)
            grads = torch.autograd.grad(y, wrt, inp.dy.double())
            ref.update(dx=grads[0], dweight=grads[1], dbias=grads[2])
            if r is not None:
                ref["dresidual"] = grads[3]
    if case.pass_ in ("fwd", "fwd_bwd"):
        ref.update(running_mean=rm, running_var=rv)
    return ref


def bytes_min_of(case: Case) -> int:
    """A point's minimal bytes (:func:`bnbench.bench.bytes_model.bytes_min`; the runner asks each workload module)."""
    return bytes_min(case.pass_, case.numel, case.dtype, residual=case.family == "bn_add_act")


#: the running statistics are fp32 whatever the input dtype: they are checked at fp32's tolerance
STATS_TOLERANCE = tolerance(torch.float32)


def stats_tolerance(case: Case) -> float:
    """The tolerance of a case's batch statistics (the runner asks each workload module)."""
    return STATS_TOLERANCE


_STATS = ("running_mean", "running_var")


def batch_statistics(
    out: dict[str, torch.Tensor | None], running_mean0: torch.Tensor, running_var0: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """Split the running statistics off ``out``, as the batch statistics they imply: (new - (1 - m) old) / m.

    The batch term is only m = 0.1 of an updated running value, so comparing running values would hide a wrong
    batch statistic ten times over (a biased instead of unbiased variance passes at fp32 tolerance). Returns the
    removed entries, renamed ``batch_mean``/``batch_var``.
    """
    olds = {"running_mean": running_mean0, "running_var": running_var0}
    stats = {}
    for name in _STATS:
        if name in out:
            new = out.pop(name)
            stats[name.replace("running", "batch")] = (
                None if new is None else (new.double() - (1 - MOMENTUM) * olds[name].double()) / MOMENTUM
            )
    return stats


def _channel_view(case: Case) -> tuple[int, ...]:
    return (1, case.C) + (1,) * (len(case.shape) - 2)


def max_rel_err(got: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``||got - ref|| / ||ref||`` over the checked tensors (in float64), and the name of the worst
    one. A missing tensor, a shape mismatch or a non-finite value counts as an infinite error."""
    worst, worst_name = 0.0, ""
    for name, r in ref.items():
        g = got.get(name)
        if g is None or tuple(g.shape) != tuple(r.shape):
            return math.inf, f"{name} missing or of the wrong shape"
        diff = torch.linalg.vector_norm(g.detach().double() - r).item()
        norm = torch.linalg.vector_norm(r).item()
        err = diff / norm if norm > 0 else diff
        if not math.isfinite(err):
            return math.inf, f"{name} has non-finite values"
        if err > worst or not worst_name:
            worst, worst_name = err, name
    return worst, worst_name
