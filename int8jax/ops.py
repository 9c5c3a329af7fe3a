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
  cached ``clip`` (0, no cached clip: ``clip_ratio * max|g|`` of the step;
  how a layer's clip warm-up is expressed, ``QuantConfig.clip_warmup``). Its
  *cotangent* is the step's measurement (:func:`int8jax.dsgc.measure_gradient`,
  scaled by :func:`int8jax.dsgc.as_cotangent`): on a step with ``measure=True``
  the cosine distance ``d = 1 - cos(g, g_hat)``, ``d(d)/d(log c)``, ``max|g|``,
  the clipped fraction and, for ``QuantConfig.clip_method="search"``, the
  best candidate clip; zeros otherwise. ``jax.grad`` w.r.t. ``grad_state``
  therefore returns the measurement, and :mod:`int8jax.optim` (or
  :func:`int8jax.dsgc.update_grad_state`) folds it into the state;
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
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax.sharding import PartitionSpec as P

from int8jax import backends, dsgc, exact, quant
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
  ``grad_groups``: 1 for one gradient scale per tensor, ``G`` for one per
  feature group. ``static_measure``: ``None`` when ``measure`` is traced,
  else the Python bool (no measuring ``lax.cond`` is built).
  ``stored_clip_only``: non-measuring calls use the stored clip with no
  fallback to ``max|g|`` (no reduction over ``g`` at all).
  """
  kind: str
  spec: ConvSpec | None
  config: QuantConfig
  backend: str
  x_dtype: Any
  w_dtype: Any
  out_dtype: Any
  grad_groups: int
  static_measure: bool | None
  stored_clip_only: bool = False

  def _data_parallel(self, impl: backends.Backend):
    """``(mesh, axis, shards)`` when the backend's products must run per batch
    shard (its ``per_shard``, with ``QuantConfig.data_axis``), else ``None``."""
    axis = self.config.data_axis
    if not impl.per_shard:
      return None
    mesh = jax.sharding.get_abstract_mesh()
    if axis is None:
      if not mesh.empty and mesh.size > 1:
        warnings.warn(
            f"a {impl.name!r} int8 {self.kind} traced under a mesh of {mesh.size} devices "
            f"({mesh}) without QuantConfig.data_axis: XLA cannot partition the kernels, so each "
            "device gathers and computes the whole batch. Set data_axis to the batch's "
            "mesh axis (examples.steps.shard_quantized_layers does it for a model).",
            stacklevel=2)
      return None
    if mesh.empty or axis not in mesh.axis_names:
      raise ValueError(
          f"QuantConfig(data_axis={axis!r}) needs a mesh with that axis in context: trace "
          f"the step under `with jax.set_mesh(mesh):` (mesh in context: {mesh})")
    return mesh, axis, mesh.shape[axis]

  def _local_spec(self, shards):
    n = self.spec.lhs_shape[0]
    if n % shards:
      raise ValueError(f"batch {n} is not divisible by the {shards} devices of "
                       f"data_axis={self.config.data_axis!r}")
    return dataclasses.replace(self.spec, lhs_shape=(n // shards, *self.spec.lhs_shape[1:]))

  def _batch_spec(self, axis):
    return P(axis) if self.kind == "conv" else P(None, axis)  # dense rows: (B, M, K)

  def _function(self, gemm: str):
    """The backend (checked for the platform being traced for) and its
    product ``gemm`` (``"forward"``, ``"dgrad"``, ``"wgrad"``) for this op."""
    impl = backends.get(self.backend)
    return impl, impl.function(f"{self.kind}_{gemm}")

  def _sharded(self, gemm, a, b, scale, out_dtype):
    """The product ``gemm`` on ``a, b, scale, [spec]``, per batch shard when the
    backend runs per shard (forward, input gradient)."""
    impl, fn = self._function(gemm)
    impl_kw = dict(out_dtype=out_dtype)
    dp = self._data_parallel(impl)
    if dp is None:
      extra = (self.spec,) if self.kind == "conv" else ()
      return fn(a, b, scale, *extra, **impl_kw)
    mesh, axis, shards = dp
    extra = (self._local_spec(shards),) if self.kind == "conv" else ()
    bs = self._batch_spec(axis)
    return jax.shard_map(lambda a, b, s: fn(a, b, s, *extra, **impl_kw), mesh=mesh,
                         in_specs=(bs, P(), P()), out_specs=bs)(a, b, scale)

  def forward(self, xq, wq, scale):
    return self._sharded("forward", xq, wq, scale, self.out_dtype)

  def dgrad(self, gq, wq, scale):
    return self._sharded("dgrad", gq, wq, scale, self.x_dtype)

  def wgrad_layout(self):
    """The layout the backend's conv weight gradient reads x and g in
    (:meth:`int8jax.backends.Backend.wgrad_layout`), or None: NHWC (dense ops,
    backends without one, fallbacks). Per batch shard (``data_axis``): each
    device's shard in the layout of the local conv, the shards stacked along
    the layout's first axis (a container sharded like the batch), and a
    ``run`` that sums the shards' exact halves across devices."""
    if self.kind != "conv":
      return None
    impl = backends.get(self.backend)
    dp = self._data_parallel(impl)
    if dp is None:
      return impl.wgrad_layout(self.spec)
    mesh, axis, shards = dp
    local_spec = self._local_spec(shards)
    local = impl.wgrad_layout(local_spec)
    if local is None:
      return None
    sharded = P(axis)

    def per_shard(f):
      return lambda q: jax.shard_map(f, mesh=mesh, in_specs=sharded, out_specs=sharded)(q)

    def run(xl, gl, scale, spec, *, out_dtype, halves=False):
      del spec  # the local conv's: local_spec

      def body(x, g):
        h = local.run(x, g, None, local_spec, out_dtype=out_dtype, halves=True)
        return jax.tree.map(lambda v: lax.psum(v, axis), h)

      h = jax.shard_map(body, mesh=mesh, in_specs=(sharded, sharded),
                        out_specs=(P(), P()))(xl, gl)
      return h if halves else backends.dequant(exact.join_halves(h), scale, out_dtype)

    return backends.WgradLayout(key=("per_shard", local.key, axis, shards),
                                x=per_shard(local.x), g=per_shard(local.g), run=run)

  def wgrad(self, xq, gq, scale):
    if isinstance(xq, _Laid):  # x and g in the backend's layout (see _Laid)
      return xq.layout.run(xq.value, gq, scale, self.spec, out_dtype=self.w_dtype)
    impl, fn = self._function("wgrad")
    dp = self._data_parallel(impl)
    if dp is None:
      extra = (self.spec,) if self.kind == "conv" else ()
      return fn(xq, gq, scale, *extra, out_dtype=self.w_dtype)
    # Per device: the exact integer sum over its shard as int32 halves; the
    # halves add up exactly across devices; one rounding at the end.
    mesh, axis, shards = dp
    extra = (self._local_spec(shards),) if self.kind == "conv" else ()
    bs = self._batch_spec(axis)

    def local(x, g):
      h = fn(x, g, None, *extra, halves=True)
      return jax.tree.map(lambda v: lax.psum(v, axis), h)

    halves = jax.shard_map(local, mesh=mesh, in_specs=(bs, bs), out_specs=(P(), P()))(xq, gq)
    return backends.dequant(exact.join_halves(halves), scale, self.w_dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value"],
                   meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class _Laid:
  """The int8 x kept for the weight gradient in the backend's layout
  (:class:`int8jax.backends.WgradLayout`, static): the residual carries the
  forward pass's choice to the backward pass."""
  value: jax.Array
  layout: Any


def _quantize_once(x, scale, layout=None, **kwargs):
  """``(q, q_finite, laid)``: ``x`` quantized (non-finite entries marked), whether
  it was finite, and ``layout(q)`` (None without a layout), all inside one
  ``optimization_barrier`` and all computed from the one elementwise
  quantization: XLA materialises q once, and the finiteness reduction and the
  layout's copy can be outputs of the fusion that writes q (a multi-output
  fusion reading the float tensor once) instead of passes over q of their own.
  """
  q = quant.quantize(x, scale, mark_nonfinite=True, **kwargs)
  extra = () if layout is None else (layout(q),)
  q, ok, *laid = lax.optimization_barrier((q, quant.all_finite_int8(q), *extra))
  return q, ok, (laid[0] if laid else None)


def _all_finite(x):
  # One fused float reduction (0 * inf and 0 * nan are nan); jnp.isfinite
  # followed by jnp.all materialises a boolean tensor on XLA:CPU first.
  return jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0))


