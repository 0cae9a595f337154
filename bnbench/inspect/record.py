"""Run a case's pass through bnbench's public Triton path under a recording driver: the launches it makes and
the aten ops around them that would launch CUDA kernels. Nothing is executed on a GPU.

Inputs are uninitialised CPU tensors of the case's shape, dtype and layout (``torch.empty`` costs no memory
traffic, so the largest shapes are fine); the pass is the benchmark's own (:func:`bnbench.bench.workload.build_pass`)
with the ``triton`` provider's function, so what is recorded is what ``bnbench bench`` would launch.
"""

from __future__ import annotations

import dataclasses

import torch

from bnbench.bench.cases import Case
from bnbench.bench.workload import Inputs, build_pass, torch_dtype
from bnbench.inspect.aten import KernelOpCounter

__all__ = ["PassRecord", "empty_inputs", "record_pass", "triton_function"]


@dataclasses.dataclass
class PassRecord:
    case: Case
    target: str
    launches: list  # bnbench.kernels._driver.Launch, in launch order
    aten_kernels: dict[str, int]  # aten ops that would launch a CUDA kernel during the pass, by name


def empty_inputs(case: Case) -> Inputs:
    """The case's tensors on CPU, uninitialised (x and dy in the case's dtype and layout; fp32 parameters)."""
    memory_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    dtype = torch_dtype(case.dtype)
    x = torch.empty(case.shape, dtype=dtype).to(memory_format=memory_format)
    dy = torch.empty_like(x)
    params = [torch.ones(case.C) for _ in range(4)]  # weight, bias, running_mean, running_var
    if case.needs_grad:
        for t in (x, params[0], params[1]):
            t.requires_grad_(True)
    return Inputs(x, params[0], params[1], params[2], params[3], dy)


def triton_function(case: Case):
    """The benchmark's ``triton`` provider function for the case (bnbench's public functional API)."""
    from bnbench.bench.providers import get_providers

    (provider,) = get_providers("triton")
    return provider.make(case)


def record_pass(case: Case, target="sm_90", inputs: Inputs | None = None) -> PassRecord:
    """Record one call of ``case``'s pass (for ``bwd``, the forward it replays is made first and not counted)."""
    from bnbench.kernels._driver import recording

    inp = inputs if inputs is not None else empty_inputs(case)
    run = build_pass(case, triton_function(case), inp)
    with recording(target) as rec:
        run.prepare()
        # one-time state per (device, stream), not a per-call launch: the split path's arrival counters, zeroed
        # once when first used and left at zero by every launch after
        from bnbench.kernels.launchers import _arrival_counters

        _arrival_counters(inp.x.device)
        rec.clear()
        inp.zero_grads()
        with KernelOpCounter() as ops:
            run.call()
        launches = rec.take()
    return PassRecord(case, rec.target.name, launches, dict(ops.counts))
