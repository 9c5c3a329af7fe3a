"""The quantizers of int8jax.quant: rounding, scales, the stochastic-rounding noise."""

import jax
import jax.numpy as jnp
import numpy as np

from int8jax import quant


def test_quantizer_basics():
  x = jnp.array([-2.0, -1.0, -0.004, 0.0, 0.004, 0.5, 1.0, 3.0])
  q = quant.quantize(x, quant.scale_from_clip(1.0))
  np.testing.assert_array_equal(q, [-127, -127, -1, 0, 1, 64, 127, 127])
  assert q.dtype == jnp.int8
  # all-zero tensor, zero clip: no division by zero
  z = jnp.zeros(5)
  np.testing.assert_array_equal(quant.fake_quantize(z, quant.absmax(z)), z)
  # stochastic rounding is unbiased inside the range
  v = jnp.full((200_000,), 0.3 / 127)
  qs = quant.quantize(v, quant.scale_from_clip(1.0), rounding="stochastic",
                      key=jax.random.key(0))
  assert set(np.unique(np.asarray(qs))) == {0, 1}
  assert abs(float(qs.astype(jnp.float32).mean()) - 0.3) < 0.005


def test_uniform_noise_is_uniform_and_keyed():
  u = np.asarray(quant.uniform_noise(jax.random.key(0), (1 << 20,)))
  assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
  counts = np.histogram(u, bins=64, range=(0, 1))[0]
  expected = len(u) / 64
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 120  # 63 dof: p < 1e-5 above ~120
  assert abs(float(np.corrcoef(u[:-1], u[1:])[0, 1])) < 0.01
  np.testing.assert_array_equal(u, quant.uniform_noise(jax.random.key(0), (1 << 20,)))
  other = np.asarray(quant.uniform_noise(jax.random.key(1), (1 << 20,)))
  assert abs(float(np.corrcoef(u, other)[0, 1])) < 0.01
