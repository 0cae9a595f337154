"""One training-step configuration per provider: prepared, checked against the float64 network, timed, profiled.

A configuration (:class:`StepCase`) is a network, batch, precision (fp32, or bf16 under ``torch.autocast``),
layout and input resolution. For each case the network runs one step on a fixed batch in float64 (the
reference) and in the run's precision (eager: the rounding error every provider is measured against). Each provider then gets the same initial weights (the same seed) and data:

1. its first step (forward, loss, backward, optimizer step) is timed alone as ``compile_s`` (Dynamo/Inductor
   compile, Triton JIT, cuDNN planning: first-call latency, never in the timed region); its loss and gradients
   (taken before the optimizer step) are compared with those of the same network in float64 (relative norm
   errors, all gradients together). The bound is :func:`bnbench.testing.tolerance` of the precision the step
   computes in (bf16 under autocast; fp32, or TF32's fp16-sized mantissa when CUDA convolutions may use TF32),
   scaled by the network's amplification of rounding, measured as the eager network's own error over that
   precision's unit roundoff (a deep network with small per-channel batches amplifies it by orders of magnitude;
   a fixed per-operation tolerance would fail torch.compile itself). Above the bound: status incorrect;
2. ``warmup`` more steps, then ``steps`` timed steps (wall clock, synchronised on CUDA: what a user waits for);
3. on CUDA one more step for the peak memory (``torch.cuda.max_memory_allocated``: weights, gradients, optimizer
   state and activations). On CPU there is no allocator peak statistic: the column stays empty;
4. ``profile_steps`` steps under torch.profiler for the BatchNorm + activation share (:mod:`bnbench.step.share`).

Under the Triton interpreter (fused backend "triton" on CPU) only step 1 runs: a correctness check, never timed.
A failing configuration becomes a row with status error (or oom) and its message; the run goes on. Touches no file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bnbench.models import build_network, get_network
from bnbench.schema import STEP_COLUMNS
from bnbench.step.providers import Prepared, StepProvider
from bnbench.step.share import measure_share

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "Reference",
    "StepCase",
    "StepSettings",
    "add_speedups",
    "compute_precision",
    "error_bound",
    "measure_case",
    "point_id",
    "results_frame",
    "run_steps",
]  # fmt: skip

#: precision name -> autocast dtype (None: plain fp32)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
_TIMED = ("wall",)


@dataclasses.dataclass(frozen=True, order=True)
class StepCase:
    model: str
    batch: int
    dtype: str
    layout: str
    resolution: int | None = None  # None: the network's default

    def __post_init__(self) -> None:
        spec = get_network(self.model)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)} (bf16 = autocast)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {', '.join(LAYOUTS)}")
        if self.layout == "channels_last" and not spec.spatial:
            raise ValueError(f"network {self.model!r} has no 4-D activations: channels_last does not apply")
        if not isinstance(self.batch, int) or self.batch < 2:
            raise ValueError(
                f"batch must be an integer >= 2 (BatchNorm trains on batch statistics), got {self.batch!r}"
            )
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 1):
            raise ValueError(f"resolution must be a positive integer, got {self.resolution!r}")
        spec.input_shape(self.batch, self.resolution)  # raises for a size the network does not take

    @property
    def input_shape(self) -> tuple[int, ...]:
        return get_network(self.model).input_shape(self.batch, self.resolution)

    def label(self) -> str:
        return f"{self.model} b{self.batch} {self.dtype} {self.layout} {self.input_shape[-1]}px"


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How a case runs: the fused layers' backend, step counts, optimizer, seed and network source."""

    fused_backend: str = "torch"
    warmup: int = 3
    steps: int = 10
    profile_steps: int = 2
    lr: float = 0.01
    seed: int = 0
    source: str = "auto"

    def __post_init__(self) -> None:
        if self.fused_backend not in ("triton", "torch"):
            raise ValueError(f"fused_backend must be 'triton' or 'torch', got {self.fused_backend!r}")
        if self.warmup < 0 or self.steps < 1 or self.profile_steps < 0:
            raise ValueError(f"need warmup >= 0, steps >= 1, profile_steps >= 0; got {self.warmup}, {self.steps}, "
                             f"{self.profile_steps}")  # fmt: skip


