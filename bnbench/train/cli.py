"""``bnbench train``: run the training experiments, then write results.csv, results.json, PNGs and summary.md.

The only module of ``bnbench.train`` that touches the disk (through :mod:`bnbench._io`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bnbench import _io
from bnbench.train.presets import COMMON, EXPERIMENTS, PRESETS

HELP = "training experiments: BatchNorm's convergence claims, fused vs eager"
DESCRIPTION = (
    "Test the claims made for BatchNorm (Ioffe and Szegedy 2015) on small offline data, and compare the fused "
    "layer with PyTorch's BatchNorm. Experiments: bn-paper (the paper's 3x100 sigmoid MLP, batch 60, with and "
    "without BN, same initial weights: accuracy vs steps and the Figure 1 percentiles), depth (depth sweep for "
    "sigmoid/tanh/relu: steps to target, final accuracy, per-layer gradient norms, saturation), lr (largest "
    "learning rate that still trains), fused-vs-eager (same seed and data: curves agree; time per step on a GPU), "
    "ics (internal covariate shift as Santurkar et al. 2018 define it). Without --experiment every experiment "
    "runs (the quick preset takes a few minutes on 2 CPU cores; 'nox -s train' runs exactly that). Defaults the "
    "paper does not give: SGD, momentum 0.9, learning rate 0.1, Glorot/Xavier normal init, zero biases; each can "
    "be overridden. On CPU, fused runs use the Triton interpreter (tiny models, never timed) unless --no-interpret. "
    "Output: results.csv (long format: one row per run, step and metric), results.json (configuration and "
    "environment), PNG figures and summary.md with the verdict per claim."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment",
        choices=(*EXPERIMENTS, "all"),
        default="all",
        help="which experiment to run; 'all' runs them one after another",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="quick",
        help="quick: minutes on 2 CPU cores; full: a GPU or a long CPU run",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (0..N-1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default reports/train/<experiment>-<device>-<timestamp>/)",
    )
    data = parser.add_argument_group("data (offline only: nothing is downloaded)")
    data.add_argument(
        "--dataset",
        choices=("digits", "mnist5k", "mnist", "synthetic"),
        default=None,
        help=f"default: {COMMON['dataset']} (scikit-learn's 8x8 digits)",
    )
    data.add_argument("--data-dir", type=Path, default=None, help="folder with the MNIST IDX files (--dataset mnist)")
    data.add_argument("--binarize", action="store_true", help="threshold pixels at 0.5")
    data.add_argument("--synthetic-samples", type=int, default=12000, help="size of --dataset synthetic")
    data.add_argument("--synthetic-shape", default="1,28,28", help="C,H,W of --dataset synthetic")
    sweep = parser.add_argument_group("model and optimisation (default: the preset's values)")
    sweep.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=None)
    sweep.add_argument("--depths", nargs="+", type=int, default=None, help="hidden layers (conv blocks for cnn)")
    sweep.add_argument("--activations", nargs="+", default=None, help="e.g. sigmoid tanh relu gelu silu")
    sweep.add_argument("--norms", nargs="+", choices=("none", "eager", "fused"), default=None)
    sweep.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates")
    sweep.add_argument("--width", type=int, default=None, help="units (mlp) or channels (cnn) per layer")
    sweep.add_argument("--batch-size", type=int, default=None)
    sweep.add_argument("--steps", type=int, default=None)
    sweep.add_argument("--eval-every", type=int, default=None)
    sweep.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    sweep.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    sweep.add_argument("--init", choices=("pytorch", "xavier", "kaiming", "normal"), default=None)
    sweep.add_argument("--init-std", type=float, default=None, help="std of --init normal")
    sweep.add_argument(
        "--target-acc", type=float, default=None, help="test accuracy behind 'steps to target' (default per data set)"
    )
    sweep.add_argument("--channels-last", action="store_true", default=None, help="cnn inputs in channels_last")
    sweep.add_argument(
        "--probe-every",
        type=int,
        default=None,
        help="record gradient norms, percentiles, saturation and train accuracy every N steps "
        "(a multiple of --eval-every; 0: at every evaluation)",
    )
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--fused-backend",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="backend of the fused layer (auto: Triton on CUDA or under the interpreter)",
    )
    run.add_argument(
        "--no-interpret",
        action="store_true",
        help="on CPU, do not switch the Triton interpreter on for fused runs (they then run the "
        "PyTorch reference, and say so)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: these small models run fastest single-threaded)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="K",
        help="run under 'torchrun --nproc-per-node K': train one model data-parallel (DistributedDataParallel) "
        "with synchronized fused BN (SyncBatchNormAct; gloo on CPU, NCCL on GPUs). Takes one value each of "
        "--models, --depths, --activations, --lrs, plus --dataset, --data-dir, --width, --batch-size (per rank), "
        "--steps, --out",
    )


def _run_distributed(args) -> int:
    """``--world-size K``: one data-parallel run (:mod:`bnbench.train.distributed`) of the one model given."""
    from bnbench.train.distributed import DDPRun, run_ddp

    if args.out is None:
        raise ValueError("--world-size needs --out: the folder rank 0 writes results.csv to")
    options = {}
    singles = {"models": "model", "depths": "depth", "activations": "activation", "lrs": "lr"}
    for name, field in singles.items():
        values = getattr(args, name)
        if values is None:
            continue
        if len(values) != 1:
            raise ValueError(f"--world-size trains one model: give one value of --{name}, got {values}")
        options[field] = values[0]
    for name in ("dataset", "data_dir", "width", "batch_size", "steps"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return run_ddp(DDPRun(world_size=args.world_size, out=Path(args.out), **options))


def _overrides(args) -> dict:
    return {
        "dataset": args.dataset, "models": args.models, "depths": args.depths, "activations": args.activations,
        "norms": args.norms, "lrs": args.lrs, "width": args.width, "batch_size": args.batch_size,
        "steps": args.steps, "eval_every": args.eval_every, "optimizer": args.optimizer,
        "momentum": args.momentum, "init": args.init, "init_std": args.init_std, "target_acc": args.target_acc,
        "channels_last": args.channels_last, "probe_every": args.probe_every,
    }  # fmt: skip


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--synthetic-shape must be C,H,W with positive integers, got {text!r}")
    return shape


def run(args) -> int:
    if args.world_size is not None:
        return _run_distributed(args)
    from bnbench import envinfo
    from bnbench.report.train import summary_markdown, train_figures, verdict_table
    from bnbench.schema import validate_train
    from bnbench.train.data import load_dataset
    from bnbench.train.experiments import build_configs, run_configs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    shape = _parse_shape(args.synthetic_shape)
    experiments = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    norms_used = set(args.norms or ()) | ({"fused"} if "fused-vs-eager" in experiments else set())
    want_interpreter = device == "cpu" and "fused" in norms_used and not args.no_interpret
    interpreter = device == "cpu" and (
        envinfo.switch_triton_interpreter_on() if want_interpreter else envinfo.interpreter_requested()
    )
    if device == "cpu" and args.fused_backend == "triton" and not interpreter:
        raise ValueError(
            "--fused-backend triton on --device cpu needs the Triton interpreter: drop --no-interpret (or set "
            "TRITON_INTERPRET=1), or use --fused-backend auto or torch"
        )
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    configs, specs = [], {}
    for experiment in experiments:
        cfgs, spec = build_configs(experiment, args.preset, seeds=args.seeds, device=device,
                                   overrides=_overrides(args), interpreter=interpreter,
                                   backend=args.fused_backend)  # fmt: skip
        configs += cfgs
        specs[experiment] = spec

    def loader(name: str):
        return load_dataset(name, data_dir=args.data_dir, binarize=args.binarize,
                            synthetic_samples=args.synthetic_samples, synthetic_shape=shape)  # fmt: skip

    env = envinfo.collect()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = args.out or Path("reports/train") / f"{args.experiment}-{envinfo.device_slug(env)}-{stamp}"
    print(f"bnbench train: {len(configs)} runs ({', '.join(experiments)}; preset {args.preset}, {args.seeds} seeds, "
          f"{device}{', Triton interpreter for fused runs' if interpreter else ''}) -> {out}", file=sys.stderr)  # fmt: skip
    from tqdm.auto import tqdm

    with tqdm(total=sum(c.steps for c in configs), unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        result = run_configs(
            configs, loader, progress=bar.update,
            on_run=lambda c: bar.set_description(f"{c.experiment} {c.model} d{c.depth} {c.activation} {c.norm} "
                                                 f"lr{c.lr:g} s{c.seed}"),
        )  # fmt: skip
    frame = validate_train(result.frame)
    verdicts = verdict_table(frame)
    meta = {
        "command": sys.argv,
        "preset": args.preset, "experiments": experiments, "seeds": args.seeds, "device": device,
        "triton_interpreter": interpreter, "fused_backend": args.fused_backend,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "specs": specs, "datasets": result.datasets, "failures": result.failures,
        "run_count": len(configs), "verdicts": verdicts.to_dict(orient="records"),
        "environment": env, "note": "see bnbench/train/presets.py for why these defaults",
    }  # fmt: skip
    _io.write_csv(out / "results.csv", frame)
    _io.write_json(out / "results.json", meta)
    for stem, fig in train_figures(frame).items():
        _io.write_figure(out / f"{stem}.png", fig, dpi=72)
    summary = summary_markdown(frame, meta)
    _io.write_text(out / "summary.md", summary)
    print(summary)
    fused_disagrees = ((verdicts["experiment"] == "fused-vs-eager") & verdicts["claim"].str.contains("same curves")
                       & verdicts["held"].map(lambda h: h is not None and not h))  # fmt: skip
    if result.failures or fused_disagrees.any():
        print(f"bnbench train: {len(result.failures)} run(s) failed; fused/eager curves disagree: "
              f"{bool(fused_disagrees.any())}", file=sys.stderr)  # fmt: skip
        return 1
    return 0
