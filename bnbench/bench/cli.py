"""``bnbench bench``: the benchmark sweep from the command line, and the only module of the harness that touches
the disk (results CSV, JSON sidecar, PNG figures, summary.md; the profiler's files go through here too).

Every file is written whole through :mod:`bnbench._io` (a temporary file, then a rename). The CSV and the JSON
sidecar are rewritten after every point, so Ctrl-C leaves the finished points on disk and ``--resume`` picks up
from there; results.json says how complete the run is (``bnbench.bench.record``). One command writes a folder at
a time (``bnbench._io.folder_lock``). The machine is probed before and after the sweep (copy bandwidth, device,
GPU clocks; ``bnbench.bench.machine``), so a comparison can tell a changed machine from changed code.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import sys
from pathlib import Path

from bnbench.activations import valid_names

HELP = "benchmark sweep vs eager and torch.compile -> CSV, JSON, PNG, summary.md"
DESCRIPTION = """\
Measure fused BatchNorm + activation against PyTorch eager and torch.compile over a sweep of cases, check every
point against a float64 reference, and write results.csv (one row per point; every column is defined in
docs/measuring.md), results.json (environment, copy bandwidth, raw samples), PNG plots and summary.md to --out.

Cases come from a preset or from comma lists. Presets: 'quick' (the default when no axis is given; 12 cases of
BN1d (batch 256/2048 x width 64/256) and BN2d 16x64x14x14 in both layouts, fp32, relu, fwd and fwd_bwd: within two
minutes on a 2-core CPU including torch.compile's C++ builds, 1-3 s per case; 55 s measured with a cold Inductor
cache), 'baseline' (the baseline shapes of docs/measuring.md in fp32 and bf16, 28 cases; GPU-sized), 'standard'
(baseline plus a batch sweep at width 1024 and a width sweep at batch 4096), and
'resnet50' (every BN layer shape of ResNet-50 at batch 64/128/256, channels_last, bf16 and fp32, read off
the model; --from-model NAME does the same for any network, on the given batch/dtype/layout/pass axes, and the
summary adds the call-weighted BN + activation time per training step). With --preset,
axis options filter the preset; without it, they build a grid (unset axes: batch 256, width 256, spatial 1, fp32,
relu, fwd,fwd_bwd, nchw).

Timing: triton.testing.do_bench (L2 flushed, CUDA events; p20/p50/p80) on a GPU; wall-clock medians after warm-up on
CPU. Without a GPU the triton providers run in the Triton interpreter (switched on unless --no-interpret) on the
cases small enough for it, as a correctness check (timer=interpreter, never in a speed table); larger cases are
recorded as skipped, saying why.
With --world-size K under torchrun the same sweep runs on every rank with synchronised BatchNorm (see
docs/measuring.md).

--op bn_add_act measures act(BN(x) + residual) instead, the tail of a ResNet block (the residual like x: same
shape, dtype and layout): eager is F.batch_norm + add + activation, compile that composition compiled, triton
bnbench.batch_norm_act(..., residual=...); the float64 check covers the residual's gradient, and bytes_min counts
its read and its gradient's write (3T forward, 7T forward+backward). It takes every axis and preset of bn_act;
'--op bn_act,bn_add_act' measures each case both ways. With --preset resnet50 or --from-model the cases are the
network's BatchNorm calls as convert_bn_act fuses them: bn_act for a BatchNorm + activation, bn_add_act for the
last BatchNorm of a block with its residual add; --op defaults to both there (one op keeps its calls only).

