"""Tests of int8jax.diagnostics: layer statistics, tensor capture, distributions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import int8jax
from int8jax import diagnostics as dg
from int8jax.nn import TRAINABLE, QuantConv, QuantDense


class Tiny(nnx.Module):
  """conv -> relu -> depthwise conv -> relu -> GAP -> dense (all quantizable)."""

  def __init__(self, quant, rngs):
    self.conv = QuantConv(2, 4, (3, 3), config=quant, rngs=rngs)
    self.dw = QuantConv(4, 4, (3, 3), feature_group_count=4, config=quant, rngs=rngs)
    self.head = QuantDense(4, 3, config=quant, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv(x))
    h = nnx.relu(self.dw(h))
    return self.head(h.mean((1, 2)))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batch():
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  return x, jnp.array([0, 1, 2, 1])


def test_capture_float_matches_chain_rule():
  """With quantization off, g is dL/dy: it reproduces the weight gradients."""
  model = Tiny(None, nnx.Rngs(0))
  x, y = _batch()
  t = dg.capture_tensors(model, loss_fn, x, y)
  assert list(t) == ["conv", "dw", "head"]  # call order
  assert [v.kind for v in t.values()] == ["conv", "depthwise", "dense"]
  assert [v.index for v in t.values()] == [0, 1, 2]
  np.testing.assert_array_equal(t["conv"].x, np.asarray(x))
  np.testing.assert_array_equal(t["head"].w, np.asarray(model.head.kernel[...]))
  # Head: g = (softmax(logits) - onehot) / N.
  logits = model(x)
  want = (jax.nn.softmax(logits) - jax.nn.one_hot(y, 3)) / x.shape[0]
  np.testing.assert_allclose(t["head"].g, want, rtol=1e-5, atol=1e-7)
  grads = nnx.grad(loss_fn)(model, x, y)
  np.testing.assert_allclose(t["head"].x.T @ t["head"].g, grads.head.kernel[...],
                             rtol=1e-5, atol=1e-7)
  # Depthwise conv: its weight gradient from (x, g) through lax's own vjp.
  dw = model.dw

  def conv(w):
    return jax.lax.conv_general_dilated(
        jnp.asarray(t["dw"].x), w, (1, 1), dw.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=4)

  _, vjp = jax.vjp(conv, dw.kernel[...])
  np.testing.assert_allclose(vjp(jnp.asarray(t["dw"].g))[0], grads.dw.kernel[...],
                             rtol=1e-4, atol=1e-6)


def test_capture_quantized_leaves_model_alone_and_is_repeatable():
  model = Tiny(int8jax.QuantConfig(), nnx.Rngs(0, quant=1))
  x, y = _batch()
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))
  t1 = dg.capture_tensors(model, loss_fn, x, y)
  t2 = dg.capture_tensors(model, loss_fn, x, y)
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))
  chex.assert_trees_all_equal(before, after, strict=True)
  assert int(model.conv.call_count[...]) == 0
  for k in t1:
    np.testing.assert_array_equal(t1[k].g, t2[k].g)
    assert np.all(np.isfinite(t1[k].g)) and np.abs(t1[k].g).max() > 0
  # The quantized head output differs from the float one, but its gradient
  # is still the softmax residual of the (quantized) logits.
  fmodel = Tiny(None, nnx.Rngs(0))
  tf = dg.capture_tensors(fmodel, loss_fn, x, y)
  np.testing.assert_array_equal(t1["conv"].x, tf["conv"].x)
  assert not np.array_equal(t1["dw"].g, tf["dw"].g)  # int8 backward of the head


def test_capture_does_not_change_the_training_gradient():
  """Probes add zero: the parameter gradients equal a plain step's."""
  model = Tiny(int8jax.QuantConfig(grad_rounding="nearest"), nnx.Rngs(0, quant=1))
  x, y = _batch()
  t = dg.capture_tensors(model, loss_fn, x, y)
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model, x, y)
  # The head's int8 weight gradient is x^T g up to quantization of x and g.
  approx = t["head"].x.T @ t["head"].g
  got = np.asarray(grads.head.kernel[...])
  assert np.linalg.norm(got - approx) < 0.05 * np.linalg.norm(approx)


def test_layer_stats_after_ui8_steps():
  model = Tiny(int8jax.QuantConfig(period=1), nnx.Rngs(0, quant=1))
  opt = nnx.Optimizer(model, int8jax.optim.ui8(optax.sgd(0.1)), wrt=TRAINABLE)
  x, y = _batch()

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model, x, y)
    opt.update(model, grads)

  for _ in range(3):
    step(model, opt)
  stats = dg.layer_stats(model)
  raw = int8jax.nn.grad_quant_stats(model)
  assert set(stats) == set(raw) == {"conv", "dw", "head"}
  for k, s in stats.items():
    assert s["measurements"] == 3
    assert s["cosine_distance"] == pytest.approx(float(raw[k].channel_distance_mean))
    assert s["global_cosine_distance"] == pytest.approx(float(raw[k].distance))
    # phi from the distance that drives the LR (default: the global one).
    assert s["phi"] == pytest.approx(
        max(np.exp(-20 * s["global_cosine_distance"]), 0.1), rel=1e-5)
    assert 0 < s["clip_ratio"] <= 1 + 1e-6
    assert s["clip"] == pytest.approx(s["clip_ratio"] * s["grad_absmax"])
    assert 0 <= s["clipped_fraction"] <= 1


def test_distribution_shape_statistics():
  rng = np.random.default_rng(0)
  g = dg.distribution(rng.normal(size=200_000))
  lap = dg.distribution(rng.laplace(size=200_000))
  assert g.kurtosis == pytest.approx(3.0, abs=0.1)
  assert lap.kurtosis == pytest.approx(6.0, abs=0.4)
  assert g.hist.sum() == pytest.approx(1.0)
  assert g.hist.shape == (len(dg.LOG_BINS) - 1,)
  # Heavier tail -> more mass far below max|v| -> more entries under one int8 step.
  assert lap.below_step > g.below_step
  d = dg.distribution(np.array([0.0, 0.0, 1.0, -1e-4]))
  assert d.zero_fraction == 0.5 and d.absmax == 1.0 and d.below_step == 0.5
  assert d.hist[-1] == 0.5  # log10(1) = 0 lands in the last bin
  assert np.isnan(dg.distribution(np.zeros(5)).kurtosis)
