"""Synchronised BatchNorm + activation over ``torch.distributed``.

- :mod:`~bnbench.distributed.functional`: the autograd function and its two collectives per training step;
- :mod:`~bnbench.distributed.modules`: :class:`SyncBatchNormAct` and :func:`convert_sync_bn_act`;
- :mod:`~bnbench.distributed.launch`: running a command on every rank under torchrun (used by
  ``bnbench bench --world-size`` and ``bnbench train --world-size``).

Depends on the single-process layer (``bnbench.functional``, ``bnbench.modules``, ``bnbench.convert``) and, through
it, on ``bnbench.kernels``; nothing here imports ``bench/`` or ``train/``.
"""

from bnbench.distributed.functional import record_collectives, sync_batch_norm_act
from bnbench.distributed.modules import SyncBatchNormAct, convert_sync_bn_act

__all__ = ["SyncBatchNormAct", "convert_sync_bn_act", "record_collectives", "sync_batch_norm_act"]
