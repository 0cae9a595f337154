"""The one switch for the Triton interpreter: whether it is asked for, whether it is active, turning it on.

Triton decides at kernel-decoration time (when :mod:`bnbench.kernels` is first imported) whether its kernels run
compiled or in the interpreter, from the ``TRITON_INTERPRET`` environment variable. Every part of bnbench that
needs to know (the layer's backend choice, the benchmark's providers, the training CLI, ``bnbench env``) asks here.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = [
    "ENV_VAR",
    "LARGE_NUMEL",
    "interpreter_active",
    "interpreter_requested",
    "switch_triton_interpreter_on",
    "warn_if_large",
]

ENV_VAR = "TRITON_INTERPRET"
_TRUE = ("1", "true", "on", "yes")
#: inputs above this many elements take seconds to minutes in the interpreter, which simulates every program in
#: numpy (a 32x64x28x28 input took 40 s forward and 102 s backward on a 2-core CPU)
LARGE_NUMEL = 1 << 18


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the interpreter in this process."""
    return os.environ.get(ENV_VAR, "0").lower() in _TRUE


def interpreter_active() -> bool:
    """True when the Triton kernels run (or, not built yet, will run) in the interpreter."""
    if "bnbench.kernels" in sys.modules:  # already built: ask what the kernels were built for
        from bnbench import kernels

        return kernels.interpreter_active()
    return interpreter_requested()


def switch_triton_interpreter_on() -> bool:
    """Set ``TRITON_INTERPRET=1`` for this process unless triton is already imported (too late then). For CLI
    runs on machines without CUDA; returns True when the interpreter is on."""
    if interpreter_requested():
        return True
    if "triton" in sys.modules:
        return False
    os.environ[ENV_VAR] = "1"
    return True


def warn_if_large(numel: int) -> None:
    """Warn that the interpreter is about to simulate an input of ``numel`` elements when that is large (above
    :data:`LARGE_NUMEL`): it is a correctness tool, and such a call takes seconds to minutes."""
    if numel > LARGE_NUMEL:
        warnings.warn(
            f"bnbench: the Triton interpreter (TRITON_INTERPRET=1) will simulate a {numel}-element input in numpy: "
            f"expect seconds to minutes per call (above {LARGE_NUMEL} elements). For real work on CPU use "
            "backend='torch' (or unset TRITON_INTERPRET); the kernels are fast on a CUDA device.",
            RuntimeWarning,
            stacklevel=3,
        )
