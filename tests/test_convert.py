"""int8jax.nn.quantize_model: in-place conversion of nnx.Conv / nnx.Linear.

This library test imports the examples' model zoo on purpose: conversion is
checked on the real architectures users convert (ResNets with projections,
MobileNetV2's depthwise convs, VGG), which a tiny model of the test's own
would not exercise. (tests/test_step_memory.py does the same for ResNet-20.)
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import int8jax
from int8jax.nn import GradQuant, QuantConv, QuantDense
from int8jax.nn.convert import default_skip, quantizable_layers, quantize_model

from examples import models


def _tiny(name="resnet20"):
  """A tiny model; built under jit (eager init would compile op by op: slow)."""
  return nnx.jit(lambda: models.create_model(name, num_classes=10, width=4,
                                             rngs=nnx.Rngs(0)))()


def _abstract(name="resnet20"):
  """Shapes only: for structural checks."""
  return nnx.eval_shape(lambda: models.create_model(name, num_classes=10, width=4,
                                                    rngs=nnx.Rngs(0)))


class _Net(nnx.Module):
  """Names chosen so that sorted order differs from definition order."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs),
                            nnx.Conv(4, 4, (1, 1), strides=2, padding="VALID",
                                     use_bias=False, rngs=rngs)])
    self.aux = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for b in self.blocks:
      x = b(x)
    return self.head(self.aux(x.mean((1, 2))))


def test_default_skip_keeps_first_conv_and_last_dense_float():
  m = _Net(nnx.Rngs(0))
  assert len(quantizable_layers(m)) == 5
  quantize_model(m, rngs=nnx.Rngs(1))
  # 'stem' sorts after 'blocks' and 'aux' before 'head': definition order is used.
  assert type(m.stem) is nnx.Conv
  assert type(m.head) is nnx.Linear
  assert isinstance(m.aux, QuantDense)
  assert all(isinstance(b, QuantConv) for b in m.blocks)
  assert m.blocks[0].feature_group_count == 2
  assert (m.blocks[1].strides, m.blocks[1].padding, m.blocks[1].bias) == (2, "VALID", None)
  assert quantizable_layers(m) == [(("stem",), m.stem), (("head",), m.head)]
  assert nnx.jit(lambda m, x: m(x))(m, jnp.ones((2, 6, 6, 3))).shape == (2, 3)


def test_keeps_arguments_and_the_same_weight_variables():
  m = _Net(nnx.Rngs(0))
  olds = list(m.blocks)
  kernels = [b.kernel for b in olds]
  quantize_model(m, int8jax.QuantConfig(period=7), rngs=nnx.Rngs(1))
  for old, new, kernel in zip(olds, m.blocks, kernels):
    assert isinstance(new, QuantConv) and new is not old
    assert new.kernel is kernel
    for attr in ("in_features", "out_features", "kernel_size", "strides", "padding",
                 "feature_group_count", "use_bias", "kernel_dilation", "input_dilation",
                 "dtype", "param_dtype", "precision"):
      assert getattr(new, attr) == getattr(old, attr), attr
    assert new.config == int8jax.QuantConfig(period=7)


def test_mobilenet_depthwise_layers_keep_their_groups():
  before = _abstract("mobilenet_v2_cifar")
  groups = [b.dw.feature_group_count for b in before.blocks]
  after = nnx.eval_shape(lambda: quantize_model(
      models.create_model("mobilenet_v2_cifar", num_classes=10, width=4, rngs=nnx.Rngs(0)),
      rngs=nnx.Rngs(1)))
  assert all(isinstance(b.dw, QuantConv) for b in after.blocks)
  assert [b.dw.feature_group_count for b in after.blocks] == groups
  assert max(groups) > 1


def test_disabled_config_computes_exactly_the_float_model():
  m = _tiny("simple_cnn")
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  fwd = nnx.jit(lambda model, x: model(x))
  y_float = fwd(m, x)
  quantize_model(m, rngs=nnx.Rngs(1))
  assert len(int8jax.nn.quant_layers(m)) > 0
  for _, layer in int8jax.nn.quant_layers(m):
    layer.config = None  # quantization off: the float model, same state tree
  np.testing.assert_array_equal(np.asarray(fwd(m, x)), np.asarray(y_float))


def test_quantized_model_is_close_to_float_and_differentiable():
  m = _tiny("simple_cnn")
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  fwd = nnx.jit(lambda model, x: model(x))
  y_float = fwd(m, x)
  quantize_model(m, rngs=nnx.Rngs(1, quant=2))
  y = fwd(m, x)
  err = float(jnp.max(jnp.abs(y - y_float)))
  assert 0 < err < 0.1 * float(jnp.max(jnp.abs(y_float)))

  def loss(model):
    return jnp.mean(model(x) ** 2)

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, int8jax.nn.TRAINABLE)))(m)
  assert len(jax.tree.leaves(nnx.filter_state(grads, GradQuant))) > 0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_custom_skip_predicate_overrides_default():
  m = _abstract("simple_cnn")
  quantize_model(m, skip=lambda path, mod: isinstance(mod, nnx.Conv) and path[-1] == 1,
                 rngs=nnx.Rngs(1))
  assert isinstance(m.convs[0], QuantConv)  # default would keep the first conv float
  assert type(m.convs[1]) is nnx.Conv
  assert isinstance(m.head, QuantDense)


def test_default_skip_predicate_and_idempotence():
  m = _abstract("simple_cnn")
  skip = default_skip(m)
  assert skip(("convs", 0), m.convs[0]) and skip(("head",), m.head)
  assert not skip(("convs", 1), m.convs[1])
  quantize_model(m, rngs=nnx.Rngs(1))
  layers = [l for _, l in int8jax.nn.quant_layers(m)]
  quantize_model(m, rngs=nnx.Rngs(1))  # nothing left to convert except the skipped ones
  assert [l for _, l in int8jax.nn.quant_layers(m)] == layers


def test_convtranspose_converted_and_unsupported_layers_named():
  import warnings
  from int8jax.nn import QuantConvTranspose

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.up = nnx.ConvTranspose(4, 4, (3, 3), strides=2, rngs=rngs)
      self.mix = nnx.LinearGeneral(4, 4, rngs=rngs)
      self.fc = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.fc(self.mix(self.up(self.stem(x))).mean((1, 2)))

  m = Net(nnx.Rngs(0))
  x = jnp.ones((2, 5, 5, 3))
  y0 = m(x)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    quantize_model(m, rngs=nnx.Rngs(1))
  assert isinstance(m.up, QuantConvTranspose) and type(m.stem) is nnx.Conv
  assert any("mix (LinearGeneral)" in str(i.message) for i in w)
  assert float(jnp.abs(m(x) - y0).max()) < 0.05 * float(jnp.abs(y0).max())
