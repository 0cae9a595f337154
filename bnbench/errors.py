"""The exceptions bnbench defines (importing this module imports nothing else)."""

from __future__ import annotations

__all__ = ["ShapeError"]


class ShapeError(ValueError, RuntimeError):
    """A tensor's shape does not fit the input, e.g. a running statistic or a parameter with the wrong number of
    channels. A ValueError, as the project raises for bad input, and a RuntimeError, as PyTorch raises for these
    (and its tests assert), so code written against nn.BatchNorm catches it too. (The kernel launchers raise
    ``bnbench.kernels._errors.ShapeError``, the same for their own checks: kernels/ imports nothing of bnbench.)"""
