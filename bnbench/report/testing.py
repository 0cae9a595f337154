"""Synthetic results frames in the bench and train schemas, for tests of code that reads results.

These frames are made up (a simple bytes / bandwidth time model with seeded noise); they exist so that report,
harness and CI code can be tested without a GPU. Nothing in ``bnbench`` reports them as measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bnbench.schema import BENCH_COLUMNS, ELEMENT_SIZE, TRAIN_COLUMNS

__all__ = ["synthetic_bench", "synthetic_train"]

#: minimal traffic in units of one tensor (the bytes model of docs/measuring.md)
_PASS_TENSORS = {"fwd": 2, "bwd": 3, "fwd_bwd": 5, "eval": 2}
#: made-up fraction of copy bandwidth per provider
_PROVIDER_EFFICIENCY = {"eager": 0.45, "compile": 0.8, "compile-max-autotune": 0.82, "triton": 0.86}


def synthetic_bench(
    *,
    providers: Sequence[str] = ("eager", "compile", "triton"),
    dtypes: Sequence[str] = ("fp32", "bf16"),
    passes: Sequence[str] = ("fwd", "fwd_bwd"),
    batches: Sequence[int] = (256, 4096, 65536),
    widths: Sequence[int] = (64, 1024),
    timer: str = "cuda_event",
    device: str = "NVIDIA H200",
    copy_gbps: float = 4270.0,
    spread: float = 0.03,
    seed: int = 0,
    run_id: str = "synthetic",
) -> pd.DataFrame:
    """A complete, valid bench frame: every case x provider, status ok, speedups computed within the frame."""
    rng = np.random.default_rng(seed)
    rows = []
    for dtype in dtypes:
        for pass_ in passes:
            for n in batches:
                for c in widths:
                    numel = n * c
                    bytes_min = _PASS_TENSORS[pass_] * numel * ELEMENT_SIZE[dtype]
                    for provider in providers:
                        efficiency = _PROVIDER_EFFICIENCY.get(provider, 0.5)
                        ms = 0.005 + bytes_min / (efficiency * copy_gbps * 1e9) * 1e3
                        ms *= float(rng.uniform(0.98, 1.02))
                        rows.append(
                            {
                                "run_id": run_id, "timestamp_utc": "2026-11-26T00:00:00Z", "git_sha": "0123456789ab",
                                "bnbench_version": "0.1.0", "torch_version": "2.11.0", "triton_version": "3.6.0",
                                "device_name": device, "peak_copy_gbps": copy_gbps,
                                "op": "bn1d", "pass": pass_, "activation": "relu", "bn_mode": "train",
                                "dtype": dtype, "layout": "nchw", "N": n, "C": c, "S": 1, "shape": f"{n}x{c}",
                                "numel": numel, "provider": provider, "is_baseline": provider != "triton",
                                "kernel_config": "", "timer": timer, "n_samples": 100,
                                "ms_p20": ms * (1 - spread), "ms_p50": ms, "ms_p80": ms * (1 + spread),
                                "bytes_min": bytes_min, "gbps": bytes_min / (ms * 1e-3) / 1e9,
                                "compile_s": 0.5, "peak_mem_mb": numel * ELEMENT_SIZE[dtype] * 3 / 2**20,
                                "max_rel_err": 1e-6, "status": "ok", "message": "",
                            }
                        )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["frac_of_copy_bw"] = frame["gbps"] / frame["peak_copy_gbps"]
    case = ["dtype", "pass", "N", "C"]
    for baseline in ("eager", "compile"):
        ref = frame[frame["provider"] == baseline].set_index(case)["ms_p50"].rename(f"_ref_{baseline}")
        frame = frame.join(ref, on=case)
        frame[f"speedup_vs_{baseline}"] = frame[f"_ref_{baseline}"] / frame["ms_p50"]
    return frame[list(BENCH_COLUMNS)]


def synthetic_train(
    *,
    norms: Sequence[str] = ("none", "eager", "fused"),
    seeds: Sequence[int] = (0, 1),
    steps: int = 50,
    metrics: Sequence[str] = ("test_acc", "train_loss"),
) -> pd.DataFrame:
    """A valid long-format train frame: one row per (norm, seed, step, metric), accuracy rising faster with BN."""
    rows = []
    for norm in norms:
        rate = 0.02 if norm == "none" else 0.08
        for seed in seeds:
            rng = np.random.default_rng(seed)
            for step in range(0, steps + 1, 5):
                accuracy = 0.1 + 0.88 * (1 - np.exp(-rate * step)) + float(rng.normal(0, 0.005))
                values = {"test_acc": accuracy, "train_loss": 2.3 * np.exp(-rate * step)}
                for metric in metrics:
                    rows.append(
                        {
                            "experiment": "bn-paper", "dataset": "digits", "model": "mlp", "depth": 3,
                            "width": 100, "activation": "sigmoid", "norm": norm, "lr": 0.1, "batch_size": 60,
                            "seed": seed, "step": step, "wall_s": step * 0.01, "metric": metric,
                            "value": values[metric],
                        }
                    )  # fmt: skip
    return pd.DataFrame(rows, columns=list(TRAIN_COLUMNS))
