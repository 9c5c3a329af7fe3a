"""Direction-sensitive gradient clipping (DSGC): state, measurement, update.

UI8 (Zhu et al. 2020, §4.1) picks each layer's gradient clip value ``c`` to
minimise the cosine distance ``d = 1 - cos(g, g_hat)`` between the output
gradient ``g`` and its quantized version ``g_hat``. This module holds the
per-layer state (:class:`GradQuantState`), the measurement the backward pass
of a quantized op makes (:func:`measure_gradient`) and the pure state update
(:func:`update_grad_state`) that :mod:`int8jax.optim` applies.

How the state travels: a quantized op takes a ``GradQuantState`` as an
ordinary array argument and its backward rule returns the *measurement* of the
step as that argument's cotangent. The cotangent has the same fields, read as
sums over the op's uses in the step (so a layer called twice, or gradients
accumulated over micro-batches, average correctly: every field is divided by
``measurements``):

* ``channel_distance_mean``: the mean over output channels of each channel's cosine
  distance (see below);
* ``distance``: the cosine distance of the whole tensor (the paper's
  ``d``, norm-weighted; what the clip search minimises and, by default, what
  drives the error-sensitive LR: :func:`int8jax.optim.lr_distance`);
* ``channel_distance_max`` / ``channel_distance_median``: the largest and
  the median per-channel distance (channels with a non-zero gradient);
* ``grad_absmax``: ``max|g|``; ``clipped_fraction``: share of entries with
  ``|g| >= c``;
* ``dlog_clip``: ``d(distance)/d(log c)`` (the paper's descent direction);
* ``best_ratio``: the clip ratio (of ``max|g|``, per group for per-group
  scales) with the smallest global distance among the candidates evaluated in
  the same pass (:data:`CANDIDATE_RATIOS` and a local grid around the current
  ratio); 1 for ``grad_clip="max"``; 0 for ``clip_method="gradient"``, whose
  backward pass runs no search (0 tells :func:`update_grad_state` to descend);
* ``measurements``: 1 per use on a measure step, 0 otherwise;
* ``nonfinite``: 1 per use whose gradient held NaN/Inf, on any step (its
  other fields are then 0);
* ``clip_ratio``: a check value, ``measurements / 256`` (see below);
* ``clip``: 0 (unused in a measurement).

The measurement is returned *scaled* by :data:`MEASUREMENT_SCALE`
(``2^-40``, :func:`as_cotangent`): it travels as the gradient of the layer's
state, so optax transforms placed before the optimizer see it. At this scale
it adds nothing to a global norm, and since every field is a sum divided by
``measurements``, a uniform rescaling leaves its meaning unchanged; a
transform that changes fields unequally breaks the check value and is
refused (:func:`check_measurements`). Why this route, and what a user
composing transforms must know: docs/design.md, "How the measurement reaches
the optimizer". :func:`read_measurement` gives the per-use averages.

Why the per-channel distances are measured: the global distance is weighted
by ``|g|``, so a few channels with large gradients hide the others. Measured
in a depthwise MobileNet (docs/results.md): with one scale per tensor, 7 of 8
channels fell below one int8 step and their directions were lost
(per-channel distances 0.72-0.77) while the global distance read 0.001. The
mean, median and maximum over channels show such channels (diagnostics,
TensorBoard). What fixes them is a gradient scale per channel group
(``QuantConfig.grad_granularity``), not a smaller learning rate: driving the
LR by the channel mean cut ResNet convs' LR to ~0.2 and cost 2.9 pp, so the
LR uses the global distance by default.

How the clip is learned (:func:`update_grad_state`): the paper descends on
``log c`` along ``d(d)/d(log c)``; on real gradients that derivative is
about ``2 d`` (1e-3), so one step moves the clip by 0.1-2% and the cosine-
optimal clip (0.6-1.0 of ``max|g|``) was reached only after ~120
measurements. The default update instead moves to ``best_ratio``: the same
objective (the global cosine distance between ``g`` and its quantization),
minimised by direct search over candidate clips evaluated in the measuring
pass. Each candidate is scored by :func:`search_objective`: the clipping bias
exactly, and stochastic rounding's noise by its exact variance (no sampling
noise in the comparison of candidates), weighted by
``QuantConfig.clip_noise_weight`` (1: one step's expected cosine distance,
the paper's objective). ``QuantConfig(clip_method="gradient")`` keeps the
paper's descent (and skips the search in the backward pass).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from int8jax import quant

#: Smallest learned clip, as a fraction of ``max|g|``.
MIN_CLIP_RATIO = 1e-3

#: Clip ratios (of ``max|g|``) the measurement always evaluates: a coarse
#: grid over where the cosine-optimal clip of real gradients lies (0.6-1.0
#: measured; heavier tails lower).
CANDIDATE_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
#: ... and these multiples of the current ratio (a local refinement).
LOCAL_FACTORS = (0.85, 0.92, 0.96, 1.0, 1.04, 1.08, 1.17)

#: The update rules :func:`update_grad_state` knows.
CLIP_METHODS = ("search", "gradient")

#: The scale at which a quantized op returns its measurement (see the module doc).
MEASUREMENT_SCALE = 2.0 ** -40
_CHECK = 256.0


#: Former names of :class:`GradQuantState` fields (deprecated one release):
#: the paper's ``d`` is ``distance``, the per-channel statistics say so.
DEPRECATED_FIELDS = {"deviation": "channel_distance_mean", "global_deviation": "distance",
                     "channel_deviation_max": "channel_distance_max",
                     "channel_deviation_median": "channel_distance_median"}


def _renamed(name: str, where: str) -> str:
  """The current name of field ``name`` (warning if it is a former one)."""
  if name in DEPRECATED_FIELDS:
    new = DEPRECATED_FIELDS[name]
    warnings.warn(f"{where}: GradQuantState.{name} is deprecated: use .{new}",
                  DeprecationWarning, stacklevel=3)
    return new
  return name


@dataclasses.dataclass(frozen=True)
class GradQuantState:
  """Per-layer gradient-quantization state (all float32 scalars).

  A quantized layer keeps it packed (:meth:`pack`, field order below, which
  checkpoints store) in its ``grad_quant`` variable
  (:class:`int8jax.nn.GradQuant`); the ops take it as ``grad_state``.

  Attributes:
    clip: clip value of the output gradient used between measurements with
      per-tensor scales (``clip_ratio * max|g|`` of the latest measurement);
      0 means "not measured yet", in which case the op clips at ``max|g|`` of
      the step. (With per-group scales the op clips each group at
      ``clip_ratio`` times that group's ``max|g|`` on every step.)
    clip_ratio: the learned clip as a fraction of ``max|g|``, in
      ``[MIN_CLIP_RATIO, 1]``; 0 means "not learned yet" (ratio 1).
    channel_distance_mean: mean of the per-channel cosine distances at the
      latest measurement (formerly ``deviation``).
    distance: the paper's ``d``: the cosine distance
      (:func:`int8jax.quant.cosine_distance`) of the whole gradient tensor,
      norm-weighted; what the clip search minimises and, by default, what
      drives the error-sensitive LR (formerly ``global_deviation``).
    channel_distance_max: largest per-channel cosine distance.
    channel_distance_median: median per-channel cosine distance.
    grad_absmax: ``max|g|`` at the latest measurement.
    clipped_fraction: fraction of gradient entries at or beyond the clip.
    dlog_clip: ``d(distance)/d(log c)`` at the latest measurement.
    best_ratio: the best clip ratio the latest measurement's search found
      (0 when the layer's ``clip_method`` is ``"gradient"``: no search ran).
    measurements: number of measurements taken in.
    nonfinite: number of steps whose gradient was not finite (the stored
      values were kept).
  """

  clip: jax.Array
  clip_ratio: jax.Array
  channel_distance_mean: jax.Array
  distance: jax.Array
  channel_distance_max: jax.Array
  channel_distance_median: jax.Array
  grad_absmax: jax.Array
  clipped_fraction: jax.Array
  dlog_clip: jax.Array
  best_ratio: jax.Array
  measurements: jax.Array
  nonfinite: jax.Array

  @classmethod
  def initial(cls) -> "GradQuantState":
    # One buffer per field: a shared buffer could not be donated to a step.
    return cls(*(jnp.zeros((), jnp.float32) for _ in _FIELDS))

  def replace(self, **changes) -> "GradQuantState":
    return dataclasses.replace(
        self, **{_renamed(k, "GradQuantState.replace"): v for k, v in changes.items()})

  def __getattr__(self, name):  # only reached for names that are not fields
    if name in DEPRECATED_FIELDS:
      return getattr(self, _renamed(name, "GradQuantState"))
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def pack(self) -> jax.Array:
    """The fields as one float32 vector ``(NUM_FIELDS,)`` (field order)."""
    return jnp.stack([jnp.asarray(getattr(self, f), jnp.float32) for f in _FIELDS])

  @classmethod
  def unpack(cls, v: jax.Array) -> "GradQuantState":
    """Inverse of :meth:`pack`."""
    v = jnp.asarray(v)
    if v.shape != (NUM_FIELDS,):
      raise ValueError(f"a packed GradQuantState has shape ({NUM_FIELDS},), got {v.shape}")
    return cls(*(v[i] for i in range(NUM_FIELDS)))


_FIELDS = [f.name for f in dataclasses.fields(GradQuantState)]
jax.tree_util.register_dataclass(GradQuantState, data_fields=_FIELDS, meta_fields=[])
#: Length of :meth:`GradQuantState.pack`'s vector.
NUM_FIELDS = len(_FIELDS)


def as_state(x) -> GradQuantState:
  """``x`` as a :class:`GradQuantState` (unpacking a packed vector)."""
  return x if isinstance(x, GradQuantState) else GradQuantState.unpack(x)


_TINY = float(np.finfo(np.float32).tiny)


def candidate_ratios(current: jax.Array) -> jax.Array:
  """The clip ratios a measurement evaluates (float32 vector).

  :data:`CANDIDATE_RATIOS` plus :data:`LOCAL_FACTORS` times ``current``
  (``current`` 0 means 1), clamped to ``[MIN_CLIP_RATIO, 1]``.
  """
  r = jnp.where(current > 0, current, 1.0).astype(jnp.float32)
  local = jnp.clip(r * jnp.asarray(LOCAL_FACTORS, jnp.float32), MIN_CLIP_RATIO, 1.0)
  return jnp.concatenate([jnp.asarray(CANDIDATE_RATIOS, jnp.float32), local])


def _cos(sab, saa, sbb):
  return sab / jnp.maximum(jnp.sqrt(saa) * jnp.sqrt(sbb), _TINY)


def _distance(sgh, sgg, shh):
  # g == 0: nothing to lose, d = 0. g != 0 but g_hat == 0: direction lost, d = 1.
  return jnp.where(sgg > 0, 1.0 - _cos(sgh, sgg, shh), 0.0)


def measure_gradient(g: jax.Array, q: jax.Array, scale: jax.Array, clip: jax.Array, *,
                     gmax: jax.Array | None = None, ratio: jax.Array | None = None,
                     stochastic: bool = True, noise_weight: float = 1.0,
                     search: bool = True) -> GradQuantState:
  """The measurement cotangent for one use of a quantized op.

  Args:
    g: the float output gradient, channels on its last axis.
    q: its int8 quantization (what the GEMMs use).
    scale: the scale of ``q`` (scalar, or broadcastable to ``g``: one per
      channel for per-group scales).
    clip: the clip value(s) used (``127 * scale``), same shape as ``scale``.
    gmax: the ``max|g|`` the clip is a ratio of (scalar or per channel, like
      ``scale``); default ``max|g|`` of the tensor.
    ratio: the ratio ``clip / gmax`` in use (the centre of the local search).
    stochastic: ``q`` was rounded stochastically (else to nearest); the
      candidate clips are scored for the same rounding (see :func:`search_objective`).
    noise_weight: the weight of stochastic rounding's noise against the
      clipping bias in the candidates' score (``QuantConfig.clip_noise_weight``;
      1 is the cosine distance of one step).
    search: evaluate the candidate clips (``False`` for ``grad_clip="max"``
      and ``clip_method="gradient"``: ``best_ratio`` is then 1, which the op
      sets to 0 for ``"gradient"``, see :func:`update_grad_state`).

  Returns:
    A :class:`GradQuantState` read as a measurement (see the module doc).
    ``dlog_clip`` uses straight-through rounding (as in learned step-size
    quantization; docs/design.md §1): ``d g_hat_i / d c = sign(g_i)`` where
    ``|g_i| >= c`` and ``(g_hat_i - g_i) / c`` inside the range, and
    ``d d / d g_hat = -(g / (|g||g_hat|) - cos * g_hat / |g_hat|^2)``.
  """
  g = g.astype(jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  c = jnp.asarray(clip, jnp.float32)
  h = q.astype(jnp.float32) * scale
  axes = tuple(range(g.ndim - 1))
  # Per-channel sums (one pass over g, h); totals from them.
  sgg_c = jnp.sum(g * g, axis=axes)
  shh_c = jnp.sum(h * h, axis=axes)
  sgh_c = jnp.sum(g * h, axis=axes)
  sgg, shh, sgh = sgg_c.sum(), shh_c.sum(), sgh_c.sum()
  d_c = _distance(sgh_c, sgg_c, shh_c)
  live = sgg_c > 0
  d_mean = jnp.sum(jnp.where(live, d_c, 0.0)) / jnp.maximum(jnp.sum(live), 1)
  d_max = jnp.max(jnp.where(live, d_c, 0.0), initial=0.0)
  d_median = _live_median(d_c, live)
  d = _distance(sgh, sgg, shh)

  # Derivative w.r.t. log c (one learned ratio for every channel: d log c_i
  # = d log r), straight-through rounding.
  clipped = jnp.abs(g) >= c
  tc = jnp.where(clipped, jnp.sign(g) * c, h - g)  # c_i * d g_hat_i / d c_i
  nn_ = jnp.maximum(jnp.sqrt(sgg) * jnp.sqrt(shh), _TINY)
  dlog = -jnp.sum(g * tc) / nn_ + _cos(sgh, sgg, shh) * jnp.sum(h * tc) / jnp.maximum(shh, _TINY)
  dlog = jnp.where((sgg > 0) & (shh > 0), dlog, 0.0)

  absmax = quant.absmax(g)
  finite = (jnp.isfinite(sgg) & jnp.isfinite(shh) & jnp.isfinite(sgh) & jnp.all(jnp.isfinite(c))
            & jnp.isfinite(absmax))
  if search:
    best = _search(g, gmax if gmax is not None else absmax,
                   jnp.zeros((), jnp.float32) if ratio is None else ratio, sgg,
                   stochastic=stochastic, noise_weight=noise_weight)
  else:
    best = jnp.ones((), jnp.float32)

  def keep(v):
    return jnp.where(finite, v, 0.0).astype(jnp.float32)

  zero = jnp.zeros((), jnp.float32)
  return GradQuantState(
      clip=zero, clip_ratio=zero, channel_distance_mean=keep(d_mean), distance=keep(d),
      channel_distance_max=keep(d_max), channel_distance_median=keep(d_median),
      grad_absmax=keep(absmax),
      clipped_fraction=keep(jnp.mean(clipped.astype(jnp.float32))), dlog_clip=keep(dlog),
      best_ratio=keep(best), measurements=jnp.ones((), jnp.float32),
      nonfinite=jnp.where(finite, 0.0, 1.0).astype(jnp.float32))


def _live_median(d_c, live):
  """Median of ``d_c`` over the ``live`` channels (0 when none is)."""
  n = jnp.sum(live)
  srt = jnp.sort(jnp.where(live, d_c, jnp.inf))
  lo = srt[jnp.maximum((n - 1) // 2, 0)]
  hi = srt[jnp.maximum(n // 2, 0)]
  return jnp.where(n > 0, 0.5 * (lo + hi), 0.0)


def search_objective(g: jax.Array, ratio: jax.typing.ArrayLike,
                     gmax: jax.typing.ArrayLike | None = None, *, stochastic: bool = True,
                     noise_weight: float = 1.0, sgg: jax.Array | None = None) -> jax.Array:
  """The score the clip search minimises for clip ``ratio * gmax`` (scalar).

  With stochastic rounding the quantization of ``g`` at clip ``c`` is
  ``h = clip(g, -c, c) + n``: a bias (the clipped part) and a zero-mean noise
  whose variance is known exactly, ``s^2 f (1 - f)`` per entry (``s`` the
  int8 step, ``f`` the fractional part of ``clip(g)/s``). The score is the
  cosine distance with the noise's energy weighted by ``noise_weight``::

    1 - <g, clip(g)> / (|g| sqrt(|clip(g)|^2 + noise_weight * sum s^2 f (1 - f)))

  With ``noise_weight=1`` this is the expected cosine distance of one step's
  quantization (the paper's objective, without sampling noise). A smaller
  weight counts that the noise of successive steps averages out (momentum,
  the sum over a weight gradient's positions) while the clipping bias is the
  same every step: the search then clips only where the noise it removes is
  large against the bias it adds (heavy tails). Nearest rounding's error is
  deterministic: it is scored as one step's cosine distance.

  Args:
    g: the float gradient, channels on the last axis.
    ratio: the candidate clip as a fraction of ``gmax``.
    gmax: ``max|g|`` (scalar, or per channel for per-group scales); default
      ``max|g|`` of the tensor.
    stochastic: stochastic (default) or nearest rounding.
    noise_weight: see above (ignored for nearest rounding).
    sgg: ``sum(g * g)`` if already known.
  """
  g = g.astype(jnp.float32)
  gmax = quant.absmax(g) if gmax is None else jnp.asarray(gmax, jnp.float32)
  sgg = jnp.sum(g * g) if sgg is None else sgg
  inv = quant.QMAX / jnp.maximum(gmax, _TINY)  # 1 / (int8 step at ratio 1)
  r = jnp.asarray(ratio, jnp.float32)
  step = r / inv
  y = jnp.clip(g * (inv / r), -quant.QMAX, quant.QMAX)  # clip(g) in int8 steps
  if stochastic:
    cg = y * step
    f = y - jnp.floor(y)
    noise = jnp.sum(f * (1.0 - f) * (step * step))  # E|n|^2
    return _distance(jnp.sum(g * cg), sgg, jnp.sum(cg * cg) + noise_weight * noise)
  h = jnp.floor(y + 0.5) * step
  return _distance(jnp.sum(g * h), sgg, jnp.sum(h * h))


def _search(g, gmax, ratio, sgg, *, stochastic, noise_weight):
  """The candidate ratio with the smallest :func:`search_objective`.

  One fused reduction pass over ``g`` per candidate, run as a loop
  (``lax.map``): as one reduction over a broadcast ``(..., K)`` axis, or
  unrolled, XLA:CPU kept per-candidate intermediates alive at once (the
  ResNet-20 step's temporaries grew by up to 2x).
  """
  cand = candidate_ratios(ratio)  # (K,)
  score = lambda r: search_objective(g, r, gmax, stochastic=stochastic,  # noqa: E731
                                     noise_weight=noise_weight, sgg=sgg)
  return cand[jnp.argmin(jax.lax.map(score, cand))]


def as_cotangent(m: GradQuantState) -> GradQuantState:
  """A measurement (per-use values, ``measurements`` = 1 or 0) in the form the
  ops return it: scaled by :data:`MEASUREMENT_SCALE`, with the check value."""
  m = jax.tree.map(lambda v: (v * MEASUREMENT_SCALE).astype(jnp.float32), m)
  return m.replace(clip=jnp.zeros((), jnp.float32), clip_ratio=m.measurements / _CHECK)


def measurement_is_consistent(measured: GradQuantState) -> jax.Array:
  """Boolean scalar: the measurement's check value still matches (no transform
  changed its fields unequally; see the module doc)."""
  n, tag = measured.measurements, measured.clip_ratio * _CHECK
  return (jnp.abs(tag - n) <= 1e-5 * jnp.abs(n)) & (n >= 0)


def read_measurement(measured: GradQuantState) -> GradQuantState:
  """A measurement as the ops return it, read back: every field the per-use
  average (the sums divided by ``measurements``, so any uniform rescaling
  cancels); ``measurements`` and ``nonfinite`` the counts of uses (exact when
  nothing rescaled the measurement); ``clip`` and ``clip_ratio`` 0. Zeros
  when there was no measurement."""
  n = measured.measurements
  inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  mean = jax.tree.map(lambda v: (v * inv).astype(jnp.float32), measured)
  zero = jnp.zeros((), jnp.float32)
  return mean.replace(clip=zero, clip_ratio=zero, measurements=n / MEASUREMENT_SCALE,
                      nonfinite=measured.nonfinite / MEASUREMENT_SCALE)


def update_grad_state(state: GradQuantState, measured: GradQuantState,
                      learning_rate: jax.typing.ArrayLike = 1.0,
                      learn_clip: jax.typing.ArrayLike = True,
                      method: str | None = None) -> GradQuantState:
  """Fold one step's measurement into the state (pure, jit-friendly).

  Every field of ``measured`` is a sum over uses; dividing by
  ``measured.measurements`` makes the update the same after any uniform
  rescaling of the measurement (gradient accumulation averages it; a clipping
  transform placed before the optimizer scales it). Without a measurement
  (``measurements == 0``) only ``nonfinite`` can change. A measurement with
  non-finite data only increments ``nonfinite``; one whose check value does
  not match (:func:`measurement_is_consistent`) is ignored. Otherwise the clip ratio
  ``r`` (``clip_ratio``, 0 meaning 1) moves:

  * after a search (the layer's ``QuantConfig.clip_method="search"``, the
    default: the measurement's ``best_ratio`` > 0): towards the best
    candidate, ``log r_new = log r + learning_rate * (log best_ratio - log r)``
    (``learning_rate=1`` jumps there);
  * otherwise (``clip_method="gradient"``: the backward pass ran no search and
    reported ``best_ratio`` 0): the paper's descent,
    ``r_new = r * exp(-learning_rate * d(d)/d(log c))``;

  clamped to ``[MIN_CLIP_RATIO, 1]``; ``clip = r_new * max|g|``.

  Args:
    state: current state.
    measured: the cotangent the quantized op returned for ``state``.
    learning_rate: step size on ``log c``.
    learn_clip: ``False`` keeps ``r = 1`` (clip at ``max|g|``: naive INT8).
    method: ``None`` (the rule the measurement says, above); ``"search"`` or
      ``"gradient"`` force one (static).

  Returns:
    The new state.
  """
  if method is not None and method not in CLIP_METHODS:
    raise ValueError(f"method must be one of {CLIP_METHODS} or None, got {method!r}")
  n = measured.measurements
  vals = [measured.channel_distance_mean, measured.distance, measured.grad_absmax,
          measured.dlog_clip, measured.clipped_fraction, measured.best_ratio,
          measured.channel_distance_max, measured.channel_distance_median]
  bad = ((measured.nonfinite > 0) | ~jnp.all(jnp.isfinite(jnp.stack(vals)))
         | ~measurement_is_consistent(measured))
  inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  mean = lambda v: v * inv  # noqa: E731
  gmax = mean(measured.grad_absmax)
  r = jnp.where(state.clip_ratio > 0, state.clip_ratio, 1.0)
  lr = jnp.asarray(learning_rate, jnp.float32)
  best = jnp.clip(mean(measured.best_ratio), MIN_CLIP_RATIO, 1.0)
  searched = jnp.asarray(method == "search") if method else measured.best_ratio > 0
  r_new = jnp.where(searched, jnp.exp(jnp.log(r) + lr * (jnp.log(best) - jnp.log(r))),
                    r * jnp.exp(-lr * mean(measured.dlog_clip)))
  r_new = jnp.where(learn_clip, jnp.clip(r_new, MIN_CLIP_RATIO, 1.0), 1.0)
  # An all-zero gradient (gmax == 0) carries no information about the clip.
  ok = (n > 0) & ~bad & (gmax > 0)

  def pick(new, old):
    return jnp.where(ok, new, old).astype(jnp.float32)

  return GradQuantState(
      clip=pick(r_new * gmax, state.clip), clip_ratio=pick(r_new, state.clip_ratio),
      channel_distance_mean=pick(mean(measured.channel_distance_mean), state.channel_distance_mean),
      distance=pick(mean(measured.distance), state.distance),
      channel_distance_max=pick(mean(measured.channel_distance_max),
                                 state.channel_distance_max),
      channel_distance_median=pick(mean(measured.channel_distance_median),
                                    state.channel_distance_median),
      grad_absmax=pick(gmax, state.grad_absmax),
      clipped_fraction=pick(mean(measured.clipped_fraction), state.clipped_fraction),
      dlog_clip=pick(mean(measured.dlog_clip), state.dlog_clip),
      best_ratio=pick(mean(measured.best_ratio), state.best_ratio),
      measurements=(state.measurements + jnp.where(ok, 1.0, 0.0)).astype(jnp.float32),
      nonfinite=(state.nonfinite + jnp.where(measured.nonfinite > 0, 1.0, 0.0)
                 ).astype(jnp.float32))


def state_is_intact(state: GradQuantState) -> jax.Array:
  """Boolean scalar: ``state`` is one the clip learner could have written --
  counts (``measurements``, ``nonfinite``) whole and non-negative, ratios in
  ``[0, 1]``. A transform placed after :func:`int8jax.optim.ui8` that changes
  the state's update (``optax.scale``, weight decay) breaks it."""
  def whole(v):
    return (v >= 0) & (v == jnp.round(v))
  return (whole(state.measurements) & whole(state.nonfinite)
          & (state.clip_ratio >= 0) & (state.clip_ratio <= 1) & (state.clip >= 0))


def check_measurements(measured, where, states=None) -> jax.Array:
  """A float32 zero that raises, when computed, if a transform changed a
  measurement's fields unequally (:func:`measurement_is_consistent`) or a
  stored state is not one the learner wrote (:func:`state_is_intact`). Add it
  into the caller's result: a check whose value is unused would be dropped.

  One check per step for all layers. The host is reached only when a
  check fails (a ``lax.cond`` around a ``jax.pure_callback`` that raises).
  Not ``jax.debug.callback``: a computation with a side effect
  loses jit's C++ dispatch fast path, and every step then paid ~80 ms of
  Python argument handling on MobileNetV2's ~900 state leaves (the CPU step
  regression of benchmarks/RESULTS.md; a callback per layer and step cost
  more still).

  Args:
    measured: a sequence of measurements (:class:`GradQuantState`).
    where: the layers' names, same length (named in the error).
    states: the layers' current states, same length, or ``None``.
  """
  measured, where = list(measured), list(where)
  states = [None] * len(measured) if states is None else list(states)
  if not len(measured) == len(where) == len(states):
    raise ValueError(f"check_measurements: {len(measured)} measurements, "
                     f"{len(where)} names, {len(states)} states")
  zero = jnp.zeros((), jnp.float32)
  if not measured:
    return zero
  # Per layer: 0 fine, 1 measurement changed (before ui8), 2 state changed (after ui8).
  bad = jnp.stack([
      jnp.where(~measurement_is_consistent(m), 1,
                0 if st is None else jnp.where(state_is_intact(st), 0, 2)).astype(jnp.int32)
      for m, st in zip(measured, states)])
  names = tuple(where)

  def report(b):
    return jax.pure_callback(functools.partial(_report_inconsistent, names=names),
                             jax.ShapeDtypeStruct((), jnp.float32), b)

  return jax.lax.cond(jnp.any(bad > 0), report, lambda b: zero, bad)


def _report_inconsistent(bad, names):
  _raise_if_inconsistent(bad, names)
  return np.zeros((), np.float32)


def _raise_if_inconsistent(bad, names):
  bad = np.asarray(bad).reshape(-1)
  before = ", ".join(n for n, b in zip(names, bad) if b == 1)
  after = ", ".join(n for n, b in zip(names, bad) if b == 2)
  if before:
    raise ValueError(
        f"int8jax: the quantization measurement of {before} was changed "
        "by a gradient transformation placed before int8jax.optim.ui8 (e.g. optax.add_noise "
        "or weight decay added to all gradients). Such transforms treat the measurement as "
        "a gradient; put them inside ui8's base optimizer (ui8(optax.chain(..., base))), "
        "which sees only the weights' gradients. Uniform rescalings (clip_by_global_norm, "
        "MultiSteps, scale) are fine where they are.")
  if after:
    raise ValueError(
        f"int8jax: the gradient-quantization state of {after} is not one the clip learner "
        "wrote (a count is fractional or a ratio outside [0, 1]): a gradient transformation "
        "placed after int8jax.optim.ui8 (e.g. optax.scale, add_decayed_weights) changed the "
        "state's update. Put such transforms inside ui8's base optimizer "
        "(ui8(optax.chain(base, ...))), which sees only the weights.")
