"""Turn an experiment's settings into runs, and run them: configurations in, one long DataFrame out.

Runs are ordered seed by seed, and within a seed configuration by configuration with the arms (norms) of one
configuration back to back, so paired runs see the same machine load and an interrupted sweep holds whole pairs.
A run that raises is recorded (a ``failed`` row plus the message in the returned failure list) and the other
runs go on; Ctrl-C stops the sweep and returns what finished (``interrupted``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from bnbench.schema import validate_train
from bnbench.train.data import Dataset, load_dataset
from bnbench.train.loop import RUN_COLUMNS, RunConfig, train_run
from bnbench.train.presets import DEFAULT_TARGET, EXPERIMENTS, PRESETS, SWEEPS, experiment_spec

__all__ = ["VAL_FRACTION", "ExperimentResult", "build_configs", "load_data", "run_configs"]

#: the share of each training set held out for validation (choosing learning rates)
VAL_FRACTION = 0.1
_SCALARS = ("width", "steps", "eval_every", "optimizer", "momentum", "init", "init_std", "noise", "epochs",
            "probes", "ics_every", "probe_every", "channels_last", "train_mode_eval", "target_acc",
            "train_eval_samples")  # fmt: skip


@dataclass
class ExperimentResult:
    """All runs' measurements, the runs that failed, the data sets used, and whether the sweep was interrupted."""

    frame: pd.DataFrame
    failures: list[dict] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    runs_done: int = 0


def build_configs(
    experiment: str,
    preset: str,
    *,
    seeds: int | None,
    device: str,
    overrides: dict | None = None,
    interpreter: bool = False,
    backend: str = "auto",
) -> tuple[list[RunConfig], dict]:
    """The runs of one experiment (every sweep combination x seeds 0..seeds-1, interleaved as the module says)
    and the merged settings. ``seeds`` None means the preset's number (or the experiment's own, where it sets
    one).

    ``overrides`` holds user settings (sweep axes as sequences, scalars as values; None means "preset's").
    Invalid settings raise ValueError here, before anything runs.
    """
    spec = experiment_spec(experiment, preset, interpreter=interpreter)
    preset_seeds = spec.pop("seeds", PRESETS[preset]["seeds"])  # an experiment may run fewer (the interpreter's)
    seeds = preset_seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    per_model = {m: spec.pop(m) for m in ("mlp", "cnn") if isinstance(spec.get(m), dict)}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in SWEEPS and key not in _SCALARS:
            raise ValueError(f"unknown setting {key!r} for experiment {experiment}")
        spec[key] = tuple(value) if key in SWEEPS else value
        if key in _SCALARS:  # a user's value wins over per-model presets too
            for extra in per_model.values():
                extra.pop(key, None)
        if key == "steps":  # a step count given by the user replaces a length in epochs
            spec["epochs"] = None
    for key, values in ((k, spec[k]) for k in SWEEPS):
        if len(values) == 0:
            raise ValueError(f"experiment {experiment}: the sweep over {key} is empty")
    if experiment == "fused-vs-eager" and "fused" not in spec["norms"]:
        raise ValueError(f"fused-vs-eager compares norm 'fused' with 'eager'; --norms {spec['norms']} lacks fused")
    axes = [k for k in SWEEPS if k != "norms"]
    configs = []
    for seed in range(seeds):
        for combo in itertools.product(*(spec[k] for k in axes)):
            point = dict(zip((SWEEPS[k] for k in axes), combo, strict=True))
            extra = dict(per_model.get(point["model"], {}))
            point.update({k: extra.pop(k) for k in list(extra) if k in SWEEPS.values()})  # e.g. a cnn's batch
            scalars = {k: spec[k] for k in _SCALARS if k in spec} | extra
            scalars.setdefault("target_acc", DEFAULT_TARGET[point["dataset"]])
            probes = tuple(scalars.pop("probes"))
            for norm in spec["norms"]:
                noise = {"noise": scalars["noise"] if norm == "noisy" else 0.0}  # noise belongs to noisy BN only
                configs.append(RunConfig(experiment=experiment, norm=norm, seed=seed, device=device,
                                         backend=backend, probes=probes, **point, **(scalars | noise)))  # fmt: skip
    spec["per_model"] = per_model
    spec["seeds"] = seeds
    spec.setdefault("target_acc", {d: DEFAULT_TARGET[d] for d in spec["datasets"]})
    return configs, spec


def load_data(name: str, **options) -> Dataset:
    """A data set with the experiments' validation split (see :data:`VAL_FRACTION`)."""
    return load_dataset(name, val_fraction=VAL_FRACTION, **options)


def run_configs(
    configs: list[RunConfig],
    data_loader: Callable[[str], Dataset] | None = None,
    progress: Callable[[int], None] | None = None,
    on_run: Callable[[RunConfig], None] | None = None,
) -> ExperimentResult:
    """Run every configuration in order; return the concatenated, validated measurements.

    ``data_loader(name)`` gives a data set (default: :func:`load_data`); each is loaded once. ``progress(n)`` is
    told about every n steps done; ``on_run(cfg)`` before each run starts.
    """
    loader = data_loader or load_data
    cache: dict[str, Dataset] = {}
    frames, failures, datasets, interrupted, done = [], [], {}, False, 0
    for cfg in configs:
        if cfg.experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {cfg.experiment!r}; valid experiments are: {', '.join(EXPERIMENTS)}")
    try:
        for cfg in configs:
            if on_run is not None:
                on_run(cfg)
            if cfg.dataset not in cache:
                cache[cfg.dataset] = loader(cfg.dataset)
                datasets[cfg.dataset] = cache[cfg.dataset].description
            data = cache[cfg.dataset]
            try:
                frames.append(train_run(cfg, data, progress))
            except Exception as err:  # recorded, and the next run goes on
                failures.append({"config": cfg.as_dict(), "error": f"{type(err).__name__}: {err}"})
                row = {k: getattr(cfg, k, None) for k in RUN_COLUMNS if hasattr(cfg, k)}
                row.update(step=0, wall_s=0.0, metric="failed", value=1.0, backend="error")
                frames.append(pd.DataFrame([row], columns=list(RUN_COLUMNS)))
                if progress is not None:
                    progress(cfg.for_data(len(data.x_train)).steps)
            done += 1
    except KeyboardInterrupt:
        interrupted = True
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(RUN_COLUMNS))
    return ExperimentResult(validate_train(frame), failures, datasets, interrupted, done)
