"""Flax NNX layers with INT8 forward and backward GEMMs: QuantConv, QuantDense.

Both are drop-in subclasses of their Flax twins (``nnx.Conv``, ``nnx.Linear``):
same constructor arguments, layouts (NHWC inputs, HWIO kernels), parameter
initialisation and names, plus ``config: QuantConfig | None`` (the
quantization config). With ``config=None`` they compute exactly what the
Flax layer computes (the quantization state is still created, so setting
``layer.config`` switches a model without changing its state tree).

Quantization state (not ``nnx.Param``, so optimizers and filters tell them
apart, like BatchNorm's ``BatchStat``):

* :class:`ActRange` — cached activation clip value ``max|x|``, written in
  the forward pass on measure steps;
* :class:`GradQuant` — the type of the layer's ``grad_quant`` variable: its
  gradient-quantization state, a :class:`int8jax.dsgc.GradQuantState`
  (learned clip, latest cosine distance, ...) packed into one float32 vector
  (``.state`` unpacks it; :func:`grad_quant_stats` gives every layer's). It is
  differentiable: its gradient is the backward pass's measurement, which
  :func:`int8jax.optim.ui8` turns into the state update. Include it in
  ``nnx.grad`` / ``nnx.Optimizer`` with the filter :data:`TRAINABLE`;
* :class:`QuantCounter` — the layer's call count (selects measure steps) and
  the count of measure steps skipped for non-finite activations.

Periodic update (§4.3 of the paper): a layer measures on its calls number
0, ``period``, ``2 * period``, ... in training mode, and by default
(``QuantConfig.measure_early``) also on calls 1, 2, 4, 8, ... below
``period``. ``measure`` is a traced value (:func:`measure_step`) that picks a
``lax.cond`` branch, so the
compiled step is the same on every step and the extra passes (activation
``max|x|``, cosine distance, clip gradient) run only on measure steps. With
``QuantConfig.clip_warmup`` (default) the first ``period`` calls also clip
the gradient at the learned ratio of each step's ``max|g|`` (a reduction
over ``g``, selected by the same kind of traced flag). A
training loop needs to do nothing; ``int8jax.nn.set_call_count(model, n)``
re-aligns the counters (e.g. ``0`` to force a measurement on the next call),
and ``model.eval()`` stops counting and measuring.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding
from jax import lax

from int8jax import quant
from int8jax.config import QuantConfig
from int8jax.dsgc import GradQuantState
from int8jax.ops import conv_transpose_as_conv, quant_conv_general_dilated, quant_dot_general


class ActRange(nnx.Variable):
  """Cached activation clip value (float32 scalar; 0 = not measured yet)."""


class GradQuant(nnx.Variable):
  """The type of a quantized layer's ``grad_quant`` variable: its
  :class:`int8jax.dsgc.GradQuantState` packed into one float32 vector
  (:meth:`~int8jax.dsgc.GradQuantState.pack`; read it with :attr:`state`).
  Checkpoints store the attribute name ``grad_quant`` and the packed vector
  (field order), not this class's or the fields' names.

  Packed because its gradient is the backward pass's measurement and it
  travels through optax: a plain array leaf survives every optimizer-state
  round trip (``optax.MultiSteps``' accumulators, NNX's ``Optimizer``), where
  a dataclass node would be turned into an ``nnx.State`` mapping. It is
  unpacked once per call (the layer hands the op a ``GradQuantState``) and
  once per update (:mod:`int8jax.optim`).
  """

  @property
  def state(self) -> GradQuantState:
    return GradQuantState.unpack(self[...])


class QuantCounter(nnx.Variable):
  """Integer counters of a quantized layer (calls; non-finite activations)."""


#: Filter of everything a UI8 optimizer updates: weights and gradient state.
TRAINABLE = nnx.Any(nnx.Param, GradQuant)


#: What a quantized layer's ``measure_mode`` may be (see :func:`set_measure_mode`).
MEASURE_MODES = ("periodic", "always", "never")


def measure_step(count: jax.Array, period: int, early: bool = False) -> jax.Array:
  """Whether a layer measures on its call number ``count`` (traced bool):
  ``count % period == 0``, and with ``early`` also ``count`` a power of two
  below ``period`` (``QuantConfig.measure_early``). Traced, so one compiled
  step serves measuring and non-measuring calls."""
  periodic = (count % period) == 0
  if not early:
    return periodic
  return periodic | ((count < period) & ((count & (count - 1)) == 0))


class _QuantMixin:
  """State and per-call inputs shared by QuantConv and QuantDense."""

  def _init_quant(self, config, rng_collection, deterministic, rngs):
    if config is not None and not isinstance(config, QuantConfig):
      raise TypeError(f"config must be an int8jax.QuantConfig or None, "
                      f"got {type(config).__name__}")
    self.config = config
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    self.measure_mode = "periodic"
    self.reset_quant_state(rngs)

  def reset_quant_state(self, rngs: nnx.Rngs) -> None:
    """(Re)sets the quantization state to that of a new layer: no activation
    range measured, the initial gradient state, counters 0, and a stochastic-
    rounding stream forked from ``rngs[rng_collection]``. For a layer built
    under ``nnx.eval_shape`` (its state abstract) that is not restored from a
    checkpoint."""
    self.act_range = ActRange(jnp.zeros((), jnp.float32))
    self.grad_quant = GradQuant(GradQuantState.initial().pack())
    self.call_count = QuantCounter(jnp.zeros((), jnp.int32))
    self.act_nonfinite = QuantCounter(jnp.zeros((), jnp.int32))
    self.quant_rngs = rngs[self.rng_collection].fork()

  def _check_concrete(self):
    state = nnx.state(self, nnx.Any(ActRange, GradQuant, QuantCounter, nnx.RngState))
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(state)):
      raise ValueError(
          f"{type(self).__name__}: its quantization state (act_range, grad_quant, counters, "
          "quant_rngs) is abstract -- the layer was built under nnx.eval_shape. Restore it "
          "from a checkpoint, or call layer.reset_quant_state(nnx.Rngs(seed)) for a new "
          "layer's state, before calling the layer")

  @property
  def quantized(self) -> bool:
    return self.config is not None

  def _quant_call(self, op, x, *args, **kwargs):
    """Runs the quantized ``op`` on ``x`` (with ``return_status=True``);
    updates the counters and the cached activation range."""
    self._check_concrete()
    cfg = self.config
    cached = self.act_range[...]
    warmup = False
    if self.deterministic:
      measure = False
      need = cached <= 0
    else:
      count = self.call_count[...]
      self.call_count[...] = count + 1
      if self.measure_mode == "periodic":
        measure = measure_step(count, cfg.period, cfg.measure_early)  # traced
        need = measure | (cached <= 0)
        warmup = cfg.clip_warmup and cfg.period > 1
      else:
        measure = self.measure_mode == "always"
        need = measure | (cached <= 0)
    # The clip is state, not a function of x to differentiate: without the
    # stop_gradient JAX keeps max|x|'s JVP residuals (a mask and a sign the
    # size of x, materialised on the non-measuring branch too) and runs their
    # transpose in the backward pass, only to multiply a zero cotangent.
    fresh = lax.cond(need, lambda: quant.absmax(lax.stop_gradient(x)), lambda: cached)
    if self.deterministic or cfg.grad_rounding == "nearest":
      key = jax.random.key(0)
    else:
      key = self.quant_rngs()
    grad_state = self.grad_quant.state
    if warmup:  # no cached clip: the op clips at the ratio of each step's max|g|
      grad_state = grad_state.replace(clip=jnp.where(count < cfg.period, 0.0, grad_state.clip))
    y, x_finite = op(x, *args, key=key, grad_state=grad_state,
                     x_clip=fresh, measure=measure, config=cfg,
                     stored_clip_only=self.measure_mode == "never", return_status=True,
                     **kwargs)
    if not self.deterministic:
      # Non-finite data never reaches the cached range (max|x| itself may
      # come out finite for a NaN tensor: XLA can compile max without NaN
      # propagation), and is counted on every step it occurs.
      self.act_range[...] = jnp.where(x_finite, fresh, cached)
      self.act_nonfinite[...] += jnp.where(x_finite, 0, 1).astype(jnp.int32)
    return y


class QuantConv(_QuantMixin, nnx.Conv):
  """``nnx.Conv`` whose forward, input-gradient and weight-gradient run in INT8.

  Args: those of :class:`flax.nnx.Conv`, plus

    config: :class:`int8jax.QuantConfig` (default: UI8, best available backend);
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
               config: QuantConfig | None = QuantConfig(),
               deterministic: bool = False,
               rng_collection: str = "quant", rngs: nnx.Rngs, **conv_kwargs):
    if "conv_general_dilated" in conv_kwargs:
      raise TypeError("QuantConv does not take conv_general_dilated=: it provides its own")
    super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs,
                     **conv_kwargs)
    del self.conv_general_dilated  # nnx.Conv.__call__ now finds the method below
    self._init_quant(config, rng_collection, deterministic, rngs)

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, precision=None, **kwargs):
    if not self.quantized:
      return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision, **kwargs)
    return self._quant_call(quant_conv_general_dilated, lhs, rhs, window_strides,
                            padding, lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count, **kwargs)


