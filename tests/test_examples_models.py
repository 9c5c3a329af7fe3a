"""examples/models.py: shapes, parameter counts, depthwise convs, bf16."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from examples import models


def _num_params(make):
  abstract = nnx.eval_shape(make)  # no allocation, so full-size models are cheap
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("make,expected", [
    # Reference counts of the standard architectures (torchvision / He et al.).
    (lambda: models.resnet18(rngs=nnx.Rngs(0)), 11_689_512),
    (lambda: models.resnet34(rngs=nnx.Rngs(0)), 21_797_672),
    (lambda: models.resnet50(rngs=nnx.Rngs(0)), 25_557_032),
    (lambda: models.mobilenet_v2(rngs=nnx.Rngs(0)), 3_504_872),
    (lambda: models.resnet20(num_classes=10, rngs=nnx.Rngs(0)), 272_474),
    (lambda: models.resnet56(num_classes=10, rngs=nnx.Rngs(0)), 855_770),
])
def test_full_size_parameter_counts(make, expected):
  assert _num_params(make) == expected


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_tiny_forward_shapes(name):
  def run():
    m = models.create_model(name, num_classes=5, in_channels=3, width=4, small_input=True,
                            rngs=nnx.Rngs(0))
    return m(jnp.ones((2, 16, 16, 3)))
  y = jax.eval_shape(run)  # traced only: every model, in well under a second each
  assert y.shape == (2, 5) and y.dtype == jnp.float32


@pytest.mark.parametrize("make", [
    lambda: models.CifarResNet(8, num_classes=5, width=4, rngs=nnx.Rngs(0)),  # residual path
    lambda: models.simple_cnn(num_classes=5, in_channels=3, width=4, rngs=nnx.Rngs(0)),
])
def test_tiny_forward_is_finite_and_input_dependent(make):
  @jax.jit
  def run(x):
    return make()(x)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  y = run(x)
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.max(jnp.abs(y - run(x[::-1])[::-1]))) > 0  # batch stats used
  assert float(jnp.max(jnp.abs(y[0] - y[1]))) > 0


def test_mobilenet_uses_depthwise_convs():
  m = nnx.eval_shape(lambda: models.create_model("mobilenet_v2_cifar", num_classes=10,
                                                 width=8, rngs=nnx.Rngs(0)))
  dw = m.blocks[1].dw
  assert dw.feature_group_count == dw.in_features == dw.out_features
  assert dw.kernel.shape[2] == 1  # HWIO with I = in / groups


def test_bf16_compute_keeps_float32_params():
  def run():
    m = models.create_model("resnet20", num_classes=10, width=4, dtype=jnp.bfloat16,
                            rngs=nnx.Rngs(0))
    return m(jnp.ones((2, 8, 8, 3))), nnx.state(m, nnx.Param)
  y, params = jax.eval_shape(run)
  assert y.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def test_unknown_model_is_an_error():
  with pytest.raises(ValueError, match="unknown model"):
    models.create_model("resnet7", num_classes=2, rngs=nnx.Rngs(0))


def test_one_dimensional_nets():
  """resnet1d / mobilenet1d (benchmarks/accuracy.py on MNIST-1D): NLC in, logits out."""
  cfg = ((1, 4, 1, 1), (4, 6, 2, 2), (4, 8, 2, 2))
  make_r = lambda: models.resnet1d(n=1, width=4, rngs=nnx.Rngs(0))  # noqa: E731
  make_m = lambda: models.mobilenet1d(config=cfg, stem=4, last=16, rngs=nnx.Rngs(0))  # noqa: E731
  x = jnp.ones((2, 40, 1))
  yr, ym = jax.eval_shape(lambda: (make_r()(x), make_m()(x)))
  assert yr.shape == ym.shape == (2, 10)
  m = nnx.eval_shape(make_m)
  assert m.blocks[1].dw.kernel.shape == (3, 1, 16)  # depthwise k=3: one input per group
  assert nnx.eval_shape(make_r).stem.kernel.shape == (5, 1, 4)
