"""``bnbench inspect``: the plan and compiled code of bnbench's Triton path for cases, without a GPU; optionally
host time per call beside eager. Computation in :mod:`bnbench.inspect.table`; this module parses and writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HELP = "launch plan and sm_90 compiled code of the Triton path, no GPU needed (--host-overhead: host us/call)"
DESCRIPTION = """\
Inspect bnbench's Triton path for the selected cases (same case options as 'bnbench bench') without running it.
bnbench's launchers run on uninitialised CPU tensors under a recording Triton driver: the argument checks, the
planner, Triton's binder, specialisation and cache, and Triton's real compiler for --target run; each launch is
recorded instead of made, so NOTHING is executed on a GPU (none is needed). For every pass it reports the path
(fused or split), the launches (bnbench's kernels, plus the aten ops that would launch a CUDA kernel, e.g.
autograd's zero gradients), the bytes the kernels' code issues against the 2T/3T floors and a time modelled at
the H200's copy bandwidth; for every launch the grid, tiles, warps, and from the cubin: registers, spill bytes,
shared memory, occupancy and waves (modelled), the width of the main loads, cp.async (LDGSTS) and BAR.SYNC inside
the hot loops. --host-overhead also measures host microseconds per call on this CPU, eager (PyTorch's CPU
kernels on the same small input: includes that compute) beside triton (its whole host path, launches recorded:
no GPU work and no CUDA launch call). Needs TRITON_INTERPRET unset. Writes launches.csv, passes.csv, host.csv,
inspect.json and summary.md to --out (each file whole). Exit status: 0 ok, 1 a case failed to compile,
2 bad arguments, 130 interrupted."""

_PRESETS = ("quick", "standard", "resnet50", "baseline", "resnet50-b256", "report")


def configure(parser: argparse.ArgumentParser) -> None:
    cases = parser.add_argument_group("cases (as in 'bnbench bench'; with --preset they filter it)")
    cases.add_argument("--preset", choices=_PRESETS, default=None,
                       help="a benchmark preset, or: baseline (MEASURE.md's shapes, fp32+bf16, every pass), "
                            "resnet50-b256 (ResNet-50's BN shapes at batch 256, both layouts), report (both)")  # fmt: skip
    cases.add_argument("--batch", metavar="N,...", help="batch sizes, e.g. 64,256,1024")
    cases.add_argument("--width", metavar="C,...", help="channel counts, e.g. 64,256,1024")
    cases.add_argument("--spatial", metavar="S,...", help="1 for BatchNorm1d on (N, C); HxW (or H) for BatchNorm2d")
    cases.add_argument("--dtype", metavar="D,...", help="fp32, fp16, bf16")
    cases.add_argument("--activation", metavar="A,...", help="identity, relu, leaky_relu, sigmoid, tanh, gelu, ...")
    cases.add_argument("--pass", dest="passes", metavar="P,...", help="fwd, bwd, fwd_bwd, eval")
    cases.add_argument("--layout", metavar="L,...", help="nchw and/or channels_last (4-D only)")
    run = parser.add_argument_group("run")
    run.add_argument("--target", default="sm_90", help="GPU to compile for: sm_90 (H100/H200, 132 SMs) or sm_80")
    run.add_argument("--json", action="store_true", help="print the JSON document instead of the tables")
    run.add_argument("--out", type=Path, default=None, help="also write CSV, JSON and summary.md to this folder")
    run.add_argument("--host-overhead", action="store_true",
                     help="also measure host us per call, eager beside triton (cases of at most 65536 elements)")  # fmt: skip
    run.add_argument("--calls", type=int, default=300, help="timed calls per provider for --host-overhead")
    run.add_argument("--regenerate", default="", help=argparse.SUPPRESS)  # the command line quoted in summary.md


def _select(args):
    from bnbench.bench import cases as c
    from bnbench.inspect.cases import INSPECT_PRESETS, inspect_preset

    def parsed(value, parse):
        return None if value is None else parse(value)

    axes = dict(
        batch=parsed(args.batch, lambda v: c.parse_ints(v, "--batch")),
        width=parsed(args.width, lambda v: c.parse_ints(v, "--width")),
        spatial=parsed(args.spatial, c.parse_spatial),
        dtypes=parsed(args.dtype, c.parse_dtypes),
        activations=parsed(args.activation, c.parse_activations),
        passes=parsed(args.passes, c.parse_passes),
        layouts=parsed(args.layout, c.parse_layouts),
    )
    if args.preset in INSPECT_PRESETS:
        given = {k: v for k, v in axes.items() if v is not None}
        selected = c.filter_cases(inspect_preset(args.preset), **given)
        if not selected:
            raise ValueError(f"no case left in preset {args.preset!r} filtered by {given}")
        return selected
    return c.select_cases(args.preset, **axes)


def run(args) -> int:
    from bnbench._io import write_csv, write_json, write_text
    from bnbench.inspect import table
    from bnbench.inspect.host import check_host_cases
    from bnbench.kernels._target import parse_target

    if args.calls < 10:
        raise ValueError(f"--calls must be at least 10, got {args.calls}")
    target = parse_target(args.target)
    cases = _select(args)
    if args.host_overhead:
        check_host_cases(cases)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise ValueError("inspect compiles the real kernels: unset TRITON_INTERPRET (it selects the interpreter)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default (the GPU image), stated for 3.9

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(1)  # eager's CPU kernels single-threaded: a fair, quiet host measurement
    with tqdm(total=len(cases), desc="inspect", unit="case", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(case):  # after each case
            bar.set_postfix_str(case.label(), refresh=False)
            bar.update(1)

        result = table.inspect_cases(cases, target, progress)
    if args.host_overhead:
        from bnbench.inspect.host import host_frame

        print("bnbench inspect: measuring host time per call ...", file=sys.stderr)
        result.host = host_frame(cases, target=target, calls=args.calls, warmup=max(10, args.calls // 10))
    import triton

    from bnbench import __version__, envinfo

    machine = "GPU machine" if torch.cuda.is_available() else "CPU machine"
    title = f"bnbench inspect: {machine}, compiled for {target.name}, nothing executed on a GPU"
    provenance = {"bnbench": __version__, "git": envinfo.git_sha() or "unknown", "torch": torch.__version__,
                  "triton": triton.__version__}  # fmt: skip
    summary = table.format_summary(result, title=title, regenerate=args.regenerate, provenance=provenance)
    document = table.to_json(result, provenance)
    if args.out is not None:
        write_csv(args.out / "launches.csv", result.launches)
        write_csv(args.out / "passes.csv", result.passes)
        if result.host is not None:
            write_csv(args.out / "host.csv", result.host)
        write_json(args.out / "inspect.json", document)
        write_text(args.out / "summary.md", summary)
        print(f"bnbench inspect: wrote {args.out}", file=sys.stderr)
    print(json.dumps(document, indent=2, default=str) if args.json else summary)
    return 1 if result.errors else 0
