"""What each experiment runs, per preset: plain dicts, so ``--help``, the JSON sidecar and the tests read them.

Keys are :class:`bnbench.train.loop.RunConfig` fields, plus the sweep axes ``datasets``, ``models``, ``depths``,
``activations``, ``norms``, ``lrs``, ``batch_sizes``, ``dropouts`` and ``weight_decays`` (every combination runs,
once per seed; the arms of one configuration and seed run back to back, so they see the same machine load).

What the paper says (Ioffe and Szegedy 2015, section 4.1): 28x28 MNIST, a network of 3 fully connected hidden
layers of 100 sigmoid units, weights initialised to small random Gaussian values, 60 examples per mini-batch,
50000 steps, with and without BatchNorm before each sigmoid; it gives no optimizer, learning rate or Gaussian
scale. ``paper-literal`` runs that set-up on binarised mnist5k with plain SGD and N(0, 0.01^2) weights (our choices
for what the paper leaves open). ``bn-paper`` runs the same network as a fair comparison: Glorot init, SGD with
momentum 0.9, and a learning-rate sweep, so each arm is judged at the plain network's best rate (the paper's
like-for-like "same rate" comparison: BN added to a tuned baseline) and at its own best rate (chosen on the
validation split). Every other experiment uses ``init: auto`` (He for ReLU, Glorot for sigmoid and tanh).
"""

from __future__ import annotations

import copy

__all__ = ["COMMON", "DEFAULT_TARGET", "EXPERIMENTS", "PRESETS", "SWEEPS", "experiment_spec"]

EXPERIMENTS = ("bn-paper", "paper-literal", "depth", "lr", "saturation", "ics", "regularization", "batch-size",
               "santurkar", "cnn", "fused-vs-eager")  # fmt: skip

#: sweep axis in a spec -> RunConfig field
SWEEPS = {"datasets": "dataset", "models": "model", "depths": "depth", "activations": "activation", "lrs": "lr",
          "batch_sizes": "batch_size", "dropouts": "dropout", "weight_decays": "weight_decay", "norms": "norm"}  # fmt: skip

#: the target test accuracy behind "steps to target", per data set (a level the plain network also reaches)
DEFAULT_TARGET = {"digits": 0.93, "mnist5k": 0.90, "mnist5k-binary": 0.85, "mnist": 0.97, "synthetic": 0.70}

COMMON = {
    "datasets": ("mnist5k",), "models": ("mlp",), "optimizer": "sgd", "momentum": 0.9, "lrs": (0.1,),
    "init": "auto", "init_std": 0.1, "batch_sizes": (60,), "width": 100, "depths": (3,),
    "activations": ("sigmoid",), "norms": ("none", "eager"), "dropouts": (0.0,), "weight_decays": (0.0,),
    "noise": 0.0, "probes": (), "ics_every": 0, "probe_every": 500, "channels_last": False,
    "train_mode_eval": False, "epochs": None,
}  # fmt: skip

_SIGMOID_LRS = (0.1, 0.3, 1.0, 3.0)
_RELU_LRS_QUICK = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)