def _group_max(v, groups: int):
  """``max|v|`` per feature group of the last axis, repeated per feature."""
  n = v.shape[-1]
  m = quant.absmax(v.reshape(-1, groups, n // groups), axis=(0, 2))  # (G,)
  return jnp.repeat(m, n // groups)


def _weight_quant(w, granularity: str, groups: int = 1):
  """Nearest-rounded int8 weight and its scale (fresh ``max|w|`` each step:
  one pass over a small tensor): per ``"tensor"``, per output feature
  (``"channel"``, the last axis) or per feature ``"group"`` (repeated per
  output feature). Non-finite entries are marked (:data:`quant.NONFINITE`)."""
  if granularity == "tensor":
    clip = quant.absmax(w)
  elif granularity == "channel":
    clip = quant.absmax(w, axis=tuple(range(w.ndim - 1)))
  else:
    clip = _group_max(w, groups)
  sw = quant.scale_from_clip(clip)
  return quant.quantize(w, sw, mark_nonfinite=True), sw


def _nan_unless(ok, scale):
  """``scale``, or NaN where ``ok`` is false: folded into the GEMM's dequantizing
  multiply, a non-finite operand makes the whole result NaN at no extra pass."""
  return jnp.where(ok, scale, jnp.nan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qapply(op: _Op, x, w, x_clip, grad_state, key, measure):
  out, _ = _qapply_fwd(op, x, w, x_clip, grad_state, key, measure)
  return out


def _int8_forward(op: _Op, x, wq, sw, x_clip, x_layout=None):
  """The forward GEMM on an int8 weight ``wq`` with scale(s) ``sw``:
  ``(y, x_finite, xq, sx, x_laid)`` (``x_laid``: ``x_layout(xq)``, or None).
  Shared by training (:func:`_qapply_fwd`) and the frozen inference ops, so
  both compute the same bits."""
  sx = quant.scale_from_clip(x_clip)
  # The barrier materialises the int8 tensor once: otherwise XLA fuses the
  # quantization into each consumer (the GEMM's padding, the patches of the
  # weight gradient) and keeps the float32 x alive as the residual instead.
  # The quantization itself stays in the fusion that produces x (BN + ReLU).
  xq, x_ok, x_laid = _quantize_once(x, sx, x_layout)
  ok = x_ok & quant.all_finite_int8(wq)
  y = op.forward(xq, wq, _nan_unless(ok, sx * sw))
  # Materialise the output: otherwise XLA may keep the wider int32 GEMM
  # result alive for the consumers' backward pass and redo the scaling.
  y = lax.optimization_barrier(y)
  return y, x_ok, xq, sx, x_laid


def _qapply_fwd(op: _Op, x, w, x_clip, grad_state, key, measure):
  """Returns ``(y, x_finite)`` and the residuals."""
  wg = op.config.weight_granularity
  wq, sw = _weight_quant(w, wg)
  layout = op.wgrad_layout()
  y, x_ok, xq, sx, x_laid = _int8_forward(op, x, wq, sw, x_clip,
                                          None if layout is None else layout.x)
  # The weight gradient's x: in the backend's layout when it has one (x_laid,
  # written by the quantizing fusion); xq itself is then dead after the forward GEMM.
  x_res = xq if layout is None else _Laid(x_laid, layout)
  res = (x_res, wq, sx, sw, w if wg == "channel" else None, grad_state, key, measure)
  return (y, x_ok), res


def _grad_clip(op: _Op, g, grad_state, measure):
  """``(clip, gmax, ratio)`` of the output gradient: clip per tensor (scalar)
  or per feature (per-group scales, repeated per feature)."""
  cfg = op.config
  if cfg.grad_clip == "max":
    ratio = jnp.ones((), jnp.float32)
  else:
    ratio = jnp.where(grad_state.clip_ratio > 0, grad_state.clip_ratio, 1.0)
  if op.grad_groups > 1:  # fresh per-group max on every step
    gmax = _group_max(g, op.grad_groups)
    return ratio * gmax, gmax, ratio
  if cfg.grad_clip == "max" or op.static_measure is True:
    gmax = quant.absmax(g)
    return ratio * gmax, gmax, ratio
  stored = grad_state.clip
  if op.static_measure is False and op.stored_clip_only:
    # No reduction over g: the quantization is g's only reader, so XLA fuses
    # it into the fusion that produces g. An unmeasured layer (stored == 0)
    # has no clip: its gradients become NaN (see set_measure_mode).
    return jnp.where(stored > 0, stored, jnp.nan), stored, ratio
  # Measure steps clip at the learned ratio of this step's max|g|; other
  # steps reuse the cached clip and skip the max pass. A state with no cached
  # clip (0: a layer never measured, or one in its clip warm-up, see
  # QuantConfig.clip_warmup) clips at the ratio of this step's max|g| (the
  # ratio is 1 until one is learned).
  if op.static_measure is not None:
    measure = jnp.asarray(op.static_measure)
  need_max = measure | ~(stored > 0)
  gmax = lax.cond(need_max, lambda: quant.absmax(g), lambda: jnp.zeros((), jnp.float32))
  clip = jnp.where(need_max, ratio * gmax, stored)
  return clip, gmax, ratio


def _qapply_bwd(op: _Op, res, cts):
  gy, _ = cts  # the finiteness flag has no cotangent
  xq, wq, sx, sw, w, grad_state, key, measure = res
  cfg = op.config
  g = gy.astype(jnp.float32)
  clip, gmax, ratio = _grad_clip(op, g, grad_state, measure)
  sg = quant.scale_from_clip(clip)
  stochastic = cfg.grad_rounding == "stochastic"
  # The noise is a hash of the element index, computed inside the quantizing
  # fusion (the clip search scores candidates by its exact variance instead).
  layout = xq.layout if isinstance(xq, _Laid) else None
  # One quantization pass, shared by both GEMMs (see _qapply_fwd), with the
  # finiteness reduction and the weight gradient's layout of g as outputs of
  # the same fusion (_quantize_once).
  gq, g_ok, g_laid = _quantize_once(
      g, sg, None if layout is None else layout.g, rounding=cfg.grad_rounding,
      noise=quant.uniform_noise(key, g.shape) if stochastic else None)
  # Tying x to gq keeps XLA from hoisting the weight gradient's patch building
  # (it needs only forward residuals) to the start of the backward pass, where
  # the patch matrices of every layer would be alive at once.
  xq, gq = lax.optimization_barrier((xq, gq))
  ok = g_ok & jnp.all(jnp.isfinite(clip))

  # Only what the layer's clip learner needs: the candidate search for
  # clip_method="search"; for "gradient" best_ratio 0 says "descend along
  # dlog_clip" (dsgc.update_grad_state); "max" learns nothing (ratio 1).
  search = cfg.grad_clip == "learned" and cfg.clip_method == "search"
  descent = cfg.grad_clip == "learned" and cfg.clip_method == "gradient"

  def measured():
    m = dsgc.measure_gradient(g, gq, sg, clip, gmax=gmax, ratio=ratio,
                              stochastic=stochastic, noise_weight=cfg.clip_noise_weight,
                              search=search)
    return m.replace(best_ratio=jnp.zeros((), jnp.float32)) if descent else m

  if op.static_measure is None:
    m = lax.cond(measure, measured, dsgc.GradQuantState.initial)
  elif op.static_measure:
    m = measured()
  else:
    m = dsgc.GradQuantState.initial()
  # A non-finite gradient is counted on every step; it leaves no measurement.
  m = jax.tree.map(lambda v: jnp.where(ok, v, 0.0), m)
  m = dsgc.as_cotangent(m.replace(nonfinite=jnp.where(ok, 0.0, 1.0).astype(jnp.float32)))

  groups = op.grad_groups
  if groups == 1:
    if w is not None:  # per-channel forward: the contraction over O needs one scale
      wq, sw = _weight_quant(w, "tensor")
    dx_scale, dw_scale = sg * sw, sg * sx
  else:
    # Per-group scales multiply whole independent GEMMs (one per group).
    if w is not None and op.spec.group_dims[3] > 1:  # channel scales inside a group
      wq, sw = _weight_quant(w, "group", groups)
    _, _, cg, og = op.spec.group_dims
    per_group = (sg * sw)[::og] if jnp.ndim(sw) else sg[::og] * sw
    dx_scale = jnp.repeat(per_group, cg)
    dw_scale = sg * sx
  dx = op.dgrad(gq, wq, _nan_unless(ok, dx_scale))
  dw = op.wgrad(xq, gq if g_laid is None else g_laid, _nan_unless(ok, dw_scale))
  return dx, dw, jnp.zeros_like(sx), m, None, None


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
    raise TypeError(f"config must be an int8jax.QuantConfig (or None for float where the op "
                    f"allows it), got {type(config).__name__}")


def _check_float(name, x):
  if not isinstance(x, (jax.Array, np.ndarray)) and not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype (it is quantized inside the op), "
                    f"got {x.dtype}")


def _state_inputs(x, key, grad_state, x_clip, measure, config):
  """Defaults and checks for the state arguments shared by both ops.

  Returns ``(key, grad_state, x_clip, measure, static_measure)``: a Python
  bool ``measure`` is static (no ``lax.cond``); an array is traced.
  """
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
  static = measure if isinstance(measure, (bool, np.bool_)) else None
  measure = jnp.asarray(measure)
  if measure.shape != () or measure.dtype != jnp.bool_:
    raise ValueError(f"measure must be a boolean scalar, got {measure.dtype}{list(measure.shape)}")
  return key, grad_state, x_clip, measure, None if static is None else bool(static)


def _out_dtype(lhs, preferred_element_type):
  if preferred_element_type is None:
    return jnp.dtype(lhs.dtype)
  dt = jnp.dtype(preferred_element_type)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"preferred_element_type must be a floating dtype when quantizing "
                    f"(the dequantized result), got {preferred_element_type!r}")
  if jnp.finfo(dt).bits < jnp.finfo(lhs.dtype).bits:  # as lax: never narrower
    raise TypeError(f"preferred_element_type={dt} must not be narrower than the input's "
                    f"dtype {lhs.dtype} (as in lax)")
  return dt


def _grad_groups(config: QuantConfig, spec: ConvSpec | None) -> int:
  """Number of gradient scales (see ``QuantConfig.grad_granularity``)."""
  g = 1 if spec is None else spec.feature_group_count
  if config.grad_granularity == "tensor":
    return 1
  return g  # "group": per group for grouped convs, one (the tensor) otherwise


def _status(y, ok, return_status: bool):
  return (y, ok) if return_status else y


def quant_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
    rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1, *,
    key: jax.Array | None = None, grad_state: dsgc.GradQuantState | None = None,
    x_clip: jax.Array | None = None, measure: bool | jax.Array = False,
    config: QuantConfig | None = QuantConfig(), precision=None,
    preferred_element_type=None, out_sharding=None, batch_group_count: int = 1,
    stored_clip_only: bool = False, return_status: bool = False):
  """INT8 ``lax.conv_general_dilated`` with int8 forward and backward GEMMs.

  Takes and returns the same layouts as :func:`jax.lax.conv_general_dilated`
  (any ``dimension_numbers``; Flax passes NHWC/HWIO), with ``window_strides``,
  SAME/VALID/explicit ``padding``, input and kernel dilation and
  ``feature_group_count`` (grouped and depthwise), any number of spatial dims.
  A conv with an empty operand or output is computed by lax itself (nothing
  to quantize), forward and backward.

  Args:
    lhs, rhs: float input and kernel; quantized inside (nearest rounding).
    key: PRNG key for stochastic rounding of the output gradient.
    grad_state: the layer's :class:`~int8jax.dsgc.GradQuantState` (default:
      initial state, i.e. clip at ``max|g|``). Differentiate w.r.t. it to get
      the step's measurement.
    x_clip: activation clip value (default: ``max|lhs|`` of this call).
    measure: measure the gradient's quantization (cosine distances, the clip
      search) in the backward pass. A traced boolean picks a ``lax.cond``
      branch (one compilation for all steps); a Python bool builds only that
      branch.
    config: :class:`~int8jax.QuantConfig`; ``None`` is exactly
      ``lax.conv_general_dilated`` (no quantization).
    precision, out_sharding: passed to lax when quantization is off.
    preferred_element_type: dtype of the result (default: ``lhs``'s); the
      dequantizing epilogue writes it directly.
    batch_group_count: only 1 (a clear ``ValueError`` otherwise).
    stored_clip_only: with ``measure=False`` (static), the gradient is
      quantized with the stored clip and nothing else reads it, so XLA fuses
      the quantization into the fusion that produces the gradient; a
      ``grad_state`` without a stored clip then gives NaN gradients (counted
      as non-finite). What :func:`int8jax.nn.set_measure_mode` ``"never"``
      uses.
    return_status: also return whether ``lhs`` was finite.

  Returns:
    The convolution, dtype ``preferred_element_type`` or that of ``lhs``;
    with ``return_status``, ``(y, lhs_finite)`` (a boolean scalar; ``True``
    when quantization is off) -- what :class:`int8jax.nn.QuantConv` uses to
    keep non-finite data out of its cached range and to count it.
    Cotangents have the dtypes of ``lhs`` and ``rhs``.
  """
  if config is not None:
    _check_config(config)
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  if batch_group_count != 1:
    raise ValueError(
        f"batch_group_count={batch_group_count!r} is not supported by the quantized "
        "convolution (lax uses it to express grouped weight gradients, which the op "
        "computes itself); use lax.conv_general_dilated for such a conv")
  spec = make_conv_spec(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                        rhs_dilation, dimension_numbers, feature_group_count)
  if config is None or 0 in lhs.shape or 0 in rhs.shape or 0 in spec.out_shape:
    # Off, or nothing to multiply (an empty operand or output): exactly lax,
    # which returns an empty array or the all-zero conv of the padding.
    kw = _lax_kwargs(preferred_element_type, out_sharding)
    y = lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                 rhs_dilation, dimension_numbers, feature_group_count,
                                 precision=precision, **kw)
    return _status(y, jnp.ones((), jnp.bool_), return_status)
  key, grad_state, x_clip, measure, static = _state_inputs(lhs, key, grad_state, x_clip,
                                                           measure, config)
  op = _Op("conv", spec, config, backends.resolve(config.backend), jnp.dtype(lhs.dtype),
           jnp.dtype(rhs.dtype), _out_dtype(lhs, preferred_element_type),
           _grad_groups(config, spec), static, bool(stored_clip_only))
  x = jnp.transpose(lhs, spec.lhs_perm)
  w = jnp.transpose(rhs, spec.rhs_perm)
  y, ok = _qapply(op, x, w, x_clip, grad_state, key, measure)
  return _status(jnp.transpose(y, spec.out_perm), ok, return_status)


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


