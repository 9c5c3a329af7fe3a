"""Direction-sensitive gradient clipping (DSGC) state and measurement.

UI8 (Zhu et al. 2020, §4.1) picks each layer's gradient clip value ``c`` to
minimise the cosine distance ``d = 1 - cos(g, g_hat)`` between the output
gradient ``g`` and its quantized version ``g_hat``, by gradient descent on
``log c``. This module holds the per-layer state (:class:`GradQuantState`),
the measurement made in the backward pass of a quantized op
(:func:`measure_gradient`) and the pure state update
(:func:`update_grad_state`) that :mod:`int8jax.optim` applies.

How the state travels: a quantized op takes a ``GradQuantState`` as an
ordinary array argument and its backward rule returns the *measurement* of the
step as that argument's cotangent. The cotangent has the same fields, read as
sums over the op's uses in the step:

* ``clip``: ``d(d)/d(log c)`` at the clip value used;
* ``clip_ratio``: 0 (unused);
* ``deviation``: the cosine distance ``d``;
* ``grad_absmax``: ``max|g|``;
* ``clipped_fraction``: fraction of entries with ``|g| >= c``;
* ``dlog_clip``: ``d(d)/d(log c)`` again (kept so the state records it);
* ``measurements``: 1 per use on a measure step, 0 otherwise;
* ``nonfinite``: 1 per use whose gradient held NaN/Inf (its other fields are 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from int8jax import quant

#: Smallest learned clip, as a fraction of ``max|g|``.
MIN_CLIP_RATIO = 1e-3


@dataclasses.dataclass(frozen=True)
class GradQuantState:
  """Per-layer gradient-quantization state (all float32 scalars).

  Attributes:
    clip: clip value of the output gradient used between measurements
      (``clip_ratio * max|g|`` of the latest measurement); 0 means "not
      measured yet", in which case the op clips at ``max|g|`` of the step.
    clip_ratio: the learned clip as a fraction of ``max|g|``, in
      ``[MIN_CLIP_RATIO, 1]``; 0 means "not learned yet" (ratio 1). On a
      measure step the op clips at ``clip_ratio * max|g|`` of that step, so
      the clip follows the gradient's scale as training goes on; the clip
      learner descends on ``log clip_ratio``.
    deviation: cosine distance ``d`` at the latest measurement.
    grad_absmax: ``max|g|`` at the latest measurement.
    clipped_fraction: fraction of gradient entries at or beyond the clip value
      at the latest measurement.
    dlog_clip: ``d(d)/d(log c)`` at the latest measurement.
    measurements: number of measurements taken in.
    nonfinite: number of measure steps skipped because the gradient was not
      finite (the other fields kept their previous values).
  """

  clip: jax.Array
  clip_ratio: jax.Array
  deviation: jax.Array
  grad_absmax: jax.Array
  clipped_fraction: jax.Array
  dlog_clip: jax.Array
  measurements: jax.Array
  nonfinite: jax.Array

  @classmethod
  def initial(cls) -> "GradQuantState":
    # One buffer per field: a shared buffer could not be donated to a step.
    return cls(*(jnp.zeros((), jnp.float32) for _ in _FIELDS))

  def replace(self, **changes) -> "GradQuantState":
    return dataclasses.replace(self, **changes)


_FIELDS = [f.name for f in dataclasses.fields(GradQuantState)]
jax.tree_util.register_dataclass(GradQuantState, data_fields=_FIELDS, meta_fields=[])


def measure_gradient(g: jax.Array, g_hat: jax.Array, clip: jax.Array) -> GradQuantState:
  """The measurement cotangent for one use of a quantized op.

  Args:
    g: the float output gradient.
    g_hat: its dequantized int8 version (``scale * q``).
    clip: the clip value ``c`` used to quantize ``g``.

  Returns:
    A :class:`GradQuantState` read as a measurement (see the module doc).
    Derivative (straight-through rounding, as in learned step-size
    quantization; docs/design.md §1): ``d g_hat_i / d c = sign(g_i)`` where
    ``|g_i| >= c`` and ``(g_hat_i - g_i) / c`` inside the range, and
    ``d d / d g_hat = -(g / (|g||g_hat|) - cos * g_hat / |g_hat|^2)``.
    All sums are taken in one pass over ``g``.
  """
  g = g.astype(jnp.float32)
  h = g_hat.astype(jnp.float32)
  c = jnp.asarray(clip, jnp.float32)
  clipped = jnp.abs(g) >= c
  t = jnp.where(clipped, jnp.sign(g), (h - g) / c)  # d g_hat / d c
  sgg = jnp.sum(g * g)
  shh = jnp.sum(h * h)
  sgh = jnp.sum(g * h)
  sgt = jnp.sum(g * t)
  sht = jnp.sum(h * t)
  gmax = quant.absmax(g)
  frac = jnp.mean(clipped.astype(jnp.float32))
  finite = jnp.isfinite(sgg) & jnp.isfinite(shh) & jnp.isfinite(sgh) & jnp.isfinite(c)

  tiny = jnp.finfo(jnp.float32).tiny
  ng, nh = jnp.sqrt(sgg), jnp.sqrt(shh)
  cos = sgh / jnp.maximum(ng * nh, tiny)
  # g == 0: nothing to lose, d = 0. g != 0 but g_hat == 0: direction lost, d = 1.
  d = jnp.where(sgg > 0, 1.0 - cos, 0.0)
  dd_dc = -(sgt / jnp.maximum(ng * nh, tiny)) + cos * sht / jnp.maximum(shh, tiny)
  dlog = jnp.where((sgg > 0) & (shh > 0), c * dd_dc, 0.0)

  def keep(v):
    return jnp.where(finite, v, 0.0).astype(jnp.float32)

  one = jnp.ones((), jnp.float32)
  return GradQuantState(
      clip=keep(dlog), clip_ratio=jnp.zeros((), jnp.float32), deviation=keep(d),
      grad_absmax=keep(gmax),
      clipped_fraction=keep(frac), dlog_clip=keep(dlog), measurements=one,
      nonfinite=jnp.where(finite, 0.0, 1.0).astype(jnp.float32))


def update_grad_state(state: GradQuantState, measured: GradQuantState,
                      learning_rate: jax.typing.ArrayLike = 1.0,
                      learn_clip: jax.typing.ArrayLike = True) -> GradQuantState:
  """Fold one step's measurement into the state (pure, jit-friendly).

  On a step without measurement (``measured.measurements == 0``) the state is
  returned unchanged. A measurement with non-finite data only increments
  ``nonfinite``. Otherwise the clip takes one gradient-descent step on
  ``log`` of its ratio to ``max|g|`` (UI8 §4.1; the measure step clipped at
  ``r * max|g|``)::

      r = clip_ratio if clip_ratio > 0 else 1      # first measurement: max|g|
      r_new = clamp(r * exp(-learning_rate * d(d)/d(log c)), MIN_CLIP_RATIO, 1)
      clip_new = r_new * max|g|

  Args:
    state: current state.
    measured: the cotangent the quantized op returned for ``state``.
    learning_rate: step size of the descent on ``log c``.
    learn_clip: ``False`` sets ``c = max|g|`` (naive INT8; no descent).

  Returns:
    The new state.
  """
  n = measured.measurements
  bad = (measured.nonfinite > 0) | ~jnp.all(jnp.isfinite(jnp.stack(
      [measured.deviation, measured.grad_absmax, measured.dlog_clip,
       measured.clipped_fraction])))
  ok = (n > 0) & ~bad
  inv = 1.0 / jnp.maximum(n, 1.0)
  d = measured.deviation * inv
  gmax = measured.grad_absmax * inv
  frac = measured.clipped_fraction * inv
  dlog = measured.dlog_clip * inv
  r = jnp.where(state.clip_ratio > 0, state.clip_ratio, 1.0)
  lr = jnp.asarray(learning_rate, jnp.float32)
  r_new = jnp.where(learn_clip, jnp.clip(r * jnp.exp(-lr * dlog), MIN_CLIP_RATIO, 1.0), 1.0)
  # An all-zero gradient (gmax == 0) carries no information about the clip.
  ok = ok & (gmax > 0)
  c_new = r_new * gmax

  def pick(new, old):
    return jnp.where(ok, new, old).astype(jnp.float32)

  return GradQuantState(
      clip=pick(c_new, state.clip), clip_ratio=pick(r_new, state.clip_ratio),
      deviation=pick(d, state.deviation),
      grad_absmax=pick(gmax, state.grad_absmax),
      clipped_fraction=pick(frac, state.clipped_fraction),
      dlog_clip=pick(dlog, state.dlog_clip),
      measurements=(state.measurements + jnp.where(ok, 1.0, 0.0)).astype(jnp.float32),
      nonfinite=(state.nonfinite + jnp.where((n > 0) & bad, 1.0, 0.0)).astype(jnp.float32))


def lr_coefficient(deviation: jax.typing.ArrayLike, alpha: jax.typing.ArrayLike = 20.0,
                   beta: jax.typing.ArrayLike = 0.1) -> jax.Array:
  """Error-sensitive learning-rate coefficient ``max(exp(-alpha * d), beta)`` (§4.2)."""
  return jnp.maximum(jnp.exp(-jnp.asarray(alpha) * deviation), beta)
