"""Quantized conv and dense ops: ``jax.custom_vjp``s whose three GEMMs are int8.

:func:`quant_conv_general_dilated` mirrors :func:`jax.lax.conv_general_dilated`
and :func:`quant_dot_general` mirrors :func:`jax.lax.dot_general`. Both run
(UI8, Zhu et al. 2020, §3):

============  =======================================  ===================
GEMM          int8 operands                            dequantized by
============  =======================================  ===================
forward       x (nearest, clip ``x_clip``), w (nearest)  ``s_x * s_w``
input grad    g (stochastic, clip from ``grad_state``), w  ``s_g * s_w``
weight grad   x, g                                     ``s_x * s_g``
============  =======================================  ===================

with int32 accumulation (chunked, exact; see :mod:`int8jax.exact`).

State in and out (no host callbacks, no global state):

* ``x_clip`` — the activation clip value (a cached range or a fresh
  ``max|x|``) comes in as an ordinary array;
* ``grad_state`` — a :class:`int8jax.dsgc.GradQuantState`: measure steps
  clip ``g`` at ``clip_ratio * max|g|`` (ratio 0 means 1), other steps at the
  cached ``clip`` (0: ``max|g|`` of the step). Its
  *cotangent* is the step's measurement: on a step with ``measure=True`` the
  cosine distance ``d = 1 - cos(g, g_hat)``, ``d(d)/d(log c)``, ``max|g|`` and
  the clipped fraction; zeros otherwise. ``jax.grad`` w.r.t. ``grad_state``
  therefore returns the measurement, and
  :func:`int8jax.dsgc.update_grad_state` (or :mod:`int8jax.optim`) folds it
  into the state;
* ``key`` — the PRNG key for stochastic rounding of ``g``;
* ``measure`` — a boolean scalar; a traced value selects the measuring branch
  with ``lax.cond``, so no recompilation happens between steps.

Non-finite inputs give NaN outputs (never a finite wrong answer); a
non-finite gradient gives NaN input/weight gradients and a measurement that
says so (``nonfinite=1``) instead of poisoning the clip value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from int8jax import backends, dsgc, quant
from int8jax.config import QuantConfig
from int8jax.conv_spec import ConvSpec, make_conv_spec


@dataclasses.dataclass(frozen=True)
class _Op:
  """A quantized bilinear op in canonical layout (static, hashable).

  conv:  x (N, *S, C), w (*window, C//G, O), y (N, *S', O)
  dense: x (B, M, K),  w (B, K, N),        y (B, M, N)
  The weight's output-feature axis is last in both. ``backend`` is a name
  (hashable); the :class:`~int8jax.backends.Backend` is looked up -- and
  checked for the platform being traced for -- when the op is traced.
  """
  kind: str
  spec: ConvSpec | None
  config: QuantConfig
  backend: str
  x_dtype: Any
  w_dtype: Any

  def _args(self):
    impl = backends.get(self.backend)
    kw = {"chunk_k": self.config.chunk_k}
    extra = (self.spec,) if self.kind == "conv" else ()
    return impl, extra, kw

  def forward(self, xq, wq, scale):
    impl, extra, kw = self._args()
    fn = impl.conv_forward if self.kind == "conv" else impl.dense_forward
    return fn(xq, wq, scale, *extra, **kw)

  def dgrad(self, gq, wq, scale):
    impl, extra, kw = self._args()
    fn = impl.conv_dgrad if self.kind == "conv" else impl.dense_dgrad
    return fn(gq, wq, scale, *extra, **kw)

  def wgrad(self, xq, gq, scale):
    impl, extra, kw = self._args()
    fn = impl.conv_wgrad if self.kind == "conv" else impl.dense_wgrad
    return fn(xq, gq, scale, *extra, **kw)


def _all_finite(x):
  # One fused float reduction (0 * inf and 0 * nan are nan); jnp.isfinite
  # followed by jnp.all materialises a boolean tensor on XLA:CPU first.
  return jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0))


def _weight_quant(w, per_channel: bool):
  """Nearest-rounded int8 weight and its scale (fresh ``max|w|`` each step:
  one pass over a small tensor; per tensor, or per output feature = last axis)."""
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  sw = quant.scale_from_clip(quant.absmax(w, axis=axes))
  return quant.quantize(w, sw), sw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qapply(op: _Op, x, w, x_clip, grad_state, key, measure):
  y, _ = _qapply_fwd(op, x, w, x_clip, grad_state, key, measure)
  return y


def _qapply_fwd(op: _Op, x, w, x_clip, grad_state, key, measure):
  per_channel = op.config.weight_granularity == "channel"
  sx = quant.scale_from_clip(x_clip)
  # The barrier materialises the int8 tensor once: otherwise XLA fuses the
  # quantization into each consumer (the GEMM's padding, the patches of the
  # weight gradient) and keeps the float32 x alive as the residual instead.
  xq = lax.optimization_barrier(quant.quantize(x, sx))
  wq, sw = _weight_quant(w, per_channel)
  y = op.forward(xq, wq, sx * sw)
  ok = _all_finite(x) & _all_finite(w)
  # Materialise the float output: otherwise XLA may keep the wider int32
  # GEMM result alive for the consumers' backward pass and redo the scaling.
  y = lax.optimization_barrier(jnp.where(ok, y, jnp.nan).astype(op.x_dtype))
  res = (xq, wq, sx, sw, w if per_channel else None, grad_state, key, measure)
  return y, res


def _qapply_bwd(op: _Op, res, gy):
  xq, wq, sx, sw, w, grad_state, key, measure = res
  cfg = op.config
  g = gy.astype(jnp.float32)
  if cfg.grad_clip == "max":
    c = quant.absmax(g)
  else:
    # Measure steps clip at the learned ratio of this step's max|g|; other
    # steps reuse the cached clip and skip the max pass.
    stored, ratio = grad_state.clip, grad_state.clip_ratio
    need_max = measure | ~(stored > 0)
    gmax = lax.cond(need_max, lambda: quant.absmax(g), lambda: jnp.zeros((), jnp.float32))
    r = jnp.where(ratio > 0, ratio, 1.0)
    c = jnp.where(measure, r * gmax, jnp.where(stored > 0, stored, gmax))
  sg = quant.scale_from_clip(c)
  if cfg.grad_rounding == "stochastic":
    gq = quant.quantize(g, sg, rounding="stochastic", key=key)
  else:
    gq = quant.quantize(g, sg)
  # One quantization pass, shared by both GEMMs (see _qapply_fwd); tying xq to
  # gq also keeps XLA from hoisting the weight gradient's patch building (it
  # needs only forward residuals) to the start of the backward pass, where the
  # patch matrices of every layer would be alive at once.
  gq, xq = lax.optimization_barrier((gq, xq))
  measurement = lax.cond(
      measure,
      lambda: dsgc.measure_gradient(g, quant.dequantize(gq, sg), c),
      dsgc.GradQuantState.initial)
  if w is not None:  # per-channel forward: contraction over O needs one scale
    wq, sw = _weight_quant(w, per_channel=False)
  dx = op.dgrad(gq, wq, sg * sw)
  dw = op.wgrad(xq, gq, sg * sx)
  ok = _all_finite(g)
  dx = jnp.where(ok, dx, jnp.nan).astype(op.x_dtype)
  dw = jnp.where(ok, dw, jnp.nan).astype(op.w_dtype)
  return dx, dw, jnp.zeros_like(sx), measurement, None, None


_qapply.defvjp(_qapply_fwd, _qapply_bwd)


# ---------------------------------------------------------------------------
# Public ops.


def _lax_kwargs(preferred_element_type, out_sharding) -> dict:
  """Optional lax arguments, passed only when set (quantization off)."""
  kw = {}
  if preferred_element_type is not None:
    kw["preferred_element_type"] = preferred_element_type
  if out_sharding is not None:
    kw["out_sharding"] = out_sharding
  return kw


def _check_config(config):
  if not isinstance(config, QuantConfig):
    raise TypeError(f"config must be an int8jax.QuantConfig, got {type(config).__name__}")


def _check_float(name, x):
  if not isinstance(x, (jax.Array, np.ndarray)) and not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype (it is quantized inside the op), "
                    f"got {x.dtype}")


def _state_inputs(x, key, grad_state, x_clip, measure, config):
  """Defaults and checks for the state arguments shared by both ops."""
  if grad_state is None:
    grad_state = dsgc.GradQuantState.initial()
  elif not isinstance(grad_state, dsgc.GradQuantState):
    raise TypeError(f"grad_state must be an int8jax.GradQuantState, "
                    f"got {type(grad_state).__name__}")
  if key is None:
    if config.grad_rounding == "stochastic":
      raise ValueError("key=None: stochastic gradient rounding needs a PRNG key "
                       "(or QuantConfig(grad_rounding='nearest'))")
    key = jax.random.key(0)
  if x_clip is None:
    x_clip = quant.absmax(x)
  # The clip gets no gradient (its cotangent is zero); stopping it here keeps
  # JAX from carrying and transposing max|x|'s JVP through the step.
  x_clip = lax.stop_gradient(jnp.asarray(x_clip, jnp.float32))
  if x_clip.shape != ():
    raise ValueError(f"x_clip must be a scalar, got shape {x_clip.shape}")
  measure = jnp.asarray(measure)
  if measure.shape != () or measure.dtype != jnp.bool_:
    raise ValueError(f"measure must be a boolean scalar, got {measure.dtype}{list(measure.shape)}")
  return key, grad_state, x_clip, measure


def quant_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
    rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1, *,
    key: jax.Array | None = None, grad_state: dsgc.GradQuantState | None = None,
    x_clip: jax.Array | None = None, measure: bool | jax.Array = False,
    config: QuantConfig = QuantConfig(), precision=None,
    preferred_element_type=None, out_sharding=None) -> jax.Array:
  """INT8 ``lax.conv_general_dilated`` with int8 forward and backward GEMMs.

  Takes and returns the same layouts as :func:`jax.lax.conv_general_dilated`
  (any ``dimension_numbers``; Flax passes NHWC/HWIO), with ``window_strides``,
  SAME/VALID/explicit ``padding``, input and kernel dilation and
  ``feature_group_count`` (grouped and depthwise), any number of spatial dims.

  Args:
    lhs, rhs: float input and kernel; quantized inside (nearest rounding).
    key: PRNG key for stochastic rounding of the output gradient.
    grad_state: the layer's :class:`~int8jax.dsgc.GradQuantState` (default:
      initial state, i.e. clip at ``max|g|``). Differentiate w.r.t. it to get
      the step's measurement.
    x_clip: activation clip value (default: ``max|lhs|`` of this call).
    measure: measure ``d`` and ``d(d)/d(log c)`` in the backward pass.
    config: :class:`~int8jax.QuantConfig`; ``enabled=False`` is exact float.
    precision, preferred_element_type, out_sharding: passed to lax when
      quantization is off; ignored otherwise (the output has ``lhs``'s dtype).

  Returns:
    The convolution, dtype of ``lhs``.
  """
  _check_config(config)
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  spec = make_conv_spec(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                        rhs_dilation, dimension_numbers, feature_group_count)
  if not config.enabled:
    kw = _lax_kwargs(preferred_element_type, out_sharding)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kw)
  key, grad_state, x_clip, measure = _state_inputs(lhs, key, grad_state, x_clip, measure,
                                                   config)
  op = _Op("conv", spec, config, backends.resolve(config.backend),
           jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))
  x = jnp.transpose(lhs, spec.lhs_perm)
  w = jnp.transpose(rhs, spec.rhs_perm)
  y = _qapply(op, x, w, x_clip, grad_state, key, measure)
  return jnp.transpose(y, spec.out_perm)


def _dense_perms(lhs_ndim, rhs_ndim, dimension_numbers):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in v) for v in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(f"dimension_numbers must be ((lhs_contract, rhs_contract), "
                     f"(lhs_batch, rhs_batch)), got {dimension_numbers!r}") from None
  for name, axes, nd in (("lhs contracting", lc, lhs_ndim), ("rhs contracting", rc, rhs_ndim),
                         ("lhs batch", lb, lhs_ndim), ("rhs batch", rb, rhs_ndim)):
    if any(not 0 <= a < nd for a in axes) or len(set(axes)) != len(axes):
      raise ValueError(f"{name} dims {axes} invalid for rank {nd} "
                       f"(dimension_numbers={dimension_numbers!r})")
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers={dimension_numbers!r}: lhs and rhs must have as "
                     "many contracting and batch dims")
  lf = tuple(a for a in range(lhs_ndim) if a not in lc + lb)
  rf = tuple(a for a in range(rhs_ndim) if a not in rc + rb)
  return lc, rc, lb, rb, lf, rf


def quant_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None, *, key: jax.Array | None = None,
                      grad_state: dsgc.GradQuantState | None = None,
                      x_clip: jax.Array | None = None, measure: bool | jax.Array = False,
                      config: QuantConfig = QuantConfig(), out_sharding=None) -> jax.Array:
  """INT8 ``lax.dot_general`` with int8 forward and backward GEMMs.

  Same arguments and output layout as :func:`jax.lax.dot_general` (batch dims,
  then ``lhs`` free dims, then ``rhs`` free dims); ``rhs`` is the weight, its
  free dims are the output features (the per-channel scale axis). State
  arguments as in :func:`quant_conv_general_dilated`.
  """
  _check_config(config)
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  lc, rc, lb, rb, lf, rf = _dense_perms(lhs.ndim, rhs.ndim, dimension_numbers)
  for a, b in zip(lc + lb, rc + rb):
    if lhs.shape[a] != rhs.shape[b]:
      raise ValueError(f"lhs dim {a} (size {lhs.shape[a]}) and rhs dim {b} (size "
                       f"{rhs.shape[b]}) must match (dimension_numbers={dimension_numbers!r})")
  if not config.enabled:
    kw = _lax_kwargs(preferred_element_type, out_sharding)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kw)
  key, grad_state, x_clip, measure = _state_inputs(lhs, key, grad_state, x_clip, measure,
                                                   config)
  bshape = tuple(lhs.shape[a] for a in lb)
  lfs = tuple(lhs.shape[a] for a in lf)
  rfs = tuple(rhs.shape[a] for a in rf)
  b, m, n = math.prod(bshape), math.prod(lfs), math.prod(rfs)
  k = math.prod(lhs.shape[a] for a in lc)
  x = jnp.transpose(lhs, lb + lf + lc).reshape(b, m, k)
  w = jnp.transpose(rhs, rb + rc + rf).reshape(b, k, n)
  op = _Op("dense", None, config, backends.resolve(config.backend),
           jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))
  y = _qapply(op, x, w, x_clip, grad_state, key, measure)
  return y.reshape(bshape + lfs + rfs)
