"""Where the quantization runs in a compiled training step (XLA:CPU HLO).

With ``set_measure_mode(model, "never")`` the only reader of a layer's float
output gradient is its quantization, so XLA fuses the stochastic
quantization into the fusion that produces the gradient (the BatchNorm /
ReLU backward); in the default periodic mode the measuring ``lax.cond``
reads the float gradient too, and the quantization is a standalone pass.
The activations' quantization is fused with BatchNorm + ReLU in both modes.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import int8jax
from int8jax.diagnostics import quantize_fusions
from int8jax.nn import TRAINABLE, QuantConv


class Block(nnx.Module):
  """stem -> BN -> ReLU -> [QuantConv -> BN -> ReLU -> QuantConv -> BN] + skip -> ReLU."""

  def __init__(self, rngs, c=16):
    self.stem = nnx.Conv(3, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn0 = nnx.BatchNorm(c, rngs=rngs)
    self.conv1 = QuantConv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, rngs=rngs)
    self.conv2 = QuantConv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, rngs=rngs)
    self.head = nnx.Linear(c, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    y = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(y)) + x)
    return self.head(x.mean((1, 2)))


def _step_hlo(mode):
  model = Block(nnx.Rngs(0, quant=1))
  int8jax.nn.set_measure_mode(model, mode)
  opt = nnx.Optimizer(model, int8jax.optim.ui8(optax.sgd(0.1)), wrt=TRAINABLE)
  graph, state = nnx.split((model, opt))

  @jax.jit
  def step(state, x, y):
    m, o = nnx.merge(graph, state)
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    _, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(m)
    o.update(m, g)
    return nnx.state((m, o))

  x, y = jnp.ones((4, 8, 8, 3)), jnp.zeros((4,), jnp.int32)
  return step.lower(state, x, y).compile().as_text()


@pytest.fixture(scope="module")
def fusions():
  return {mode: quantize_fusions(_step_hlo(mode)) for mode in ("periodic", "never")}


def _acts(fs, rounding):
  return [f for f in fs if f.rounding == rounding and f.shape == (4, 8, 8, 16)]


def test_gradient_quantization_fused_into_its_producer_without_measuring(fusions):
  grads = _acts(fusions["never"], "stochastic")
  assert len(grads) == 2  # one per quantized layer, written once
  assert all(f.fused_with_producer for f in grads), grads
  # the BatchNorm / ReLU backward is in the same fusion
  assert all({"subtract", "compare"} <= set(f.ops) for f in grads)


def test_periodic_mode_quantizes_gradients_in_a_separate_pass(fusions):
  """The contrast: the measuring cond reads the float gradient, so it is
  materialised and quantized by a standalone fusion."""
  grads = _acts(fusions["periodic"], "stochastic")
  assert len(grads) == 2 and not any(f.fused_with_producer for f in grads)


@pytest.mark.parametrize("mode", ["periodic", "never"])
def test_activation_quantization_fused_with_batchnorm_relu(fusions, mode):
  acts = _acts(fusions[mode], "nearest")
  assert len(acts) == 2 and all(f.fused_with_producer for f in acts)
  assert all("maximum" in f.ops for f in acts)  # the ReLU
