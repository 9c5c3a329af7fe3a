"""Flax NNX layers with INT8 forward and backward GEMMs: QuantConv, QuantDense.

Both are drop-in subclasses of their Flax twins (``nnx.Conv``, ``nnx.Linear``):
same constructor arguments, layouts (NHWC inputs, HWIO kernels), parameter
initialisation and names, plus ``quant: QuantConfig | None``. With
``quant=None`` or ``QuantConfig(enabled=False)`` they compute exactly what the
Flax layer computes.

Quantization state (not ``nnx.Param``, so optimizers and filters tell them
apart, like BatchNorm's ``BatchStat``):

* :class:`ActRange` — cached activation clip value ``max|x|``, written in
  the forward pass on measure steps;
* :class:`GradQuant` — the gradient state
  (:class:`int8jax.dsgc.GradQuantState`: learned clip, latest cosine distance,
  ...). It is differentiable: its gradient is the backward pass's measurement,
  which :func:`int8jax.optim.ui8` turns into the state update. Include it in
  ``nnx.grad`` / ``nnx.Optimizer`` with the filter :data:`TRAINABLE`;
* :class:`QuantCounter` — the layer's call count (selects measure steps) and
  the count of measure steps skipped for non-finite activations.

Periodic update (§4.3 of the paper): a layer measures on its calls number
0, ``period``, ``2 * period``, ... in training mode. ``measure`` is a traced
value (``count % period == 0``) that picks a ``lax.cond`` branch, so the
compiled step is the same on every step and the extra passes (activation
``max|x|``, cosine distance, clip gradient) run only on measure steps. A
training loop needs to do nothing; ``int8jax.nn.set_call_count(model, n)``
re-aligns the counters (e.g. ``0`` to force a measurement on the next call),
and ``model.eval()`` stops counting and measuring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from int8jax import quant
from int8jax.config import QuantConfig
from int8jax.dsgc import GradQuantState
from int8jax.ops import quant_conv_general_dilated, quant_dot_general


class ActRange(nnx.Variable):
  """Cached activation clip value (float32 scalar; 0 = not measured yet)."""


class GradQuant(nnx.Variable):
  """Gradient quantization state, a :class:`int8jax.dsgc.GradQuantState`."""


class QuantCounter(nnx.Variable):
  """Integer counters of a quantized layer (calls; non-finite activations)."""


#: Filter of everything a UI8 optimizer updates: weights and gradient state.
TRAINABLE = nnx.Any(nnx.Param, GradQuant)


class _QuantMixin:
  """State and per-call inputs shared by QuantConv and QuantDense."""

  def _init_quant(self, quant_config, rng_collection, deterministic, rngs):
    if quant_config is not None and not isinstance(quant_config, QuantConfig):
      raise TypeError(f"quant must be an int8jax.QuantConfig or None, "
                      f"got {type(quant_config).__name__}")
    self.quant = quant_config
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    self.act_range = ActRange(jnp.zeros((), jnp.float32))
    self.grad_quant = GradQuant(GradQuantState.initial())
    self.call_count = QuantCounter(jnp.zeros((), jnp.int32))
    self.act_nonfinite = QuantCounter(jnp.zeros((), jnp.int32))
    self.quant_rngs = rngs[rng_collection].fork()

  @property
  def quantized(self) -> bool:
    return self.quant is not None and self.quant.enabled

  def _step_inputs(self, x):
    """(key, grad_state, x_clip, measure) for this call; updates counters/range."""
    cfg = self.quant
    cached = self.act_range[...]
    if self.deterministic:
      measure = jnp.zeros((), bool)
      need = cached <= 0
    else:
      count = self.call_count[...]
      measure = (count % cfg.period) == 0
      need = measure | (cached <= 0)
      self.call_count[...] = count + 1
    # The clip is state, not a function of x to differentiate: without the
    # stop_gradient JAX keeps max|x|'s JVP residuals (a mask and a sign the
    # size of x, materialised on the non-measuring branch too) and runs their
    # transpose in the backward pass, only to multiply a zero cotangent.
    fresh = lax.cond(need, lambda: quant.absmax(lax.stop_gradient(x)), lambda: cached)
    finite = jnp.isfinite(fresh)
    x_clip = jnp.where(finite, fresh, cached)
    if not self.deterministic:
      self.act_range[...] = x_clip
      self.act_nonfinite[...] += jnp.where(finite, 0, 1).astype(jnp.int32)
    if self.deterministic or cfg.grad_rounding == "nearest":
      key = jax.random.key(0)
    else:
      key = self.quant_rngs()
    return dict(key=key, grad_state=self.grad_quant.get_value(), x_clip=x_clip,
                measure=measure, config=cfg)


class QuantConv(_QuantMixin, nnx.Conv):
  """``nnx.Conv`` whose forward, input-gradient and weight-gradient run in INT8.

  Args: those of :class:`flax.nnx.Conv`, plus

    quant: :class:`int8jax.QuantConfig` (default: UI8, best available backend);
      ``None`` makes the layer an exact ``nnx.Conv``.
    deterministic: evaluation mode (no counting, no measuring, cached range);
      toggled by ``model.eval()`` / ``model.train()``.
    rng_collection: rng stream for stochastic rounding (falls back to
      ``default``).

  Example:
    >>> from flax import nnx
    >>> from int8jax.nn import QuantConv
    >>> conv = QuantConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 16, 16, 3))).shape
    (2, 16, 16, 8)
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
               quant: QuantConfig | None = QuantConfig(), deterministic: bool = False,
               rng_collection: str = "quant", rngs: nnx.Rngs, **conv_kwargs):
    if "conv_general_dilated" in conv_kwargs:
      raise TypeError("QuantConv does not take conv_general_dilated=: it provides its own")
    super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs,
                     **conv_kwargs)
    del self.conv_general_dilated  # nnx.Conv.__call__ now finds the method below
    self._init_quant(quant, rng_collection, deterministic, rngs)

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, precision=None, **kwargs):
    if not self.quantized:
      return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision, **kwargs)
    return quant_conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, **self._step_inputs(lhs))


