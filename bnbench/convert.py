"""``convert_bn_act``: replace BatchNorm1d/2d followed by an activation with the fused BatchNormAct1d/2d.

Two passes, each converting only what it can prove safe:

1. ``nn.Sequential`` containers, structurally: a BatchNorm child directly followed by a supported activation
   child (a Sequential feeds each child's output only to the next). The activation slot becomes ``nn.Identity``
   so the container's indices, and hence the ``state_dict`` keys of later children, do not move.
2. Every other module whose ``forward`` calls a BatchNorm child and then an activation: its ``forward`` is traced
   with ``torch.fx`` (children kept as leaves), the pattern is rewritten in the graph, and the module is replaced
   by the resulting ``fx.GraphModule`` (same children and state_dict keys; methods other than ``forward`` are not
   carried over). This covers a torchvision-style ResNet basic block and bottleneck.

   With ``example_inputs``, the same pass also fuses a residual add (:mod:`bnbench.convert_residual`):
   ``act(bn(x) + r)`` becomes ``bn(x, r)`` when one forward of the example showed ``r`` to have the BatchNorm
   output's shape and dtype. When ``r`` is itself the output of a BatchNorm (a ResNet's downsample branch, or a
   child called directly), that BatchNorm is converted too, with no activation, so every BatchNorm of a ResNet
   runs fused.

A BatchNorm is converted only when it is exactly ``nn.BatchNorm1d``/``nn.BatchNorm2d``, has no hooks, is used once
in the model, and its output's only use is a supported activation (module or call) with constant arguments, or
a plain sum (no ``alpha``, no broadcasting, no type promotion) whose only use is such an activation.
Anything else (a BN output also used elsewhere, a sum used twice, a forward fx cannot trace) is left as it
was, with the reason in the :class:`ConversionReport`. Converted layers share the original parameter and buffer
tensors (so an ``inplace=True`` conversion keeps an optimizer's references valid) and keep train/eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnbench.activations import Activation, describe
from bnbench.convert_residual import (
    ModuleCalls,
    ResidualAdd,
    fused_residual,
    match_add,
    record_module_inputs,
    residual_mismatch,
    tensor_shapes,
)
from bnbench.functional import BACKENDS, RESIDUAL_MEMORY_SAVING_ERROR, TRITON_DTYPES, memory_saving_unsupported
from bnbench.modules import BatchNormAct1d, BatchNormAct2d

__all__ = ["ConversionReport", "convert_bn_act"]

_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d}


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_bn_act` did: ``converted`` maps a BatchNorm's qualified name (in the input model) to the
    fused activation (``"leaky_relu(0.1)"``); ``skipped`` maps every other BatchNorm to the reason."""

    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the converted-with-residual BatchNorms (a subset of ``converted``): name -> the graph node of the residual
    #: its fused layer adds before the activation (``act(bn(x) + r)``)
    with_residual: dict[str, str] = dataclasses.field(default_factory=dict)
    #: BatchNorms converted without an activation (``identity`` in ``converted``) because their output is the
    #: residual of a converted-with-residual one (a ResNet's downsample): name -> that BatchNorm's name
    residual_of: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} BatchNorm + activation pair(s) ({len(self.with_residual)} with "
                 f"a residual add), skipped {len(self.skipped)}"]  # fmt: skip
        for name, act in self.converted.items():
            if name in self.with_residual:
                act = f"{act} after + residual ({self.with_residual[name]})"
            elif name in self.residual_of:
                act = f"{act} (the residual of {self.residual_of[name]})"
            lines.append(f"  converted {name}: {act}")
        lines += [f"  skipped   {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def convert_bn_act(
    model: nn.Module,
    inplace: bool = False,
    *,
    backend: str = "auto",
    memory_saving: bool = False,
    return_report: bool = False,
    example_inputs: torch.Tensor | Sequence | None = None,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    r"""Return ``model`` with every provably safe BatchNorm1d/2d + activation pair fused into BatchNormAct1d/2d.

    A pair is ``bn`` directly followed by a supported activation (module or functional call) whose only input is
    ``bn``'s output, found in an ``nn.Sequential`` or, through ``torch.fx``, in a ``forward``:
    ``act(bn(x))`` becomes ``BatchNormAct(x)`` computing the same
    :math:`\mathrm{act}((x - \mathrm{E}[x]) / \sqrt{\mathrm{Var}[x] + \epsilon} * \gamma + \beta)`, and the
    activation's slot becomes ``nn.Identity``. Given ``example_inputs``, a residual sum in a forward,
    ``act(bn(x) + r)``, ``act(r + bn(x))`` or ``out = bn(x); out += r; act(out)`` (torchvision's ResNet blocks), becomes
    ``BatchNormAct(x, r)``, when the example showed ``r`` to have the BatchNorm output's shape and dtype; a
    BatchNorm whose output is that ``r`` becomes a fused layer without activation. The new layers share the original parameter and buffer tensors (an
    optimizer built before keeps valid references) and keep train/eval mode; state_dict keys are unchanged.
    Anything not provably safe (a BatchNorm output used twice, hooks, shared modules, an unsupported activation) is
    left alone and the report says why.

    Args:
        model: the model to convert.
        inplace: edit ``model`` itself; False (default) converts a deep copy and leaves the input untouched. A
            module whose forward is rewritten through fx is replaced by a new GraphModule in its parent (if that
            module is ``model`` itself, the returned object is the new one).
        backend: the new layers' backend (``auto``, ``triton`` or ``torch``). Default: ``auto``.
        memory_saving: build the new layers with ``memory_saving=True``; a pair whose activation does not allow it
            is skipped, with the reason. Default: False.
        return_report: also return a :class:`ConversionReport` (``converted``: BatchNorm name -> fused activation;
            ``with_residual``: those that add a residual; ``skipped``: name -> reason). Default: False.
        example_inputs: a tensor or a tuple of ``model``'s forward arguments. Residual adds are fused only with
            it: a deep copy of the model runs it once (no gradients; the model's running statistics are not
            touched) and each block is run again through its traced graph to read the shapes and dtypes of the
            add's operands, every time the block is called. Use a batch of at least 2 (a batch of 1 cannot tell a
            residual that broadcasts over the batch). Default: None (every BatchNorm feeding an add is skipped,
            saying so).

    Returns:
        the converted model, or ``(model, ConversionReport)`` with ``return_report=True``.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        >>> fused, report = bnbench.convert_bn_act(model, return_report=True)
        >>> report.converted
        {'1': 'relu'}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if example_inputs is not None:
        example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(model, backend, bool(memory_saving), example_inputs)
    model = converter.run()
    return (model, converter.report) if return_report else model


# ---------------------------------------------------------------------------------------------------------------
# Activations: modules and calls that map to (Activation, parameter)
# ---------------------------------------------------------------------------------------------------------------

_SIMPLE_MODULES = {nn.ReLU: Activation.RELU, nn.Sigmoid: Activation.SIGMOID, nn.Tanh: Activation.TANH,
                   nn.SiLU: Activation.SILU}  # fmt: skip
_RELU_FNS = {F.relu, F.relu_, torch.relu, torch.relu_}
_SIGMOID_FNS = {torch.sigmoid, torch.sigmoid_, F.sigmoid}
_TANH_FNS = {torch.tanh, torch.tanh_, F.tanh}
_METHODS = {"relu": Activation.RELU, "relu_": Activation.RELU, "sigmoid": Activation.SIGMOID,
            "sigmoid_": Activation.SIGMOID, "tanh": Activation.TANH, "tanh_": Activation.TANH}  # fmt: skip


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


_HOOKED_ACTIVATION = "the activation module has hooks, which would not run once it is fused away"


def _module_activation(module: nn.Module) -> tuple[Activation, float] | None:
    """The fused equivalent of an activation module, or None."""
    kind = type(module)
    if kind in _SIMPLE_MODULES:
        return _SIMPLE_MODULES[kind], 0.0
    if kind is nn.LeakyReLU:
        return Activation.LEAKY_RELU, float(module.negative_slope)
    if kind is nn.GELU:
        return (Activation.GELU_TANH if module.approximate == "tanh" else Activation.GELU), 0.0
    return None


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _call_activation(node: fx.Node, source: fx.Node) -> tuple[Activation, float] | None:
    """The fused equivalent of a call_function / call_method node applied to ``source``, or None."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_method":
        act = _METHODS.get(node.target)
        return (act, 0.0) if act is not None and len(node.args) == 1 and not node.kwargs else None
    target = node.target
    if target in _RELU_FNS or target in _SIGMOID_FNS or target in _TANH_FNS or target is F.silu:
        extra = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        if len(node.args) > 2 or extra or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None
        if target in _RELU_FNS:
            return Activation.RELU, 0.0
        if target in _SIGMOID_FNS:
            return Activation.SIGMOID, 0.0
        return (Activation.TANH, 0.0) if target in _TANH_FNS else (Activation.SILU, 0.0)
    if target in (F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu):
        slope = _arg(node, 1, "negative_slope", 0.01)
        return (Activation.LEAKY_RELU, float(slope)) if isinstance(slope, (int, float)) else None
    if target is F.gelu:
        approx = _arg(node, 1, "approximate", "none")
        if approx not in ("none", "tanh"):
            return None
        return (Activation.GELU_TANH if approx == "tanh" else Activation.GELU), 0.0
    return None


# ---------------------------------------------------------------------------------------------------------------
# The two passes
# ---------------------------------------------------------------------------------------------------------------


def _param_dtype(bn: nn.Module) -> torch.dtype | None:
    """The dtype of a BatchNorm's parameters or running statistics (None when it has neither)."""
    return next((t.dtype for t in (bn.weight, bn.running_mean) if t is not None), None)


def _is_unfused_bn(module: nn.Module) -> bool:
    """Any BatchNorm (1d/2d/3d, sync, lazy) that is not already a fused layer."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (BatchNormAct1d, BatchNormAct2d)
    )


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every child module is a leaf (its own forward is handled separately)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class _Converter:
    def __init__(self, model: nn.Module, backend: str, memory_saving: bool, example_inputs: tuple | None) -> None:
        self.model = model
        self.backend = backend
        self.memory_saving = memory_saving
        self.report = ConversionReport()
        uses: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            uses[id(module)] = uses.get(id(module), 0) + 1
        self.uses = uses
        self.all_bn = {name: m for name, m in model.named_modules() if _is_unfused_bn(m)}
        self.calls: ModuleCalls | None = None  # the example forward's calls of every module that may be traced
        if example_inputs is not None:
            traced = [name for name, m in model.named_modules() if any(type(c) in _FUSED for c in m.children())]
            self.calls = record_module_inputs(model, example_inputs, traced)

    def run(self) -> nn.Module:
        model = self._visit(self.model, "")
        for name in self.all_bn:
            if name not in self.report.converted and name not in self.report.skipped:
                self.report.skipped[name] = "not followed by a supported activation in any forward seen"
        order = {name: i for i, name in enumerate(self.all_bn)}  # report in the model's module order
        for entries in (self.report.converted, self.report.skipped):
            ordered = sorted(entries.items(), key=lambda item: order.get(item[0], len(order)))
            entries.clear()
            entries.update(ordered)
        return model

    # -- checks ------------------------------------------------------------------------------------------------

    def _bn_blocker(self, bn: nn.Module) -> str | None:
        """Why this BatchNorm module cannot be replaced, whatever follows it (None if it can)."""
        if type(bn) not in _FUSED:
            return f"{type(bn).__name__} has no fused counterpart (only exact BatchNorm1d/BatchNorm2d)"
        if self.uses.get(id(bn), 0) > 1:
            return "the same BatchNorm module is registered more than once (shared parameters)"
        if _has_hooks(bn):
            return "the BatchNorm module has hooks, which the fused layer would not run"
        dtype = _param_dtype(bn)
        if self.backend == "triton" and dtype is not None and dtype not in TRITON_DTYPES:
            return (
                f'its parameters are {dtype}, which backend="triton" cannot run (the kernels take float32, float16 '
                f'and bfloat16); backend="auto" converts it and runs {dtype} through PyTorch'
            )
        return None

    def _fused(self, bn: nn.Module, act: Activation, param: float, name: str) -> nn.Module | None:
        """The fused layer sharing bn's tensors, or None (and a skip reason) when memory saving rules it out."""
        if self.memory_saving and (reason := memory_saving_unsupported(act, param)):
            self.report.skipped[name] = f"memory_saving=True: {reason}"
            return None
        new = _FUSED[type(bn)](
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, activation=act,
            activation_param=param, backend=self.backend, device="meta",
            memory_saving=self.memory_saving,
        )  # fmt: skip
        new.weight, new.bias = bn.weight, bn.bias
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, buffer, getattr(bn, buffer))
        new.train(bn.training)
        self.report.converted[name] = describe(act, param)
        return new

    # -- traversal ---------------------------------------------------------------------------------------------

    def _visit(self, module: nn.Module, prefix: str) -> nn.Module:
        """Convert inside ``module`` (children first) and return it, or its fx-rewritten replacement."""
        for child_name, child in list(module.named_children()):
            new_child = self._visit(child, f"{prefix}{child_name}.")
            if new_child is not child:
                setattr(module, child_name, new_child)
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            self._sequential(module, prefix)
            return module
        if any(type(child) in _FUSED for child in module.children()):
            return self._traced(module, prefix)
        return module

    def _sequential(self, seq: nn.Sequential, prefix: str) -> None:
        children = list(seq.named_children())
        for i, (name, child) in enumerate(children):
            if not _is_unfused_bn(child):
                continue
            qual = prefix + name
            if (blocker := self._bn_blocker(child)) is not None:
                self.report.skipped[qual] = blocker
                continue
            if i + 1 == len(children):
                self.report.skipped[qual] = "last child of an nn.Sequential: its consumer is outside the container"
                continue
            next_name, next_child = children[i + 1]
            found = _module_activation(next_child)
            if found is None:
                self.report.skipped[qual] = f"followed by {type(next_child).__name__}, not a supported activation"
                continue
            if _has_hooks(next_child):
                self.report.skipped[qual] = _HOOKED_ACTIVATION
                continue
            fused = self._fused(child, *found, qual)
            if fused is not None:
                setattr(seq, name, fused)
                setattr(seq, next_name, nn.Identity())

    def _traced(self, module: nn.Module, prefix: str) -> nn.Module:
        bn_names = [name for name, child in module.named_children() if type(child) in _FUSED]
        try:
            graph = _LeafTracer().trace(module)
        except Exception as error:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
            reason = f"forward of {type(module).__name__} is not traceable by torch.fx: {type(error).__name__}: {error}"
            for name in bn_names:
                self.report.skipped.setdefault(prefix + name, reason.splitlines()[0][:300])
            return module
        calls: dict[str, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        shapes: tuple[str | None, list[dict[str, object]]] | None = None  # read once, at the first residual add
        fused_children: dict[str, nn.Module] = {}
        for name in bn_names:
            if name in fused_children:  # already converted as the residual of another BatchNorm
                continue
            qual = prefix + name
            bn = getattr(module, name)
            nodes = calls.get(name, [])
            reason, use = self._bn_blocker(bn), None
            if reason is None:
                reason, use = self._traced_pattern(module, nodes)
            if reason is None and use.add is not None:
                # every backend takes a residual; memory saving refuses one
                reason = (
                    f"its output feeds a residual add: {RESIDUAL_MEMORY_SAVING_ERROR}" if self.memory_saving else None
                )
                if reason is None:
                    shapes = shapes or tensor_shapes(self.calls, prefix[:-1], graph)
                    reason = _residual_reason(nodes[0], use.add.residual, *shapes)
            if reason is not None:
                self.report.skipped[qual] = reason
                continue
            fused = self._fused(bn, *use.found, qual)
            if fused is None:
                continue
            fused_children[name] = fused
            if use.add is not None:
                residual = use.add.residual
                self.report.with_residual[qual] = residual.name
                partner = self._residual_partner(module, prefix, residual, calls, qual)
                if partner is not None:
                    fused_children[residual.target] = partner
            _rewrite(graph, name, nodes[0], use)
        if not fused_children:
            return module
        graph.lint()
        # Built from the untouched module, then given the fused children: a caller still holding the original
        # module (inplace=True) keeps a consistent BatchNorm + activation, not a fused layer plus the activation.
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        for name, fused in fused_children.items():
            if fused is not _IN_PLACE:
                setattr(rewritten, name, fused)
        _keep_order(rewritten, module)
        rewritten.train(module.training)
        return rewritten

    def _traced_pattern(self, module: nn.Module, nodes: list[fx.Node]) -> tuple[str | None, _Use | None]:
        """(reason, use) for one BatchNorm child: reason is None when its use is safe to fuse."""
        if not nodes:
            return "never called in the traced forward", None
        if len(nodes) > 1:
            return f"called {len(nodes)} times in forward (shared statistics)", None
        (bn_node,) = nodes
        users = list(bn_node.users)
        if len(users) != 1:
            return f"its output has {len(users)} uses in forward (needs exactly one, the activation)", None
        (user,) = users
        reason, add = match_add(bn_node, user)
        if reason is not None:
            return reason, None
        if add is None:
            reason, found = _activation_use(module, user, bn_node, "its output")
            return (reason, None) if reason else (None, _Use(user, found, None))
        if self.calls is None:
            return ("its output feeds a residual add: convert_bn_act fuses one only given example_inputs (to check "
                    "that the residual has the BatchNorm output's shape and dtype)"), None  # fmt: skip
        if len(bn_node.args) != 1 or bn_node.kwargs:
            return "called with more than its input, so the residual has no argument slot", None
        sum_users = list(add.add.users)
        if len(sum_users) != 1:
            return (
                f"its output feeds a residual add whose sum has {len(sum_users)} uses (needs one, the activation)",
                None,
            )
        reason, found = _activation_use(module, sum_users[0], add.add, "its output feeds a residual add whose sum")
        if reason is not None:
            return reason, None
        return None, _Use(sum_users[0], found, add)

    def _residual_partner(
        self, module: nn.Module, prefix: str, residual: fx.Node, calls: dict[str, list[fx.Node]], owner: str
    ) -> nn.Module | None:
        """When the residual ``r`` of a converted add is the output of a BatchNorm (a child called once, or the last
        child of a child nn.Sequential: a ResNet's downsample), and ``r`` has no other use, convert that BatchNorm
        without activation. Returns the fused child to install in the rewritten module (``_IN_PLACE`` when it was
        set inside the Sequential), or None when there is no such BatchNorm or it must stay."""
        if residual.op != "call_module" or len(residual.users) != 1 or len(calls.get(residual.target, ())) != 1:
            return None
        target = module.get_submodule(residual.target)
        if type(target) in _FUSED:
            holder, child_name, bn = None, residual.target, target
        elif type(target) is nn.Sequential and len(target) and type(target[-1]) in _FUSED:
            holder, (child_name, bn) = target, list(target.named_children())[-1]
        else:
            return None
        qual = prefix + residual.target + ("" if holder is None else f".{child_name}")
        if self._bn_blocker(bn) is not None:
            return None
        fused = self._fused(bn, Activation.IDENTITY, 0.0, qual)
        if fused is None:
            return None
        self.report.skipped.pop(qual, None)  # the Sequential pass skipped it: its consumer was outside
        self.report.residual_of[qual] = owner
        if holder is None:
            return fused
        setattr(holder, child_name, fused)
        return _IN_PLACE


def _keep_order(rewritten: fx.GraphModule, module: nn.Module) -> None:
    """Give ``rewritten`` the children, parameters and buffers in ``module``'s order. A GraphModule registers them
    in the order the graph first uses them, and a fused residual call moves after its residual's computation;
    the order decides ``parameters()`` (an optimizer's state is stored by that index) and ``state_dict()``."""
    for attribute in ("_modules", "_parameters", "_buffers"):
        original = list(getattr(module, attribute))
        entries = getattr(rewritten, attribute)
        ordered = sorted(entries.items(), key=lambda item: original.index(item[0]) if item[0] in original else 1 << 30)
        entries.clear()
        entries.update(ordered)


#: a fused child already installed (inside a child nn.Sequential), not to be set on the rewritten module
_IN_PLACE = nn.Identity()


@dataclasses.dataclass
class _Use:
    """How a BatchNorm's output is used: through ``act`` (found: its Activation, parameter), after ``add`` if any."""

    act: fx.Node
    found: tuple[Activation, float]
    add: ResidualAdd | None


def _rewrite(graph: fx.Graph, name: str, bn_node: fx.Node, use: _Use) -> None:
    """Replace ``bn -> act`` by the fused child's call, ``bn -> add r -> act`` by ``fused_residual(name, x, r)``
    (``name(x, r)`` where r is a tensor of x's shape and dtype, as in the example forward)."""
    if use.add is None:
        use.act.replace_all_uses_with(bn_node)
        graph.erase_node(use.act)
        return
    with graph.inserting_before(use.add.add):  # where both the BatchNorm's input and r exist
        layer = graph.get_attr(name)
        fused_call = graph.call_function(fused_residual, (layer, bn_node.args[0], use.add.residual))
    use.act.replace_all_uses_with(fused_call)
    for node in (use.act, use.add.add, bn_node):
        graph.erase_node(node)


def _activation_use(
    module: nn.Module, user: fx.Node, source: fx.Node, subject: str
) -> tuple[str | None, tuple[Activation, float] | None]:
    """``(None, (Activation, param))`` when ``user`` is a supported activation of ``source`` alone, else the
    reason, a sentence starting with ``subject`` ("its output feeds hardtanh, not a supported activation")."""
    if user.op == "call_module":
        activation_module = module.get_submodule(user.target)
        if _has_hooks(activation_module):
            return _HOOKED_ACTIVATION, None
        found = _module_activation(activation_module)
        found = found if len(user.args) == 1 and not user.kwargs else None
    elif user.op in ("call_function", "call_method"):
        found = _call_activation(user, source)
    else:
        found = None
    if found is None:
        what = user.target if user.op == "call_method" else getattr(user.target, "__name__", str(user.target))
        return f"{subject} feeds {what}, not a supported activation", None
    return None, found


def _residual_reason(bn_node: fx.Node, residual: fx.Node, reason: str | None, shapes: list[dict]) -> str | None:
    """Why the residual add of ``bn_node`` cannot fuse, from the example forward's shapes (None: it can)."""
    if reason is not None:
        return f"its output feeds a residual add, but {reason}"
    for i, seen in enumerate(shapes):
        mismatch = residual_mismatch(seen.get(bn_node.name), seen.get(residual.name))
        if mismatch is not None:
            call = f" (call {i + 1} of {len(shapes)})" if len(shapes) > 1 else ""
            return f"its output feeds a residual add that cannot fuse{call}: {mismatch}"
    return None