PRESETS: dict[str, dict] = {
    "quick": {
        "seeds": 5,
        # the paper's network, fair: Glorot init, momentum SGD, each arm at the plain net's best and its own best rate
        "bn-paper": {"lrs": _SIGMOID_LRS, "steps": 1500, "eval_every": 100, "probe_every": 250,
                     "probes": ("percentiles",)},
        # the paper's set-up as written (binary 28x28 MNIST, small Gaussian init, plain SGD)
        "paper-literal": {"datasets": ("mnist5k-binary",), "init": "normal", "init_std": 0.01, "momentum": 0.0,
                          "lrs": (0.5,), "steps": 1500, "eval_every": 100, "probe_every": 250,
                          "probes": ("percentiles",)},
        "depth": {"datasets": ("digits",), "depths": (2, 6, 20), "activations": ("sigmoid", "tanh", "relu"),
                  "width": 64, "steps": 500, "eval_every": 100, "probe_every": 500, "probes": ("grads",)},
        "lr": {"datasets": ("digits",), "lrs": _RELU_LRS_QUICK, "activations": ("relu",), "steps": 500,
               "eval_every": 100},
        # a condition that saturates the plain sigmoid network: large initial weights
        "saturation": {"datasets": ("digits",), "activations": ("sigmoid", "tanh"), "init": "normal",
                       "init_std": 1.0, "steps": 500, "eval_every": 100, "probe_every": 100,
                       "probes": ("saturation",)},
        "ics": {"steps": 500, "eval_every": 100, "probes": ("ics",), "ics_every": 50},
        "regularization": {"datasets": ("digits",), "activations": ("relu",), "dropouts": (0.0, 0.5),
                           "weight_decays": (0.0, 5e-4), "steps": 800, "eval_every": 100,
                           "probes": ("train_eval",)},
        "batch-size": {"datasets": ("digits",), "activations": ("relu",), "batch_sizes": (4, 16, 60),
                       "norms": ("none", "eager", "layernorm", "groupnorm"), "lrs": (0.02,), "epochs": 4,
                       "train_mode_eval": True},
        "santurkar": {"datasets": ("digits",), "activations": ("relu",), "norms": ("none", "eager", "noisy"),
                      "noise": 1.0, "steps": 500, "eval_every": 100, "probes": ("smoothness",), "ics_every": 50},
        "cnn": {"datasets": ("digits", "mnist5k"), "models": ("cnn",), "activations": ("relu",), "depths": (3,),
                "width": 8, "lrs": (0.1,), "steps": 300, "eval_every": 50},
        "fused-vs-eager": {"datasets": ("digits",), "models": ("mlp", "cnn"), "norms": ("eager", "fused"),
                           "activations": ("relu",), "depths": (3,), "width": 64, "steps": 600, "eval_every": 50},
    },
    "standard": {
        "seeds": 10,
        "bn-paper": {"lrs": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), "steps": 10000, "eval_every": 250,
                     "probe_every": 250, "probes": ("percentiles",)},
        "paper-literal": {"datasets": ("mnist5k-binary",), "init": "normal", "init_std": 0.01, "momentum": 0.0,
                          "lrs": (0.1, 0.5, 2.0), "steps": 10000, "eval_every": 250, "probe_every": 250,
                          "probes": ("percentiles",)},
        "depth": {"datasets": ("digits",), "depths": (2, 4, 8, 12, 16, 20), "activations": ("sigmoid", "tanh", "relu"),
                  "width": 64, "lrs": (0.03, 0.1, 0.3), "steps": 2000, "eval_every": 100, "probe_every": 1000,
                  "probes": ("grads",)},
        "lr": {"datasets": ("digits", "mnist5k"), "lrs": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
               "activations": ("relu", "sigmoid"), "steps": 2000, "eval_every": 100},
        "saturation": {"datasets": ("digits", "mnist5k"), "activations": ("sigmoid", "tanh"), "init": "normal",
                       "init_std": 1.0, "lrs": (0.1, 1.0), "steps": 2000, "eval_every": 100, "probe_every": 100,
                       "probes": ("saturation",)},
        "ics": {"lrs": (0.1, 1.0), "steps": 2000, "eval_every": 100, "probes": ("ics",), "ics_every": 50},
        "regularization": {"activations": ("relu",), "dropouts": (0.0, 0.5), "weight_decays": (0.0, 5e-4),
                           "lrs": (0.03, 0.1), "steps": 5000, "eval_every": 250, "probes": ("train_eval",)},
        "batch-size": {"activations": ("relu",), "batch_sizes": (2, 4, 8, 16, 60, 250),
                       "norms": ("none", "eager", "layernorm", "groupnorm"), "lrs": (0.02,), "epochs": 10,
                       "train_mode_eval": True},
        "santurkar": {"activations": ("relu",), "norms": ("none", "eager", "noisy"), "noise": 1.0, "steps": 3000,
                      "eval_every": 250, "probes": ("smoothness",), "ics_every": 100},
        "cnn": {"datasets": ("digits", "mnist5k"), "models": ("cnn",), "activations": ("relu",), "depths": (4,),
                "width": 32, "lrs": (0.03, 0.1, 0.3), "steps": 2000, "eval_every": 100},
        "fused-vs-eager": {"datasets": ("digits",), "models": ("mlp", "cnn"), "norms": ("eager", "fused"),
                           "activations": ("relu",), "depths": (4,), "width": 256, "batch_sizes": (256,),
                           "steps": 3000, "eval_every": 100},
    },
}  # fmt: skip

#: fused-vs-eager on a CPU runs the Triton kernels in the interpreter (numpy simulation of every program):
#: a tiny model, a few steps, 2 seeds and a small training subset for the train-set evaluations, whatever the
#: preset. These runs check agreement at every evaluation; they are never timed.
INTERPRETER_FUSED = {"datasets": ("digits",), "models": ("mlp", "cnn"), "norms": ("eager", "fused"),
                     "activations": ("relu",), "depths": (2,), "width": 16, "batch_sizes": (32,), "steps": 40,
                     "eval_every": 10, "probes": (), "seeds": 2, "train_eval_samples": 200,
                     "cnn": {"width": 4, "batch_size": 16, "steps": 12, "eval_every": 6}}  # fmt: skip


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
