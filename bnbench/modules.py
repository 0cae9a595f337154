"""BatchNormAct1d / BatchNormAct2d: drop-in replacements for ``nn.BatchNorm1d/2d`` followed by an activation.

They subclass the PyTorch modules, so parameters, buffers, state_dict, ``reset_parameters``, input checks and
``isinstance`` checks are PyTorch's own; only ``forward`` (and ``extra_repr``) differ. ``momentum=None`` (the
cumulative average) is computed on the device, so a training step needs no host synchronisation: it compiles
with ``fullgraph=True`` and is capturable in a CUDA graph.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.functional import BACKENDS, batch_norm_act, memory_saving_unsupported

__all__ = ["NN_BATCHNORM_HAS_BIAS", "BatchNormAct1d", "BatchNormAct2d", "count_batch"]


def count_batch(module: nn.modules.batchnorm._BatchNorm) -> float | Tensor:
    """What ``nn.BatchNorm.forward`` does before normalising: count the batch (training with tracked statistics)
    and return the running-statistics factor: ``momentum``, or for ``momentum=None`` the cumulative factor
    1/num_batches_tracked, kept as a device tensor (no host synchronisation, capturable, compilable)."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            dtype = torch.promote_types(module.running_mean.dtype, torch.float32)
            factor = module.num_batches_tracked.to(dtype).reciprocal()
    return factor


#: whether the installed torch's nn.BatchNorm takes ``bias=`` (keyword-only, since torch 2.13): the layers follow it
NN_BATCHNORM_HAS_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


