"""The residual patterns of :func:`bnbench.convert_bn_act`: ``act(bn(x) + r)``, ``act(r + bn(x))`` and torchvision's
``out = bn(x); out += r; out = act(out)``, as torch.fx records them, and the shapes that prove them safe.

fx records ``a + b`` and ``a += b`` as ``operator.add`` (a Proxy has no ``__iadd__``), ``torch.add(a, b)`` as a
call_function and ``a.add(b)`` / ``a.add_(b)`` as call_methods; all are matched here. The sum becomes one call of
the fused layer, ``bn(x, r)``, which needs ``r`` to be a tensor of the BatchNorm output's shape and dtype (no
broadcasting, no type promotion). Nothing in a graph says so, so a residual is converted only when one forward
of the caller's example inputs showed it, every time the block ran (:func:`record_module_inputs`, then
:func:`tensor_shapes` of each call).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = [
    "ModuleCalls",
    "ResidualAdd",
    "fused_residual",
    "match_add",
    "record_module_inputs",
    "residual_mismatch",
    "tensor_shapes",
]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@dataclasses.dataclass(frozen=True)
class ResidualAdd:
    """The add node that sums a BatchNorm's output with ``residual`` (another node of the graph)."""

    add: fx.Node
    residual: fx.Node


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def match_add(bn_node: fx.Node, user: fx.Node) -> tuple[str | None, ResidualAdd | None]:
    """Whether ``user`` (the only use of ``bn_node``) is ``bn + r`` or ``r + bn`` with a tensor node ``r``:
    ``(None, match)``, or ``(reason, None)``. ``(None, None)``: ``user`` is no add at all."""
    if not _is_add(user):
        return None, None
    what = f"Tensor.{user.target}" if user.op == "call_method" else f"{user.target.__module__}.{user.target.__name__}"
    if len(user.args) != 2:
        return f"its output feeds {what} with {len(user.args)} positional arguments (needs exactly 2)", None
    extra = {k: v for k, v in user.kwargs.items() if not (k == "alpha" and v == 1)}
    if extra:
        names = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        return f"its output feeds {what} with {names}: not a plain sum (only alpha=1 fuses)", None
    a, b = user.args
    residual = b if a is bn_node else a
    if residual is bn_node:
        return "its output is added to itself, not to a residual", None
    if not isinstance(residual, fx.Node):
        return f"its output is added to the constant {residual!r}, which broadcasts: not a residual tensor", None
    if user.op == "call_method" and user.target == "add_" and a is residual:
        return ("its output is added in place into the residual (r.add_(bn(x))), whose new value the fused layer "
                "would not write"), None  # fmt: skip
    later = [u.name for u in residual.users if u is not user and _runs_after(u, user)]
    if later:
        return (f"the residual {residual.name} is used after the add (by {', '.join(later)}): fx records "
                "`r += bn(x)`, which changes r, as `r + bn(x)`, and the fused layer keeps r for its backward, so a "
                "later in-place change of r would break it"), None  # fmt: skip
    return None, ResidualAdd(user, residual)


def _runs_after(node: fx.Node, ref: fx.Node) -> bool:
    """Whether ``node`` comes after ``ref`` in their graph's order."""
    cursor = ref.next
    while cursor.op != "root":  # the graph's sentinel closes the ring of nodes
        if cursor is node:
            return True
        cursor = cursor.next
    return False


def fused_residual(layer: nn.Module, input: torch.Tensor, residual) -> torch.Tensor:
    """What a converted residual tail calls: ``layer(input, residual)``, or, where this call's residual is not a
    tensor of the input's shape, dtype and device (the example forward showed one, but autocast may promote the
    sum, and a residual may broadcast over a batch the example did not have), the unfused composition the model
    wrote, ``act(bn(input) + residual)`` with the layer's BatchNorm (eager's result and dtype)."""
    if (
        isinstance(residual, torch.Tensor)
        and residual.shape == input.shape
        and residual.dtype == input.dtype
        and residual.device == input.device
    ):
        return layer(input, residual)
    return layer.activate(layer.normalize(input) + residual)


def residual_mismatch(bn_meta, residual_meta) -> str | None:
    """Why the residual cannot be fused, from one call's shapes (None when it has the BN output's shape and dtype)."""
    if not isinstance(residual_meta, TensorMetadata):
        return "the residual is not a tensor in the example forward"
    if not isinstance(bn_meta, TensorMetadata):
        return "the BatchNorm output's shape is unknown in the example forward"
    if tuple(residual_meta.shape) != tuple(bn_meta.shape):
        return (f"the residual's shape {tuple(residual_meta.shape)} is not the BatchNorm output's "
                f"{tuple(bn_meta.shape)} (the add broadcasts)")  # fmt: skip
    if residual_meta.dtype != bn_meta.dtype:
        return (f"the residual is {residual_meta.dtype}, the BatchNorm output {bn_meta.dtype} (the add promotes: the "
                "fused layer takes a residual of the input's dtype)")  # fmt: skip
    return None


@dataclasses.dataclass
class ModuleCalls:
    """What one forward of the example inputs showed: each recorded module's positional arguments per call (on a
    copy of the model, ``probe``, which the shape propagation runs), and why a module's calls are unusable."""

    probe: nn.Module | None = None
    args: dict[str, list[tuple]] = dataclasses.field(default_factory=dict)
    unusable: dict[str, str] = dataclasses.field(default_factory=dict)


def record_module_inputs(model: nn.Module, example_inputs: Sequence, names: Iterable[str]) -> ModuleCalls:
    """Run a deep copy of ``model`` (same mode, no gradients) on ``example_inputs`` and record the arguments of
    every call of the modules ``names``. The copy keeps the running statistics of ``model`` unchanged."""
    calls = ModuleCalls(probe=copy.deepcopy(model))
    wanted = set(names)
    handles = []

    def recorder(name: str):
        def hook(module, args, kwargs):
            if kwargs:
                calls.unusable[name] = f"called with keyword arguments ({', '.join(kwargs)}) in the example forward"
            calls.args.setdefault(name, []).append(args)

        return hook

    for name, module in calls.probe.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(recorder(name), with_kwargs=True))
    try:
        with torch.no_grad():
            calls.probe(*example_inputs)
    except Exception as error:  # the caller's inputs do not fit its model: bad input, said before any fusion
        raise ValueError(
            f"example_inputs: the model's forward failed on them ({type(error).__name__}: {error})"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return calls


def tensor_shapes(calls: ModuleCalls, name: str, graph: fx.Graph) -> tuple[str | None, list[dict[str, object]]]:
    """``graph`` (the traced forward of module ``name``) run on each recorded call of it: per call, node name ->
    its output's :class:`TensorMetadata` (None for a non-tensor). ``(reason, [])`` when there is no usable call."""
    if name in calls.unusable:
        return calls.unusable[name], []
    recorded = calls.args.get(name)
    if not recorded:
        return "the block is never called in the example forward, so its residual's shape is unknown", []
    runner = fx.GraphModule(calls.probe.get_submodule(name), graph)
    shapes = []
    with torch.no_grad():
        for args in recorded:
            ShapeProp(runner).propagate(*args)
            shapes.append({node.name: node.meta.get("tensor_meta") for node in graph.nodes})
    return None, shapes
