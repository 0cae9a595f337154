"""``bnbench profile``: a per-kernel breakdown of one benchmark case for each provider (torch.profiler), a Chrome
trace per provider, the Triton kernels' launch configurations with registers and spills, each kernel's bandwidth
for its bytes, and optionally the Nsight Compute command for the case (run when ``ncu`` is on PATH).

Files are written by :mod:`bnbench.bench.cli` (the harness's one writer); the computation is in
:mod:`bnbench.bench.profiling`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import subprocess
import sys
from pathlib import Path

HELP = "per-kernel breakdown of one case (torch.profiler, launch configs, Nsight Compute command)"
DESCRIPTION = """\
Profile one benchmark case (the bench axis options, one value each) with every provider: kernels launched per
call, each kernel's time, GPU time vs wall time (launch overhead), a Chrome trace (open it in chrome://tracing or
Perfetto), bnbench's Triton kernels' launch configuration (block sizes, warps, stages) with registers and spills,
and each kernel's achieved bandwidth for the bytes it must move. Writes profile.md, kernels.csv and
trace-<provider>.json to --out and prints the profile. On CPU it profiles eager and compile as aten operators and
says what it cannot show. --ncu prints the Nsight Compute command for the case, and runs it when ncu is on PATH
and a GPU is present. Exit status: 0 ok, 1 a provider failed, 2 bad arguments."""

_DEFAULTS = {
    "batch": "256", "width": "256", "spatial": "1", "dtype": "fp32", "activation": "relu", "passes": "fwd_bwd",
    "layout": "nchw",
}  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    case = parser.add_argument_group("the case (one value each)")
    case.add_argument("--batch", default=_DEFAULTS["batch"], metavar="N", help="batch size")
    case.add_argument("--width", default=_DEFAULTS["width"], metavar="C", help="channels")
    case.add_argument("--spatial", default=_DEFAULTS["spatial"], metavar="S", help="1 (BatchNorm1d) or HxW")
    case.add_argument("--dtype", default=_DEFAULTS["dtype"], help="fp32, fp16 or bf16")
    case.add_argument("--activation", default=_DEFAULTS["activation"], help="the activation after BN")
    case.add_argument("--pass", dest="passes", default=_DEFAULTS["passes"], help="fwd, bwd, fwd_bwd or eval")
    case.add_argument("--layout", default=_DEFAULTS["layout"], help="nchw or channels_last")
    run = parser.add_argument_group("run")
    run.add_argument("--providers", default="eager,compile,triton", help="comma list of providers")
    run.add_argument("--iters", type=int, default=10, help="profiled calls (after warm-up)")
    run.add_argument("--warmup", type=int, default=3, help="calls before profiling (compiles happen here)")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: results/profile/<device>-<UTC timestamp>/; results/ is git-ignored)",
    )
    run.add_argument("--no-trace", action="store_true", help="do not write Chrome traces")
    run.add_argument("--ncu", action="store_true",
                     help="print the Nsight Compute command for the case; run it when ncu is on PATH")  # fmt: skip


def _one(values: list, flag: str):
    if len(values) != 1:
        raise ValueError(f"{flag}: profile takes exactly one value, got {values}")
    return values[0]


def select_case(args):
    """The single Case the arguments name."""
    from bnbench.bench import cases as c

    spatial = _one(c.parse_spatial(args.spatial), "--spatial")
    layout = _one(c.parse_layouts(args.layout), "--layout")
    found = c.grid(
        [_one(c.parse_ints(args.batch, "--batch"), "--batch")],
        [_one(c.parse_ints(args.width, "--width"), "--width")],
        [spatial],
        [_one(c.parse_dtypes(args.dtype), "--dtype")],
        [_one(c.parse_activations(args.activation), "--activation")],
        [_one(c.parse_passes(args.passes), "--pass")],
        [layout],
    )
    if not found:
        raise ValueError(f"--layout {layout} needs a spatial size (HxW), got --spatial {args.spatial}")
    return found[0]


def run(args) -> int:
    import torch

    from bnbench import _io, envinfo
    from bnbench.bench import profiling
    from bnbench.bench.cli import write_profile_outputs
    from bnbench.bench.providers import get_providers

    case = select_case(args)
    providers = get_providers(args.providers)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as bnbench bench does on CPU: no OpenMP stalls on a shared machine
    stamp = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or _io.RESULTS_ROOT / "profile" / f"{envinfo.device_slug()}-{stamp:%Y%m%d-%H%M%S}"
    _io.folder_entries(out)  # a file named by --out is refused before anything is profiled

    profiles = []
    for provider in providers:
        print(f"bnbench profile: {provider.name} {case.label()} ...", file=sys.stderr)
        profiles.append(profiling.profile_provider(case, provider, device, iters=args.iters, warmup=args.warmup))
    text = profiling.format_markdown(case, device, profiles)
    ncu_text = _ncu(args, case, providers, device, out) if args.ncu else ""
    with _io.folder_lock(out, "bnbench profile"):
        write_profile_outputs(
            out, text + ncu_text, profiling.kernels_frame(case, profiles), [] if args.no_trace else profiles
        )
    print(text + ncu_text)
    print(f"bnbench profile: wrote {out}", file=sys.stderr)
    return 1 if any(p.status == "error" for p in profiles) else 0


def _ncu(args, case, providers, device, out: Path) -> str:
    from bnbench.bench import profiling

    names = [p.name for p in providers]
    cmd = profiling.ncu_command(case, names, str(out / "ncu.csv"))
    lines = ["", "## Nsight Compute", "", "```", profiling.shell_join(cmd), "```", ""]
    if shutil.which("ncu") is None:
        lines.append("ncu is not on PATH: run the command above on a machine with Nsight Compute.")
    elif device.type != "cuda":
        lines.append("no CUDA device here: ncu has no kernels to measure.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        status = "finished" if done.returncode == 0 else f"failed (exit {done.returncode}): {done.stderr[-800:]}"
        lines.append(f"ncu {status}; metrics per kernel in ncu.csv.")
    return "\n".join(lines) + "\n"
