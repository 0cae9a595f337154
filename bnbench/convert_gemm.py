"""``convert_linear_bn_act``: fuse Linear / 1x1 Conv2d + BatchNorm (+ activation) in ``nn.Sequential`` containers.

A plain ``nn.Sequential`` feeds each child's output only to the next child, so the pattern is provable from the
structure alone: child i an exact ``nn.Linear`` (or ``nn.Conv2d`` with a 1x1 kernel, no padding, one group),
child i+1 an exact ``nn.BatchNorm1d`` (``nn.BatchNorm2d``) of matching width, and optionally child i+2 a
supported activation module (else the fused activation is identity: the BatchNorm's output goes on to child i+2
unchanged). None may have hooks or be registered more than once in the model. A bias on the matmul is folded
away (see :mod:`bnbench.linear_bn_modules`: BatchNorm removes it; the running mean is shifted by it).

Replacements: a Sequential that is exactly (matmul, bn[, act]) is itself replaced by the fused layer, whose
children "0" and "1" keep every state_dict key. Inside a longer Sequential the fused layer takes slot i and the
BatchNorm and activation slots become ``nn.Identity`` (later indices do not move); the keys of slots i and i+1
then move under slot i (``i.weight`` -> ``i.0.weight``, ``{i+1}.*`` -> ``i.1.*``), listed in the report's
``renamed``. Modules other than plain Sequentials are not rewritten (their forward is not inspected).
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from bnbench.convert import ConversionReport, _module_activation
from bnbench.functional import BACKENDS
from bnbench.linear_bn import INPUT_PRECISIONS
from bnbench.linear_bn_modules import (
    Conv1x1BatchNormAct2d,
    LinearBatchNormAct,
    _MatmulBatchNormAct,
    conv1x1_unsupported,
)

__all__ = ["MatmulConversionReport", "convert_linear_bn_act"]

_PAIRS = {nn.Linear: (nn.BatchNorm1d, LinearBatchNormAct), nn.Conv2d: (nn.BatchNorm2d, Conv1x1BatchNormAct2d)}


@dataclasses.dataclass
class MatmulConversionReport(ConversionReport):
    """:class:`bnbench.ConversionReport` (``converted``/``skipped`` keyed by the BatchNorm's qualified name)
    plus ``renamed``: state_dict key prefixes that moved (old prefix -> new prefix)."""

    renamed: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [super().__str__()]
        lines += [f"  renamed   {old}* -> {new}*" for old, new in self.renamed.items()]
        return "\n".join(lines)


def convert_linear_bn_act(
    model: nn.Module,
    inplace: bool = False,
    *,
    backend: str = "auto",
    input_precision: str = "ieee",
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, MatmulConversionReport]:
    """Return ``model`` with every provable Linear/1x1-Conv2d + BatchNorm (+ activation) run in an nn.Sequential
    fused into :class:`~bnbench.LinearBatchNormAct` / :class:`~bnbench.Conv1x1BatchNormAct2d`.

    ``inplace=False`` converts a deep copy. ``backend`` and ``input_precision`` go to the new layers. With
    ``return_report=True`` the result is ``(model, MatmulConversionReport)``; every BatchNorm of the model is in
    it, converted or skipped with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(model, backend, input_precision)
    model = converter.visit(model, "")
    report = converter.report
    for name in converter.all_bn:
        if name not in report.converted and name not in report.skipped:
            report.skipped[name] = "not directly after a Linear or 1x1 Conv2d in an nn.Sequential"
    order = {name: i for i, name in enumerate(converter.all_bn)}
    for entries in (report.converted, report.skipped):
        ordered = sorted(entries.items(), key=lambda item: order.get(item[0], len(order)))
        entries.clear()
        entries.update(ordered)
    return (model, report) if return_report else model


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


class _Converter:
    def __init__(self, model: nn.Module, backend: str, input_precision: str) -> None:
        self.backend = backend
        self.input_precision = input_precision
        self.report = MatmulConversionReport()
        self.uses: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            self.uses[id(module)] = self.uses.get(id(module), 0) + 1
        fused_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, _MatmulBatchNormAct)]
        self.all_bn = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(name.startswith(p) for p in fused_prefixes)
        }

    def visit(self, module: nn.Module, prefix: str) -> nn.Module:
        if isinstance(module, _MatmulBatchNormAct):
            return module  # already fused
        for name, child in list(module.named_children()):
            new = self.visit(child, f"{prefix}{name}.")
            if new is not child:
                setattr(module, name, new)
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            return self._sequential(module, prefix)
        return module

    def _blocker(self, matmul: nn.Module, bn: nn.Module) -> str | None:
        """Why (matmul, bn) cannot be fused, or None."""
        bn_cls, _ = _PAIRS[type(matmul)]
        if type(bn) is not bn_cls:
            return f"{type(bn).__name__} after {type(matmul).__name__} (needs an exact {bn_cls.__name__})"
        if isinstance(matmul, nn.Conv2d) and (reason := conv1x1_unsupported(matmul)):
            return f"the Conv2d before it is not a plain 1x1 matmul: {reason}"
        features = matmul.out_features if isinstance(matmul, nn.Linear) else matmul.out_channels
        if bn.num_features != features:
            return f"the {type(matmul).__name__} has {features} outputs, the BatchNorm {bn.num_features} features"
        for module in (matmul, bn):
            if self.uses.get(id(module), 0) > 1:
                return f"the {type(module).__name__} is registered more than once in the model (shared)"
            if _has_hooks(module):
                return f"the {type(module).__name__} has hooks, which the fused layer would not run"
        return None

    def _sequential(self, seq: nn.Sequential, prefix: str) -> nn.Module:
        children = list(seq.named_children())
        i = 0
        while i + 1 < len(children):
            (m_name, matmul), (bn_name, bn) = children[i], children[i + 1]
            if type(matmul) not in _PAIRS or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                i += 1
                continue
            if (reason := self._blocker(matmul, bn)) is not None:
                self.report.skipped[prefix + bn_name] = reason
                i += 1
                continue
            act_name, act = children[i + 2] if i + 2 < len(children) else (None, None)
            found = _module_activation(act) if act is not None else None
            if found is not None and (_has_hooks(act) or self.uses.get(id(act), 0) > 1):
                found = None  # not fused: the activation stays a module of its own
            fused = _PAIRS[type(matmul)][1].from_modules(
                matmul, bn, act if found is not None else None, backend=self.backend,
                input_precision=self.input_precision,
            )  # fmt: skip
            described = f"{type(matmul).__name__}+{type(bn).__name__}+{fused.activation.value}"
            self.report.converted[prefix + bn_name] = described + (" (bias folded)" if matmul.bias is not None else "")
            consumed = 3 if found is not None else 2
            if consumed == len(children):  # the whole container: its keys are the fused layer's
                return fused
            setattr(seq, m_name, fused)
            setattr(seq, bn_name, nn.Identity())
            if found is not None:
                setattr(seq, act_name, nn.Identity())
            self.report.renamed[f"{prefix}{m_name}."] = f"{prefix}{m_name}.0."
            self.report.renamed[f"{prefix}{bn_name}."] = f"{prefix}{m_name}.1."
            i += consumed
        return seq
