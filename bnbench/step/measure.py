"""One training-step configuration per provider: prepared, checked, timed, profiled; rows in the step schema.

For each case (:class:`bnbench.step.training.StepCase`) the reference runs first (:mod:`bnbench.step.check`: the
network in float64 and in the run's precision). Each provider then gets the same initial weights and data:

1. its first step (forward, loss, backward, optimizer step) is timed alone as ``compile_s`` (Dynamo/Inductor
   compile, Triton JIT, cuDNN planning: first-call latency, never in the timed region); its loss and gradients
   (before the optimizer step) are checked against the float64 network's: above the bound, status incorrect;
2. ``warmup`` more steps, then ``steps`` timed steps (wall clock, synchronised on CUDA: what a user waits for);
3. on CUDA one more step for the peak memory (``torch.cuda.max_memory_allocated``: weights, gradients, optimizer
   state and activations). On CPU there is no allocator peak statistic: the column stays empty;
4. ``profile_steps`` steps under torch.profiler for the BatchNorm + activation share (:mod:`bnbench.step.share`).

Under the Triton interpreter (fused backend "triton" on CPU) only step 1 runs: a correctness check, never timed.
A failing configuration becomes a row with status error (or oom) and its message; the run goes on. Touches no file.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from bnbench.schema import STEP_COLUMNS
from bnbench.step.check import Reference, errors, reference_step
from bnbench.step.providers import Prepared, StepProvider
from bnbench.step.share import measure_share
from bnbench.step.training import DTYPES, StepCase, StepSettings, Trainer, build, make_batch

__all__ = ["add_speedups", "measure_case", "point_id", "results_frame", "run_steps"]

_TIMED = ("wall",)


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


def _measure(case, provider, device, settings, batch, reference: Reference, row) -> list[float]:
    from bnbench.bench.timing import time_wall

    model, source = build(case, device, settings)
    row["network_source"] = source
    row["bn_layers"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    prepared = provider.prepare(model, settings.fused_backend, batch.x[:2])
    row.update(fused_backend=prepared.fused_backend, bn_fused=prepared.bn_fused, bn_unfused=prepared.bn_unfused)
    row["bn_unfused_reasons"] = "; ".join(f"{n} x {why}" for why, n in prepared.unfused_reasons.items())
    trainer = Trainer(prepared.model, case, device, batch, settings.lr)
    capture: dict = {}
    trainer.sync()
    start = time.perf_counter()
    trainer.step(capture)
    trainer.sync()
    row["compile_s"] = time.perf_counter() - start
    loss_err, grad_err, worst = errors(capture, reference.f64)
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
        batch = make_batch(case, device, settings.seed)
        reference = reference_step(case, device, settings, batch)
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