def _dense_canonical(lhs, rhs, dimension_numbers):
  """Checks a dot_general's operands; returns ``(canon, out_shape, (B, M, N, K))``:
  ``canon(lhs, rhs)`` gives them as ``(B, M, K)`` and ``(B, K, N)``, and the
  ``(B, M, N)`` result reshapes to ``out_shape``."""
  lc, rc, lb, rb, lf, rf = _dense_perms(lhs.ndim, rhs.ndim, dimension_numbers)
  for a, b in zip(lc + lb, rc + rb):
    if lhs.shape[a] != rhs.shape[b]:
      raise ValueError(f"lhs dim {a} (size {lhs.shape[a]}) and rhs dim {b} (size "
                       f"{rhs.shape[b]}) must match (dimension_numbers={dimension_numbers!r})")
  bshape = tuple(lhs.shape[a] for a in lb)
  lfs = tuple(lhs.shape[a] for a in lf)
  rfs = tuple(rhs.shape[a] for a in rf)
  b, m, n = math.prod(bshape), math.prod(lfs), math.prod(rfs)
  k = math.prod(lhs.shape[a] for a in lc)

  def canon(x, w):
    return (jnp.transpose(x, lb + lf + lc).reshape(b, m, k),
            jnp.transpose(w, rb + rc + rf).reshape(b, k, n))

  return canon, bshape + lfs + rfs, (b, m, n, k)


