"""Inference-only copies of UI8-trained models: int8 weights, trained ranges.

A model trained with UI8 already runs its forward pass in int8, with the
activation clip values it measured during training (``ActRange``). In eval
mode those ranges are fixed, so the model can be served in int8 with no
calibration: :func:`freeze` returns a copy in which every quantized layer
holds its weight *already quantized* (int8 codes plus the scale, per tensor
or per output channel as trained) and its cached activation range, and runs
only the forward int8 GEMM -- the library's own forward
(:func:`int8jax.ops.frozen_conv_general_dilated`), so its outputs are the
trained model's ``model.eval()`` outputs, bit for bit (tests/test_freeze.py).

What the copy keeps and drops:

* ``QuantConv`` / ``QuantConvTranspose`` / ``QuantDense`` become
  :class:`FrozenConv` / :class:`FrozenConvTranspose` / :class:`FrozenDense`:
  ``kernel`` is a :class:`QuantizedWeight` (int8),
  ``kernel_scale`` its float32 scale(s), ``act_range`` the cached range; no
  gradient-quantization state, counters or RNG streams. One with
  quantization off becomes the plain ``nnx.Conv`` / ``nnx.Linear`` it computes.
* Every remaining ``nnx.Param`` (float layers the paper keeps float -- the
  first conv and the classifier --, biases, BatchNorm scale and offset)
  becomes a :class:`FrozenParam`: nothing in the copy is an optimizer's
  ``nnx.Param``.
* BatchNorm stays a separate layer in eval mode (running statistics), *not*
  folded into the conv's dequantization scale: folding changes the float
  rounding of every output (a different order of multiplies), and
  bit-identity with the trained model was chosen over the saving (one
  multiply-add per output element).

:func:`export_serving` turns a frozen model's forward pass into a
``jax.export.Exported`` with a symbolic batch dimension, whose
``serialize()`` bytes a process with only ``jax`` installed can run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from int8jax import ops, quant
from int8jax.nn.convert import _constructor_kwargs, _set_child, _walk
from int8jax.nn.layers import (ActRange, QuantConv, QuantConvTranspose, QuantDense,
                               conv_transpose_call)

__all__ = ["FrozenConv", "FrozenConvTranspose", "FrozenDense", "FrozenParam", "QuantizedWeight",
           "freeze", "export_serving"]


class QuantizedWeight(nnx.Variable):
  """A frozen layer's int8 weight codes and their float32 scale(s)."""


class FrozenParam(nnx.Variable):
  """A float parameter of a frozen model (not an ``nnx.Param``: nothing trains it)."""


class _FrozenMixin:
  """State shared by the frozen layers (set by their constructors)."""

  def _set_frozen(self, layer, path: str, as_conv=None):
    kernel = layer.kernel[...]
    if getattr(layer, "mask", None) is not None:  # the trained forward quantizes kernel * mask
      kernel = kernel * layer.mask
      self.mask = None
    if as_conv is not None:  # the kernel as the trained GEMM sees it
      kernel = as_conv(kernel)
    wq, scale = ops.quantize_weight(kernel, layer.config.weight_granularity)
    if not bool(quant.all_finite_int8(wq)):
      raise ValueError(f"freeze: layer {path!r} has non-finite weights")
    self.kernel = QuantizedWeight(wq)
    self.kernel_scale = QuantizedWeight(scale)
    self.act_range = ActRange(jnp.asarray(layer.act_range[...], jnp.float32))
    if layer.bias is not None:
      self.bias = FrozenParam(layer.bias[...])
    self.config = layer.config

  def _frozen_args(self):
    return dict(x_clip=self.act_range[...], config=self.config)


