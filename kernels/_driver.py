"""A Triton driver that compiles for a chosen GPU and records launches instead of running them.

Inside ``with recording(target) as rec:`` a launcher called on CPU tensors (TRITON_INTERPRET unset) goes through
Triton's real JIT path: the binder, the specialisation of every argument (dtypes, divisibility by 16, integers
equal to 1), the kernel cache, and the real compiler down to a cubin for the target (with the ptxas Triton
ships). Only the last step, the launch, is replaced: :class:`RecordingLauncher` appends a :class:`Launch` to
``rec.launches`` and returns. No kernel runs and no output is written (outputs stay uninitialised memory).
(The launchers take that path on the first call of each launch key; later calls launch the compiled kernel
directly, ``_launch.py``, through the same launcher, so every launch is recorded either way.)

A Triton driver, as ``JITFunction.run`` and ``CompiledKernel`` use it (same in Triton 3.6 and 3.9), provides:
``get_current_device`` (the key of the per-device kernel cache), ``get_current_stream``, ``get_current_target``
(what the binder compiles for), ``utils.get_device_properties`` (shared memory check), ``utils.load_binary``
(module, function, registers, spills, max threads), ``utils.unload_module`` and ``launcher_cls(src, metadata)``,
whose instances are called as ``(grid_x, grid_y, grid_z, stream, function, *launch_metadata, *kernel_args)``.
The device key is a string naming the target arch, so these compiled kernels never mix with a real device's.

Triton's active driver is process-global: recordings are not thread-safe. The previous driver is restored on
exit (nesting works). While a recording is active, :func:`recording_target` returns its target: the launchers
then accept CPU tensors and plan for the target's SM count.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from ._target import TARGETS, Target

__all__ = ["Launch", "Recorder", "TensorArg", "recording", "recording_target"]

_STACK: list[Recorder] = []


def _device_key(arch: int) -> str:
    """The "device" of a recording for sm_<arch>: the key of Triton's per-device kernel cache."""
    return f"bnbench-recording:sm_{arch}"


def recording_target() -> Target | None:
    """The target of the innermost active recording, or None when none is active."""
    return _STACK[-1].target if _STACK else None


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """What a launch saw of a tensor argument (the tensor itself is not kept)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    numel: int
    element_size: int
    aligned_16: bool  # data pointer divisible by 16 bytes

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded kernel launch."""

    kernel: str  # the @triton.jit function's name
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared_bytes: int  # static + dynamic shared memory per program, from the compiler
    constexprs: dict[str, Any]  # by parameter name, including integers Triton specialised to the constant 1
    signature: dict[str, str]  # Triton type of every argument ("*fp32", "i32", "constexpr", ...)
    args: dict[str, Any]  # every argument's value as passed (tensors as TensorArg); {} if not kept
    compiled: Any = dataclasses.field(compare=False, repr=False)  # triton CompiledKernel: asm, metadata
    stream: int = 0  # the stream the launcher was given (the driver's current stream at the launch)

    @property
    def programs(self) -> int:
        x, y, z = self.grid
        return x * y * z

    @property
    def key(self) -> str:
        """Identifies the compiled variant (Triton's hash of source, specialisation, options and target)."""
        return self.compiled.hash


class Recorder:
    """The launches recorded so far, in order (``launches``), for ``target``.

    With ``keep_args`` (the default) each launch is described on the spot, arguments included, and no reference
    to a tensor is kept (a kept reference would change what autograd does: it copies a gradient it cannot steal).
    Without it only the kernel and grid are kept (``Launch.args`` is empty): well under a microsecond per launch,
    for measuring host time under a recording.
    """

    def __init__(self, target: Target, keep_args: bool = True) -> None:
        self.target = target
        self.keep_args = keep_args
        self.driver = RecordingDriver(target)
        self._raw: list[tuple] = []  # (RecordingLauncher, grid, stream) of launches recorded without arguments
        self._launches: list[Launch] = []

    @property
    def launches(self) -> list[Launch]:
        if self._raw:
            self._launches += [launcher.describe(grid, None, stream) for launcher, grid, stream in self._raw]
            self._raw.clear()
        return self._launches

    def clear(self) -> None:
        self._raw.clear()
        self._launches = []

    def take(self) -> list[Launch]:
        """The launches recorded since the last take (or clear), and forget them."""
        out = self.launches
        self._launches = []
        return out


def _describe(value: Any) -> Any:
    if hasattr(value, "data_ptr") and hasattr(value, "stride"):  # a tensor: keep its layout, not its memory
        return TensorArg(
            tuple(value.shape), tuple(value.stride()), str(value.dtype).removeprefix("torch."), value.numel(),
            value.element_size(), value.data_ptr() % 16 == 0,
        )  # fmt: skip
    return value