class QuantDense(_QuantMixin, nnx.Linear):
  """``nnx.Linear`` whose three GEMMs run in INT8 (arguments as :class:`QuantConv`).

  Example:
    >>> from flax import nnx
    >>> from int8jax.nn import QuantDense
    >>> QuantDense(4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
    (2, 3)
  """

  def __init__(self, in_features: int, out_features: int, *,
               config: QuantConfig | None = QuantConfig(),
               deterministic: bool = False,
               rng_collection: str = "quant", rngs: nnx.Rngs, **linear_kwargs):
    if "dot_general" in linear_kwargs:
      raise TypeError("QuantDense does not take dot_general=: it provides its own")
    super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
    del self.dot_general
    self._init_quant(config, rng_collection, deterministic, rngs)

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, **kwargs):
    if not self.quantized:
      return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    return self._quant_call(quant_dot_general, lhs, rhs, dimension_numbers,
                            **kwargs)


class QuantConvTranspose(_QuantMixin, nnx.ConvTranspose):
  """``nnx.ConvTranspose`` whose three GEMMs run in INT8 (arguments as
  :class:`QuantConv`): the same constructor, kernel layout, padding rules
  (``lax.conv_transpose``'s, ``CIRCULAR`` included) and ``transpose_kernel``.

  Example:
    >>> from flax import nnx
    >>> from int8jax.nn import QuantConvTranspose
    >>> QuantConvTranspose(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 3))).shape
    (1, 10, 10, 4)
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=None, *,
               config: QuantConfig | None = QuantConfig(),
               deterministic: bool = False,
               rng_collection: str = "quant", rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
    self._init_quant(config, rng_collection, deterministic, rngs)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self.quantized:
      return super().__call__(inputs)
    kernel = self.kernel[...]
    if self.mask is not None:
      if self.mask.shape != self.kernel_shape:
        raise ValueError(f"Mask needs to have the same shape as weights. Shapes are: "
                         f"{self.mask.shape}, {self.kernel_shape}")
      kernel = kernel * self.mask

    def gemm(x, k, strides, padding, dilation):
      k, pads, lhs_dilation, rd, dn = conv_transpose_as_conv(
          x.shape, k, strides, padding, dilation, None, self.transpose_kernel)
      return self._quant_call(quant_conv_general_dilated, x, k, (1,) * (x.ndim - 2), pads,
                              lhs_dilation, rd, dn, precision=self.precision,
                              preferred_element_type=self.preferred_element_type)

    return conv_transpose_call(self, inputs, kernel, gemm)


def conv_transpose_call(layer: nnx.ConvTranspose, inputs: jax.Array, kernel, gemm) -> jax.Array:
  """``nnx.ConvTranspose.__call__``'s work around its GEMM, for a layer whose
  GEMM is int8: batch reshapes, dtype promotion, ``CIRCULAR`` padding, bias.

  ``gemm(inputs, kernel, strides, padding, kernel_dilation)`` computes the
  transposed conv (``padding`` never ``CIRCULAR``). ``kernel=None``: the GEMM
  holds its own weight (a frozen layer) and only ``inputs`` and the bias are
  promoted.
  """
  n = len(layer.kernel_size)
  bcast = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))
  num_batch = inputs.ndim - (n + 1)
  batch_shape = inputs.shape[:num_batch]
  if num_batch != 1:
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch:])
  strides, kernel_dilation = bcast(layer.strides), bcast(layer.kernel_dilation)
  padding = canonicalize_padding(layer.padding, n)
  bias = layer.bias[...] if layer.bias is not None else None
  if kernel is None:
    inputs, bias = layer.promote_dtype((inputs, bias), dtype=layer.dtype)
  else:
    inputs, kernel, bias = layer.promote_dtype((inputs, kernel, bias), dtype=layer.dtype)
  y = gemm(inputs, kernel, strides, "VALID" if padding == "CIRCULAR" else padding,
           kernel_dilation)
  if layer.padding == "CIRCULAR":
    y = _wrap_circular(y, inputs.shape[1:-1], strides, layer.transpose_kernel)
  if layer.use_bias:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  if num_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


def _wrap_circular(y, in_spatial, strides, transpose_kernel):
  """``nnx.ConvTranspose``'s CIRCULAR padding: pad the VALID result to whole
  periods (input size x stride) and wrap it around each spatial dimension."""
  periods = [d * s for d, s in zip(in_spatial, strides)]
  diffs = [-(yd - p) % (2 * p) for yd, p in zip(y.shape[1:-1], periods)]
  if transpose_kernel:
    pads = [(d // 2, (d + 1) // 2) for d in diffs]
  else:
    pads = [((d + 1) // 2, d // 2) for d in diffs]
  y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
  for i in range(1, y.ndim - 1):
    y = y.reshape(y.shape[:i] + (-1, periods[i - 1]) + y.shape[i + 1:]).sum(axis=i)
  return y


def quant_layers(model: nnx.Module):
  """``(path, layer)`` for every quantized layer (QuantConv, QuantConvTranspose,
  QuantDense) in ``model``."""
  return [(path, m) for path, m in nnx.iter_graph(model)
          if isinstance(m, (QuantConv, QuantConvTranspose, QuantDense))]


def grad_quant_stats(model: nnx.Module) -> dict[str, GradQuantState]:
  """Per quantized layer (``"a/b/c"`` path): its gradient-quantization state
  (the ``grad_quant`` variable, unpacked).

  The fields give what the paper plots: ``distance`` (the paper's cosine
  distance d of the whole gradient; ``channel_distance_mean`` / ``_max`` /
  ``_median`` over its channels), ``clip`` next to ``grad_absmax``,
  ``clipped_fraction``; the LR coefficient is
  ``int8jax.lr_coefficient(state.distance)`` (with the default
  :func:`int8jax.optim.lr_distance`).
  """
  return {"/".join(str(p) for p in path): m.grad_quant.state
          for path, m in quant_layers(model) if m.quantized}


def quant_stats(model: nnx.Module) -> dict[str, GradQuantState]:
  """Deprecated name of :func:`grad_quant_stats`."""
  warnings.warn("int8jax.nn.quant_stats is deprecated: use int8jax.nn.grad_quant_stats",
                DeprecationWarning, stacklevel=2)
  return grad_quant_stats(model)


def set_measure_mode(model: nnx.Module, mode: str) -> None:
  """How every quantized layer of ``model`` selects measure steps.

  * ``"periodic"`` (the default): on calls 0, ``period``, ``2 period``, ...
    of the layer (and 1, 2, 4, ... below ``period`` with
    ``QuantConfig.measure_early``), chosen by a traced flag (``lax.cond``) -- one compiled
    step serves every step;
  * ``"always"`` / ``"never"``: every call measures / none does, with no
    ``lax.cond``. A loop that compiles two steps -- one on a model in
    ``"always"`` mode for its measure steps, one in ``"never"`` mode for the
    others -- gets the non-measuring step without any reader of the float
    gradient but its quantization, which XLA then fuses into the fusion that
    produces the gradient (BatchNorm/ReLU backward): the int8 operand is
    written once and the float gradient never goes to memory. Run a
    measuring step before the first ``"never"`` step: a layer with no
    stored clip gives NaN gradients there (counted in
    ``GradQuantState.nonfinite``).

  The mode is a static attribute: it is part of ``nnx.split``'s graph
  definition, so set it before splitting / jitting.
  """
  if mode not in MEASURE_MODES:
    raise ValueError(f"mode must be one of {MEASURE_MODES}, got {mode!r}")
  for _, m in quant_layers(model):
    m.measure_mode = mode


def set_call_count(model: nnx.Module, count: int = 0) -> None:
  """Set every quantized layer's call counter (``0``: measure on the next call)."""
  for _, m in quant_layers(model):
    m.call_count[...] = jnp.asarray(count, jnp.int32)