class FrozenConv(_FrozenMixin, nnx.Conv):
  """Inference-only :class:`~int8jax.nn.QuantConv`: int8 ``kernel``, its
  ``kernel_scale`` and the trained ``act_range``. Built by :func:`freeze`.

  ``nnx.Conv.__call__`` does the padding, batch reshapes and bias; it hands
  the GEMM a float copy of the int8 kernel (its dtype promotion), which is
  ignored: the int8 kernel itself goes to the int8 GEMM.
  """

  def __init__(self, layer: QuantConv, path: str):
    super().__init__(**_constructor_kwargs(layer, nnx.Conv), rngs=nnx.Rngs(0))
    del self.conv_general_dilated  # nnx.Conv.__call__ now finds the method below
    self._set_frozen(layer, path)

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, precision=None,
                           preferred_element_type=None, out_sharding=None):
    del rhs, precision, out_sharding  # the int8 kernel is used; see the class doc
    return ops.frozen_conv_general_dilated(
        lhs, self.kernel[...], self.kernel_scale[...], window_strides, padding,
        lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
        preferred_element_type=preferred_element_type, **self._frozen_args())


class FrozenDense(_FrozenMixin, nnx.Linear):
  """Inference-only :class:`~int8jax.nn.QuantDense` (see :class:`FrozenConv`)."""

  def __init__(self, layer: QuantDense, path: str):
    super().__init__(**_constructor_kwargs(layer, nnx.Linear), rngs=nnx.Rngs(0))
    del self.dot_general
    self._set_frozen(layer, path)

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
    del rhs, precision, out_sharding
    return ops.frozen_dot_general(lhs, self.kernel[...], self.kernel_scale[...],
                                  dimension_numbers, preferred_element_type=preferred_element_type,
                                  **self._frozen_args())


class FrozenConvTranspose(_FrozenMixin, nnx.ConvTranspose):
  """Inference-only :class:`~int8jax.nn.QuantConvTranspose` (see
  :class:`FrozenConv`). ``kernel`` holds the int8 weight in the layout of the
  convolution the transposed conv runs as (``transpose_kernel``: flipped, its
  channel axes swapped), quantized there as training quantizes it."""

  def __init__(self, layer: QuantConvTranspose, path: str):
    super().__init__(**_constructor_kwargs(layer, nnx.ConvTranspose), rngs=nnx.Rngs(0))
    n = len(layer.kernel_size)
    self._set_frozen(layer, path, as_conv=lambda k: ops.conv_transpose_as_conv(
        (1,) * (n + 2), k, (1,) * n, "VALID", transpose_kernel=layer.transpose_kernel)[0])

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return conv_transpose_call(self, inputs, None, self._gemm)

  def _gemm(self, inputs, _, strides, padding, kernel_dilation):
    wq = self.kernel[...]
    n = len(self.kernel_size)
    _, pads, lhs_dilation, rd, dn = ops.conv_transpose_as_conv(
        inputs.shape, wq, strides, padding, kernel_dilation)
    return ops.frozen_conv_general_dilated(
        inputs, wq, self.kernel_scale[...], (1,) * n, pads, lhs_dilation, rd, dn,
        preferred_element_type=self.preferred_element_type, **self._frozen_args())


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _check_layer(path: str, layer) -> None:
  r = float(np.asarray(layer.act_range[...]))
  if not (np.isfinite(r) and r > 0):
    raise ValueError(
        f"freeze: layer {path!r} has no activation range (act_range={r}): it was never "
        "measured. Run the model in training mode on data at least once (a training step) "
        "before freezing it")


