"""The launchers' exception for a tensor whose shape does not fit the input."""

from __future__ import annotations

__all__ = ["ShapeError"]


class ShapeError(ValueError, RuntimeError):
    """A per-channel tensor (weight, bias, running statistics, saved mean/rstd) whose shape does not fit the
    input: a ValueError, as the launchers raise for bad arguments, and a RuntimeError, as PyTorch raises for these.
    (kernels/ imports nothing of bnbench; ``bnbench.ShapeError`` is the same for the functional API's checks,
    which run first.)"""
