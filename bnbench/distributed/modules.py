"""SyncBatchNormAct: ``nn.SyncBatchNorm`` followed by an activation, fused, with statistics over the global batch.

It subclasses ``_BatchNorm``, the base of ``nn.BatchNorm*d`` and ``nn.SyncBatchNorm`` (same parameters, buffers and
state_dict keys as ``nn.SyncBatchNorm``), not ``nn.SyncBatchNorm`` itself: DistributedDataParallel refuses any
``nn.SyncBatchNorm`` instance in a CPU module ("SyncBatchNorm layers only work with GPU modules"), which would rule
out data-parallel training with gloo on CPU. The synchronisation runs on ``torch.distributed`` (NCCL on GPUs, gloo
on CPU): one all_gather of per-rank statistics in forward, one all_reduce of per-channel gradient sums in backward
(see :mod:`bnbench.distributed.functional`).
Outside an initialised process group, with a world size of 1, or in eval mode it runs exactly as
``BatchNormAct1d/2d`` (through :func:`bnbench.batch_norm_act`), with no collective.

:func:`convert_sync_bn_act` turns a model's BatchNorm*/SyncBatchNorm (+ a following activation, fused where
:func:`bnbench.convert_bn_act` proves it safe) and BatchNormAct* layers into SyncBatchNormAct.
"""

from __future__ import annotations

import copy

import torch.distributed as dist
from torch import Tensor, nn

from bnbench.activations import Activation, describe, parse_activation
from bnbench.convert import ConversionReport, convert_bn_act
from bnbench.distributed.functional import sync_batch_norm_act
from bnbench.functional import BACKENDS, batch_norm_act, check_residual, resolve_backend
from bnbench.modules import BatchNormAct1d, BatchNormAct2d, count_batch

__all__ = ["SyncBatchNormAct", "convert_sync_bn_act"]


def _flattened(t: Tensor, name: str) -> Tensor:
    """A 5-D tensor as its (N, C, D*H*W) view (never a copy), or a ValueError naming its strides."""
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} has strides {t.stride()}, in which D, H and W do not flatten into one "
            "axis without a copy (the 5-D path reads (N, C, D*H*W)); pass it contiguous or channels_last_3d"
        ) from None


class SyncBatchNormAct(nn.modules.batchnorm._BatchNorm):
    r"""``nn.SyncBatchNorm`` followed by an activation, fused, with the statistics over every rank's batch.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta\right)

    where, in training, the mean and biased variance per channel are taken over the batches of all ranks of
    ``process_group`` together (one all_gather of per-rank statistics in forward, one all_reduce of two per-channel
    sums in backward); eval uses the running statistics and synchronises nothing. Running statistics come from the
    global batch (unbiased variance with the global count). dweight/dbias are the local sums, as in
    ``nn.SyncBatchNorm`` (DistributedDataParallel averages them). Unequal and empty per-rank batches are fine.
    Outside an initialised process group, or with a world size of 1, it runs exactly as ``BatchNormAct1d/2d``.

    Args:
        num_features: C, the number of channels of the input.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: the running statistics' update factor; ``None`` for the cumulative average over
            ``num_batches_tracked``. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: True.
        track_running_stats: keep running statistics. Default: True.
        process_group: the group to synchronise over; ``None`` for the whole world. Default: None.
        activation: ``identity``, ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu``, ``gelu_tanh`` or
            ``silu``. Default: ``relu``.
        activation_param: the negative slope of ``leaky_relu`` (default 0.01); the other activations take none.
        backend: ``auto`` (the Triton kernels for CUDA tensors and under ``TRITON_INTERPRET=1``, plain torch ops
            otherwise, with the same two collectives), ``triton`` (never falls back) or ``torch``. Default: ``auto``.

    Shape:
        - Input: :math:`(N, C)`, :math:`(N, C, L)`, :math:`(N, C, H, W)` (NCHW or channels_last) or
          :math:`(N, C, D, H, W)`; N may differ between ranks, and be 0
        - Output: the input's shape

    Example::

        >>> # on every rank of an initialised process group (e.g. under torchrun)
        >>> layer = bnbench.SyncBatchNormAct(64, activation="silu").cuda()
        >>> y = layer(torch.randn(16, 64, 14, 14, device="cuda"))  # statistics over 16 x world_size samples
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        activation: str | Activation = "relu",
        activation_param: float | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.activation, self.activation_param = parse_activation(activation, activation_param)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
        self.backend = backend

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2 or input.dim() > 5:
            raise ValueError(f"expected a 2-D to 5-D input (N, C, ...), got {input.dim()}-D input {tuple(input.shape)}")

    def _group(self):
        """The process group to synchronise over, or None when no synchronisation is needed."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """act(BN(input)), or act(BN(input) + residual) given a residual of the input's shape, dtype and device."""
        factor = count_batch(self)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        group = self._group() if self.training else None  # eval (even with batch statistics) never synchronises
        if group is None:
            self._check_input_dim(input)
            check_residual(input, residual)
            x, r = input, residual
            if input.dim() == 5:  # (N, C, D*H*W) views: the kernels take at most 4-D
                x = _flattened(input, "input")
                r = None if residual is None else _flattened(residual, "residual")
            y = batch_norm_act(
                x, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps,
                self.activation, self.activation_param, self.backend, residual=r,
            )  # fmt: skip
            return y.view(input.shape) if input.dim() == 5 else y
        # Input checks that can differ between ranks travel in the forward collective (no rank raises alone), so the
        # backend follows the layer's device, not the input's (an input on another device is reported, not raised).
        anchor = next((t for t in (self.weight, self.running_mean) if t is not None), input)
        use_triton = resolve_backend(self.backend, anchor) == "triton"
        return sync_batch_norm_act(
            input, running_mean, running_var, self.weight, self.bias, factor, self.eps, self.activation,
            self.activation_param, group, use_triton, residual,
        )  # fmt: skip

    def extra_repr(self) -> str:
        act = self.activation.value
        if self.activation is Activation.LEAKY_RELU:
            act += f", activation_param={self.activation_param}"
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"{super().extra_repr()}, activation={act}{backend}"


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


