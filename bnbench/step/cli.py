"""``bnbench step``: time a network's whole training step under eager, torch.compile, the fused layers and the
fused layers under torch.compile; the only module of ``bnbench.step`` that touches the disk (results.csv,
results.json, PNG figures, summary.md, each written whole; the CSV and JSON are rewritten after every point).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import sys
from pathlib import Path

HELP = "time a network's training step: eager, compile, fused, fused+compile -> CSV, JSON, PNG, summary.md"
DESCRIPTION = """\
Time a full training step (zero_grad, forward, cross-entropy loss, backward, SGD step) of a network on synthetic
data under eager PyTorch, torch.compile, the fused BatchNorm + activation layers (convert_bn_act) and the fused
layers under torch.compile, for every network x batch x precision x layout given. Reports the step time
(p20/p50/p80 of --steps timed steps after --warmup), images per second, speedups vs eager and compile, the first
step's latency apart (compile_s), peak GPU memory, the share of the step in BatchNorm and activation kernels
(torch.profiler, --profile-steps more steps), and checks each provider's loss and gradients after one step against
the same network's in float64 (same weights and data; the bound is the compute precision's tolerance or 100x the
eager network's own error, whichever is larger). convert_bn_act is given two images of the batch, so a
BatchNorm feeding a residual add fuses with the add (a ResNet's downsample BatchNorm, the add's other input, fuses
without activation); BatchNorms it leaves alone (e.g. one whose output has another use) are counted in bn_unfused,
with the reason.

Networks: resnet18 and resnet50 (torchvision's when it imports, else the project's identical definitions; 224x224,
1000 classes), cnn (32x32) and mlp (3x8x8) for quick CPU runs. Precision: fp32, or bf16 under torch.autocast.

On a CPU the fused layers run their PyTorch reference (fused_backend torch, said in every row) unless
--fused-backend triton: then the Triton kernels run in the interpreter, checked after one step and never timed
(tiny networks only). peak_mem_mb needs CUDA. Writes results.csv, results.json, step_time.png, summary.md to --out.
Exit status: 0 every row ok, 1 a configuration failed (error, oom) or mismatched (incorrect), 2 bad arguments."""


def configure(parser: argparse.ArgumentParser) -> None:
    cases = parser.add_argument_group("configurations (comma lists)")
    cases.add_argument("--model", required=True, metavar="NAME,...", help="resnet18, resnet50, cnn, mlp")
    cases.add_argument("--batch", default="32", metavar="N,...", help="batch sizes (>= 2)")
    cases.add_argument("--dtype", default="fp32", metavar="D,...", help="fp32 and/or bf16 (torch.autocast)")
    cases.add_argument("--layout", default="nchw", metavar="L,...",
                       help="nchw and/or channels_last (channels_last is dropped for mlp)")  # fmt: skip
    cases.add_argument("--resolution", type=int, default=None, metavar="PX",
                       help="input height = width (default: the network's own: 224 for the ResNets)")  # fmt: skip
    run = parser.add_argument_group("run")
    run.add_argument("--providers", default="eager,compile,fused,fused-compile",
                     help="comma list of eager, compile, fused, fused-compile")  # fmt: skip
    run.add_argument("--fused-backend", choices=("auto", "triton", "torch"), default="auto",
                     help="the fused layers' backend: auto = triton on CUDA, torch (the PyTorch reference) on CPU; "
                     "triton on CPU runs the Triton interpreter (checked, not timed)")  # fmt: skip
    run.add_argument("--steps", type=int, default=10, help="timed steps per configuration and provider")
    run.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compile) step")
    run.add_argument("--profile-steps", type=int, default=2,
                     help="steps under torch.profiler for the BN + activation share (0: not measured)")  # fmt: skip
    run.add_argument("--source", choices=("auto", "torchvision", "bnbench"), default="auto",
                     help="ResNet definitions: torchvision's when it imports (auto), or the project's")  # fmt: skip
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    run.add_argument("--threads", type=int, default=1, help="CPU runs: PyTorch threads (recorded in results.json)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weights and data (the same for every provider)")
    run.add_argument(
        "--out", type=Path, default=None, help="output folder (default: results/step/<device>-<UTC time>/, git-ignored)"
    )
    run.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _names(text: str, what: str, valid) -> list[str]:
    items = [t.strip().lower() for t in str(text).split(",")]
    bad = [t for t in items if t not in valid]
    if not items or bad:
        raise ValueError(f"{what}: unknown value(s) {bad or [text]}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(items))


def plan_cases(args) -> tuple[list, list[str]]:
    """The configurations, and a note per combination dropped (channels_last of the MLP)."""
    from bnbench.bench.cases import parse_ints
    from bnbench.models import NETWORKS, get_network
    from bnbench.step.training import DTYPES, LAYOUTS, StepCase

    models = _names(args.model, "--model", NETWORKS)
    dtypes = _names(args.dtype, "--dtype", DTYPES)
    layouts = _names(args.layout.replace("nhwc", "channels_last"), "--layout", LAYOUTS)
    batches = parse_ints(args.batch, "--batch")
    if any(b < 2 for b in batches):
        raise ValueError(f"--batch: BatchNorm trains on batch statistics, every batch must be >= 2, got {args.batch}")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be a positive integer, got {args.resolution}")
    cases, dropped = [], []
    for model in models:
        for layout in layouts:
            if layout == "channels_last" and not get_network(model).spatial:
                dropped.append(f"{model}: no 4-D activations, channels_last dropped")
                continue
            cases += [StepCase(model, b, d, layout, args.resolution) for b in batches for d in dtypes]
    if not cases:
        raise ValueError(f"no configuration left ({'; '.join(dropped)})")
    return cases, dropped


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def _load_average() -> list[float] | None:
    """The machine's load averages at the start: CPU timings on a loaded machine are noise, and this says so."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write_outputs(out: Path, frame, sidecar: dict, *, report: bool) -> str | None:
    """results.csv and results.json; with ``report``, summary.md and the figures too (returns the summary)."""
    from bnbench import _io

    _io.write_csv(out / "results.csv", frame)
    _io.write_json(out / "results.json", sidecar)
    if not report:
        return None
    from bnbench.report.step import step_figures, step_summary_markdown

    summary = step_summary_markdown(frame)
    _io.write_text(out / "summary.md", summary)
    for stem, fig in step_figures(frame).items():
        _io.write_figure(out / f"{stem}.png", fig, dpi=120, bbox_inches="tight")
    return summary


