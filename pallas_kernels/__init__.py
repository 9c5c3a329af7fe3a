"""INT8 GEMM and implicit-GEMM conv kernels for Hopper GPUs (Pallas, Mosaic GPU).

The lowest layer of int8jax (see docs/design.md §2): kernels with their plain
XLA references, usable without the rest of the library.

* :func:`int8_matmul` -- ``(a @ b.T) * a_scale[:, None] * b_scale + bias``
  with a: (M, K) int8, b: (N, K) int8 (both K-major), exact int32
  accumulation and a fused dequantizing epilogue; :func:`int8_matmul_reference`.
* :func:`int8_matmul_ws` -- the same GEMM, bits and arguments on a
  persistent, warp-specialised kernel (a TMA producer warpgroup, 1-2 wgmma
  consumers, one pipeline across all of a block's tiles;
  :class:`Int8MatmulWSConfig`, :data:`WS_CONFIGS`, :func:`select_ws_config`).
  Not used by int8jax yet: it has never run on a GPU.
* :func:`int8_conv` / :func:`int8_conv_dgrad` / :func:`int8_conv_wgrad` --
  implicit-GEMM int8 conv (NHWC x HWIO), its input and weight gradients:
  per-tap shifted TMA windows of the padded input, int32 accumulators,
  fused ``acc * scale + bias`` (wgrad: split-K, parts combined exactly);
  :func:`int8_conv_reference`, :func:`int8_conv_dgrad_reference`,
  :func:`int8_conv_wgrad_reference`.
* :func:`split_halves` / :func:`join_halves` / :func:`combine_int32_chunks`
  -- the exact sum of int32 partial sums (signed high / unsigned low 16-bit
  halves, rounded once to float32), as the wgrad kernel's parts are combined;
  ``int8jax.exact`` uses the same functions.
* :func:`quantize_kmajor` / :func:`quantize_kmajor_reference` -- deprecated
  (the quantize kernel is removed; they compute the XLA reference and warn).
* :func:`available` -- True when the compiled kernels can run here.

Every kernel also runs on CPU with ``interpret=True`` (bit-exact, slow).

Modules: ``int8_matmul``; ``int8_matmul_ws``; ``int8_conv`` (the conv API, implemented in
``conv_common``, ``conv_forward``, ``conv_dgrad``, ``conv_wgrad``);
``_common`` (what they share).
"""

from pallas_kernels._common import combine_int32_chunks
from pallas_kernels._common import join_halves
from pallas_kernels._common import split_halves
from pallas_kernels.int8_conv import CONV_CONFIGS
from pallas_kernels.int8_conv import Int8ConvConfig
from pallas_kernels.int8_conv import WGRAD_CONFIGS
from pallas_kernels.int8_conv import conv_output_shape
from pallas_kernels.int8_conv import int8_conv
from pallas_kernels.int8_conv import int8_conv_dgrad
from pallas_kernels.int8_conv import int8_conv_dgrad_reference
from pallas_kernels.int8_conv import int8_conv_reference
from pallas_kernels.int8_conv import int8_conv_wgrad
from pallas_kernels.int8_conv import int8_conv_wgrad_halves
from pallas_kernels.int8_conv import int8_conv_wgrad_reference
from pallas_kernels.int8_conv import select_conv_config
from pallas_kernels.int8_conv import select_wgrad_config
from pallas_kernels.int8_matmul import DEFAULT_CONFIG
from pallas_kernels.int8_matmul import INT32_SAFE_K
from pallas_kernels.int8_matmul import Int8MatmulConfig
from pallas_kernels.int8_matmul import LIBRARY_CONFIGS
from pallas_kernels.int8_matmul import int8_matmul
from pallas_kernels.int8_matmul import int8_matmul_reference
from pallas_kernels.int8_matmul import select_config
from pallas_kernels.int8_matmul_ws import WS_CONFIGS
from pallas_kernels.int8_matmul_ws import Int8MatmulWSConfig
from pallas_kernels.int8_matmul_ws import int8_matmul_ws
from pallas_kernels.int8_matmul_ws import select_ws_config
from pallas_kernels.quantize import quantize_kmajor
from pallas_kernels.quantize import quantize_kmajor_reference

__all__ = [
    "CONV_CONFIGS",
    "DEFAULT_CONFIG",
    "INT32_SAFE_K",
    "Int8ConvConfig",
    "Int8MatmulConfig",
    "Int8MatmulWSConfig",
    "LIBRARY_CONFIGS",
    "WGRAD_CONFIGS",
    "WS_CONFIGS",
    "available",
    "combine_int32_chunks",
    "conv_output_shape",
    "int8_conv",
    "int8_conv_dgrad",
    "int8_conv_dgrad_reference",
    "int8_conv_reference",
    "int8_conv_wgrad",
    "int8_conv_wgrad_halves",
    "int8_conv_wgrad_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_matmul_ws",
    "join_halves",
    "quantize_kmajor",
    "quantize_kmajor_reference",
    "select_config",
    "select_conv_config",
    "select_ws_config",
    "select_wgrad_config",
    "split_halves",
]


def available() -> bool:
  """True only on a Hopper GPU (compute capability 9.x) with Mosaic GPU.

  Checks that ``jax.experimental.pallas.mosaic_gpu`` imports and that the
  default backend is CUDA with a device whose compute capability is 9.x
  (H100/H200/GH200; the kernels use sm_90a ``wgmma``). Never raises.
  """
  try:
    import jax
    import jax.experimental.pallas.mosaic_gpu  # noqa: F401

    if jax.default_backend() != "gpu":
      return False
    device = jax.devices("gpu")[0]
    capability = str(getattr(device, "compute_capability", ""))
    return capability.split(".")[0] == "9"
  except Exception:  # pylint: disable=broad-except
    return False