def quant_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None, *, key: jax.Array | None = None,
                      grad_state: dsgc.GradQuantState | None = None,
                      x_clip: jax.Array | None = None, measure: bool | jax.Array = False,
                      config: QuantConfig | None = QuantConfig(), out_sharding=None,
                      stored_clip_only: bool = False, return_status: bool = False):
  """INT8 ``lax.dot_general`` with int8 forward and backward GEMMs.

  Same arguments and output layout as :func:`jax.lax.dot_general` (batch dims,
  then ``lhs`` free dims, then ``rhs`` free dims); ``rhs`` is the weight, its
  free dims are the output features (the per-channel scale axis). State
  arguments, ``config=None``, ``preferred_element_type``, ``stored_clip_only``
  and ``return_status`` as in :func:`quant_conv_general_dilated`; gradients
  are quantized per tensor.
  """
  if config is not None:
    _check_config(config)
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  canon, out_shape, sizes = _dense_canonical(lhs, rhs, dimension_numbers)
  if config is None or 0 in sizes:
    kw = _lax_kwargs(preferred_element_type, out_sharding)
    y = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kw)
    return _status(y, jnp.ones((), jnp.bool_), return_status)
  key, grad_state, x_clip, measure, static = _state_inputs(lhs, key, grad_state, x_clip,
                                                           measure, config)
  x, w = canon(lhs, rhs)
  op = _Op("dense", None, config, backends.resolve(config.backend), jnp.dtype(lhs.dtype),
           jnp.dtype(rhs.dtype), _out_dtype(lhs, preferred_element_type), 1, static,
           bool(stored_clip_only))
  y, ok = _qapply(op, x, w, x_clip, grad_state, key, measure)
  return _status(y.reshape(out_shape), ok, return_status)


