"""Tables, figures and the Markdown summary of one ``bnbench step`` run (a frame with ``bnbench.schema.STEP_COLUMNS``).

One row per training-step configuration (network, batch, resolution, precision, layout) and provider. Speed
tables use only timed rows (status ok, timer wall); rows run under the Triton interpreter are correctness checks
and failures are listed apart, never averaged in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bnbench.report.document import Section, Table, Text, to_markdown
from bnbench.report.style import PROVIDER_ORDER, color_for, new_figure, order_values

__all__ = ["step_figures", "step_sections", "step_summary_markdown", "step_table"]

STEP_PROVIDER_ORDER = tuple(dict.fromkeys(("eager", "compile", "fused", "fused-compile", *PROVIDER_ORDER)))
_CONFIG = ["model", "batch", "resolution", "dtype", "layout"]
_PROVENANCE = ("run_id", "git_sha", "bnbench_version", "torch_version", "triton_version", "device_name")


def _timed(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "ok") & (df["timer"] == "wall")]


def _config_label(df: pd.DataFrame) -> pd.Series:
    return (df["model"].astype(str) + " b" + df["batch"].astype(str) + " " + df["resolution"].astype(str) + "px "
            + df["dtype"].astype(str) + " " + df["layout"].astype(str))  # fmt: skip


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    rank = {p: i for i, p in enumerate(order_values(df["provider"], STEP_PROVIDER_ORDER))}
    return df.assign(_p=df["provider"].map(rank)).sort_values([*_CONFIG, "_p"], kind="stable").drop(columns="_p")


def environment_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = [{"field": c, "value": ", ".join(map(str, dict.fromkeys(df[c].dropna()))) or "(not recorded)"}
            for c in _PROVENANCE]  # fmt: skip
    stamps = sorted(map(str, df["timestamp_utc"].dropna()))
    rows.append({"field": "measured", "value": f"{stamps[0]} to {stamps[-1]}" if stamps else "(not recorded)"})
    counts = df["status"].value_counts()
    rows.append({"field": "rows", "value": f"{len(df)} ({', '.join(f'{s} {int(n)}' for s, n in counts.items())})"})
    return pd.DataFrame(rows, columns=["field", "value"])


def step_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and provider: the step time (p50 and its p20-p80 band), images per second, speedups,
    first-step latency, peak memory, the BN + activation share, and how many BatchNorms were fused."""
    columns = ["config", "provider", "fused_backend", "timer", "ms_p50", "ms_p20", "ms_p80", "images_per_s",
               "speedup_vs_eager", "speedup_vs_compile", "compile_s", "peak_mem_mb", "bn_act_share", "bn_fused",
               "bn_unfused", "status"]  # fmt: skip
    if df.empty:
        return pd.DataFrame(columns=columns)
    out = _sorted(df)
    return out.assign(config=_config_label(out))[columns].reset_index(drop=True)


def correctness_table(df: pd.DataFrame) -> pd.DataFrame:
    """Loss and gradient errors of every provider against the float64 network after one step."""
    columns = ["config", "provider", "fused_backend", "loss", "loss_rel_err", "grad_rel_err", "eager_grad_rel_err",
               "tolerance", "status"]  # fmt: skip
    if df.empty:
        return pd.DataFrame(columns=columns)
    out = _sorted(df)
    return out.assign(config=_config_label(out))[columns].reset_index(drop=True)


def not_ok_table(df: pd.DataFrame) -> pd.DataFrame:
    bad = _sorted(df[df["status"] != "ok"])
    columns = ["config", "provider", "status", "message"]
    if bad.empty:
        return pd.DataFrame(columns=columns)
    return bad.assign(config=_config_label(bad))[columns].reset_index(drop=True)