--op linear_bn_act / conv1x1_bn_act (or both, comma-separated) measure Linear / 1x1 Conv2d + BatchNorm +
activation instead (the fused op with the statistics in the matmul's epilogue against the eager module chain and
torch.compile; training fwd and fwd_bwd; bytes_min is the fused op's traffic, 3T of the matmul output forward plus
its operands). Their presets: 'quick' (the default; tiny shapes the interpreter checks on CPU), 'mlp' (an MLP's
Linear layers, fp32 and bf16; linear_bn_act), 'resnet50' (ResNet-50's 15 distinct 1x1 convolutions, bf16, batch
64/128/256; conv1x1_bn_act) and 'standard' (resnet50 at batch 256 plus mlp); --batch, --dtype, --activation and
--pass filter them. 'baseline' (the BatchNorm baseline table), --width, --spatial, --layout, --from-model and
--world-size are BatchNorm-only and refused with these ops. The method (providers, passes, timers, bytes model) is in docs/measuring.md.
Results go to --out, by default results/bench/<device>-<UTC time>/ (results/ is git-ignored; commit a run under
reports/ deliberately). --out must be new, empty, or (with --resume) an earlier run with the same options.
results.json records whether the run completed and how many of its planned points are recorded.
Exit status: 0 every point ok or skipped, 1 some point incorrect or failed (error, oom), 2 bad arguments or
input, 130 interrupted (the finished points are kept; --resume continues)."""

#: a point is finished (skipped by --resume) once it has one of these statuses; error and oom are retried
FINISHED_STATUSES = ("ok", "incorrect", "skipped")


#: --op's values in its two groups: the BatchNorm ops (bnbench.bench.cases.BN_OPS: + activation, + residual add +
#: activation) and the matmul + BatchNorm ops (bnbench.bench.gemm_cases.GEMM_OPS); one run measures one group
OP_GROUPS = (("bn_act", "bn_add_act"), ("linear_bn_act", "conv1x1_bn_act"))
OPS = tuple(op for group in OP_GROUPS for op in group)


def _ops(text: str) -> str:
    """--op: one op, or a comma list of ops of one group; normalised to its text."""
    ops = list(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
    unknown = [o for o in ops if o not in OPS]
    if not ops or unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {unknown or [text]}; valid: {', '.join(OPS)}")
    if not any(set(ops) <= set(group) for group in OP_GROUPS):
        raise argparse.ArgumentTypeError(
            f"{', '.join(ops)}: one run measures the BatchNorm ops ({', '.join(OP_GROUPS[0])}) or the matmul ops "
            f"({', '.join(OP_GROUPS[1])}), not both"
        )
    return ",".join(ops)


def is_matmul_op(op: str) -> bool:
    """Whether a (resolved) --op value names the matmul + BatchNorm ops."""
    return op.split(",")[0] in OP_GROUPS[1]


def resolve_op(args) -> str:
    """--op as the run measures it: as given, else bn_act, or both BatchNorm ops when the cases are a network's
    BatchNorm calls (--preset resnet50, --from-model), which are of both."""
    if args.op is not None:
        return args.op
    from bnbench.bench.model_cases import MODEL_PRESETS

    return ",".join(OP_GROUPS[0]) if args.from_model or args.preset in MODEL_PRESETS else "bn_act"


def configure(parser: argparse.ArgumentParser) -> None:
    cases = parser.add_argument_group("cases (comma lists; with --preset they filter it)")
    cases.add_argument(
        "--op",
        type=_ops,
        default=None,
        metavar="OP",
        help="bn_act: BatchNorm + activation (the default); bn_add_act: BatchNorm + residual add + activation (or "
        "both, comma-separated; both by default with --preset resnet50 and --from-model); linear_bn_act, "
        "conv1x1_bn_act (or both): Linear / 1x1 conv + BatchNorm + activation (presets quick, mlp, resnet50, "
        "standard; see above)",
    )
    cases.add_argument(
        "--preset",
        choices=("quick", "baseline", "standard", "resnet50", "mlp"),
        default=None,
        help="a named sweep (default: quick, when no axis option is given). baseline is --op bn_act's only, "
        "mlp the matmul ops' only",
    )
    cases.add_argument(
        "--from-model",
        metavar="NAME",
        default=None,
        help="the BN calls of a network's forward pass (resnet18, resnet50, cnn, mlp) as cases, with their counts; "
        "takes --batch, --dtype, --layout, --pass (default: those of the resnet50 preset); the summary adds the "
        "call-weighted BN + activation time per training step",
    )
    cases.add_argument("--batch", metavar="N,...", help="batch sizes, e.g. 64,256,1024")
    cases.add_argument("--width", metavar="C,...", help="channel counts, e.g. 64,256,1024")
    cases.add_argument(
        "--spatial", metavar="S,...", help="1 for BatchNorm1d on (N, C); HxW (or H) for BatchNorm2d, e.g. 1,28x28"
    )
    cases.add_argument("--dtype", metavar="D,...", help="fp32, fp16, bf16")
    cases.add_argument("--activation", metavar="A,...", help=", ".join(valid_names()))
    cases.add_argument(
        "--pass",
        dest="passes",
        metavar="P,...",
        help="fwd (training forward), bwd (backward of a saved forward), fwd_bwd, eval",
    )
    cases.add_argument(
        "--layout", metavar="L,...", help="nchw (contiguous) and/or channels_last (4-D only; dropped for spatial 1)"
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--providers",
        default=None,
        help="comma list of eager, compile, compile-max-autotune, triton, triton-compile (the fused layer under "
        "torch.compile); default eager,compile,triton. With --world-size: sync_fused, sync_fused_torch, "
        "sync_eager (all three by default). With a matmul --op: eager, compile, triton, triton-compile",
    )
    run.add_argument(
        "--out", type=Path, default=None,
        help="output folder: new, empty, or an earlier run to --resume (default: results/bench/<device>-<UTC "
        "timestamp>/; results/ is git-ignored)",
    )  # fmt: skip
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out: skip points already recorded there (error/oom are retried); refused "
        "when its options (cases, providers, seed, timing) differ from this command's, naming the difference",
    )
    run.add_argument("--dry-run", action="store_true", help="list the points and exit")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (for logs and CI); the per-run lines and the summary are still printed")  # fmt: skip
    run.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run (auto: cuda when available)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the inputs (every provider sees the same data)")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU runs: PyTorch threads. 1 by default: when another process holds a core, OpenMP thread pools "
        "stall for whole scheduler ticks and medians came out 100x off on a shared 2-core machine; raise it on "
        "an idle machine to measure multi-threaded CPU code (recorded in results.json)",
    )
    run.add_argument(
        "--cpu-budget-s", type=float, default=0.3, help="CPU: seconds of timed samples per point (at least 20 samples)"
    )
    run.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench's rep (ms of timed calls)")
    run.add_argument("--cuda-graph", action="store_true",
                     help="GPU: also time small fwd/eval points as a CUDA-graph replay (timer=cuda_graph)")  # fmt: skip
    run.add_argument(
        "--no-interpret",
        action="store_true",
        help="on CPU, do not switch the Triton interpreter on: the triton providers are then skipped (by default "
        "they run in the interpreter on the cases small enough for it, as a correctness check, never timed)",
    )
    run.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="K",
        help="run under 'torchrun --nproc-per-node K -m bnbench bench --world-size K --out DIR ...': the same "
        "sweep (every case option, --pass, --seed, --providers) on every rank with synchronised BatchNorm "
        "(gloo on CPU, NCCL on GPUs), the statistics over the global batch; rank 0 writes every rank's rows with "
        "the collectives' share of each call. Needs --out; --resume and --cuda-graph are refused",
    )
    dist = parser.add_argument_group("with --world-size (every rank makes the same number of calls)")
    dist.add_argument("--warmup", type=int, default=10, help="untimed calls per point before the timed ones")
    dist.add_argument("--reps", type=int, default=30, help="timed calls per point (replaces the adaptive budgets)")


def _select(args):
    from bnbench.bench import cases as c

    if is_matmul_op(args.op):  # the matmul + BatchNorm ops: their cases live in gemm_cases
        from bnbench.bench.gemm_workload import select_cases_from_args

        return select_cases_from_args(args)
    from bnbench.bench.model_cases import MODEL_PRESETS

    from_model = args.from_model is not None or args.preset in MODEL_PRESETS
    cases = c.with_ops(_bn_cases(args), args.op.split(","), from_model=from_model)
    if not cases:
        raise ValueError(f"no {args.op} case left: the network's BatchNorm calls are of the other op only")
    return cases


def _bn_cases(args):
    """The BatchNorm + activation cases of the axes and presets (before --op makes them its ops' cases)."""
    from bnbench.bench import cases as c

    if args.preset == "mlp":
        raise ValueError("--preset mlp is a preset of --op linear_bn_act (for an MLP's BatchNorm calls as "
                         "bn_act cases: --from-model mlp)")  # fmt: skip

    def parsed(value, parse):
        return None if value is None else parse(value)

    if args.from_model is not None:  # the network's BN calls (bnbench.bench.model_cases)
        from bnbench.bench.model_cases import cases_from_model

        return cases_from_model(
            args.from_model, preset=args.preset, width=args.width, spatial=args.spatial, activation=args.activation,
            batch=parsed(args.batch, lambda v: c.parse_ints(v, "--batch")), dtypes=parsed(args.dtype, c.parse_dtypes),
            layouts=parsed(args.layout, c.parse_layouts), passes=parsed(args.passes, c.parse_passes),
        )  # fmt: skip
    return c.select_cases(
        args.preset,
        batch=parsed(args.batch, lambda v: c.parse_ints(v, "--batch")),
        width=parsed(args.width, lambda v: c.parse_ints(v, "--width")),
        spatial=parsed(args.spatial, c.parse_spatial),
        dtypes=parsed(args.dtype, c.parse_dtypes),
        activations=parsed(args.activation, c.parse_activations),
        passes=parsed(args.passes, c.parse_passes),
        layouts=parsed(args.layout, c.parse_layouts),
    )


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _load_previous(out: Path):
    """(frame, sidecar) of an earlier run in ``out`` (for --resume), or (None, {}). Both are validated whole
    (``bnbench.report.load``): a cut CSV or a results.json that is not a JSON object is a ValueError."""
    from bnbench.report.load import load_result

    if not (out / "results.csv").exists():
        return None, {}
    result = load_result(out)
    if result.kind != "bench":
        raise ValueError(f"cannot resume {out}: it holds {result.kind} results, not a benchmark run")
    return result.frame, result.meta


def _check_out(out: Path, resume: bool) -> None:
    """Refuse, before anything runs, an --out that would overwrite another command's files: a file, a folder
    holding other files (a report, someone's notes), or an earlier run without --resume."""
    from bnbench import _io

    entries = _io.folder_entries(out)
    if "results.csv" in entries:
        if not resume:
            raise ValueError(f"{out} already holds results.csv: pass --resume to continue it, or choose another --out")
    elif entries:
        raise ValueError(
            f"--out {out}: is not empty and holds no benchmark run ({_io.describe_entries(entries)}); choose a new "
            "or empty folder"
        )


_RESUME_MUST_MATCH = ("device_name", "git_sha", "torch_version", "triton_version", "bnbench_version")


def _check_resumable(previous, provenance: dict, out: Path, old_sidecar: dict, options: dict) -> None:
    """--resume continues a run only with the same options (the same grid, measured the same way) on the same
    device, code and versions: speedups pair points of one run."""
    from bnbench.bench.record import resume_mismatch

    if previous is None or not len(previous):
        return
    why = resume_mismatch(old_sidecar.get("run"), options)
    if why:
        raise ValueError(f"cannot resume {out}: {why}. Rerun with those options, or start a new --out.")
    for column in _RESUME_MUST_MATCH:
        before = {str(v) for v in previous[column].dropna().unique()}
        now = str(provenance[column])
        if before and before != {now}:
            raise ValueError(
                f"cannot resume {out}: it was measured with {column}={', '.join(sorted(before))}, this run has "
                f"{column}={now}; points from both would be compared as one run. Start a new --out instead."
            )


def _done_keys(frame) -> set[tuple]:
    if frame is None:
        return set()
    from bnbench.schema import POINT_KEY

    finished = frame[frame["status"].isin(FINISHED_STATUSES)]
    cols = [*POINT_KEY, "provider"]
    return {tuple(str(v) for v in row) for row in finished[cols].itertuples(index=False)}


def _drop_rerun(frame, points) -> object:
    """Earlier rows of the points about to be measured again (error/oom), so each point has one row."""
    if frame is None or not len(points):
        return frame
    from bnbench.schema import POINT_KEY

    rerun = {(*case.key(), provider.name) for case, provider in points}
    cols = [*POINT_KEY, "provider"]
    keep = [tuple(str(v) for v in row) not in rerun for row in frame[cols].itertuples(index=False)]
    return frame[keep]


def _dry_run(points, done: set, device) -> int:
    print(f"{len(points)} point(s) to measure on {device}" + (f" ({len(done)} already done)" if done else ""))
    reasons: dict[str, int] = {}
    for i, (case, provider) in enumerate(points, 1):
        reason = provider.skip_reason(case, device)
        note = ""
        if reason:
            reasons.setdefault(reason, len(reasons) + 1)
            note = f"  [skipped, see ({reasons[reason]})]"
        print(f"{i:4d}. {provider.name:<21} {case.label()}{note}")
    for reason, number in reasons.items():
        print(f"({number}) {reason}")
    return 0


def write_bench_outputs(out: Path, frame, sidecar: dict) -> None:
    """The results CSV and the JSON sidecar, each written whole."""
    from bnbench import _io

    _io.write_csv(out / "results.csv", frame)
    _io.write_json(out / "results.json", sidecar)


def write_report(out: Path, frame, model_calls: dict | None = None, meta: dict | None = None) -> str:
    """summary.md and the PNG figures from the report module; returns the summary. ``model_calls``: the network's
    BN call table when the cases came from one (the summary adds the call-weighted total); ``meta``: results.json
    (the summary says how complete the run is). A run without a GPU quotes the newest committed GPU results."""
    from bnbench import _io
    from bnbench.report.bench import bench_figures, summary_markdown
    from bnbench.report.load import newest_gpu_reference
    from bnbench.report.scope import is_gpu_run

    gpu = None if is_gpu_run(frame) else newest_gpu_reference()
    summary = summary_markdown(frame, model_calls=model_calls, meta=meta, gpu=gpu)
    _io.write_text(out / "summary.md", summary)
    for stem, fig in bench_figures(frame).items():
        _io.write_figure(out / f"{stem}.png", fig, dpi=120, bbox_inches="tight")
    return summary


def write_profile_outputs(out: Path, markdown: str, kernels, profiles) -> None:
    """``bnbench profile``'s files: profile.md, kernels.csv and one Chrome trace per profiled provider."""
    from bnbench import _io

    _io.write_text(out / "profile.md", markdown)
    _io.write_csv(out / "kernels.csv", kernels)
    for p in profiles:
        if p.profiler is not None:
            with _io.atomic_path(out / f"trace-{p.provider}.json") as tmp:
                p.profiler.export_chrome_trace(str(tmp))


def _sidecar(args, info: dict, run_id: str, started, device, providers, cases, timing: dict, copy: dict,
             old_sidecar: dict) -> dict:  # fmt: skip
    """results.json without the raw samples: the environment, the run's settings and completeness (state
    running, the points planned), the copy bandwidth record (``bnbench.bench.machine.copy_record``)."""
    import torch

    from bnbench.bench.bytes_model import (
        MATMUL_BN_ACT_BWD_PASSES,
        MATMUL_BN_ACT_FWD_PASSES,
        MIN_TENSOR_PASSES,
        RESIDUAL_MIN_TENSOR_PASSES,
    )
    from bnbench.bench.model_cases import run_call_table
    from bnbench.bench.record import options_record
    from bnbench.bench.runner import plan_points
    from bnbench.schema import DTYPES
    from bnbench.testing import tolerance

    return {
        "environment": info,
        "run": {
            "run_id": run_id, "started_utc": started.isoformat(timespec="seconds"),
            "options": options_record(args),
            "state": "running", "points_planned": len(plan_points(cases, providers)), "points_done": 0,
            "device": str(device), "torch_threads": torch.get_num_threads(), "seed": args.seed,
            "providers": [p.name for p in providers], "n_cases": len(cases), "resumed": bool(args.resume),
            "timing": timing,
            "tolerance_max_rel_err": {d: tolerance(d) for d in DTYPES},
            "op": args.op,
            **({"bytes_model_min_tensor_passes": MIN_TENSOR_PASSES,
                "bytes_model_min_tensor_passes_residual": RESIDUAL_MIN_TENSOR_PASSES}
               if not is_matmul_op(args.op) else {
                # passes over the matmul's [M, N] output by implementation (bytes_min: the fused op's), and the
                # fused backward's; the matmul's operands are counted besides (bytes_model.matmul_bn_act_bytes)
                "bytes_model_matmul_output_passes": {"fwd": MATMUL_BN_ACT_FWD_PASSES,
                                                     "bwd_fused": MATMUL_BN_ACT_BWD_PASSES},
            }),
        },
        "copy_bandwidth": copy,
        # the sessions a --resume continues, each with the machine it ran on
        "previous_runs": old_sidecar.get("previous_runs", [])
        + ([{**old_sidecar["run"], "machine": old_sidecar.get("machine")}] if "run" in old_sidecar else []),
        # the network's BN call table, None unless the cases came from one (--from-model, --preset resnet50)
        "model_bn_calls": None if is_matmul_op(args.op) else run_call_table(args.preset, args.from_model),
    }  # fmt: skip


def _finish(out: Path, frame, sidecar: dict) -> int:
    """Write the results whole, the summary and the figures; the exit status of the run."""
    write_bench_outputs(out, frame, sidecar)
    print(write_report(out, frame, sidecar.get("model_bn_calls"), sidecar))
    failed = frame[frame["status"].isin(("incorrect", "error", "oom"))]
    counts = frame["status"].value_counts().to_dict()
    print(f"bnbench bench: wrote {out} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    if len(failed):
        print(f"bnbench bench: {len(failed)} incorrect or failed point(s): see summary.md", file=sys.stderr)
        return 1
    return 0


def _progress(points, enabled: bool = True):
    """A tqdm bar over the points and the (on_start, on_point) callbacks that drive it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(points), desc="bench", unit="pt", dynamic_ncols=True, file=sys.stderr, disable=not enabled)

    def on_start(case, provider) -> None:
        bar.set_postfix_str(f"{provider.name} {case.label()}", refresh=True)

    def on_point(case, provider, results) -> None:
        bar.update(1)

    return bar, on_start, on_point


def _check_run_options(args) -> None:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not (0 < args.cpu_budget_s < math.inf and 0 < args.rep_ms < math.inf):  # NaN fails both
        raise ValueError(f"--cpu-budget-s and --rep-ms must be > 0, got {args.cpu_budget_s} and {args.rep_ms}")
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out: the folder of the run to continue")
    if is_matmul_op(args.op):
        for flag, given in (("--world-size", args.world_size is not None), ("--from-model", args.from_model)):
            if given:
                raise ValueError(
                    f"{flag} is for --op bn_act only: --op {args.op} has no synchronised or per-network sweep"
                )
    if args.world_size is not None and args.op != "bn_act":
        raise ValueError(f"--world-size measures --op bn_act only (synchronised BatchNorm), not --op {args.op}")
    if args.world_size is None:
        return
    if args.out is None:
        raise ValueError("--world-size needs --out: the folder rank 0 writes results.csv to")
    unsupported = [flag for flag, on in (("--resume", args.resume), ("--cuda-graph", args.cuda_graph)) if on]
    if unsupported:
        raise ValueError(f"--world-size does not support {', '.join(unsupported)} (every rank would have to agree "
                         "on which points to run and how to replay them)")  # fmt: skip


def run(args) -> int:
    import torch

    from bnbench import _io, envinfo
    from bnbench.bench import runner
    from bnbench.bench.providers import DEFAULT_PROVIDERS, get_providers
    from bnbench.interpreter import switch_triton_interpreter_on

    args.op = resolve_op(args)  # recorded resolved: --resume compares what was measured
    _check_run_options(args)
    device = _device(args.device)
    if device.type == "cpu" and not args.no_interpret:
        switch_triton_interpreter_on()  # before anything imports triton (a model's cases import it)
    cases = _select(args)
    if is_matmul_op(args.op):
        from bnbench.bench.gemm_workload import DEFAULT_GEMM_PROVIDERS, get_gemm_providers

        providers = get_gemm_providers(args.providers or ",".join(DEFAULT_GEMM_PROVIDERS))
    elif args.world_size is None:
        providers = get_providers(args.providers or ",".join(DEFAULT_PROVIDERS))
    else:
        from bnbench.bench.distributed import DEFAULT_SYNC_PROVIDERS, SyncTiming, get_sync_providers

        providers = get_sync_providers(args.providers or ",".join(DEFAULT_SYNC_PROVIDERS))
        sync_timing = SyncTiming(warmup=args.warmup, reps=args.reps)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    started = _dt.datetime.now(_dt.timezone.utc)
    info = envinfo.collect()
    out = args.out or _io.RESULTS_ROOT / "bench" / f"{envinfo.device_slug(info)}-{started:%Y%m%d-%H%M%S}"
    _check_out(out, args.resume)
    if args.dry_run:
        previous, _ = _load_previous(out) if args.resume else (None, {})
        done = _done_keys(previous)
        return _dry_run(runner.plan_points(cases, providers, done), done, device)
    if args.world_size is not None:
        return _run_distributed(args, cases, providers, sync_timing, device, info, started, out)
    with _io.folder_lock(out, "bnbench bench"):
        _check_out(out, args.resume)  # again, under the lock: another command may have written there meanwhile
        return _run_local(args, cases, providers, device, info, started, out)


def _run_local(args, cases, providers, device, info: dict, started, out: Path) -> int:
    """The sweep on this process's device, the results written after every point; the folder is locked."""
    from bnbench.bench import runner
    from bnbench.bench.machine import probe
    from bnbench.bench.record import mark, options_record

    previous, old_sidecar = _load_previous(out) if args.resume else (None, {})
    done = _done_keys(previous)
    points = runner.plan_points(cases, providers, done)
    if args.resume and previous is None:
        print(f"bnbench bench: nothing to resume in {out} (no results.csv); starting a new run there", file=sys.stderr)

    run_id = str(previous["run_id"].iloc[0]) if previous is not None and len(previous) else out.name
    _check_resumable(previous, runner.provenance_from_env(info, run_id), out, old_sidecar, options_record(args))
    before = probe(device)
    copy = before["copy"]
    print(f"bnbench bench: {len(points)} point(s) on {device}; copy bandwidth {copy['gbps']:.3g} GB/s (band "
          f"{copy['gbps_lo']:.3g}-{copy['gbps_hi']:.3g}); out {out}")  # fmt: skip
    ctx = runner.RunContext(
        device=device, copy_gbps=copy["gbps"], provenance=runner.provenance_from_env(info, run_id), seed=args.seed,
        timing=runner.TimingSettings(rep_ms=args.rep_ms, cpu_budget_s=args.cpu_budget_s, cuda_graph=args.cuda_graph),
        cache_bytes=info["device"].get("cache_bytes") if device.type == "cpu" else None,
    )  # fmt: skip
    kept = _drop_rerun(previous, points)
    sidecar = _sidecar(args, info, run_id, started, device, providers, cases, dataclasses.asdict(ctx.timing), copy,
                       old_sidecar)  # fmt: skip
    sidecar["machine"] = {"before": before, "after": None}
    samples: dict[str, list[float]] = dict(old_sidecar.get("samples_ms", {}))
    rows: list[dict] = []

    def frame_now():
        return _merge(kept, runner.results_frame(rows))

    bar, on_start, advance = _progress(points, enabled=not args.no_progress)

    def recorded(frame) -> int:  # points, not rows: a CUDA-graph replay is a second row of its point
        return int((frame["timer"] != "cuda_graph").sum()) if len(frame) else 0

    def on_point(case, provider, results) -> None:  # the finished points are on disk after every point
        advance(case, provider, results)
        for result in results:
            rows.append(result.row)
            samples[runner.point_id(result.row)] = result.samples_ms
        frame = frame_now()
        sidecar["run"] = mark(sidecar["run"], "running", points_done=recorded(frame))
        write_bench_outputs(out, frame, {**sidecar, "samples_ms": samples})

    try:
        with bar:
            runner.run_sweep(cases, providers, ctx, done=done, on_start=on_start, on_point=on_point)
    except KeyboardInterrupt:  # keep what finished, say what is missing, then let the CLI exit 130
        frame = frame_now()
        sidecar["run"] = mark(sidecar["run"], "interrupted", points_done=recorded(frame))
        meta = {**sidecar, "samples_ms": samples}
        write_bench_outputs(out, frame, meta)
        write_report(out, frame, sidecar.get("model_bn_calls"), meta)
        print(f"bnbench bench: interrupted with {recorded(frame)} of {sidecar['run']['points_planned']} point(s) "
              f"recorded in {out}; 'bnbench bench --resume --out {out}' with the same options measures the rest",
              file=sys.stderr)  # fmt: skip
        raise
    sidecar["machine"]["after"] = probe(device)
    frame = frame_now()
    sidecar["run"] = mark(sidecar["run"], "complete", points_done=recorded(frame))
    return _finish(out, frame, {**sidecar, "samples_ms": samples})


def _merge(kept, new):
    """Earlier points kept by --resume, then the new ones, with speedups over the whole."""
    import pandas as pd

    from bnbench.bench import runner

    parts = [f for f in (kept, new) if f is not None and len(f)]
    merged = pd.concat(parts, ignore_index=True) if len(parts) > 1 else (parts[0] if parts else new)
    return runner.add_speedups(merged) if len(merged) else merged


def _run_distributed(args, cases, providers, sync_timing, device, info: dict, started, out: Path) -> int:
    """``--world-size K``: the same sweep on every rank of a torchrun process group (``bench/distributed.py``);
    rank 0 writes every rank's rows. Every rank returns the same exit status."""
    import functools

    import torch.distributed as dist

    from bnbench import _io
    from bnbench.bench import runner
    from bnbench.bench.bandwidth import measure_copy_bandwidth
    from bnbench.bench.distributed import measure_sync_point
    from bnbench.bench.machine import copy_record
    from bnbench.bench.record import mark
    from bnbench.distributed import launch

    with launch.process_group(args.world_size, cuda=device.type == "cuda") as rank_device:
        copy = measure_copy_bandwidth(rank_device)
        ctx = runner.RunContext(device=rank_device, copy_gbps=copy.gbps, seed=args.seed,
                                provenance=runner.provenance_from_env(info, out.name))  # fmt: skip
        points = runner.plan_points(cases, providers)
        rank0 = launch.is_rank_zero()
        if rank0:
            print(f"bnbench bench: {len(points)} point(s) on {args.world_size} ranks ({dist.get_backend()}, "
                  f"{rank_device}); out {out}")  # fmt: skip
        bar, on_start, on_point = _progress(points, enabled=rank0 and not args.no_progress)
        with bar:
            frame, samples = runner.run_sweep(cases, providers, ctx, on_start=on_start, on_point=on_point,
                                              measure=functools.partial(measure_sync_point, timing=sync_timing))  # fmt: skip
        frame = launch.gather_frames(frame)
        every_sample: list[dict | None] = [None] * args.world_size
        dist.all_gather_object(every_sample, samples)
    if not rank0:
        return 1 if frame["status"].isin(("incorrect", "error", "oom")).any() else 0
    sidecar = _sidecar(args, info, out.name, started, device, providers, cases, dataclasses.asdict(sync_timing),
                       copy_record(copy), {})  # fmt: skip
    sidecar["run"]["world_size"] = args.world_size
    rank0_rows = frame[frame["rank"] == 0] if "rank" in frame.columns else frame  # every rank measures every point
    sidecar["run"] = mark(sidecar["run"], "complete", points_done=len(rank0_rows))
    sidecar["samples_ms"] = {f"rank{r}|{k}": v for r, ranks in enumerate(every_sample) for k, v in ranks.items()}
    with _io.folder_lock(out, "bnbench bench --world-size (rank 0)"):
        _check_out(out, resume=False)
        return _finish(out, frame, sidecar)
