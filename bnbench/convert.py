"""``convert_bn_act``: replace BatchNorm1d/2d followed by an activation with the fused BatchNormAct1d/2d.

Two passes, each converting only what it can prove safe:

1. ``nn.Sequential`` containers, structurally: a BatchNorm child directly followed by a supported activation
   child (a Sequential feeds each child's output only to the next). The activation slot becomes ``nn.Identity``
   so the container's indices, and hence the ``state_dict`` keys of later children, do not move.
2. Every other module whose ``forward`` calls a BatchNorm child and then an activation: its ``forward`` is traced
   with ``torch.fx`` (children kept as leaves), the pattern is rewritten in the graph, and the module is replaced
   by the resulting ``fx.GraphModule`` (same children and state_dict keys; methods other than ``forward`` are not
   carried over). This covers a torchvision-style ResNet basic block.

A BatchNorm is converted only when it is exactly ``nn.BatchNorm1d``/``nn.BatchNorm2d``, has no hooks, is used once
in the model, and its output's only use is a supported activation (module or call) with constant arguments.
Anything else (a BN output also used elsewhere, one feeding an add, a forward fx cannot trace) is left as it
was, with the reason in the :class:`ConversionReport`. Converted layers share the original parameter and buffer
tensors (so an ``inplace=True`` conversion keeps an optimizer's references valid) and keep train/eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnbench.activations import Activation, describe
from bnbench.functional import BACKENDS, TRITON_DTYPES, memory_saving_unsupported
from bnbench.modules import BatchNormAct1d, BatchNormAct2d

__all__ = ["ConversionReport", "convert_bn_act"]

_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d}


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_bn_act` did: ``converted`` maps a BatchNorm's qualified name (in the input model) to the
    fused activation (``"leaky_relu(0.1)"``); ``skipped`` maps every other BatchNorm to the reason."""

    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} BatchNorm + activation pair(s), skipped {len(self.skipped)}"]
        lines += [f"  converted {name}: {act}" for name, act in self.converted.items()]
        lines += [f"  skipped   {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def convert_bn_act(
    model: nn.Module,
    inplace: bool = False,
    *,
    backend: str = "auto",
    memory_saving: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    r"""Return ``model`` with every provably safe BatchNorm1d/2d + activation pair fused into BatchNormAct1d/2d.

    A pair is ``bn`` directly followed by a supported activation (module or functional call) whose only input is
    ``bn``'s output, found in an ``nn.Sequential`` or, through ``torch.fx``, in a ``forward``:
    ``act(bn(x))`` becomes ``BatchNormAct(x)`` computing the same
    :math:`\mathrm{act}((x - \mathrm{E}[x]) / \sqrt{\mathrm{Var}[x] + \epsilon} * \gamma + \beta)`, and the
    activation's slot becomes ``nn.Identity``. The new layers share the original parameter and buffer tensors (an
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
            ``skipped``: name -> reason). Default: False.

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
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(model, backend, bool(memory_saving))
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
    def __init__(self, model: nn.Module, backend: str, memory_saving: bool) -> None:
        self.model = model
        self.backend = backend
        self.memory_saving = memory_saving
        self.report = ConversionReport()
        uses: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            uses[id(module)] = uses.get(id(module), 0) + 1
        self.uses = uses
        self.all_bn = {name: m for name, m in model.named_modules() if _is_unfused_bn(m)}

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
        fused_children: dict[str, nn.Module] = {}
        for name in bn_names:
            qual = prefix + name
            bn = getattr(module, name)
            nodes = calls.get(name, [])
            reason = self._bn_blocker(bn)
            if reason is None:
                reason, act_node, found = self._traced_pattern(module, nodes)
            if reason is not None:
                self.report.skipped[qual] = reason
                continue
            fused = self._fused(bn, *found, qual)
            if fused is None:
                continue
            act_node.replace_all_uses_with(nodes[0])
            graph.erase_node(act_node)
            fused_children[name] = fused
        if not fused_children:
            return module
        graph.lint()
        # Built from the untouched module, then given the fused children: a caller still holding the original
        # module (inplace=True) keeps a consistent BatchNorm + activation, not a fused layer plus the activation.
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        for name, fused in fused_children.items():
            setattr(rewritten, name, fused)
        rewritten.train(module.training)
        return rewritten

    def _traced_pattern(self, module: nn.Module, nodes: list[fx.Node]):
        """(reason, activation node, (Activation, param)) for one BatchNorm child; reason is None when safe."""
        if not nodes:
            return "never called in the traced forward", None, None
        if len(nodes) > 1:
            return f"called {len(nodes)} times in forward (shared statistics)", None, None
        (bn_node,) = nodes
        users = list(bn_node.users)
        if len(users) != 1:
            return f"its output has {len(users)} uses in forward (needs exactly one, the activation)", None, None
        (user,) = users
        if user.op == "call_module":
            activation_module = module.get_submodule(user.target)
            if _has_hooks(activation_module):
                return _HOOKED_ACTIVATION, None, None
            found = _module_activation(activation_module)
            found = found if len(user.args) == 1 and not user.kwargs else None
        elif user.op in ("call_function", "call_method"):
            found = _call_activation(user, bn_node)
        else:
            found = None
        if found is None:
            what = user.target if user.op == "call_method" else getattr(user.target, "__name__", str(user.target))
            if user.target in (operator.add, operator.iadd, torch.add):
                return "its output feeds an add (a residual sum), not an activation", None, None
            return f"its output feeds {what}, not a supported activation", None, None
        return None, user, found