def _conv_transpose_padding(k: int, s: int, padding) -> tuple[int, int]:
  """Before/after padding of one dim of a transposed conv, as
  ``lax.conv_transpose`` computes it (keras Conv2DTranspose conventions)."""
  if padding == "SAME":
    pad_len = k + s - 2
    pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
  elif padding == "VALID":
    pad_len = k + s - 2 + max(k - s, 0)
    pad_a = k - 1
  else:
    raise ValueError(f"padding must be 'SAME', 'VALID' or (lo, hi) pairs, got {padding!r}")
  return pad_a, pad_len - pad_a


def conv_transpose_as_conv(lhs_shape, rhs, strides, padding, rhs_dilation=None,
                           dimension_numbers=None, transpose_kernel: bool = False):
  """``lax.conv_transpose``'s arguments as a ``conv_general_dilated``'s:
  ``(rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers)`` (the
  kernel flipped and its channel axes swapped with ``transpose_kernel``).
  Shared by :class:`int8jax.nn.QuantConvTranspose` and its frozen copy."""
  if len(lhs_shape) != rhs.ndim or rhs.ndim < 3:
    raise ValueError(f"lhs and rhs must have the same rank >= 3, got shapes {tuple(lhs_shape)} "
                     f"and {rhs.shape}")
  n = rhs.ndim - 2
  if dimension_numbers is None:
    chans = "HWD"[:n] if n <= 3 else None
    if chans is None:
      raise ValueError(f"no default dimension_numbers for {n} spatial dims; pass them")
    dimension_numbers = (f"N{chans}C", f"{chans}IO", f"N{chans}C")
  dn = lax.conv_dimension_numbers(tuple(lhs_shape), rhs.shape, dimension_numbers)
  k_sdims = np.take(rhs.shape, dn.rhs_spec)[2:]
  rd = (1,) * n if rhs_dilation is None else tuple(rhs_dilation)
  strides = tuple(strides)
  if isinstance(padding, str):
    eff = [(k - 1) * r + 1 for k, r in zip(k_sdims, rd)]
    pads = tuple(_conv_transpose_padding(int(k), s, padding.upper()) for k, s in zip(eff, strides))
  else:
    pads = padding
  if transpose_kernel:  # flip spatial dims and swap input / output channel axes
    rhs = jnp.flip(rhs, axis=tuple(dn.rhs_spec[2:]))
    rhs = jnp.swapaxes(rhs, dn.rhs_spec[0], dn.rhs_spec[1])
  return rhs, pads, strides, rd, dn


