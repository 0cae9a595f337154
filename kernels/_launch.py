"""Launching a compiled Triton kernel directly, without ``JITFunction.run`` on every call.

``kernel[grid](*args, **kwargs)`` binds ~37 arguments, specialises each one (dtype, 16-byte alignment, integers
equal to 1, divisible by 16, i32 or i64), builds the cache key from that specialisation and the options, looks the
compiled kernel up, and only then launches it: 29-36 us per launch for these kernels, against about 3 us for the
launch itself. :func:`launch` does that work once per *launch key* and afterwards calls the compiled kernel's
launcher (``CompiledKernel.run``, the same callable Triton's JIT ends in) with the same arguments.

Never stale: the launch key is a refinement of Triton's own cache key, so two calls with one launch key always
have one Triton specialisation. It holds

- the JIT function (by identity: the key's compiled kernel refers to it, so the id is never reused while the key
  exists), and the active driver's current device (the key of Triton's per-device kernel cache, which also fixes
  the target: a recording driver's device names its arch, see ``_driver.py``);
- every positional argument: an ``int`` by its value (covers == 1, % 16 and the i32/i64/u64 range), a tensor by
  its dtype and whether its data pointer is 16-byte aligned, a ``float`` by its type only (Triton passes floats as
  fp32 and does not specialise on their value), ``bool``, ``None`` and ``str`` by type and value;
- every keyword argument (constexprs and options such as ``num_warps``) by name, value and type;
- the knobs Triton folds into its options on every call (``debug``, the instrumentation mode and, where it exists,
  the fp-sanitiser setting) and the JIT function's own ``debug``.

An argument of any other type, and a float constexpr passed by position, are refused with a TypeError (they
would need more of Triton's specialisation than this key holds). The first call of a launch key goes through ``kernel[grid]`` (Triton binds, compiles or finds
the kernel, and launches it) and the key then keeps the compiled kernel and the values Triton's binder gives the
parameters after the positional ones (constexprs and defaults). Each call reads the current stream, the
launch hooks and the grid afresh, and checks the kernel's used globals as Triton does. While the JIT function has
pre-run hooks, or (Triton 3.9) a stages-inspection hook is set, every call goes through ``kernel[grid]``: those
hooks must see every call.

The recording driver (``_driver.py``) still sees every launch: the compiled kernel's launcher is the one its
driver made (a ``RecordingLauncher`` under a recording), called with exactly what Triton's JIT passes it.

Version-specific: the launcher's calling convention and the layout of ``JITFunction.device_caches``, both read in
the sources of the Triton versions in :data:`SUPPORTED_TRITON` (the only ones tested). Under any other version every
launch goes through ``kernel[grid]`` (correct, slower on the host) and a RuntimeWarning says so once, at the first
launch; ``BNBENCH_TRITON_JIT_LAUNCH=1`` (read at import) does the same by choice.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["JIT_LAUNCH", "SUPPORTED_TRITON", "clear", "launch"]

#: (major, minor) of the Triton versions whose launch convention this module was checked against
SUPPORTED_TRITON = ((3, 6), (3, 9))
#: every launch through ``kernel[grid]`` (Triton's JIT path), set by BNBENCH_TRITON_JIT_LAUNCH=1 at import
JIT_LAUNCH = os.environ.get("BNBENCH_TRITON_JIT_LAUNCH", "") == "1"
#: launch keys kept at most (a new layout per call would otherwise grow the cache without bound)
_MAX_KEYS = 4096

_ARG_TYPES = (int, float, bool, str, type(None))

#: launch key -> (compiled kernel, values of the parameters after the positional ones)
_CACHE: dict[tuple, tuple] = {}


def clear() -> None:
    """Forget every launch key (the next call of each goes through Triton's JIT again)."""
    _CACHE.clear()


@functools.cache
def _triton():
    """The installed Triton's (driver, knobs, fp-sanitiser knob, stages-inspection hook, whether a launch hook
    holds calls); None, with a RuntimeWarning naming the version, where its launch convention was not checked here
    (every launch then goes through Triton's JIT)."""
    import triton
    from triton import knobs
    from triton.runtime.driver import driver

    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if version not in SUPPORTED_TRITON:
        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_TRITON)
        warnings.warn(
            f"bnbench launches compiled Triton kernels directly only on the Triton versions whose launch convention "
            f"it was checked against ({supported}); triton {triton.__version__} is installed, so every launch goes "
            "through Triton's JIT (kernel[grid]: correct, with about 15 us more host time per launch)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    # 3.9 folds the fp-sanitiser setting into the options and may add a custom pipeline to the key; 3.6 has neither
    fpsan = (lambda: knobs.compilation.fpsan_homomorphic_casts) if version >= (3, 9) else (lambda: None)
    stages = (lambda: knobs.runtime.add_stages_inspection_hook) if version >= (3, 9) else (lambda: None)

    # the launch hooks are chains of registered calls (HookChain, in both versions): empty, they ignore the metadata
    def hooked(hook) -> bool:
        return hook is not None and (not isinstance(hook, knobs.HookChain) or bool(hook.calls))

    return driver, knobs, fpsan, stages, hooked


def _unsupported(kernel, args: tuple, kwargs: dict) -> str | None:
    """The first argument this module's launch key cannot describe, named, or None."""
    names = kernel.arg_names
    for i, a in enumerate(args):
        if not isinstance(a, (torch.Tensor, *_ARG_TYPES)):
            return f"{names[i] if i < len(names) else f'argument {i}'} of type {type(a).__name__}"
        if type(a) is float and i in kernel.constexprs:  # the key holds a float's type, a constexpr needs its value
            return f"{names[i]}={a!r}, a float constexpr passed by position (pass it by keyword)"
    for name, value in kwargs.items():
        if not isinstance(value, _ARG_TYPES):
            return f"{name}={value!r} of type {type(value).__name__}"
    return None


def _first_launch(kernel, grid, args: tuple, kwargs: dict, device) -> tuple | None:
    """Launch through Triton's JIT (the first call of a launch key) and return what later calls reuse, or None
    where Triton returned no compiled kernel yet (an asynchronous compile in flight: the next call retries)."""
    if callable(grid):
        raise TypeError(f"{kernel.fn.__name__}: the direct launch takes the grid as a tuple of ints, got a callable")
    bad = _unsupported(kernel, args, kwargs)
    if bad is not None:
        raise TypeError(
            f"{kernel.fn.__name__}: the direct launch keys tensors, int, float, bool, str and None; got {bad}"
        )
    compiled = kernel[grid](*args, **kwargs)
    if not hasattr(compiled, "packed_metadata"):
        return None
    # Triton's own binder (device_caches[device] = (kernels, keys, target, backend, binder) in 3.6 and 3.9): every
    # parameter's value in signature order, defaults applied, exactly what its JIT passes the launcher
    bound, _, _ = kernel.device_caches[device][4](*args, **kwargs)
    values = tuple(bound.values())
    if len(values) < len(args) or any(v is not a for v, a in zip(values, args, strict=False)):
        raise RuntimeError(f"{kernel.fn.__name__}: Triton's binder did not keep the positional arguments in order")
    return compiled, values[len(args) :]


def _check_globals(kernel) -> None:
    """Triton's check that the globals a kernel was compiled with have not changed (done on every JIT call)."""
    missing = object()
    for (name, _), (value, scope) in kernel.used_global_vals.items():
        if (now := scope.get(name, missing)) != value:
            raise RuntimeError(
                f"Global variable {name} has changed since we compiled this kernel, from {value} to {now}"
            )


def launch(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, with the compiled kernel launched directly from the second call of a
    launch key on (see the module doc)."""
    if JIT_LAUNCH:
        kernel[grid](*args, **kwargs)
        return
    checked = _triton()
    if checked is None:  # a Triton version this module was not checked against (warned once): its JIT path
        kernel[grid](*args, **kwargs)
        return
    driver, knobs, fpsan, stages, hooked = checked
    if kernel.pre_run_hooks or stages() is not None:  # hooks that must see every call: Triton's JIT path
        kernel[grid](*args, **kwargs)
        return
    active = driver.active
    device = active.get_current_device()
    key = (
        id(kernel), device, kernel.debug, knobs.runtime.debug, knobs.compilation.instrumentation_mode, fpsan(),
        tuple([
            a if type(a) is int else float if type(a) is float
            else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), a)
            for a in args
        ]),
        tuple(kwargs.items()), tuple(map(type, kwargs.values())),
    )  # fmt: skip
    try:
        entry = _CACHE.get(key)
    except TypeError:  # an unhashable argument: the first launch names it
        entry = None
    if entry is None:
        entry = _first_launch(kernel, grid, args, kwargs, device)
        if entry is not None:
            if len(_CACHE) >= _MAX_KEYS:
                _CACHE.clear()
            _CACHE[key] = entry
        return
    compiled, tail = entry
    if kernel.used_global_vals:
        _check_globals(kernel)
    stream = active.get_current_stream(device)
    values = (*args, *tail)
    enter = knobs.runtime.launch_enter_hook
    # what the enter hooks are called with: Triton builds it on every launch; here only while a hook is registered
    metadata = compiled.launch_metadata(grid, stream, *values) if hooked(enter) else None
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, metadata, enter, knobs.runtime.launch_exit_hook, *values)  # fmt: skip
