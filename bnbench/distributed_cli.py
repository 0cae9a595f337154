"""``python -m bnbench.distributed_cli {bench,train} --world-size K --out DIR ...`` under torchrun.

Initialises the process group from torchrun's environment (NCCL when CUDA is available, one GPU per rank by
LOCAL_RANK; gloo on CPU otherwise), runs :func:`bnbench.distributed_bench.bench_sync` or
:func:`bnbench.distributed_train.train_ddp` on every rank, gathers every rank's rows on rank 0, and rank 0 writes
``results.csv`` and ``env.json`` to ``--out`` (the only module of the distributed feature that touches the disk).

    torchrun --nproc-per-node 2 -m bnbench.distributed_cli bench --world-size 2 --out reports/dist --batch 64
    torchrun --nproc-per-node 2 -m bnbench.distributed_cli train --world-size 2 --out reports/dist-train
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from bnbench.distributed_bench import DTYPES, PROVIDERS, bench_sync, parse_cases

__all__ = ["configure", "main", "run_rank"]


def configure(parser) -> None:
    """Options of both commands (``bnbench bench/train --world-size K`` can reuse them)."""
    parser.add_argument("command", choices=("bench", "train"))
    parser.add_argument("--world-size", type=int, required=True, help="ranks expected (torchrun --nproc-per-node)")
    parser.add_argument("--out", required=True, help="output folder (rank 0 writes results.csv and env.json)")
    parser.add_argument("--batch", default="32", help="per-rank batch: bench a comma list, train one number")
    parser.add_argument("--width", default="64", help="channels: bench a comma list, train one number (hidden width)")
    parser.add_argument(
        "--spatial",
        default="1",
        help="bench: comma list of 1 (2-D input), HxW or H (HxH) as bnbench bench takes it, e.g. 1,14x14",
    )
    parser.add_argument("--dtype", default="fp32", help="bench: comma list of " + ", ".join(DTYPES))
    parser.add_argument("--activation", default="relu", help="bench: comma list; train: one activation")
    parser.add_argument("--channels-last", action="store_true", help="bench: 4-D inputs in channels_last")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="bench: comma list of " + ", ".join(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dataset", default="digits", help="train: digits, mnist5k, mnist, synthetic")
    parser.add_argument("--data-dir", default=None, help="train: folder with the MNIST IDX files (--dataset mnist)")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def run_rank(args, device: torch.device) -> pd.DataFrame:
    """This rank's rows for the parsed ``args``, inside an initialised process group."""
    if args.command == "bench":
        from bnbench.bench.runner import provenance_from_env
        from bnbench.envinfo import collect

        cases = parse_cases(args.batch, args.width, args.spatial, args.dtype, args.activation, args.channels_last)
        prov = provenance_from_env(collect(), run_id=args.run_id)
        return bench_sync(cases, device=device, providers=tuple(args.providers.split(",")), warmup=args.warmup,
                          reps=args.reps, provenance=prov, seed=args.seed)  # fmt: skip
    from bnbench.distributed_train import train_ddp
    from bnbench.train.data import load_dataset
    from bnbench.train.models import build_model, init_weights

    data = load_dataset(args.dataset, data_dir=args.data_dir)
    model = build_model(args.model, in_shape=data.image_shape, n_classes=data.n_classes, depth=args.depth,
                        width=int(args.width), activation=args.activation, norm="fused")  # fmt: skip
    init_weights(model, "pytorch", args.seed)
    labels = dict(experiment=f"ddp{args.world_size}", dataset=data.name, model=args.model, depth=args.depth,
                  width=int(args.width), activation=args.activation, norm="sync_fused")  # fmt: skip
    return train_ddp(model, data.x_train, data.y_train, steps=args.steps, batch_size=int(args.batch), lr=args.lr,
                     device=device, seed=args.seed, labels=labels)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from bnbench._io import write_csv, write_json
    from bnbench.envinfo import collect

    parser = argparse.ArgumentParser(prog="python -m bnbench.distributed_cli", description=__doc__.split("\n\n")[0])
    configure(parser)
    args = parser.parse_args(argv)
    args.run_id = f"dist{args.world_size}-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if "RANK" not in os.environ:
        parser.error("run under torchrun, e.g. torchrun --nproc-per-node K -m bnbench.distributed_cli ...")
    try:  # bad options fail here, on every rank alike, before the process group exists
        if args.command == "bench":
            parse_cases(args.batch, args.width, args.spatial, args.dtype, args.activation, args.channels_last)
            bad = sorted(set(args.providers.split(",")) - set(PROVIDERS))
            if bad:
                raise ValueError(f"unknown provider(s) {bad}; valid providers are: {', '.join(PROVIDERS)}")
        else:
            int(args.batch), int(args.width)
    except ValueError as err:
        parser.error(str(err))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(minutes=10))
    try:
        if dist.get_world_size() != args.world_size:
            parser.error(f"--world-size {args.world_size} but torchrun started {dist.get_world_size()} ranks")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        run_ids = [None] * dist.get_world_size()
        dist.all_gather_object(run_ids, args.run_id)  # every rank's rows carry rank 0's run id
        args.run_id = run_ids[0]
        frames = [None] * dist.get_world_size()
        dist.all_gather_object(frames, run_rank(args, device))
        results = pd.concat(frames, ignore_index=True)
        if dist.get_rank() == 0:
            out = Path(args.out)
            write_csv(out / "results.csv", results)
            write_json(out / "env.json", {**collect(), "world_size": args.world_size, "argv": sys.argv})
            print(f"wrote {out / 'results.csv'}")
    finally:
        dist.destroy_process_group()
    # as bnbench bench: exit status 1 when a point's output disagrees with the reference
    return 1 if "status" in results and (results["status"] == "incorrect").any() else 0


if __name__ == "__main__":
    raise SystemExit(main())