class _BatchNormActMixin:
    """The shared body of BatchNormAct1d/2d; mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``.

    The constructor takes nn.BatchNorm's arguments in nn.BatchNorm's order (``bias=`` only where the installed
    torch has it), then the fused layer's own, keyword-only.
    """

    if NN_BATCHNORM_HAS_BIAS:

        def __init__(
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: float | None = 0.1,
            affine: bool = True,
            track_running_stats: bool = True,
            device=None,
            dtype=None,
            *,
            bias: bool = True,
            activation: str | Activation = "relu",
            activation_param: float | None = None,
            backend: str = "auto",
            memory_saving: bool = False,
        ) -> None:
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
            )
            self._init_fused(activation, activation_param, backend, memory_saving)

    else:  # torch < 2.13: no bias= (passing it is a TypeError, as for nn.BatchNorm)

        def __init__(
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: float | None = 0.1,
            affine: bool = True,
            track_running_stats: bool = True,
            device=None,
            dtype=None,
            *,
            activation: str | Activation = "relu",
            activation_param: float | None = None,
            backend: str = "auto",
            memory_saving: bool = False,
        ) -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            self._init_fused(activation, activation_param, backend, memory_saving)

    def _init_fused(self, activation, activation_param, backend, memory_saving) -> None:
        self.activation, self.activation_param = parse_activation(activation, activation_param)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
        self.backend = backend
        if memory_saving and (reason := memory_saving_unsupported(self.activation, self.activation_param)):
            raise ValueError(f"memory_saving=True is not supported for activation {self.activation.value!r}: {reason}")
        self.memory_saving = bool(memory_saving)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """act(BN(input)), or act(BN(input) + residual) given a residual of the input's shape, dtype and device
        (any strides or memory format; see :func:`bnbench.batch_norm_act`)."""
        return self._batch_norm_act(input, residual, self.activation, self.activation_param)

    def normalize(self, input: Tensor) -> Tensor:
        """BN(input) alone, as ``nn.BatchNorm`` computes it with this layer's parameters and statistics (running
        statistics updated in training): the first half of ``forward``, for a caller that adds something the fused
        layer cannot take (a broadcasting or type-promoting residual) before :meth:`activate`."""
        return self._batch_norm_act(input, None, Activation.IDENTITY, None)

    def activate(self, z: Tensor) -> Tensor:
        """This layer's activation of ``z`` (PyTorch ops): the second half of ``forward``, after :meth:`normalize`."""
        return apply_activation(z, self.activation, self.activation_param)

    def _batch_norm_act(self, input, residual, activation, activation_param) -> Tensor:
        self._check_input_dim(input)
        exponential_average_factor = count_batch(self)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are only updated in training mode when they are tracked; in eval they are only read.
        track = not self.training or self.track_running_stats
        return batch_norm_act(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            activation,
            activation_param,
            self.backend,
            residual=residual,
            memory_saving=self.memory_saving,
        )

    def extra_repr(self) -> str:
        act = self.activation.value
        if self.activation is Activation.LEAKY_RELU:
            act += f", activation_param={self.activation_param}"
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        saving = ", memory_saving=True" if self.memory_saving else ""
        return f"{super().extra_repr()}, activation={act}{backend}{saving}"


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    r"""``nn.BatchNorm1d`` followed by an activation, fused into as few passes over memory as possible.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta\right)

    with the mean and biased variance over the batch (and length) axes in training, the running statistics in
    eval; the running variance is updated with the unbiased variance. Parameters, buffers, ``state_dict`` keys and
    semantics are exactly those of ``nn.BatchNorm1d``; statistics are fp32 whatever the input dtype.

    Args:
        num_features: C, the number of channels of the input.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: the running statistics' update factor, ``running = (1 - momentum) * running + momentum * batch``;
            ``None`` for the cumulative average (factor ``1 / num_batches_tracked``). Default: 0.1.
        affine: learnable ``weight`` (gamma, initialised to 1) and ``bias`` (beta, 0). Default: True.
        track_running_stats: keep running statistics (used in eval); if False, eval uses batch statistics too.
            Default: True.
        activation: ``identity``, ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu``, ``gelu_tanh`` or
            ``silu`` (a name or a :class:`bnbench.Activation`). Default: ``relu``.
        activation_param: the negative slope of ``leaky_relu`` (default 0.01); the other activations take none.
        backend: ``auto`` (the Triton kernels for CUDA tensors and under the Triton interpreter, the PyTorch
            reference otherwise), ``triton`` (never falls back) or ``torch``. Default: ``auto``.
        memory_saving: save the output instead of the input for backward (identity and leaky_relu with a
            positive slope only; the weight must stay away from 0; not with a residual). Default: False.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`
        - Residual (optional, ``forward(input, residual)``): the input's shape and dtype, any strides; the
          output is then ``act(BN(input) + residual)``
        - Output: the input's shape, dtype and strides

    Example::

        >>> layer = bnbench.BatchNormAct1d(100, activation="gelu")
        >>> y = layer(torch.randn(20, 100))
    """


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    r"""``nn.BatchNorm2d`` followed by an activation, fused into as few passes over memory as possible.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta\right)

    with the mean and biased variance per channel over (N, H, W) in training, the running statistics in eval; the
    running variance is updated with the unbiased variance. Parameters, buffers, ``state_dict`` keys and semantics
    are exactly those of ``nn.BatchNorm2d``; statistics are fp32 whatever the input dtype. NCHW, channels_last and
    strided inputs run without a copy.

    Args:
        num_features: C, the number of channels of the input.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: the running statistics' update factor, ``running = (1 - momentum) * running + momentum * batch``;
            ``None`` for the cumulative average (factor ``1 / num_batches_tracked``). Default: 0.1.
        affine: learnable ``weight`` (gamma, initialised to 1) and ``bias`` (beta, 0). Default: True.
        track_running_stats: keep running statistics (used in eval); if False, eval uses batch statistics too.
            Default: True.
        activation: ``identity``, ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu``, ``gelu_tanh`` or
            ``silu`` (a name or a :class:`bnbench.Activation`). Default: ``relu``.
        activation_param: the negative slope of ``leaky_relu`` (default 0.01); the other activations take none.
        backend: ``auto`` (the Triton kernels for CUDA tensors and under the Triton interpreter, the PyTorch
            reference otherwise), ``triton`` (never falls back) or ``torch``. Default: ``auto``.
        memory_saving: save the output instead of the input for backward (identity and leaky_relu with a
            positive slope only; the weight must stay away from 0; not with a residual). Default: False.

    Shape:
        - Input: :math:`(N, C, H, W)`, contiguous or channels_last
        - Residual (optional, ``forward(input, residual)``): the input's shape and dtype, any strides or memory
          format; the output is then ``act(BN(input) + residual)``
        - Output: the input's shape, dtype and memory format

    Example::

        >>> layer = bnbench.BatchNormAct2d(64, activation="leaky_relu", activation_param=0.1).cuda()
        >>> x = torch.randn(32, 64, 28, 28, device="cuda").to(memory_format=torch.channels_last)
        >>> y = layer(x)  # == F.leaky_relu(nn.BatchNorm2d(64)(x), 0.1)
    """