# ---------------------------------------------------------------------------
# Inference on frozen weights (int8jax.nn.freeze): the forward GEMM alone,
# on a weight quantized once, with a stored activation clip.


def quantize_weight(w: jax.Array, granularity: str = "tensor") -> tuple[jax.Array, jax.Array]:
  """The int8 weight and its scale(s) that the forward GEMM of a quantized
  layer uses for the float weight ``w``: per ``"tensor"`` (a scalar scale) or
  per ``"channel"`` (one scale per output feature, the last axis).
  Non-finite entries come out as :data:`int8jax.quant.NONFINITE`."""
  if granularity not in ("tensor", "channel"):
    raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
  _check_float("w", w)
  return _weight_quant(w, granularity)


def _frozen_inputs(lhs, wq, w_scale, x_clip, config, out_features):
  _check_config(config)
  _check_float("lhs", lhs)
  if getattr(wq, "dtype", None) != jnp.int8:
    raise TypeError(f"wq must be an int8 array (from quantize_weight), got "
                    f"{getattr(wq, 'dtype', type(wq).__name__)}")
  w_scale = jnp.asarray(w_scale, jnp.float32)
  if w_scale.shape not in ((), (out_features,)):
    raise ValueError(f"w_scale must be a scalar or have shape ({out_features},) (one per "
                     f"output feature), got shape {w_scale.shape}")
  x_clip = jnp.asarray(x_clip, jnp.float32)
  if x_clip.shape != ():
    raise ValueError(f"x_clip must be a scalar, got shape {x_clip.shape}")
  return w_scale, x_clip


