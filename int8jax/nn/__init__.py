"""Flax NNX layers: ``from int8jax.nn import QuantConv, QuantDense``."""

from int8jax.nn.convert import default_skip, quantizable_layers, quantize_model
from int8jax.nn.freeze import (FrozenConv, FrozenConvTranspose, FrozenDense, FrozenParam,
                               QuantizedWeight, export_serving, freeze)
from int8jax.nn.layers import (MEASURE_MODES, TRAINABLE, ActRange, GradQuant, QuantConv,
                               QuantConvTranspose, QuantCounter, QuantDense, grad_quant_stats,
                               quant_layers, quant_stats, measure_step, set_call_count,
                               set_measure_mode)

__all__ = [
    "FrozenConv", "FrozenConvTranspose", "FrozenDense", "FrozenParam", "QuantizedWeight",
    "export_serving", "freeze", "MEASURE_MODES", "TRAINABLE", "ActRange", "GradQuant", "QuantConv",
    "QuantConvTranspose", "QuantCounter", "QuantDense", "default_skip", "quantizable_layers",
    "quantize_model", "quant_layers", "measure_step", "grad_quant_stats", "quant_stats",
    "set_call_count", "set_measure_mode",
]
