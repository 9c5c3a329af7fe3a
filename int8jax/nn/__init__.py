"""Flax NNX layers: ``from int8jax.nn import QuantConv, QuantDense``."""

from int8jax.nn.convert import default_skip, quantizable_layers, quantize_model
from int8jax.nn.layers import (TRAINABLE, ActRange, GradQuant, QuantConv, QuantCounter,
                               QuantDense, quant_layers, quant_stats, set_call_count)

__all__ = ["TRAINABLE", "ActRange", "GradQuant", "QuantConv", "QuantCounter", "QuantDense",
           "default_skip", "quantizable_layers", "quantize_model", "quant_layers", "quant_stats", "set_call_count"]
