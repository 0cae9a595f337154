"""One training run: a model, a data set and a configuration in, a long DataFrame of measurements out.

Step s means "after s optimizer updates". At every evaluation step (0, eval_every, ..., steps) the run records
``test_acc``, ``test_loss`` and ``train_loss`` (mean mini-batch loss since the previous evaluation); the time
per step between evaluations follows from ``wall_s``.
At probe steps (multiples of ``probe_every``, 0 meaning every evaluation, and the last step; a probe step
counts only when it is also an evaluation step) it adds ``train_acc`` (a fixed training subset, eval mode), the
gradient norm of every layer's weight on that step's mini-batch, the 15/50/85th percentiles of one
last-hidden-layer unit's activation input over the test set (the paper's Figure 1) and the fraction of
saturated units per layer. Every ``ics_every`` steps it measures internal covariate shift (:mod:`.ics`). ``wall_s`` counts training time only
(evaluations and probes excluded; CUDA synchronised at evaluation points). The last rows summarise the run:
``steps_to_target``, ``time_to_target_s`` (NaN when never reached), ``reached_target``, ``diverged``,
``ms_per_step``, ``target_acc``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.functional import resolve_backend
from bnbench.schema import TRAIN_COLUMNS
from bnbench.train.data import Dataset
from bnbench.train.ics import gradient_shift
from bnbench.train.models import build_model, init_weights

__all__ = ["OPTIMIZERS", "PROBES", "RUN_COLUMNS", "RunConfig", "backend_label", "train_run"]

OPTIMIZERS = ("sgd", "adam")
PROBES = ("grads", "percentiles", "saturation", "ics")
#: TRAIN_COLUMNS plus ``backend``: which implementation ran the BN layers (none, torch, triton, triton-interpreter)
RUN_COLUMNS = (*TRAIN_COLUMNS, "backend")
#: a unit is saturated when its activation's derivative is below this fraction of the derivative's maximum
SATURATION_FRACTION = 0.05
_MAX_DERIVATIVE = {"identity": 1.0, "relu": 1.0, "sigmoid": 0.25, "tanh": 1.0, "gelu": 1.129, "gelu_tanh": 1.129,
                   "silu": 1.0998}  # fmt: skip
_PERCENTILES = (15, 50, 85)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. ``backend`` is the fused layer's backend (auto, triton, torch)."""

    experiment: str
    dataset: str
    model: str = "mlp"
    depth: int = 3
    width: int = 100
    activation: str = "sigmoid"
    norm: str = "none"
    lr: float = 0.1
    batch_size: int = 60
    seed: int = 0
    steps: int = 1000
    eval_every: int = 50
    optimizer: str = "sgd"
    momentum: float = 0.9
    init: str = "pytorch"
    init_std: float = 0.1
    channels_last: bool = False
    backend: str = "auto"
    target_acc: float = 0.9
    probe_unit: int = 0
    probes: tuple[str, ...] = ("grads", "percentiles", "saturation")
    ics_every: int = 0
    probe_every: int = 0
    device: str = "cpu"
    train_eval_samples: int = 2000

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid optimizers are: {', '.join(OPTIMIZERS)}")
        bad = sorted(set(self.probes) - set(PROBES))
        if bad:
            raise ValueError(f"unknown probe(s) {bad}; valid probes are: {', '.join(PROBES)}")
        if self.probe_every < 0 or self.ics_every < 0:
            raise ValueError(f"probe_every and ics_every must be >= 0, got {self.probe_every}, {self.ics_every}")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 2:
            raise ValueError(
                f"steps and eval_every must be >= 1 and batch_size >= 2, got steps={self.steps}, "
                f"eval_every={self.eval_every}, batch_size={self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.probe_unit < self.width:
            raise ValueError(f"probe_unit must be in [0, width={self.width}), got {self.probe_unit}")

    def as_dict(self) -> dict:
        return asdict(self)


def backend_label(cfg: RunConfig) -> str:
    """Which implementation runs the BN layers: ``none``, ``torch`` (eager, or fused falling back to the
    PyTorch reference), ``triton`` or ``triton-interpreter`` (CPU under TRITON_INTERPRET: correctness only)."""
    if cfg.norm == "none":
        return "none"
    if cfg.norm == "eager":
        return "torch"
    resolved = resolve_backend(cfg.backend, torch.empty(0, device=cfg.device))
    return "triton-interpreter" if resolved == "triton" and cfg.device == "cpu" else resolved


def _optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=cfg.lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _evaluate(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        loss += F.cross_entropy(logits, y[start : start + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[start : start + chunk]).sum().item()
    return loss / len(x), correct / len(x)


def _saturated_fraction(z: torch.Tensor, activation: Activation) -> float:
    z = z.detach().double().requires_grad_(True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(apply_activation(z, activation).sum(), z)
    return (d.abs() < SATURATION_FRACTION * _MAX_DERIVATIVE[activation.value]).double().mean().item()


def _batches(n: int, batch_size: int, seed: int):
    """Mini-batch indices: a fresh permutation every epoch from a generator seeded by the run seed; the last
    incomplete batch of an epoch is dropped (BN needs full batches)."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def train_run(cfg: RunConfig, data: Dataset, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Train one model as ``cfg`` says; return its measurements (columns :data:`RUN_COLUMNS`)."""
    device = torch.device(cfg.device)
    act, _ = parse_activation(cfg.activation)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, in_shape=data.image_shape, n_classes=data.n_classes, depth=cfg.depth, width=cfg.width,
        activation=act, norm=cfg.norm, backend=cfg.backend, channels_last=cfg.channels_last,
    )  # fmt: skip
    init_weights(model, cfg.init, cfg.seed, cfg.init_std)
    model.to(device)
    opt = _optimizer(cfg, model.parameters())
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    sub = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_eval_samples]
    x_sub, y_sub = x_train[sub.to(device)], y_train[sub.to(device)]
    weights = [b.layer.weight for b in model.blocks] + [model.head.weight]
    label = backend_label(cfg)
    fixed = {k: getattr(cfg, k) for k in TRAIN_COLUMNS if hasattr(cfg, k)}
    rows: list[tuple] = []
    clock = {"train_s": 0.0}

    def emit(step: int, metric: str, value: float) -> None:
        rows.append((step, clock["train_s"], metric, float(value)))

    def evaluate(step: int, mean_loss: float, probe: bool) -> float:
        model.eval()
        test_loss, test_acc = _evaluate(model, x_test, y_test)
        emit(step, "test_acc", test_acc)
        emit(step, "test_loss", test_loss)
        emit(step, "train_loss", mean_loss)
        if probe:
            emit(step, "train_acc", _evaluate(model, x_sub, y_sub)[1])
        if probe and {"percentiles", "saturation"} & set(cfg.probes):
            zs = model.probe(x_test)
            if "percentiles" in cfg.probes:
                unit = zs[-1].transpose(0, 1).reshape(zs[-1].shape[1], -1)[cfg.probe_unit].double()
                qs = torch.quantile(unit, torch.tensor([p / 100 for p in _PERCENTILES], dtype=torch.float64))
                for p, q in zip(_PERCENTILES, qs.tolist(), strict=True):
                    emit(step, f"pct{p}/layer{cfg.depth}.unit{cfg.probe_unit}", q)
            if "saturation" in cfg.probes:
                for i, z in enumerate(zs, start=1):
                    emit(step, f"saturated/layer{i}", _saturated_fraction(z, act))
        model.train()
        return test_acc

    batches = _batches(len(x_train), cfg.batch_size, cfg.seed)
    loss_sum, loss_count = torch.zeros((), device=device, dtype=torch.float64), 0
    steps_to_target, time_to_target, diverged, step = math.nan, math.nan, False, 0
    mark = time.perf_counter()
    for step in range(cfg.steps + 1):
        idx = next(batches).to(device)
        xb, yb = x_train[idx], y_train[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_sum += loss.detach()
        loss_count += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _sync(device)  # the loss is read only here, so training steps stay asynchronous on a GPU
            clock["train_s"] += time.perf_counter() - mark
            mean_loss = loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
            diverged = not math.isfinite(mean_loss)
            probe = cfg.probe_every == 0 or step % cfg.probe_every == 0 or step == cfg.steps or diverged
            if probe and "grads" in cfg.probes:
                for i, w in enumerate(weights, start=1):
                    emit(step, f"grad_norm/layer{i}", torch.linalg.vector_norm(w.grad).item())
            acc = evaluate(step, mean_loss, probe)
            if math.isnan(steps_to_target) and acc >= cfg.target_acc:
                steps_to_target, time_to_target = step, clock["train_s"]
            if diverged or step == cfg.steps:
                break
            mark = time.perf_counter()
        if "ics" in cfg.probes and cfg.ics_every > 0 and step % cfg.ics_every == 0:
            _sync(device)
            t0 = time.perf_counter()
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            grads = [w.grad.detach().clone() for w in weights]
            opt.step()
            after = {k: v.detach().clone() for k, v in model.state_dict().items()}
            shifts = gradient_shift(model, lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb), before, after, grads)
            for i, l2, cos in shifts:
                emit(step, f"ics_l2/layer{i + 1}", l2)
                emit(step, f"ics_cos/layer{i + 1}", cos)
            _sync(device)
            mark += time.perf_counter() - t0  # the measurement (and this step's update) stays off the clock
        else:
            opt.step()
        if progress is not None:
            progress(1)
    for metric, value in (
        ("target_acc", cfg.target_acc), ("steps_to_target", steps_to_target), ("time_to_target_s", time_to_target),
        ("reached_target", not math.isnan(steps_to_target)), ("diverged", diverged),
        ("ms_per_step", 1e3 * clock["train_s"] / max(step, 1)),
    ):  # fmt: skip
        emit(step, metric, value)
    if progress is not None and step < cfg.steps:
        progress(cfg.steps - step)  # a diverged run stops early: account for the steps it skipped
    frame = pd.DataFrame(rows, columns=["step", "wall_s", "metric", "value"])
    for key, value in fixed.items():
        frame[key] = value
    frame["backend"] = label
    return frame[list(RUN_COLUMNS)]