class RecordingLauncher:
    """Stands where Triton's CUDA launcher stands: called with the grid, stream, function handle, launch
    metadata and finally every kernel argument; records them in the innermost recording."""

    def __init__(self, src, metadata) -> None:
        self.src, self.metadata = src, metadata
        self.arg_names = list(src.fn.arg_names)
        names = self.arg_names
        self.constexprs = {}
        for path, value in getattr(src, "constants", {}).items():
            index = path[0] if isinstance(path, tuple) else path
            self.constexprs[names[index] if isinstance(index, int) else index] = value
        self._compiled = None  # the CompiledKernel this launcher belongs to, found on the first launch

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *rest) -> None:
        if not _STACK:
            raise RuntimeError("a kernel compiled for a recording was launched outside bnbench's recording()")
        recorder = _STACK[-1]
        if recorder.keep_args:  # the arguments follow packed metadata, launch metadata and the two hooks
            recorder._launches.append(self.describe((grid_x, grid_y, grid_z), rest[4:], stream))
        else:
            recorder._raw.append((self, (grid_x, grid_y, grid_z), stream))

    def describe(self, grid: tuple, values: tuple | None, stream: int = 0) -> Launch:
        """The :class:`Launch` of one recorded call (``values`` None: arguments not kept)."""
        names = self.arg_names
        if values is not None and len(values) != len(names):  # a caller passing only the runtime arguments
            names = [n for n in names if self.src.signature.get(n) != "constexpr"]
        if values is not None and len(values) != len(names):
            raise RuntimeError(f"{self.src.fn.__name__} launched with {len(values)} arguments; it takes "
                               f"{len(self.arg_names)} ({len(names)} at run time)")  # fmt: skip
        args = {} if values is None else {name: _describe(v) for name, v in zip(names, values, strict=True)}
        md = self.metadata
        return Launch(
            kernel=self.src.fn.__name__,
            grid=tuple(int(g) for g in grid),
            num_warps=int(md.num_warps),
            num_stages=int(getattr(md, "num_stages", 0)),
            shared_bytes=int(md.shared),
            constexprs=dict(self.constexprs),
            signature=dict(self.src.signature),
            args=args,
            compiled=self._owner(),
            stream=int(stream),
        )

    def _owner(self):
        """The CompiledKernel in the JIT function's cache whose launcher this is (matched by Triton's hash)."""
        if self._compiled is None:
            cache = self.src.fn.device_caches[_device_key(self.metadata.target.arch)][0]
            self._compiled = next(k for k in cache.values() if k.hash == self.metadata.hash)
        return self._compiled


class _Utils:
    """The ``driver.utils`` of a recording: device properties of the target, and a load that loads nothing."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def get_device_properties(self, device) -> dict[str, int]:
        t = self.target
        return {
            "max_shared_mem": t.max_smem_per_block, "multiprocessor_count": t.sms, "max_num_regs": t.regs_per_sm,
            "warpSize": t.warp_size,
        }  # fmt: skip

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block). Nothing is loaded, so Triton never
        # unloads anything; registers and spills are unknown here (bnbench.kernels._facts reads them from ptxas).
        return None, None, None, None, 1024

    def unload_module(self, module) -> None:
        pass


class RecordingDriver:
    """The driver object Triton's ``driver.active`` returns during a recording."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.utils = _Utils(target)
        self.launcher_cls = RecordingLauncher
        self.device = _device_key(target.arch)

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_device(self) -> str:
        return self.device

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target.gpu_target()

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.target.arch, 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("a recording driver runs nothing, so it cannot time anything")


@contextlib.contextmanager
def recording(target: Target | str = "sm_90", *, keep_args: bool = True) -> Iterator[Recorder]:
    """Make Triton compile for ``target`` and record launches instead of running them (see the module doc and
    :class:`Recorder` for ``keep_args``)."""
    from triton.runtime.driver import driver

    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid targets are: {', '.join(TARGETS)}")
        target = TARGETS[target]
    from .launchers import interpreter_active

    if interpreter_active():
        raise RuntimeError(
            "recording needs real JIT kernels: TRITON_INTERPRET was set when bnbench.kernels was imported"
        )
    recorder = Recorder(target, keep_args)
    previous = getattr(driver, "_active", None)  # read without creating the default (there is none on CPU)
    driver.set_active(recorder.driver)
    _STACK.append(recorder)
    try:
        yield recorder
    finally:
        _STACK.pop()
        driver.set_active(previous)
