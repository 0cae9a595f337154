"""Count the aten operators that would launch a CUDA kernel (fills, copies, arithmetic) while code runs.

A ``TorchDispatchMode`` sees every aten op below autograd. Allocations of uninitialised memory and views (ops
whose results alias an input without writing it) launch nothing; every other op would launch at least one
kernel on a CUDA tensor. Used around the recorded Triton path, where bnbench's own kernels are recorded by the
driver and anything seen here is an extra launch (e.g. autograd materialising zero gradients).
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelOpCounter", "launches_kernel"]

#: ops that allocate without initialising, or only change metadata: no kernel
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "resize_", "set_", "_unsafe_view", "view", "sym_size", "sym_stride", "sym_numel",
}  # fmt: skip


def launches_kernel(func) -> bool:
    """Whether an aten op (OpOverload) would launch a kernel on CUDA tensors."""
    if func.overloadpacket.__name__ in _NO_KERNEL:
        return False
    returns = func._schema.returns
    is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return not is_view


class KernelOpCounter(TorchDispatchMode):
    """``with KernelOpCounter() as ops:`` ... then ``ops.counts``: {op name: calls} of the kernel-launching ops."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
