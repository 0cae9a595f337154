"""A network's training step on synthetic data: the configuration (:class:`StepCase`), the run settings, the
batch, the network with the same initial weights for every provider, and the step itself (:class:`Trainer`):
zero_grad, forward and cross-entropy loss (under ``torch.autocast`` for bf16), backward, SGD step.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from bnbench.models import build_network, get_network

__all__ = ["DTYPES", "LAYOUTS", "Batch", "StepCase", "StepSettings", "Trainer", "build", "make_batch", "params"]

#: precision name -> autocast dtype (None: plain fp32)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")


@dataclasses.dataclass(frozen=True, order=True)
class StepCase:
    model: str
    batch: int
    dtype: str
    layout: str
    resolution: int | None = None  # None: the network's default

    def __post_init__(self) -> None:
        spec = get_network(self.model)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)} (bf16 = autocast)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {', '.join(LAYOUTS)}")
        if self.layout == "channels_last" and not spec.spatial:
            raise ValueError(f"network {self.model!r} has no 4-D activations: channels_last does not apply")
        if not isinstance(self.batch, int) or self.batch < 2:
            raise ValueError(
                f"batch must be an integer >= 2 (BatchNorm trains on batch statistics), got {self.batch!r}"
            )
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 1):
            raise ValueError(f"resolution must be a positive integer, got {self.resolution!r}")
        spec.input_shape(self.batch, self.resolution)  # raises for a size the network does not take

    @property
    def input_shape(self) -> tuple[int, ...]:
        return get_network(self.model).input_shape(self.batch, self.resolution)

    def label(self) -> str:
        return f"{self.model} b{self.batch} {self.dtype} {self.layout} {self.input_shape[-1]}px"


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How a case runs: the fused layers' backend, step counts, optimizer, seed and network source."""

    fused_backend: str = "torch"
    warmup: int = 3
    steps: int = 10
    profile_steps: int = 2
    lr: float = 0.01
    seed: int = 0
    source: str = "auto"

    def __post_init__(self) -> None:
        if self.fused_backend not in ("triton", "torch"):
            raise ValueError(f"fused_backend must be 'triton' or 'torch', got {self.fused_backend!r}")
        if self.warmup < 0 or self.steps < 1 or self.profile_steps < 0:
            raise ValueError(f"need warmup >= 0, steps >= 1, profile_steps >= 0; got {self.warmup}, {self.steps}, "
                             f"{self.profile_steps}")  # fmt: skip


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    target: torch.Tensor


def make_batch(case: StepCase, device: torch.device, seed: int) -> Batch:
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(case.input_shape, generator=gen)
    target = torch.randint(0, get_network(case.model).num_classes, (case.batch,), generator=gen)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    return Batch(x.to(device).contiguous(memory_format=fmt), target.to(device))


def build(case: StepCase, device: torch.device, settings: StepSettings) -> tuple[nn.Module, str]:
    torch.manual_seed(settings.seed)  # the same initial weights for every provider
    model, source = build_network(case.model, num_classes=get_network(case.model).num_classes, source=settings.source)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    return model.to(device=device, memory_format=fmt).train(), source


def _autocast(case: StepCase, device: torch.device):
    dtype = DTYPES[case.dtype]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name in the original network (torch.compile's wrapper adds ``_orig_mod.``)."""
    return {name.replace("_orig_mod.", ""): p for name, p in model.named_parameters()}


class Trainer:
    """One model, its SGD optimizer and the step: zero grads, forward + loss (under autocast), backward, step."""

    def __init__(self, model: nn.Module, case: StepCase, device: torch.device, batch: Batch, lr: float) -> None:
        self.model, self.case, self.device, self.batch = model, case, device, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(self, capture: dict | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.case, self.device):
            loss = F.cross_entropy(self.model(self.batch.x), self.batch.target)
        loss.backward()
        if capture is not None:  # the check: loss and gradients before the update, on the CPU
            capture["loss"] = float(loss.detach())
            capture["grads"] = {n: None if p.grad is None else p.grad.detach().float().cpu()
                                for n, p in params(self.model).items()}  # fmt: skip
        self.opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
