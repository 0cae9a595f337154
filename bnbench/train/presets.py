"""What each experiment runs, per preset: plain dicts, so ``--help``, the JSON sidecar and the tests read them.

Keys are :class:`bnbench.train.loop.RunConfig` fields, plus the sweep axes ``models``, ``depths``,
``activations``, ``norms`` and ``lrs`` (every combination runs, once per seed).

The paper (Ioffe and Szegedy, 2015) gives no optimizer, learning rate or initialisation for its MNIST network.
Our choice, shared by every experiment unless overridden: SGD with momentum 0.9, learning rate 0.1, Glorot/Xavier
normal initialisation (the standard for sigmoid networks at the time; with PyTorch's default U(+-1/sqrt(fan_in))
the plain sigmoid network stays at chance for thousands of steps), zero biases, batch 60.
"""

from __future__ import annotations

import copy

__all__ = ["COMMON", "DEFAULT_TARGET", "EXPERIMENTS", "PRESETS", "experiment_spec"]

EXPERIMENTS = ("bn-paper", "depth", "lr", "fused-vs-eager", "ics")

#: the target test accuracy behind "steps to target", per data set (a level the plain network also reaches)
DEFAULT_TARGET = {"digits": 0.93, "mnist5k": 0.90, "mnist": 0.97, "synthetic": 0.70}

COMMON = {
    "dataset": "digits", "models": ("mlp",), "optimizer": "sgd", "momentum": 0.9, "lrs": (0.1,), "init": "xavier",
    "init_std": 0.1, "batch_size": 60, "width": 100, "depths": (3,), "activations": ("sigmoid",),
    "norms": ("none", "eager"), "probes": ("grads", "percentiles", "saturation"), "ics_every": 0, "probe_every": 0,
    "channels_last": False,
}  # fmt: skip

_LR_GRID_QUICK = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
_LR_GRID_FULL = (0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)

PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        # the paper's MNIST network on the 8x8 digits: 3x100 sigmoid, batch 60, with and without BN
        "bn-paper": {"steps": 2000, "eval_every": 50, "probe_every": 100},
        "depth": {"depths": (2, 5, 10, 20), "activations": ("sigmoid", "tanh", "relu"), "width": 64,
                  "steps": 1000, "eval_every": 100, "probe_every": 500, "probes": ("grads", "saturation")},
        "lr": {"lrs": _LR_GRID_QUICK, "activations": ("relu",), "steps": 800, "eval_every": 100, "probe_every": 800,
               "probes": ()},
        "fused-vs-eager": {"models": ("mlp", "cnn"), "norms": ("eager", "fused"), "activations": ("relu",),
                           "depths": (3,), "width": 64, "steps": 600, "eval_every": 50, "probes": ()},
        "ics": {"depths": (5,), "width": 64, "steps": 600, "eval_every": 100, "probes": ("ics",), "ics_every": 50},
    },
    "full": {
        "bn-paper": {"steps": 20000, "eval_every": 200, "probe_every": 400},
        "depth": {"depths": (2, 4, 6, 8, 10, 12, 16, 20), "activations": ("sigmoid", "tanh", "relu"),
                  "steps": 4000, "eval_every": 100, "probe_every": 1000, "probes": ("grads", "saturation")},
        "lr": {"lrs": _LR_GRID_FULL, "activations": ("relu", "sigmoid"), "steps": 3000, "eval_every": 100,
               "probes": ()},
        "fused-vs-eager": {"models": ("mlp", "cnn"), "norms": ("eager", "fused"), "activations": ("relu",),
                           "depths": (4,), "width": 256, "batch_size": 256, "steps": 3000, "eval_every": 100,
                           "probes": ()},
        "ics": {"depths": (8,), "steps": 4000, "eval_every": 200, "probes": ("ics",), "ics_every": 100},
    },
}  # fmt: skip

#: fused-vs-eager on a CPU runs the Triton kernels in the interpreter (numpy simulation of every program):
#: a tiny model and a few steps, whatever the preset. These runs check agreement; they are never timed.
INTERPRETER_FUSED = {"models": ("mlp", "cnn"), "norms": ("eager", "fused"), "activations": ("relu",),
                     "depths": (2,), "width": 16, "batch_size": 32, "steps": 40, "eval_every": 10, "probes": (),
                     "cnn": {"width": 4, "batch_size": 16, "steps": 20}}  # fmt: skip


def experiment_spec(experiment: str, preset: str, *, interpreter: bool = False) -> dict:
    """The merged settings of one experiment: COMMON, then the preset's entry (or the interpreter's tiny one)."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; valid experiments are: {', '.join(EXPERIMENTS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets are: {', '.join(PRESETS)}")
    spec = copy.deepcopy(COMMON)
    if experiment == "fused-vs-eager" and interpreter:
        spec.update(copy.deepcopy(INTERPRETER_FUSED))
    else:
        spec.update(copy.deepcopy(PRESETS[preset][experiment]))
    return spec
