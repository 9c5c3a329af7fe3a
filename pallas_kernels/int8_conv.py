"""Implicit-GEMM INT8 convolutions with a fused dequantizing epilogue (Hopper).

The three conv GEMMs of UI8 (Zhu et al., "Towards Unified INT8 Training for
Convolutional Neural Network", CVPR 2020, §3 and §5 "fused quantized
convolution") -- forward, input gradient, weight gradient -- as Mosaic GPU
kernels that never build the im2col patch matrix: every kernel tap (kh, kw)
is a *shifted window of rows* of a flattened, zero-padded NHWC input,
streamed by TMA into shared memory, and all taps x input-channel chunks are
accumulated into one int32 ``wgmma`` accumulator (``m64nNk32.s32.s8.s8``),
dequantized in registers before the only write to memory (wgrad: int32
partial sums over pixel parts, combined exactly).

This module is the public face; the work is split by job, each module
documenting its own part:

* :mod:`pallas_kernels.conv_common` -- configs, argument checks, layouts and
  dtypes, the decomposition every conv kernel runs (phases for strides > 1,
  flattening to rows, 8-row-aligned shifted copies; the plans and their cost
  model), the TMA ring the kernels share, exactness;
* :mod:`pallas_kernels.conv_forward` -- :func:`int8_conv` and the row-window
  kernel (also launched by dgrad), byte counts;
* :mod:`pallas_kernels.conv_dgrad` -- :func:`int8_conv_dgrad`: sub-pixel
  phases, one row-window launch each, interleaved by XLA;
* :mod:`pallas_kernels.conv_wgrad` -- :func:`int8_conv_wgrad`: split-K over
  pixels on transposed copies, int32 parts combined exactly.

Public API (unchanged by the split): :class:`Int8ConvConfig`,
``CONV_CONFIGS``, ``WGRAD_CONFIGS``, :func:`select_conv_config`,
:func:`select_wgrad_config`, :func:`int8_conv`, :func:`int8_conv_reference`,
:func:`int8_conv_dgrad`, :func:`int8_conv_dgrad_reference`,
:func:`int8_conv_wgrad`, :func:`int8_conv_wgrad_halves`,
:func:`int8_conv_wgrad_reference`, :func:`conv_output_shape`. The named
configs (``CONV_64x64``, ..., ``WGRAD_128x128``) are importable from here too.
"""

from __future__ import annotations

from pallas_kernels.conv_common import CONV_128x128
from pallas_kernels.conv_common import CONV_128x64
from pallas_kernels.conv_common import CONV_64x128
from pallas_kernels.conv_common import CONV_64x64
from pallas_kernels.conv_common import CONV_CONFIGS
from pallas_kernels.conv_common import Int8ConvConfig
from pallas_kernels.conv_common import WGRAD_128x128
from pallas_kernels.conv_common import WGRAD_128x64
from pallas_kernels.conv_common import WGRAD_64x128
from pallas_kernels.conv_common import WGRAD_64x64
from pallas_kernels.conv_common import WGRAD_CONFIGS
from pallas_kernels.conv_common import conv_output_shape
from pallas_kernels.conv_common import select_conv_config
from pallas_kernels.conv_common import select_wgrad_config
from pallas_kernels.conv_dgrad import int8_conv_dgrad
from pallas_kernels.conv_dgrad import int8_conv_dgrad_reference
from pallas_kernels.conv_forward import int8_conv
from pallas_kernels.conv_forward import int8_conv_reference
from pallas_kernels.conv_wgrad import int8_conv_wgrad
from pallas_kernels.conv_wgrad import int8_conv_wgrad_halves
from pallas_kernels.conv_wgrad import int8_conv_wgrad_reference

__all__ = [
    "CONV_CONFIGS",
    "Int8ConvConfig",
    "WGRAD_CONFIGS",
    "conv_output_shape",
    "int8_conv",
    "int8_conv_dgrad",
    "int8_conv_dgrad_reference",
    "int8_conv_reference",
    "int8_conv_wgrad",
    "int8_conv_wgrad_halves",
    "int8_conv_wgrad_reference",
    "select_conv_config",
    "select_wgrad_config",
]

# The named configs are re-exported for callers that look configs up by name
# in this module (benchmarks/gpu_smoke.py, the tests' ids).
_NAMED_CONFIGS = (CONV_64x64, CONV_64x128, CONV_128x64, CONV_128x128,
                  WGRAD_64x64, WGRAD_64x128, WGRAD_128x64, WGRAD_128x128)
