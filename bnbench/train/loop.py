"""One training run: a model, a data set and a configuration in, a long DataFrame of measurements out.

Step s means "after s optimizer updates". Evaluations happen at :func:`evaluation_steps`: 0, the powers of four
below ``eval_every`` (log-spaced early evaluations, so a fast arm's crossing of the target is resolved), every
``eval_every`` steps and the last step. At each one the run records ``test_acc`` and ``train_loss`` (mean
mini-batch loss since the previous evaluation, dropout and noise included); with a validation split,
``val_acc`` at the last :data:`VAL_EVALUATIONS` evaluations (what chooses a learning rate).
At probe steps (multiples of ``probe_every``, 0 meaning every evaluation, and the last step; a probe step counts
only when it is also an evaluation step; with the ``train_eval`` probe, every evaluation) it adds ``test_loss``,
``train_acc`` and ``train_eval_loss`` (a fixed training subset in eval mode: the loss a regularisation comparison matches) and,
as the probes ask, the gradient norm of every layer's weight on that step's
mini-batch, the 15/50/85th percentiles of one last-hidden-layer unit's activation input over the test set (the
paper's Figure 1), the fraction of saturated units per layer and, with ``train_mode_eval``, ``test_acc_batch``:
test accuracy with batch statistics over test mini-batches of the training batch size. Every ``ics_every`` steps
it measures internal covariate shift (:mod:`.ics`) and the smoothness along the gradient (:mod:`.landscape`).
``wall_s`` counts training time only (evaluations and probes excluded; CUDA synchronised at evaluation points).
The last rows summarise the run: ``steps_to_target`` and ``time_to_target_s`` (linearly interpolated between the
last evaluation below the target and the first at or above it; NaN when never reached), ``reached_target``,
``diverged``, ``ms_per_step``, ``target_acc``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.device import synchronize
from bnbench.functional import resolve_backend
from bnbench.schema import TRAIN_COLUMNS
from bnbench.train.data import Dataset
from bnbench.train.ics import gradient_shift
from bnbench.train.landscape import smoothness
from bnbench.train.models import BATCH_NORMS, INITS, MODELS, NORMS, build_model, init_weights

__all__ = ["ARM_COLUMNS", "OPTIMIZERS", "PROBES", "RUN_COLUMNS", "RunConfig", "backend_label", "evaluation_steps",
           "train_run"]  # fmt: skip

OPTIMIZERS = ("sgd", "adam")
PROBES = ("grads", "percentiles", "saturation", "ics", "smoothness", "train_eval")
#: validation accuracy is recorded at the last this many evaluations (the final-accuracy window of the report)
VAL_EVALUATIONS = 3
#: settings beyond TRAIN_COLUMNS that tell two runs of one experiment apart (every run row carries them)
ARM_COLUMNS = ("init", "optimizer", "momentum", "weight_decay", "dropout", "noise")
#: TRAIN_COLUMNS plus ``backend`` (which implementation ran the BN layers: none, torch, triton,
#: triton-interpreter) and the ARM_COLUMNS
RUN_COLUMNS = (*TRAIN_COLUMNS, "backend", *ARM_COLUMNS)
#: a unit is saturated when its activation's derivative is below this fraction of the derivative's maximum
SATURATION_FRACTION = 0.05
_MAX_DERIVATIVE = {"identity": 1.0, "relu": 1.0, "sigmoid": 0.25, "tanh": 1.0, "gelu": 1.129, "gelu_tanh": 1.129,
                   "silu": 1.0998}  # fmt: skip
_PERCENTILES = (15, 50, 85)
#: evaluations per run when its length is given in epochs
_EVALS_PER_RUN = 10


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. ``backend`` is the fused layer's backend (auto, triton, torch).

    ``epochs``, when set, fixes the run length in passes over the training set instead of ``steps`` (see
    :meth:`for_data`); ``weight_decay`` is the optimizer's L2 penalty; ``dropout`` and ``noise`` see
    :func:`bnbench.train.models.build_model`.
    """

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
    weight_decay: float = 0.0
    init: str = "auto"
    init_std: float = 0.1
    dropout: float = 0.0
    noise: float = 0.0
    epochs: float | None = None
    channels_last: bool = False
    backend: str = "auto"
    target_acc: float = 0.9
    probe_unit: int = 0
    probes: tuple[str, ...] = ("grads", "percentiles", "saturation")
    ics_every: int = 0
    probe_every: int = 0
    train_mode_eval: bool = False
    device: str = "cpu"
    train_eval_samples: int = 1000

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
        act, _ = parse_activation(self.activation)  # unknown names raise ValueError here, before any run
        if act is Activation.LEAKY_RELU:
            raise ValueError("the training models take activations without a parameter; leaky_relu is not offered")
        for name, valid in (("model", MODELS), ("norm", NORMS), ("init", INITS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={self.depth}, width={self.width}")
        for name in ("lr", "init_std"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.target_acc <= 1.0:
            raise ValueError(f"target accuracy must be in (0, 1], got {self.target_acc!r}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive finite number, got {self.epochs!r}")
        if not 0 <= self.probe_unit < self.width:
            raise ValueError(f"probe_unit must be in [0, width={self.width}), got {self.probe_unit}")

    def as_dict(self) -> dict:
        return asdict(self)

    def for_data(self, n_train: int) -> RunConfig:
        """This run with ``steps`` and ``eval_every`` fixed from ``epochs`` and the training-set size (full
        batches only: steps = ceil(epochs * (n_train // batch_size))); unchanged when ``epochs`` is None."""
        if self.epochs is None:
            return self
        per_epoch = max(1, n_train // min(self.batch_size, n_train))
        steps = max(1, math.ceil(self.epochs * per_epoch))
        return dataclasses.replace(self, steps=steps, eval_every=max(1, steps // _EVALS_PER_RUN))


def evaluation_steps(steps: int, eval_every: int, log_early: bool = True) -> list[int]:
    """0, the powers of four below ``eval_every`` (when ``log_early``), the multiples of ``eval_every``, and
    ``steps``: sorted, distinct, none past ``steps``."""
    early = [4**k for k in range(int(math.log(eval_every, 4)) + 1) if 4**k < eval_every] if log_early else []
    return sorted({0, steps, *early, *range(eval_every, steps + 1, eval_every)} - {s for s in early if s > steps})


def backend_label(cfg: RunConfig) -> str:
    """Which implementation runs the BN layers: ``none`` (no BatchNorm), ``torch`` (eager or noisy BN, LayerNorm,
    GroupNorm, or fused falling back to the PyTorch reference), ``triton`` or ``triton-interpreter`` (CPU under
    TRITON_INTERPRET: correctness only)."""
    if cfg.norm == "none":
        return "none"
    if cfg.norm != "fused":
        return "torch"
    resolved = resolve_backend(cfg.backend, torch.empty(0, device=cfg.device))
    return "triton-interpreter" if resolved == "triton" and cfg.device == "cpu" else resolved


def _optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def _evaluate(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        loss += F.cross_entropy(logits, y[start : start + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[start : start + chunk]).sum().item()
    return loss / len(x), correct / len(x)


@torch.no_grad()
def _batch_stats_accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy with BatchNorm normalising by each test mini-batch's own statistics (train-mode BN, running
    statistics untouched, no dropout or noise); full batches only."""
    correct, seen = 0, 0
    for start in range(0, len(x) - batch_size + 1, batch_size):
        logits = model.probe(x[start : start + batch_size], batch_stats=True)[-1]
        correct += (logits.argmax(1) == y[start : start + batch_size]).sum().item()
        seen += batch_size
    return correct / seen if seen else math.nan


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


def _crossing(prev: tuple[float, float, float] | None, step: int, wall: float, acc: float, target: float):
    """Step and time at which accuracy reached ``target``, linear between the previous evaluation (step, wall,
    acc) and this one."""
    if prev is None or acc <= prev[2]:
        return float(step), wall
    frac = (target - prev[2]) / (acc - prev[2])
    return prev[0] + frac * (step - prev[0]), prev[1] + frac * (wall - prev[1])


def train_run(cfg: RunConfig, data: Dataset, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Train one model as ``cfg`` says; return its measurements (columns :data:`RUN_COLUMNS`)."""
    cfg = cfg.for_data(len(data.x_train))
    device = torch.device(cfg.device)
    act, _ = parse_activation(cfg.activation)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, in_shape=data.image_shape, n_classes=data.n_classes, depth=cfg.depth, width=cfg.width,
        activation=act, norm=cfg.norm, backend=cfg.backend, channels_last=cfg.channels_last, dropout=cfg.dropout,
        noise=cfg.noise,
    )  # fmt: skip
    init_weights(model, cfg.init, cfg.seed, cfg.init_std)
    model.to(device)
    opt = _optimizer(cfg, model.parameters())
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    has_val = data.x_val is not None and len(data.x_val) > 0
    x_val, y_val = (data.x_val.to(device), data.y_val.to(device)) if has_val else (None, None)
    sub = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_eval_samples]
    x_sub, y_sub = x_train[sub.to(device)], y_train[sub.to(device)]
    weights = [b.layer.weight for b in model.blocks] + [model.head.weight]
    batch_norm = cfg.norm in BATCH_NORMS
    label = backend_label(cfg)
    fixed = {k: getattr(cfg, k) for k in RUN_COLUMNS if hasattr(cfg, k)}
    rows: list[tuple] = []
    clock = {"train_s": 0.0}
    eval_list = evaluation_steps(cfg.steps, cfg.eval_every)
    eval_at, val_at = set(eval_list), set(eval_list[-VAL_EVALUATIONS:])

    def emit(step: int, metric: str, value: float) -> None:
        rows.append((step, clock["train_s"], metric, float(value)))

    def evaluate(step: int, mean_loss: float, probe: bool) -> float:
        model.eval()
        test_loss, test_acc = _evaluate(model, x_test, y_test)
        emit(step, "test_acc", test_acc)
        emit(step, "train_loss", mean_loss)
        if probe or "train_eval" in cfg.probes:
            emit(step, "test_loss", test_loss)
            sub_loss, sub_acc = _evaluate(model, x_sub, y_sub)
            emit(step, "train_acc", sub_acc)
            emit(step, "train_eval_loss", sub_loss)
        if has_val and (step in val_at or not math.isfinite(mean_loss)):  # a diverged run ends here
            emit(step, "val_acc", _evaluate(model, x_val, y_val)[1])
        if probe and cfg.train_mode_eval and batch_norm:
            emit(step, "test_acc_batch", _batch_stats_accuracy(model, x_test, y_test, cfg.batch_size))
        if probe and {"percentiles", "saturation"} & set(cfg.probes):
            zs = model.probe(x_test)[:-1]
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

    def seeded_loss(xb, yb, seed):
        """The mini-batch loss with the same dropout/noise draws on every call (so repeated evaluations differ
        only by the parameters)."""

        def loss_of():
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                return F.cross_entropy(model(xb), yb)

        return loss_of

    batches = _batches(len(x_train), cfg.batch_size, cfg.seed)
    loss_sum, loss_count = torch.zeros((), device=device, dtype=torch.float64), 0
    steps_to_target, time_to_target, diverged, step, prev = math.nan, math.nan, False, 0, None
    mark = time.perf_counter()
    for step in range(cfg.steps + 1):
        idx = next(batches).to(device)
        xb, yb = x_train[idx], y_train[idx]
        loss_seed = cfg.seed * 1_000_003 + step
        probe_step = "ics" in cfg.probes or "smoothness" in cfg.probes
        probe_step = probe_step and cfg.ics_every > 0 and step % cfg.ics_every == 0 and step < cfg.steps
        loss = seeded_loss(xb, yb, loss_seed)() if probe_step else F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_sum += loss.detach()
        loss_count += 1
        if step in eval_at:
            synchronize(device)  # the loss is read only here, so training steps stay asynchronous on a GPU
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
                steps_to_target, time_to_target = _crossing(prev, step, clock["train_s"], acc, cfg.target_acc)
            prev = (step, clock["train_s"], acc)
            if diverged or step == cfg.steps:
                break
            mark = time.perf_counter()
        if probe_step and not diverged:
            synchronize(device)
            t0 = time.perf_counter()
            loss_of = seeded_loss(xb, yb, loss_seed)
            if "smoothness" in cfg.probes:
                for name, value in smoothness(model, loss_of, cfg.lr).items():
                    emit(step, f"smooth_{name}", value)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            grads = [w.grad.detach().clone() for w in weights]
            opt.step()
            if "ics" in cfg.probes:
                after = {k: v.detach().clone() for k, v in model.state_dict().items()}
                for i, l2, rel, cos in gradient_shift(model, loss_of, before, after, grads):
                    emit(step, f"ics_l2/layer{i + 1}", l2)
                    emit(step, f"ics_rel/layer{i + 1}", rel)
                    emit(step, f"ics_cos/layer{i + 1}", cos)
            synchronize(device)
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