def frozen_conv_general_dilated(lhs: jax.Array, wq: jax.Array, w_scale: jax.Array,
                                window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                dimension_numbers=None, feature_group_count: int = 1, *,
                                x_clip: jax.Array, config: QuantConfig = QuantConfig(),
                                preferred_element_type=None) -> jax.Array:
  """The forward pass of :func:`quant_conv_general_dilated` on an already
  quantized weight (``wq, w_scale = quantize_weight(rhs, granularity)``) with
  the activation clip ``x_clip`` (a layer's cached range): the same int8 GEMM,
  scales and dequantization, so the same bits. No gradient."""
  spec = make_conv_spec(lhs.shape, wq.shape, window_strides, padding, lhs_dilation,
                        rhs_dilation, dimension_numbers, feature_group_count)
  w_scale, x_clip = _frozen_inputs(lhs, wq, w_scale, x_clip, config, spec.out_features)
  if 0 in lhs.shape or 0 in wq.shape or 0 in spec.out_shape:
    return lax.conv_general_dilated(lhs, wq.astype(lhs.dtype), window_strides, padding,
                                    lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count)
  op = _Op("conv", spec, config, backends.resolve(config.backend), jnp.dtype(lhs.dtype),
           jnp.dtype(lhs.dtype), _out_dtype(lhs, preferred_element_type), 1, False)
  x = jnp.transpose(lhs, spec.lhs_perm)
  w = jnp.transpose(wq, spec.rhs_perm)
  y, *_ = _int8_forward(op, x, w, w_scale, x_clip)
  return jnp.transpose(y, spec.out_perm)


def frozen_dot_general(lhs: jax.Array, wq: jax.Array, w_scale: jax.Array, dimension_numbers,
                       *, x_clip: jax.Array, config: QuantConfig = QuantConfig(),
                       preferred_element_type=None) -> jax.Array:
  """:func:`frozen_conv_general_dilated` for :func:`quant_dot_general`."""
  canon, out_shape, sizes = _dense_canonical(lhs, wq, dimension_numbers)
  w_scale, x_clip = _frozen_inputs(lhs, wq, w_scale, x_clip, config, sizes[2])
  if 0 in sizes:
    return lax.dot_general(lhs, wq.astype(lhs.dtype), dimension_numbers)
  x, w = canon(lhs, wq)
  op = _Op("dense", None, config, backends.resolve(config.backend), jnp.dtype(lhs.dtype),
           jnp.dtype(lhs.dtype), _out_dtype(lhs, preferred_element_type), 1, False)
  y, *_ = _int8_forward(op, x, w, w_scale, x_clip)
  return y.reshape(out_shape)
