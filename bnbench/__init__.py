"""bnbench: fused BatchNorm + activation kernels, a drop-in layer, and a benchmark harness that tells the truth.

Importing bnbench probes no device and compiles nothing; Triton is imported when a Triton path first runs.
"""

import importlib.metadata

from bnbench.activations import Activation
from bnbench.convert import ConversionReport, convert_bn_act
from bnbench.distributed import SyncBatchNormAct, convert_sync_bn_act
from bnbench.errors import ShapeError
from bnbench.functional import batch_norm_act
from bnbench.modules import BatchNormAct1d, BatchNormAct2d

#: the version of the installed distribution: pyproject.toml is the one place it is written
__version__ = importlib.metadata.version("bnbench")

__all__ = [
    "Activation",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "ConversionReport",
    "ShapeError",
    "SyncBatchNormAct",
    "__version__",
    "batch_norm_act",
    "convert_bn_act",
    "convert_sync_bn_act",
]