def freeze(model: nnx.Module) -> nnx.Module:
  """An inference-only copy of the UI8-trained ``model`` (``model`` is unchanged).

  Every quantized ``QuantConv`` / ``QuantConvTranspose`` / ``QuantDense``
  becomes a :class:`FrozenConv` / :class:`FrozenConvTranspose` /
  :class:`FrozenDense` holding its int8 weight, its
  weight scale(s) and its cached activation range; every other ``nnx.Param``
  becomes a :class:`FrozenParam`; the copy is in eval mode (BatchNorm on its
  running statistics, kept as its own layer). Its outputs equal the trained
  model's ``model.eval()`` outputs bit for bit (same backend, same program
  shape: compare jitted against jitted).

  Raises:
    ValueError: ``model`` has no quantized layer (a float model: nothing to
      freeze), or a quantized layer (named by its path) has no activation
      range yet or non-finite weights.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"freeze: model must be an nnx.Module, got {type(model).__name__}")
  quantized = [(path, m) for path, _, _, m in _walk(model)
               if isinstance(m, (QuantConv, QuantDense, QuantConvTranspose)) and m.quantized]
  if not quantized:
    raise ValueError(
        f"freeze: {type(model).__name__} has no quantized layer (QuantConv / QuantDense with "
        "quantization enabled): a float model has no int8 program to freeze. Quantize it "
        "with int8jax.nn.quantize_model and train it, or export its float forward directly")
  for path, m in quantized:
    _check_layer(_path_str(path), m)
  frozen = nnx.clone(model)
  for path, parent, key, m in list(_walk(frozen)):
    if isinstance(m, (QuantConv, QuantDense, QuantConvTranspose)):
      if m.quantized:
        cls = (FrozenConv if isinstance(m, QuantConv) else
               FrozenConvTranspose if isinstance(m, QuantConvTranspose) else FrozenDense)
        _set_child(parent, key, cls(m, _path_str(path)))
      else:  # quantization off: the float Flax layer it computes exactly
        _set_child(parent, key, _as_float_layer(m))
  _params_to_frozen(frozen)
  frozen.eval()
  return frozen


def _as_float_layer(layer):
  """The ``nnx.Conv`` / ``nnx.ConvTranspose`` / ``nnx.Linear`` a quantized
  layer with quantization off computes, with its kernel and bias (no
  quantization state)."""
  cls = (nnx.Conv if isinstance(layer, QuantConv) else
         nnx.ConvTranspose if isinstance(layer, QuantConvTranspose) else nnx.Linear)
  new = cls(**_constructor_kwargs(layer, cls), rngs=nnx.Rngs(0))
  new.kernel, new.bias = layer.kernel, layer.bias
  return new


def _params_to_frozen(model: nnx.Module) -> None:
  """Replaces every ``nnx.Param`` attribute by a :class:`FrozenParam` (one
  per shared variable)."""
  done: dict[int, FrozenParam] = {}
  for _, m in nnx.iter_graph(model):
    if not isinstance(m, nnx.Module):
      continue
    for name, v in list(vars(m).items()):
      if isinstance(v, nnx.Param):
        if id(v) not in done:
          done[id(v)] = FrozenParam(v[...])
        setattr(m, name, done[id(v)])


def export_serving(model: nnx.Module, input_shape: Sequence[int], dtype=jnp.float32,
                   *, fn: Callable[[nnx.Module, jax.Array], Any] | None = None,
                   batch_name: str = "b") -> jax.export.Exported:
  """``jax.export`` of a frozen model's forward pass, batch dimension symbolic.

  Args:
    model: a model from :func:`freeze` (a trained model is frozen first).
    input_shape: one example's shape, e.g. ``(28, 28, 1)``.
    dtype: the input dtype.
    fn: what the program computes, ``fn(model, x)`` (default ``model(x)``):
      e.g. a detector's forward pass followed by its box decoding and NMS.

  Returns:
    The ``jax.export.Exported``; its ``serialize()`` bytes run in any process
    with ``jax`` (``jax.export.deserialize(b).call(x)``) for every batch size.
    The weights are constants of the program (int8 for the quantized layers).
  """
  if not any(isinstance(m, (FrozenConv, FrozenDense, FrozenConvTranspose))
             for _, m in nnx.iter_graph(model)):
    model = freeze(model)
  input_shape = tuple(int(d) for d in input_shape)
  graphdef, state = nnx.split(model)

  def forward(x):
    # The barrier keeps XLA from constant-folding float work on the weights
    # (BatchNorm's ``scale * rsqrt(var + eps)``): folded at compile time it
    # rounds differently from the same ops run on arguments (up to 6e-8 on
    # the logits), and the program would no longer match ``model.eval()``.
    m = nnx.merge(graphdef, jax.lax.optimization_barrier(state))
    return m(x) if fn is None else fn(m, x)

  spec = jax.export.symbolic_shape(", ".join([batch_name, *map(str, input_shape)]))
  return jax.export.export(jax.jit(forward))(jax.ShapeDtypeStruct(spec, dtype))