class QuantDense(_QuantMixin, nnx.Linear):
  """``nnx.Linear`` whose three GEMMs run in INT8 (arguments as :class:`QuantConv`).

  Example:
    >>> from flax import nnx
    >>> from int8jax.nn import QuantDense
    >>> QuantDense(4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
    (2, 3)
  """

  def __init__(self, in_features: int, out_features: int, *,
               quant: QuantConfig | None = QuantConfig(), deterministic: bool = False,
               rng_collection: str = "quant", rngs: nnx.Rngs, **linear_kwargs):
    if "dot_general" in linear_kwargs:
      raise TypeError("QuantDense does not take dot_general=: it provides its own")
    super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
    del self.dot_general
    self._init_quant(quant, rng_collection, deterministic, rngs)

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, **kwargs):
    if not self.quantized:
      return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    return quant_dot_general(lhs, rhs, dimension_numbers, **self._step_inputs(lhs))


def quant_layers(model: nnx.Module):
  """``(path, layer)`` for every QuantConv / QuantDense in ``model``."""
  return [(path, m) for path, m in nnx.iter_graph(model)
          if isinstance(m, (QuantConv, QuantDense))]


def quant_stats(model: nnx.Module) -> dict[str, GradQuantState]:
  """Per quantized layer (``"a/b/c"`` path): its :class:`GradQuantState`.

  The fields give what the paper plots: ``deviation`` (cosine distance d),
  ``clip`` next to ``grad_absmax``, ``clipped_fraction``; the LR coefficient is
  ``int8jax.lr_coefficient(state.deviation)``.
  """
  return {"/".join(str(p) for p in path): m.grad_quant.get_value()
          for path, m in quant_layers(model) if m.quantized}


def set_call_count(model: nnx.Module, count: int = 0) -> None:
  """Set every quantized layer's call counter (``0``: measure on the next call)."""
  for _, m in quant_layers(model):
    m.call_count[...] = jnp.asarray(count, jnp.int32)