# --- the step itself ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    target: torch.Tensor


def _make_batch(case: StepCase, device: torch.device, seed: int) -> _Batch:
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(case.input_shape, generator=gen)
    target = torch.randint(0, get_network(case.model).num_classes, (case.batch,), generator=gen)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    return _Batch(x.to(device).contiguous(memory_format=fmt), target.to(device))


def _build(case: StepCase, device: torch.device, settings: StepSettings) -> tuple[nn.Module, str]:
    torch.manual_seed(settings.seed)  # the same initial weights for every provider
    model, source = build_network(case.model, num_classes=get_network(case.model).num_classes, source=settings.source)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    return model.to(device=device, memory_format=fmt).train(), source


def _autocast(case: StepCase, device: torch.device):
    dtype = DTYPES[case.dtype]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name in the original network (torch.compile's wrapper adds ``_orig_mod.``)."""
    return {name.replace("_orig_mod.", ""): p for name, p in model.named_parameters()}


class _Trainer:
    """One model, its SGD optimizer and the step: zero grads, forward + loss (under autocast), backward, step."""

    def __init__(self, model: nn.Module, case: StepCase, device: torch.device, batch: _Batch, lr: float) -> None:
        self.model, self.case, self.device, self.batch = model, case, device, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(self, capture: dict | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.case, self.device):
            loss = F.cross_entropy(self.model(self.batch.x), self.batch.target)
        loss.backward()
        if capture is not None:  # the check: loss and gradients before the update, on the CPU
            capture["loss"] = float(loss.detach())
            capture["grads"] = {n: None if p.grad is None else p.grad.detach().float().cpu()
                                for n, p in _params(self.model).items()}  # fmt: skip
        self.opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The float64 network's loss and gradients after one step, the eager network's errors against them (the
    rounding error of the run's precision, amplified by the network) and the bounds every provider must meet."""

    f64: dict
    eager_loss_err: float
    eager_grad_err: float
    loss_bound: float
    grad_bound: float
    tied_to: str


# --- checking -------------------------------------------------------------------------------------------------------


def compute_precision(case: StepCase, device: torch.device) -> tuple[torch.dtype, str]:
    """The lowest precision the step computes in, and how it is described: bf16 under autocast; fp32, or TF32
    (fp16's 10-bit mantissa) when CUDA convolutions and matmuls may use TF32."""
    if DTYPES[case.dtype] is not None:
        return DTYPES[case.dtype], f"{case.dtype} autocast"
    if device.type == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return torch.float16, "fp32 with TF32 convolutions/matmuls (fp16's mantissa)"
    return torch.float32, "fp32"


def error_bound(tol: float, eager_err: float, dtype: torch.dtype) -> float:
    """``tol`` (the dtype's entry of bnbench.testing.TOLERANCE, for one operation) scaled by how much the network
    amplifies rounding: the eager network's error over the dtype's unit roundoff, when that is above 1."""
    unit = torch.finfo(dtype).eps / 2
    return tol * max(1.0, eager_err / unit)


def _reference(case: StepCase, device: torch.device, settings: StepSettings, batch: _Batch) -> Reference:
    from bnbench.testing import tolerance

    model, _ = _build(case, device, settings)
    # float64 in NCHW whatever the run's layout (the same math; cuDNN's float64 kernels are NCHW ones)
    f64 = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format)
    f64_batch = _Batch(batch.x.double().contiguous(), batch.target)
    exact: dict = {}
    _Trainer(f64, dataclasses.replace(case, dtype="fp32"), device, f64_batch, settings.lr).step(exact)
    del f64
    eager: dict = {}
    _Trainer(model, case, device, batch, settings.lr).step(eager)
    loss_err, grad_err, _ = _errors(eager, exact)
    dtype, tied_to = compute_precision(case, device)
    tol = tolerance(dtype)
    return Reference(exact, loss_err, grad_err, error_bound(tol, loss_err, dtype), error_bound(tol, grad_err, dtype),
                     f"{tied_to}: tolerance {tol:g} x the eager network's error / unit roundoff")  # fmt: skip


def _errors(got: dict, ref: dict) -> tuple[float, float, str]:
    """(loss relative error, gradients' relative norm error over all parameters, the worst parameter)."""
    loss_err = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    if set(got["grads"]) != set(ref["grads"]):
        missing = sorted(set(ref["grads"]) ^ set(got["grads"]))[:5]
        return loss_err, math.inf, f"parameters differ from the original network's: {missing}"
    diff2 = norm2 = 0.0
    worst, worst_name = -1.0, ""
    for name, r in ref["grads"].items():
        g = got["grads"][name]
        if (g is None) != (r is None):
            return loss_err, math.inf, f"{name} has a gradient in one network only"
        if r is None:
            continue
        d = (g.double() - r.double()).norm().item() ** 2
        n = r.double().norm().item() ** 2
        diff2, norm2 = diff2 + d, norm2 + n
        rel = math.sqrt(d / n) if n > 0 else (0.0 if d == 0 else math.inf)
        if rel > worst:
            worst, worst_name = rel, name
    grad_err = math.sqrt(diff2 / norm2) if norm2 > 0 else (0.0 if diff2 == 0 else math.inf)
    return loss_err, grad_err, f"{worst_name} ({worst:.3g})"


# --- one point ------------------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(err, MemoryError) or (oom is not None and isinstance(err, oom)):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"


def _append(row: dict, text: str) -> None:
    row["message"] = f"{row['message']}; {text}" if row["message"] else text


def _base_row(case: StepCase, provider: StepProvider, provenance: dict, settings: StepSettings) -> dict:
    row: dict[str, object] = dict.fromkeys(STEP_COLUMNS, math.nan)
    row.update(provenance)
    row.update(
        timestamp_utc=_now(), model=case.model, network_source="", batch=case.batch,
        resolution=case.input_shape[-1], dtype=case.dtype, autocast=DTYPES[case.dtype] is not None,
        layout=case.layout, provider=provider.name, is_baseline=provider.is_baseline, fused_backend="",
        bn_unfused_reasons="", timer=None, n_samples=0, warmup_steps=settings.warmup, status="error", message="",
    )  # fmt: skip
    return row


def _interpreted(prepared: Prepared, device: torch.device) -> bool:
    return prepared.fused_backend == "triton" and device.type != "cuda"


def _measure(case, provider, device, settings, batch, reference, row) -> list[float]:
    from bnbench.bench.timing import time_wall

    model, source = _build(case, device, settings)
    row["network_source"] = source
    row["bn_layers"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    prepared = provider.prepare(model, settings.fused_backend)
    row.update(fused_backend=prepared.fused_backend, bn_fused=prepared.bn_fused, bn_unfused=prepared.bn_unfused)
    row["bn_unfused_reasons"] = "; ".join(f"{n} x {why}" for why, n in prepared.unfused_reasons.items())
    trainer = _Trainer(prepared.model, case, device, batch, settings.lr)
    capture: dict = {}
    trainer.sync()
    start = time.perf_counter()
    trainer.step(capture)
    trainer.sync()
    row["compile_s"] = time.perf_counter() - start
    loss_err, grad_err, worst = _errors(capture, reference.f64)
    row.update(loss=capture["loss"], loss_rel_err=loss_err, grad_rel_err=grad_err, tolerance=reference.grad_bound)
    row["eager_grad_rel_err"] = reference.eager_grad_err
    if loss_err <= reference.loss_bound and grad_err <= reference.grad_bound:
        row["status"] = "ok"
    else:
        row["status"] = "incorrect"
        _append(row, f"vs the float64 network: loss rel err {loss_err:.3g} (bound {reference.loss_bound:.3g}), "
                f"gradient rel err {grad_err:.3g} (bound {reference.grad_bound:.3g}; eager's own "
                f"{reference.eager_grad_err:.3g}; {reference.tied_to}); worst parameter {worst}")  # fmt: skip
    if _interpreted(prepared, device):
        row["timer"] = "interpreter"
        _append(row, "Triton interpreter: correctness only, not timed")
        return []
    row["timer"] = "wall"
    for _ in range(settings.warmup):
        trainer.step()
    timing = time_wall(trainer.step, sync=trainer.sync, warmup=0, warmup_s=0.0, min_samples=settings.steps,
                       max_samples=settings.steps, budget_s=0.0)  # fmt: skip
    row.update(n_samples=timing.n_samples, ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80)
    row["images_per_s"] = case.batch / (timing.ms_p50 / 1e3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step()
        trainer.sync()
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if settings.profile_steps:
        share = measure_share(trainer.step, device, steps=settings.profile_steps, compiled=prepared.compiled)
        row.update(bn_act_ms=share.bn_act_ms, bn_act_share=share.share)
        if share.share != share.share:  # NaN: say why
            _append(row, f"BN + activation share: {share.note}")
    return list(timing.samples_ms)


def _release(device: torch.device) -> None:
    """Free what the last provider held: Dynamo's compiled code (it references the model), then memory."""
    import torch._dynamo

    torch._dynamo.reset()
    if device.type == "cuda":  # the peak-memory figure of the next provider must not see this one's tensors
        gc.collect()
        torch.cuda.empty_cache()


def measure_case(
    case: StepCase,
    providers: Sequence[StepProvider],
    device: torch.device,
    settings: StepSettings,
    provenance: dict,
    *,
    on_point: Callable[[StepProvider, dict, list[float]], None] | None = None,
) -> list[tuple[dict, list[float]]]:
    """Rows (and raw samples, ms) of every provider for one case. Never raises but for KeyboardInterrupt."""
    device = torch.device(device)
    batch = reference = ref_error = None
    try:
        batch = _make_batch(case, device, settings.seed)
        reference = _reference(case, device, settings, batch)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        ref_error = err
    finally:
        _release(device)
    out = []
    for provider in providers:
        row = _base_row(case, provider, provenance, settings)
        samples: list[float] = []
        if ref_error is not None:
            status = "oom" if _is_oom(ref_error) else "error"
            row.update(status=status, message=f"the eager reference step failed: {_message(ref_error)}")
        else:
            try:
                samples = _measure(case, provider, device, settings, batch, reference, row)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a failing configuration is recorded; the run goes on
                row.update(status="oom" if _is_oom(err) else "error", message=_message(err))
            finally:
                _release(device)
        out.append((row, samples))
        if on_point is not None:
            on_point(provider, row, samples)
    return out


# --- frames ---------------------------------------------------------------------------------------------------------

#: a provider is compared with a baseline of the same case, timer, device and run only
_CASE_KEY = ["model", "batch", "resolution", "dtype", "layout", "timer", "device_name", "run_id"]


def add_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """``speedup_vs_eager``/``speedup_vs_compile``: the baseline's ms_p50 over this row's, same case and timer;
    NaN unless both are ok and timed."""
    out = frame.copy()
    ms = pd.to_numeric(out["ms_p50"], errors="coerce")
    timed = out["status"].eq("ok") & out["timer"].isin(_TIMED) & (ms > 0)
    for baseline, column in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
        base = out[timed & out["provider"].eq(baseline)][[*_CASE_KEY, "ms_p50"]]
        base = base.drop_duplicates(_CASE_KEY, keep="last").rename(columns={"ms_p50": "_base_ms"})
        merged = out[_CASE_KEY].merge(base, on=_CASE_KEY, how="left")
        ratio = pd.to_numeric(merged["_base_ms"]).to_numpy(np.float64) / ms.to_numpy(np.float64)
        out[column] = np.where(timed.to_numpy(), ratio, np.nan)
    return out


def results_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly the schema's columns, in order, speedups filled in."""
    frame = pd.DataFrame(list(rows), columns=list(STEP_COLUMNS))
    return add_speedups(frame) if len(frame) else frame


def run_steps(
    cases: Sequence[StepCase],
    providers: Sequence[StepProvider],
    device: torch.device | str,
    settings: StepSettings,
    provenance: dict,
) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """Every case with every provider: the results frame and the raw samples by point id."""
    rows, samples = [], {}
    for case in cases:
        for row, got in measure_case(case, providers, torch.device(device), settings, provenance):
            rows.append(row)
            samples[point_id(row)] = got
    return results_frame(rows), samples


def point_id(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("provider", "timer", "model", "batch", "resolution", "dtype", "layout"))