def _notes(df: pd.DataFrame) -> list[Text]:
    notes = [Text(
        "Step = optimizer.zero_grad, forward and cross-entropy loss (under torch.autocast for bf16), backward, SGD "
        "step, on synthetic data. ms: wall clock per step (synchronised on CUDA) after warm-up, p50 with p20-p80; "
        "speedup = baseline p50 / provider p50 in the same run; compile_s = the first step's latency (compile, JIT, "
        "planning), never in the timed steps. Correctness: the loss and all gradients after one step against the "
        "same network's in float64 (same weights and data; relative norm errors). The bound (tolerance) is the "
        "compute precision's tolerance (bnbench.testing) times the network's amplification of rounding, measured "
        "as the eager network's own error (eager_grad_rel_err) over the precision's unit roundoff."
    )]  # fmt: skip
    unfused = df[pd.to_numeric(df["bn_unfused"], errors="coerce") > 0]
    fused_rows = unfused[unfused["fused_backend"].fillna("").astype(str) != ""]
    if len(fused_rows):
        reasons = "; ".join(dict.fromkeys(fused_rows["bn_unfused_reasons"].dropna().astype(str)))
        notes.append(
            Text(f"Fused rows: BatchNorms left alone by convert_bn_act (they run as nn.BatchNorm): {reasons}.")
        )
    if (df["fused_backend"].astype(str) == "torch").any():
        notes.append(Text(
            "fused_backend torch: the fused layer ran its PyTorch reference (no CUDA device, or asked for), not the "
            "Triton kernels: these rows measure the conversion, not the kernels."
        ))  # fmt: skip
    cpu = df["peak_mem_mb"].isna() & (df["timer"] == "wall")
    if cpu.any():
        notes.append(Text(
            "peak_mem_mb is empty where no CUDA device was used: PyTorch's CPU allocator keeps no peak statistic "
            "(torch.cuda.max_memory_allocated exists only on CUDA)."
        ))  # fmt: skip
    if (df["timer"] == "interpreter").any():
        notes.append(Text("timer interpreter: the Triton kernels ran in the interpreter (numpy): checked, not timed."))
    return notes


def step_sections(df: pd.DataFrame, *, level: int = 2) -> list[Section]:
    timed = _timed(df)
    speed: list = (
        [Table(step_table(timed))] if len(timed) else [Text("No timed rows: nothing to put in a speed table.")]
    )
    return [
        Section("Environment", [Table(environment_table(df))], level),
        Section("Training step: time, throughput, memory, BN + activation share", [*_notes(df), *speed], level),
        Section("Correctness after one step (vs the network in float64)", [Table(correctness_table(df))], level),
        Section("Incorrect, failed and skipped rows", [Table(not_ok_table(df))], level),
    ]


def step_summary_markdown(df: pd.DataFrame, title: str = "Training-step summary") -> str:
    return to_markdown(step_sections(df), title=title)


def _bars(ax, group: pd.DataFrame, value: str, lo: str | None = None, hi: str | None = None) -> None:
    batches = sorted(group["batch"].unique())
    providers = order_values(group["provider"], STEP_PROVIDER_ORDER)
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        rows = group[group["provider"] == provider].set_index("batch").reindex(batches)
        x = np.arange(len(batches)) + (i - (len(providers) - 1) / 2) * width
        y = pd.to_numeric(rows[value], errors="coerce").to_numpy(float)
        err = None
        if lo and hi:
            err = np.vstack([y - pd.to_numeric(rows[lo]).to_numpy(float), pd.to_numeric(rows[hi]).to_numpy(float) - y])
        ax.bar(x, y, width, yerr=err, label=provider, color=color_for(provider), capsize=2)
    ax.set_xticks(np.arange(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch")


def step_figures(df: pd.DataFrame) -> dict[str, object]:
    """``step_time`` (ms per step by batch, one panel per network, precision and layout) and, when measured,
    ``bn_act_share``. Only timed rows are drawn."""
    timed = _timed(df)
    if timed.empty:
        return {}
    panels = list(timed.groupby(["model", "resolution", "dtype", "layout"], sort=True))
    figures = {}
    for stem, value, ylabel, band in (
        ("step_time", "ms_p50", "ms per training step (p50, bar: p20-p80)", True),
        ("bn_act_share", "bn_act_share", "BN + activation share of the step", False),
    ):
        if pd.to_numeric(timed[value], errors="coerce").notna().sum() == 0:
            continue
        device = ", ".join(map(str, dict.fromkeys(timed["device_name"].dropna()))) or "unknown device"
        fig, axes = new_figure(len(panels), title=f"{ylabel}: {device}")
        for ax, ((model, res, dtype, layout), group) in zip(axes, panels, strict=True):
            _bars(ax, group, value, *(("ms_p20", "ms_p80") if band else (None, None)))
            ax.set_title(f"{model} {res}px {dtype} {layout}")
            ax.set_ylabel(ylabel.split(" (")[0])
            ax.legend(fontsize="small")
        figures[stem] = fig
    return figures