def _share(new: nn.modules.batchnorm._BatchNorm, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Give ``new`` the tensors of ``bn`` (same objects: an optimizer built before keeps valid references)."""
    new.weight, new.bias = bn.weight, bn.bias
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, buffer, getattr(bn, buffer))
    new.train(bn.training)
    return new


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _replace(model: nn.Module, make) -> nn.Module:
    """Replace every module ``make`` maps to a new one (``make(m)`` is None to keep it); shared modules stay shared."""
    made: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        if id(module) in made:
            return made[id(module)]
        new = make(module)
        if new is not None:
            made[id(module)] = new
            return new
        for name, child in list(module.named_children()):
            new_child = visit(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return visit(model)


def convert_sync_bn_act(
    model: nn.Module,
    process_group=None,
    *,
    inplace: bool = False,
    backend: str = "auto",
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Return ``model`` with every BatchNorm layer as a :class:`SyncBatchNormAct` over ``process_group``.

    The fused counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``:

    - ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` directly followed by a supported activation (in an
      ``nn.Sequential`` or, through ``torch.fx``, in a forward: the rules of :func:`bnbench.convert_bn_act`) become
      one SyncBatchNormAct with that activation (the activation's slot becomes ``nn.Identity``);
    - ``BatchNormAct1d/2d`` keep their activation and backend (memory saving is not offered when synchronised);
    - every other BatchNorm becomes a SyncBatchNormAct with ``activation="identity"``; ``report.skipped`` says why
      no activation was fused into it. A BatchNorm with hooks is converted without them, as
      ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    The new layers share the original parameter and buffer tensors and keep train/eval mode; state_dict keys are
    unchanged (those of ``nn.SyncBatchNorm.convert_sync_batchnorm(model)``). ``inplace=False`` converts a deep copy.
    ``backend`` applies to layers made from plain BatchNorms. With ``return_report=True`` the result is
    ``(model, ConversionReport)``; ``report.converted`` maps every BatchNorm's name to its fused activation.

    Args:
        model: the model to convert.
        process_group: the group the new layers synchronise over; ``None`` for the whole world. Default: None.
        inplace: edit ``model`` itself; False (default) converts a deep copy.
        backend: the backend of layers made from plain BatchNorms (``auto``, ``triton``, ``torch``).
        return_report: also return the :class:`bnbench.ConversionReport`. Default: False.

    Returns:
        the converted model, or ``(model, ConversionReport)`` with ``return_report=True``.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        >>> model = bnbench.convert_sync_bn_act(model).cuda()
        >>> ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    # 1. SyncBatchNorm / BatchNorm3d have no fused counterpart in convert_bn_act: stand-in BatchNorm2d modules sharing
    #    their tensors let it find the activation pattern (stand-ins are never run; SyncBatchNormAct takes any rank).
    names = {id(m): n for n, m in model.named_modules()}

    def stand_in(m: nn.Module) -> nn.Module | None:
        if type(m) in (nn.SyncBatchNorm, nn.BatchNorm3d) and not _has_hooks(m):
            proxy = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device="meta")
            return _share(proxy, m)
        return None

    model = _replace(model, stand_in)
    # 2. Fuse BN + activation pairs (kept as BatchNormAct1d/2d for now; names are those of the input model).
    model, fused = convert_bn_act(model, inplace=True, backend=backend, return_report=True)
    report.skipped.update({k: f"no activation fused: {v}" for k, v in fused.skipped.items()})
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _has_hooks(m):
            report.skipped[name] = "no activation fused: the BatchNorm has hooks (dropped by the conversion)"
    # 3. Every BatchNorm -> SyncBatchNormAct.
    names.update({id(m): n for n, m in model.named_modules()})

    def to_sync(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, SyncBatchNormAct):
            return None
        if isinstance(m, (BatchNormAct1d, BatchNormAct2d)):
            act, param, layer_backend = m.activation, m.activation_param, m.backend
            if m.memory_saving:
                report.skipped[names[id(m)]] = "memory_saving=True dropped: SyncBatchNormAct saves its input"
        else:
            act, param, layer_backend = Activation.IDENTITY, 0.0, backend
        new = SyncBatchNormAct(
            m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group, activation=act,
            activation_param=param, backend=layer_backend, device="meta",
        )  # fmt: skip
        report.converted[names[id(m)]] = describe(act, param)
        return _share(new, m)

    model = _replace(model, to_sync)
    return (model, report) if return_report else model