def run(args) -> int:
    import torch

    from bnbench import envinfo
    from bnbench.bench.runner import provenance_from_env
    from bnbench.step.measure import measure_case, point_id, results_frame
    from bnbench.step.providers import get_step_providers
    from bnbench.step.training import StepSettings

    cases, dropped = plan_cases(args)
    providers = get_step_providers(args.providers)
    device = _device(args.device)
    backend = args.fused_backend if args.fused_backend != "auto" else ("triton" if device.type == "cuda" else "torch")
    if backend == "triton" and device.type == "cpu" and not envinfo.switch_triton_interpreter_on():
        raise ValueError("--fused-backend triton on CPU needs the Triton interpreter, but triton was imported "
                         "before TRITON_INTERPRET could be set; set TRITON_INTERPRET=1 in the environment")  # fmt: skip
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    settings = StepSettings(fused_backend=backend, warmup=args.warmup, steps=args.steps,
                            profile_steps=args.profile_steps, seed=args.seed, source=args.source)  # fmt: skip
    for note in dropped:
        print(f"bnbench step: {note}", file=sys.stderr)
    points = [(c, p) for c in cases for p in providers]
    if args.dry_run:
        print(f"{len(points)} point(s) on {device} (fused backend {backend})")
        for i, (case, provider) in enumerate(points, 1):
            print(f"{i:4d}. {provider.name:<14} {case.label()}")
        return 0
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    from bnbench import _io

    started = _dt.datetime.now(_dt.timezone.utc)
    info = envinfo.collect()
    out = args.out or _io.RESULTS_ROOT / "step" / f"{envinfo.device_slug(info)}-{started:%Y%m%d-%H%M%S}"
    if (out / "results.csv").exists():
        raise ValueError(f"{out} already holds results.csv: choose another --out")
    provenance = provenance_from_env(info, out.name)
    options = {k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
               for k, v in vars(args).items() if not k.startswith("_")}  # fmt: skip
    sidecar = {
        "environment": info,
        "run": {"run_id": out.name, "started_utc": started.isoformat(timespec="seconds"), "options": options,
                "device": str(device), "fused_backend": backend, "torch_threads": torch.get_num_threads(),
                "settings": dataclasses.asdict(settings), "dropped": dropped,
                "load_average_1_5_15_min": _load_average()},
        "samples_ms": {},
    }  # fmt: skip
    print(f"bnbench step: {len(points)} point(s) on {device}, fused backend {backend}; out {out}", file=sys.stderr)
    rows: list[dict] = []
    from tqdm.auto import tqdm

    with (
        _io.folder_lock(out, "bnbench step"),  # one writer per folder, as for every bnbench command
        tqdm(total=len(points), desc="step", unit="pt", file=sys.stderr, disable=args.no_progress) as bar,
    ):

        def on_point(provider, row, samples) -> None:  # every finished point is on disk (Ctrl-C keeps them)
            rows.append(row)
            sidecar["samples_ms"][point_id(row)] = samples
            sidecar["run"]["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            write_outputs(out, results_frame(rows), sidecar, report=False)
            bar.update(1)

        for case in cases:
            bar.set_postfix_str(case.label(), refresh=True)
            measure_case(case, providers, device, settings, provenance, on_point=on_point)
        frame = results_frame(rows)
        summary = write_outputs(out, frame, sidecar, report=True)
    print(summary)
    counts = frame["status"].value_counts().to_dict()
    print(f"bnbench step: wrote {out} ({', '.join(f'{n} {s}' for s, n in counts.items())})", file=sys.stderr)
    failed = frame[frame["status"].isin(("incorrect", "error", "oom"))]
    if len(failed):
        print(f"bnbench step: {len(failed)} configuration(s) failed or mismatched: see summary.md", file=sys.stderr)
        return 1
    return 0
