"""Turn an experiment's settings into runs, and run them: configurations in, one long DataFrame out.

A run that raises is recorded (a ``failed`` row plus the message in the returned failure list) and the other
runs go on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from bnbench.schema import validate_train
from bnbench.train.data import Dataset, load_dataset
from bnbench.train.loop import RUN_COLUMNS, RunConfig, train_run
from bnbench.train.presets import DEFAULT_TARGET, EXPERIMENTS, experiment_spec

__all__ = ["ExperimentResult", "build_configs", "run_configs"]

_SWEEPS = {"models": "model", "depths": "depth", "activations": "activation", "norms": "norm", "lrs": "lr"}
_SCALARS = ("dataset", "width", "batch_size", "steps", "eval_every", "optimizer", "momentum", "init", "init_std",
            "probes", "ics_every", "probe_every", "channels_last", "target_acc")  # fmt: skip


@dataclass
class ExperimentResult:
    """All runs' measurements, the settings each experiment used, and the runs that failed."""

    frame: pd.DataFrame
    specs: dict[str, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)


def build_configs(
    experiment: str,
    preset: str,
    *,
    seeds: int,
    device: str,
    overrides: dict | None = None,
    interpreter: bool = False,
    backend: str = "auto",
) -> tuple[list[RunConfig], dict]:
    """The runs of one experiment (every sweep combination x seeds 0..seeds-1) and the merged settings.

    ``overrides`` holds user settings (sweep axes as sequences, scalars as values; None means "preset's").
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    spec = experiment_spec(experiment, preset, interpreter=interpreter)
    per_model = {m: spec.pop(m) for m in ("mlp", "cnn") if isinstance(spec.get(m), dict)}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _SWEEPS and key not in _SCALARS:
            raise ValueError(f"unknown setting {key!r} for experiment {experiment}")
        spec[key] = tuple(value) if key in _SWEEPS else value
        if key in _SCALARS:  # a user's value wins over per-model presets too
            for extra in per_model.values():
                extra.pop(key, None)
    spec.setdefault("target_acc", DEFAULT_TARGET[spec["dataset"]])
    if experiment == "fused-vs-eager" and "fused" not in spec["norms"]:
        raise ValueError(f"fused-vs-eager compares norm 'fused' with 'eager'; --norms {spec['norms']} lacks fused")
    configs = []
    axes = [spec[k] for k in _SWEEPS]
    for model, depth, activation, norm, lr in itertools.product(*axes):
        values = {k: spec[k] for k in _SCALARS} | per_model.get(model, {})
        probes = tuple(values.pop("probes"))
        configs += [
            RunConfig(
                experiment=experiment,
                model=model,
                depth=depth,
                activation=activation,
                norm=norm,
                lr=lr,
                seed=seed,
                device=device,
                backend=backend,
                probes=probes,
                **values,
            )
            for seed in range(seeds)
        ]
    spec["per_model"] = per_model
    return configs, spec


def _data_key(cfg: RunConfig) -> str:
    return cfg.dataset


def run_configs(
    configs: list[RunConfig],
    data_loader: Callable[[str], Dataset] | None = None,
    progress: Callable[[int], None] | None = None,
    on_run: Callable[[RunConfig], None] | None = None,
) -> ExperimentResult:
    """Run every configuration in order; return the concatenated, validated measurements.

    ``data_loader(name)`` gives a data set (default: :func:`load_dataset` with default options); each is loaded
    once. ``progress(n)`` is told about every n steps done; ``on_run(cfg)`` before each run starts.
    """
    loader = data_loader or (lambda name: load_dataset(name))
    cache: dict[str, Dataset] = {}
    frames, failures, datasets = [], [], {}
    for cfg in configs:
        if cfg.experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {cfg.experiment!r}; valid experiments are: {', '.join(EXPERIMENTS)}")
        if on_run is not None:
            on_run(cfg)
        key = _data_key(cfg)
        if key not in cache:
            cache[key] = loader(cfg.dataset)
            datasets[key] = cache[key].description
        try:
            frames.append(train_run(cfg, cache[key], progress))
        except (RuntimeError, ValueError, TypeError) as err:  # recorded, and the next run goes on
            failures.append({"config": cfg.as_dict(), "error": f"{type(err).__name__}: {err}"})
            row = {k: getattr(cfg, k, None) for k in RUN_COLUMNS if hasattr(cfg, k)}
            row.update(step=0, wall_s=0.0, metric="failed", value=1.0, backend="error")
            frames.append(pd.DataFrame([row], columns=list(RUN_COLUMNS)))
            if progress is not None:
                progress(cfg.steps)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(RUN_COLUMNS))
    return ExperimentResult(validate_train(frame), failures=failures, datasets=datasets)
