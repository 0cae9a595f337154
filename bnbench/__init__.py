"""bnbench: fused BatchNorm + activation kernels, a drop-in layer, and a benchmark harness that tells the truth.

Importing bnbench probes no device and compiles nothing; Triton is imported when a Triton path first runs.
"""

from bnbench.activations import Activation
from bnbench.convert import ConversionReport, convert_bn_act
from bnbench.convert_gemm import convert_linear_bn_act
from bnbench.distributed import SyncBatchNormAct, convert_sync_bn_act
from bnbench.functional import batch_norm_act
from bnbench.linear_bn import conv1x1_batch_norm_act, linear_batch_norm_act
from bnbench.linear_bn_modules import Conv1x1BatchNormAct2d, LinearBatchNormAct
from bnbench.modules import BatchNormAct1d, BatchNormAct2d

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "Conv1x1BatchNormAct2d",
    "ConversionReport",
    "LinearBatchNormAct",
    "SyncBatchNormAct",
    "__version__",
    "batch_norm_act",
    "conv1x1_batch_norm_act",
    "convert_bn_act",
    "convert_linear_bn_act",
    "convert_sync_bn_act",
    "linear_batch_norm_act",
]
