"""What the statistics epilogue costs: the Triton matmul with and without it, against ``torch.matmul``.

For each shape (ResNet-50's 1x1 convolutions at batch 256 as [N*H*W, C_in] x [C_in, C_out] matmuls, and an
MLP's Linears) and dtype it times, with ``triton.testing.do_bench`` (L2 flushed, median of CUDA-event samples):
``torch`` (torch.matmul of the same operands; fp32 with TF32 off for "ieee" and on for "tf32"), ``gemm`` (our
matmul, no statistics), ``gemm_stats`` (with the epilogue's partial statistics) and ``fused_fwd`` (the whole
training forward: matmul + statistics, combine, normalise + ReLU). ``epilogue`` = gemm_stats / gemm - 1 is the
epilogue's cost; ``vs_torch`` = torch / gemm (> 1: ours is faster). Every row also checks our Z against
torch.matmul's (``rel_err``). Needs a CUDA device. ``python -m bnbench.bench.gemm_epilogue [--rep-ms MS]``
prints the table as markdown (nothing is written to disk).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["SHAPES", "measure_epilogue", "to_markdown"]


def _shapes() -> list[tuple[str, int, int, int]]:
    from bnbench.bench.gemm_cases import MLP_LINEARS, RESNET50_CONV1X1

    shapes = []
    for cin, cout, h, stride, _, _ in RESNET50_CONV1X1:
        ho = -(-h // stride)
        shapes.append(
            (f"resnet50 {cin}->{cout} @{h}" + (f"/s{stride}" if stride > 1 else ""), 256 * ho * ho, cin, cout)
        )
    shapes += [(f"mlp {n}x{k}->{c}", n, k, c) for n, k, c in MLP_LINEARS]
    return shapes


SHAPES = _shapes()
#: (dtype, fp32 input precision): bf16 on tensor cores, exact fp32 (nn.Linear's default), tf32
VARIANTS = (("bf16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32"))


def _time_one(M: int, K: int, N: int, dtype_name: str, precision: str, rep_ms: float) -> dict:
    import torch
    from triton.testing import do_bench

    from bnbench.kernels.gemm_launchers import gemm_bn_stats, linear_bn_act_fwd_train
    from bnbench.testing import rel_err

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    x = torch.randn(M, K, device="cuda").add_(0.5).to(dtype)
    w = (torch.randn(N, K, device="cuda") * K**-0.5).to(dtype)
    g, b = torch.rand(N, device="cuda") + 0.5, torch.randn(N, device="cuda") * 0.1
    rm, rv = torch.zeros(N, device="cuda"), torch.ones(N, device="cuda")
    fns = {
        "torch_ms": lambda: torch.matmul(x, w.t()),
        "gemm_ms": lambda: gemm_bn_stats(x, w, stats=False, input_precision=precision),
        "gemm_stats_ms": lambda: gemm_bn_stats(x, w, stats=True, input_precision=precision),
        "fused_fwd_ms": lambda: linear_bn_act_fwd_train(
            x, w, g, b, rm, rv, momentum=0.1, eps=1e-5, activation="relu", input_precision=precision
        ),
    }
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"  # torch.matmul in the same fp32 mode as ours
    try:
        error = rel_err(fns["gemm_ms"]()[0], fns["torch_ms"]())
        times = {k: do_bench(fn, warmup=10, rep=rep_ms, quantiles=[0.5])[0] for k, fn in fns.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {**times, "rel_err": error}


def measure_epilogue(shapes=SHAPES, variants=VARIANTS, rep_ms: float = 50.0):
    """One row per (shape, variant): times in ms (medians), the epilogue's relative cost, ours vs torch."""
    import pandas as pd
    import torch

    from bnbench.bench.bytes_model import ELEMENT_SIZE, matmul_bn_act_bytes
    from bnbench.kernels.gemm_launchers import default_gemm_config

    if not torch.cuda.is_available():
        raise RuntimeError("measure_epilogue needs a CUDA device")
    rows = []
    for name, M, K, N in shapes:
        for dtype_name, precision in variants:
            t = _time_one(M, K, N, dtype_name, precision, rep_ms)
            config = default_gemm_config(M, N, K, ELEMENT_SIZE[dtype_name], torch.device("cuda"), precision)
            rows.append({
                "shape": name, "M": M, "K": K, "N": N, "dtype": dtype_name, "precision": precision, **t,
                "epilogue": t["gemm_stats_ms"] / t["gemm_ms"] - 1.0, "vs_torch": t["torch_ms"] / t["gemm_ms"],
                "fused_fwd_gbps": matmul_bn_act_bytes("fwd", M, K, N, dtype_name) / (t["fused_fwd_ms"] * 1e-3) / 1e9,
                "config": config.describe(),
            })  # fmt: skip
    return pd.DataFrame(rows)


def to_markdown(frame) -> str:
    """The frame as a markdown table (floats with 4 significant digits)."""
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnbench.bench.gemm_epilogue", description=__doc__)
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench's rep per timing (ms)")
    parser.add_argument("--quick", action="store_true", help="three shapes only (a smoke test)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gemm_epilogue: needs a CUDA device", file=sys.stderr)
        return 2
    shapes = SHAPES[:1] + SHAPES[6:7] + SHAPES[-1:] if args.quick else SHAPES
    frame = measure_epilogue(shapes, rep_ms=args.rep_ms)
    print(f"# Statistics epilogue cost on {torch.cuda.get_device_name()}\n")
    print(to_markdown(frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
