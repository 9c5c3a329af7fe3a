"""int8jax: unified INT8 training of convolutional networks in JAX/Flax.

Implements Zhu et al., "Towards Unified INT8 Training for Convolutional Neural
Network" (CVPR 2020, arXiv:1912.12607): int8 forward, input-gradient and
weight-gradient GEMMs with int32 accumulation, direction-sensitive gradient
clipping and the error-sensitive learning-rate coefficient.

Layers: numerics (:mod:`int8jax.quant`; :mod:`int8jax.dsgc`: the gradient
measurement and the clip learner) -> ops
(:func:`quant_conv_general_dilated`, :func:`quant_dot_general`) -> Flax NNX
modules (:mod:`int8jax.nn`) -> optax transforms (:mod:`int8jax.optim`).
"""

from int8jax.config import MAX_EXACT_K, QuantConfig
from int8jax.dsgc import GradQuantState, measure_gradient, read_measurement, update_grad_state
from int8jax.ops import quant_conv_general_dilated, quant_dot_general
from int8jax import backends, diagnostics, modes, nn, optim
from int8jax.optim import lr_coefficient
from int8jax.quant import (absmax, cosine_distance, dequantize, fake_quantize, quantize,
                           scale_from_clip)

__version__ = "0.1.0"


def __getattr__(attr):
  # BACKEND_NAMES: None (the best available) and every registered backend
  # name, read from the registry (int8jax.backends) so it follows register().
  if attr == "BACKEND_NAMES":
    return backends.BACKEND_NAMES
  raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = [
    "BACKEND_NAMES", "MAX_EXACT_K", "QuantConfig", "GradQuantState", "lr_coefficient",
    "measure_gradient", "read_measurement", "update_grad_state", "quant_conv_general_dilated",
    "quant_dot_general", "absmax", "cosine_distance", "dequantize", "fake_quantize", "quantize",
    "scale_from_clip", "backends", "diagnostics", "modes", "nn", "optim",
]
