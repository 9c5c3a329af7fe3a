"""Quantized ops: bit-exact int8 GEMMs, float agreement, transforms, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import int8jax
from int8jax import quant
from int8jax import exact
from int8jax.backends import xla
from int8jax.conv_spec import make_conv_spec

import reference

FLAX_DN = ("NHWC", "HWIO", "NHWC")

# (x shape NHWC, kernel shape HWIO, strides, padding, lhs_dil, rhs_dil, groups)
CONV_CASES = [
    ((2, 7, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", None, None, 1),
    ((2, 9, 8, 4), (3, 3, 4, 6), (2, 2), "SAME", None, None, 1),
    ((1, 10, 11, 3), (3, 2, 3, 5), (2, 3), "VALID", None, (2, 1), 1),
    ((2, 6, 7, 6), (3, 3, 2, 9), (1, 2), ((2, 1), (0, 3)), None, None, 3),  # grouped
    ((2, 8, 8, 5), (3, 3, 1, 5), (1, 1), "SAME", None, None, 5),  # depthwise
    ((1, 9, 9, 4), (3, 3, 1, 8), (2, 2), "SAME", None, (2, 2), 4),  # depthwise x2, dilated
    ((2, 5, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (2, 0)), (2, 2), None, 1),  # transposed-style
    ((1, 9, 8, 2), (2, 3, 2, 3), (3, 1), ((-1, 2), (1, -1)), None, None, 1),  # negative pad
    ((2, 6, 7, 16), (3, 3, 16, 16), (1, 1), "SAME", None, None, 1),  # XLA int8 conv, padded O
    ((1, 9, 8, 8), (3, 3, 8, 40), (2, 1), ((1, 2), (0, 1)), None, (1, 2), 1),  # XLA int8 conv
    ((3, 11, 4), (3, 4, 5), (2,), "SAME", None, (2,), 1),  # 1-D
    ((2, 12, 6), (5, 2, 6), (1,), ((2, 2),), (1,), None, 3),  # 1-D grouped
]


def _ids(case):
  x, w, s, p, ld, rd, g = case
  return f"x{x}-w{w}-s{s}-p{p}-ld{ld}-rd{rd}-g{g}".replace(" ", "")


def _dn(ndim):
  return ("NHWC", "HWIO", "NHWC") if ndim == 4 else ("NWC", "WIO", "NWC")


def _spec(case):
  x, w, s, p, ld, rd, g = case
  return make_conv_spec(x, w, s, p, ld, rd, _dn(len(x)), g)


def assert_scaled_int(got, ref_int, scale):
  """``got`` is ``ref_int * scale``: the integer GEMM exactly (recovered by
  dividing out the scale), the float product within 2 ulp (XLA may fold the
  scalar multiplications in another order)."""
  got = np.asarray(got)
  scale = np.float32(scale)
  np.testing.assert_array_equal(np.rint(got.astype(np.float64) / scale), ref_int)
  np.testing.assert_allclose(got, ref_int.astype(np.float32) * scale, rtol=2.4e-7, atol=0)


def _rand_int8(rng, shape, extreme=False):
  if extreme:
    return rng.choice(np.array([-127, 127], np.int8), size=shape)
  return rng.integers(-127, 128, size=shape).astype(np.int8)


@pytest.mark.parametrize("chunk_k", [131072, 5])
@pytest.mark.parametrize("case", CONV_CASES, ids=_ids)
def test_conv_gemms_bit_exact(case, chunk_k):
  """Forward, dgrad and wgrad int8 GEMMs equal the int64 numpy reference."""
  spec = _spec(case)
  rng = np.random.default_rng(abs(hash(_ids(case))) % 2**32)
  for extreme in (False, True):
    xq = _rand_int8(rng, spec.lhs_shape, extreme)
    wq = _rand_int8(rng, spec.rhs_shape, extreme)
    gq = _rand_int8(rng, spec.out_shape, extreme)
    one = jnp.float32(1.0)
    y = jax.jit(lambda a, b: xla.conv_forward(a, b, one, spec, chunk_k=chunk_k))(xq, wq)
    dx = jax.jit(lambda a, b: xla.conv_dgrad(a, b, one, spec, chunk_k=chunk_k))(gq, wq)
    dw = jax.jit(lambda a, b: xla.conv_wgrad(a, b, one, spec, chunk_k=chunk_k))(xq, gq)
    np.testing.assert_array_equal(np.asarray(y), reference.conv(xq, wq, spec).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(dx),
                                  reference.conv_dgrad(gq, wq, spec).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(dw),
                                  reference.conv_wgrad(xq, gq, spec).astype(np.float32))


def _conv_op(case, config, **kw):
  x, w, s, p, ld, rd, g = case
  return lambda lhs, rhs: int8jax.quant_conv_general_dilated(
      lhs, rhs, s, p, ld, rd, _dn(len(x)), g, config=config, **kw)


@pytest.mark.parametrize("case", CONV_CASES[:6] + CONV_CASES[8:11], ids=_ids)
def test_conv_op_exact_and_close_to_float64(case):
  """The custom_vjp's outputs are the scaled exact integer GEMMs, and they are
  close to float64 lax results (stated tolerances)."""
  spec = _spec(case)
  x_shape, w_shape, s, p, ld, rd, g = case
  kx, kw, kg, kr = jax.random.split(jax.random.key(len(str(case))), 4)
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, w_shape, jnp.float32) * 0.3
  cfg = int8jax.QuantConfig(grad_rounding="nearest", grad_granularity="tensor")
  f = _conv_op(case, cfg, key=kr)
  y, vjp = jax.vjp(jax.jit(f), x, w)
  gy = jax.random.normal(kg, y.shape, jnp.float32)
  dx, dw = vjp(gy)

  sx = quant.scale_from_clip(quant.absmax(x))
  sw = quant.scale_from_clip(quant.absmax(w))
  sg = quant.scale_from_clip(quant.absmax(gy))
  xq, wq, gq = (np.asarray(quant.quantize(a, sc)) for a, sc in ((x, sx), (w, sw), (gy, sg)))
  assert_scaled_int(y, reference.conv(xq, wq, spec), sx * sw)
  assert_scaled_int(dx, reference.conv_dgrad(gq, wq, spec), sg * sw)
  assert_scaled_int(dw, reference.conv_wgrad(xq, gq, spec), sg * sx)

  # float64 reference: 8-bit quantization of three operands; relative L2 error
  # well under 3% for Gaussian data (measured ~0.5-1.5%).
  with jax.enable_x64():
    x64, w64, g64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w, gy))
    f64 = lambda a, b: lax.conv_general_dilated(a, b, s, p, ld, rd, _dn(len(x_shape)), g)
    y64, vjp64 = jax.vjp(f64, x64, w64)
    dx64, dw64 = vjp64(g64)
    for got, want in ((y, y64), (dx, dx64), (dw, dw64)):
      want = np.asarray(want)
      err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
      assert err < 0.03, err


def test_layouts_nchw_equals_nhwc():
  case = CONV_CASES[3]
  x_shape, w_shape, s, p, ld, rd, g = case
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  key = jax.random.key(2)
  f = lambda x, w: int8jax.quant_conv_general_dilated(x, w, s, p, ld, rd, FLAX_DN, g, key=key)
  f2 = lambda x, w: jnp.transpose(int8jax.quant_conv_general_dilated(
      jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)), s, p, ld, rd,
      ("NCHW", "OIHW", "NCHW"), g, key=key), (0, 2, 3, 1))
  np.testing.assert_array_equal(f(x, w), f2(x, w))
  gy = jax.random.normal(jax.random.key(3), f(x, w).shape)
  for a, b in zip(jax.vjp(f, x, w)[1](gy), jax.vjp(f2, x, w)[1](gy)):
    np.testing.assert_array_equal(a, b)


def test_stochastic_rounding_gradient_is_unbiased():
  """Averaging dx, dw over many keys converges to the float gradient with the
  same quantized forward operands (vmap over keys)."""
  case = CONV_CASES[1]
  x_shape, w_shape, s, p, ld, rd, g = case
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape) * 0.3
  gy = jax.random.normal(jax.random.key(2), (2, 5, 4, 6)) ** 3  # heavy-ish tail
  cfg = int8jax.QuantConfig(grad_clip="max")  # c = max|g|: no clipping bias

  def grads(key):
    f = lambda a, b: int8jax.quant_conv_general_dilated(a, b, s, p, ld, rd, FLAX_DN, g,
                                                        key=key, config=cfg)
    return jax.vjp(f, x, w)[1](gy)

  n = 4000
  dx, dw = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(3), n))
  fq = lambda a, sc: quant.dequantize(quant.quantize(a, sc), sc)
  xh = fq(x, quant.scale_from_clip(quant.absmax(x)))
  wh = fq(w, quant.scale_from_clip(quant.absmax(w)))
  f = lambda a, b: lax.conv_general_dilated(a, b, s, p, ld, rd, FLAX_DN, g,
                                            precision=lax.Precision.HIGHEST)
  ex, ew = jax.vjp(f, xh, wh)[1](gy)
  sg = float(quant.absmax(gy)) / 127
  # Each SR error is in (-sg, sg) with variance <= sg^2/4; dx sums <= 54 such
  # terms times |w|, so the std of the mean is < sg*sqrt(54)*max|w|/2/sqrt(n).
  tol_x = 5 * sg * np.sqrt(54) * float(jnp.abs(wh).max()) / 2 / np.sqrt(n)
  np.testing.assert_allclose(dx.mean(0), ex, atol=tol_x, rtol=0)
  single = np.abs(np.asarray(dx[0]) - np.asarray(ex)).max()
  assert np.abs(np.asarray(dx.mean(0)) - np.asarray(ex)).max() < single / 10
  assert np.abs(np.asarray(dw.mean(0)) - np.asarray(ew)).max() < (
      np.abs(np.asarray(dw[0]) - np.asarray(ew)).max() / 10)


def test_dense_bit_exact_with_batch_dims():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 7, 4)), jnp.float32)  # batch 3, free (5,4)? no: contract 7
  w = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)
  dn = (((2,), (1,)), ((0,), (0,)))
  cfg = int8jax.QuantConfig(grad_rounding="nearest")
  f = lambda a, b: int8jax.quant_dot_general(a, b, dn, config=cfg)
  y, vjp = jax.vjp(f, x, w)
  assert y.shape == lax.dot_general(x, w, dn).shape == (3, 5, 4, 6)
  gy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  dx, dw = vjp(gy)
  sx, sw, sg = (quant.scale_from_clip(quant.absmax(a)) for a in (x, w, gy))
  xq, wq, gq = (np.asarray(quant.quantize(a, s), np.int64) for a, s in ((x, sx), (w, sw), (gy, sg)))
  ref_y = np.einsum("bmkf,bkn->bmfn", xq, wq)
  ref_dx = np.einsum("bmfn,bkn->bmkf", gq, wq)
  ref_dw = np.einsum("bmkf,bmfn->bkn", xq, gq)
  np.testing.assert_array_equal(y, ref_y.astype(np.float32) * np.float32(sx * sw))
  np.testing.assert_array_equal(dx, ref_dx.astype(np.float32) * np.float32(sg * sw))
  np.testing.assert_array_equal(dw, ref_dw.astype(np.float32) * np.float32(sg * sx))


def test_per_channel_weight_scales():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 3)) * np.array([0.01, 1.0, 10.0]), jnp.float32)
  dn = (((1,), (0,)), ((), ()))
  per_t = int8jax.quant_dot_general(x, w, dn, config=int8jax.QuantConfig(grad_rounding="nearest"))
  per_c = int8jax.quant_dot_general(
      x, w, dn, config=int8jax.QuantConfig(grad_rounding="nearest", weight_granularity="channel"))
  exact = x @ w
  err = lambda y: float(jnp.abs(y - exact)[:, 0].max() / jnp.abs(exact[:, 0]).max())
  assert err(per_c) < 0.02 < err(per_t)  # the small channel is lost per tensor
  sw = quant.scale_from_clip(quant.absmax(w, axis=0))
  sx = quant.scale_from_clip(quant.absmax(x))
  ref = (np.asarray(quant.quantize(x, sx), np.int64) @ np.asarray(quant.quantize(w, sw), np.int64))
  np.testing.assert_array_equal(per_c, ref.astype(np.float32) * np.asarray(sx * sw))
  # backward runs (dgrad re-quantizes w per tensor)
  dx, dw = jax.grad(lambda a, b: int8jax.quant_dot_general(
      a, b, dn, key=jax.random.key(0),
      config=int8jax.QuantConfig(weight_granularity="channel")).sum(), (0, 1))(x, w)
  assert bool(jnp.all(jnp.isfinite(dx)) & jnp.all(jnp.isfinite(dw)))


def test_no_int32_overflow_long_contraction():
  """All +-127 operands, K > 133,144: exact (correctly rounded float32)."""
  k = 140_000
  assert 127 * 127 * k > 2**31
  rng = np.random.default_rng(2)
  a = rng.choice(np.array([-127, 127], np.int8), size=(2, k))
  a[0] = 127
  b = np.full((k, 3), 127, np.int8)
  b[:, 1] = -127
  ref = a.astype(np.int64) @ b.astype(np.int64)
  assert np.abs(ref).max() > 2**31
  got = exact.int8_dot(jnp.asarray(a), jnp.asarray(b), (1, 0), chunk_k=int8jax.config.MAX_EXACT_K)
  np.testing.assert_array_equal(np.asarray(got), ref.astype(np.float32))
  # Through the op: x = 1 -> 127, w = +-1 -> +-127; weight gradient over a
  # batch x spatial contraction of 160,000.
  x = jnp.ones((1, 400, 400, 1), jnp.float32)
  w = jnp.ones((1, 1, 1, 2), jnp.float32).at[..., 1].set(-1.0)
  f = lambda x, w: int8jax.quant_conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=FLAX_DN,
      config=int8jax.QuantConfig(grad_rounding="nearest"))
  y, vjp = jax.vjp(f, x, w)
  np.testing.assert_array_equal(np.asarray(y[0, 0, 0]), [1.0, -1.0])
  _, dw = vjp(jnp.ones_like(y))
  s = np.float32(1 / 127) * np.float32(1 / 127)
  np.testing.assert_array_equal(np.asarray(dw).ravel(),
                                np.array([127 * 127 * 160_000] * 2, np.float32) * s)
  assert abs(float(dw[0, 0, 0, 0]) - 160_000) / 160_000 < 1e-6


def test_jit_grad_vmap_through_ops():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 2))  # vmapped batch of 3
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  keys = jax.random.split(jax.random.key(2), 3)

  def loss(x, w, key):
    return int8jax.quant_conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                              key=key).sum()

  vg = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, 0)))(x, w, keys)
  for i in range(3):
    one = jax.grad(loss, argnums=(0, 1))(x[i], w, keys[i])
    np.testing.assert_allclose(vg[0][i], one[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vg[1][i], one[1], rtol=1e-6, atol=1e-6)


def test_measurement_cotangent_and_state_update():
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  gy = jax.random.laplace(jax.random.key(2), (4, 6, 6, 5)) ** 3
  key = jax.random.key(3)
  st = int8jax.GradQuantState.initial()

  def f(x, w, st, measure):
    return int8jax.quant_conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                              key=key, grad_state=st, measure=measure)

  _, vjp = jax.vjp(lambda st: f(x, w, st, True), st)
  (raw,) = vjp(gy)
  m = int8jax.read_measurement(raw)  # per-use values (the op returns them scaled)
  c = quant.absmax(gy)  # initial state: clip at max|g|
  sg = quant.scale_from_clip(c)
  gh = quant.dequantize(quant.quantize(gy, sg, rounding="stochastic", key=key), sg)
  assert float(m.measurements) == 1.0 and float(m.nonfinite) == 0.0
  np.testing.assert_allclose(m.distance, quant.cosine_distance(gy, gh), rtol=1e-3,
                             atol=2e-6)
  # deviation: the mean over output channels of each channel's distance.
  g64, h64 = (np.asarray(a, np.float64).reshape(-1, 5) for a in (gy, gh))
  per_ch = 1 - (g64 * h64).sum(0) / np.sqrt((g64 ** 2).sum(0) * (h64 ** 2).sum(0))
  np.testing.assert_allclose(m.channel_distance_mean, per_ch.mean(), rtol=1e-3, atol=2e-6)
  np.testing.assert_allclose(m.channel_distance_max, per_ch.max(), rtol=1e-3, atol=2e-6)
  np.testing.assert_allclose(m.channel_distance_median, np.median(per_ch), rtol=1e-3,
                             atol=2e-6)
  assert float(m.grad_absmax) == float(c)
  assert float(m.dlog_clip) > 0  # the straight-through derivative says: lower the clip
  # ... but the expected distances say otherwise: best_ratio is the candidate
  # whose stochastic quantization is closest in direction in expectation
  # (float64: clip bias exact, rounding variance s^2 f (1 - f) per entry).
  cands = np.asarray(int8jax.dsgc.candidate_ratios(jnp.float32(0)), np.float64)
  g64 = np.asarray(gy, np.float64)

  def expected_distance(r):
    s = r * float(c) / 127
    y = np.clip(g64 / s, -127, 127)
    f = y - np.floor(y)
    return 1 - (g64 * y * s).sum() / np.sqrt(
        (g64 ** 2).sum() * (((y * s) ** 2).sum() + (s * s * f * (1 - f)).sum()))

  dists = np.array([expected_distance(r) for r in cands])
  best = float(m.best_ratio)
  assert best in cands
  assert expected_distance(best) <= dists.min() * (1 + 1e-4), (best, cands[np.argmin(dists)])
  _, vjp = jax.vjp(lambda st: f(x, w, st, False), st)
  (m0,) = vjp(gy)
  assert all(float(v) == 0.0 for v in jax.tree.leaves(m0))
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(raw)),  # scaled, check value
                             np.asarray(jax.tree.leaves(int8jax.dsgc.as_cotangent(m.replace(
                                 measurements=jnp.float32(1))))), rtol=1e-6)
  new = int8jax.update_grad_state(st, raw, learning_rate=0.5, method="gradient")
  assert 0 < float(new.clip) < float(c)  # initialised at max|g|, then one step down
  new = int8jax.update_grad_state(st, raw)  # default: move to the best candidate
  np.testing.assert_allclose(new.clip, float(m.best_ratio) * float(c), rtol=1e-6)
  assert float(new.channel_distance_mean) == float(m.channel_distance_mean)
  assert float(new.measurements) == 1.0
  assert float(new.distance) == float(m.distance)
  assert int8jax.update_grad_state(new, m0) == new  # no measurement: unchanged


def test_nonfinite_never_reaches_state():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 3))
  st = int8jax.GradQuantState.initial().replace(clip=jnp.float32(0.7),
                                                measurements=jnp.float32(3.0))
  f = lambda x, w, st: int8jax.quant_conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=FLAX_DN, key=jax.random.key(0), grad_state=st,
      measure=True)
  y, vjp = jax.vjp(f, x, w, st)
  gy = jnp.ones_like(y).at[0, 1, 1, 0].set(jnp.nan)
  dx, dw, m = vjp(gy)
  assert bool(jnp.all(jnp.isnan(dx))) and bool(jnp.all(jnp.isnan(dw)))
  assert float(int8jax.read_measurement(m).nonfinite) == 1.0
  new = int8jax.update_grad_state(st, m)
  assert float(new.clip) == np.float32(0.7) and float(new.nonfinite) == 1.0
  assert float(new.measurements) == 3.0
  assert all(bool(jnp.isfinite(v)) for v in jax.tree.leaves(new))
  # Non-finite input: NaN output, never a finite wrong answer.
  y_bad = f(x.at[0, 0, 0, 0].set(jnp.inf), w, st)
  assert bool(jnp.all(jnp.isnan(y_bad)))


def test_zero_tensors_quantize_without_nan():
  x = jnp.zeros((2, 4, 4, 2))
  w = jnp.zeros((3, 3, 2, 2))
  f = lambda x, w, st: int8jax.quant_conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=FLAX_DN, key=jax.random.key(0), grad_state=st,
      measure=True)
  st = int8jax.GradQuantState.initial()
  y, vjp = jax.vjp(f, x, w, st)
  dx, dw, m = vjp(jnp.zeros_like(y))
  for a in (y, dx, dw):
    assert bool(jnp.all(a == 0))
  assert float(m.channel_distance_mean) == 0.0 and float(m.nonfinite) == 0.0
  assert int8jax.update_grad_state(st, m).clip == 0.0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((2, 4)), jnp.ones((2, 4)), (1,), "SAME"),
     ValueError, "rank"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 4)),
                                                (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                                key=jax.random.key(0)),
     ValueError, "feature_group_count"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                                feature_group_count=2, key=jax.random.key(0)),
     ValueError, "divisible"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2), jnp.int8),
                                                jnp.ones((3, 3, 2, 3)), (1, 1), "SAME",
                                                dimension_numbers=FLAX_DN),
     TypeError, "lhs must have a floating dtype"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "FULL", dimension_numbers=FLAX_DN,
                                                key=jax.random.key(0)),
     ValueError, "padding"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (0, 1), "SAME", dimension_numbers=FLAX_DN,
                                                key=jax.random.key(0)),
     ValueError, "window_strides"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "SAME", dimension_numbers="NHWC"),
     ValueError, "dimension_numbers"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "SAME", dimension_numbers=FLAX_DN),
     ValueError, "key"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                                key=jax.random.key(0), config="ui8"),
     TypeError, "config"),
    (lambda: int8jax.quant_dot_general(jnp.ones((2, 3)), jnp.ones((4, 5)), (((1,), (0,)), ((), ())),
                                       key=jax.random.key(0)),
     ValueError, "must match"),
    (lambda: int8jax.quant_dot_general(jnp.ones((2, 3)), jnp.ones((3, 5)), (((2,), (0,)), ((), ())),
                                       key=jax.random.key(0)),
     ValueError, "contracting"),
    (lambda: int8jax.QuantConfig(period=0), ValueError, "period"),
    (lambda: int8jax.QuantConfig(grad_clip="mse"), ValueError, "grad_clip"),
    (lambda: int8jax.QuantConfig(weight_granularity="row"), ValueError, "weight_granularity"),
    (lambda: int8jax.QuantConfig(backend="triton"), ValueError, "backend"),
    (lambda: int8jax.QuantConfig(enabled=False), ValueError, "enabled=False.*config=None"),
    (lambda: int8jax.QuantConfig(grad_granularity="channel"), ValueError, "grad_granularity"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((4, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                                key=jax.random.key(0), batch_group_count=2),
     ValueError, "batch_group_count=2"),
    (lambda: int8jax.quant_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)),
                                                (1, 1), "SAME", dimension_numbers=FLAX_DN,
                                                key=jax.random.key(0),
                                                preferred_element_type=jnp.int32),
     TypeError, "preferred_element_type"),
])
def test_bad_input_errors(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


def test_disabled_config_is_exact_lax():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  off = None
  got = int8jax.quant_conv_general_dilated(x, w, (2, 1), "SAME", None, (1, 2), FLAX_DN, 2,
                                           config=off)
  want = lax.conv_general_dilated(x, w, (2, 1), "SAME", None, (1, 2), FLAX_DN, 2)
  np.testing.assert_array_equal(got, want)


def test_config_none_dense_is_exact_lax_and_status():
  x = jax.random.normal(jax.random.key(0), (3, 5))
  w = jax.random.normal(jax.random.key(1), (5, 4))
  dn = (((1,), (0,)), ((), ()))
  y, ok = int8jax.quant_dot_general(x, w, dn, config=None, return_status=True)
  np.testing.assert_array_equal(y, lax.dot_general(x, w, dn))
  assert bool(ok)
  y, ok = int8jax.quant_dot_general(x.at[0, 0].set(jnp.nan), w, dn, key=jax.random.key(0),
                                    return_status=True)
  assert not bool(ok) and bool(jnp.isnan(y).any())


def test_removed_config_fields_warn_or_fail():
  """QuantConfig's former fields: enabled=False fails naming config=None;
  enabled=True and chunk_k warn and are ignored; 'auto' is 'group'."""
  with pytest.raises(ValueError, match=r"QuantConfig\(enabled=False\).*config=None"):
    int8jax.QuantConfig(enabled=False)
  with pytest.raises(ValueError, match="enabled=False"):
    int8jax.QuantConfig().replace(enabled=False)
  with pytest.warns(DeprecationWarning, match=r"enabled=True"):
    assert int8jax.QuantConfig(enabled=True) == int8jax.QuantConfig()
  with pytest.warns(DeprecationWarning, match=r"chunk_k=16.*CHUNK_K"):
    assert int8jax.QuantConfig(chunk_k=16) == int8jax.QuantConfig()
  with pytest.warns(DeprecationWarning, match="grad_granularity='auto'.*'group'"):
    cfg = int8jax.QuantConfig(grad_granularity="auto")
  assert cfg == int8jax.QuantConfig() and cfg.grad_granularity == "group"
  assert hash(cfg) == hash(int8jax.QuantConfig())
  fields = {f.name for f in dataclasses.fields(int8jax.QuantConfig)}
  assert not fields & {"enabled", "chunk_k"}


# ---------------------------------------------------------------------------
# Per-group gradient scales (QuantConfig.grad_granularity).

GROUPED_CASES = [c for c in CONV_CASES if c[6] > 1]


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=_ids)
def test_per_group_gradient_scales_are_exact(case, backend):
  """One gradient scale per feature group: dx and dw are the exact integer
  GEMMs of the per-group-quantized g, scaled per group (no tolerance on the
  integers), on both backends."""
  spec = _spec(case)
  x_shape, w_shape, s, p, ld, rd, g = case
  kx, kw, kg = jax.random.split(jax.random.key(11), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, w_shape, jnp.float32)
  cfg = int8jax.QuantConfig(grad_rounding="nearest", backend=backend)  # "group": per group
  y, vjp = jax.vjp(jax.jit(_conv_op(case, cfg)), x, w)
  o = y.shape[-1]
  # channel scales spread over 3 orders of magnitude (what depthwise layers see)
  spread = jnp.logspace(-3, 0, o, dtype=jnp.float32)
  gy = jax.random.normal(kg, y.shape, jnp.float32) * spread
  dx, dw = vjp(gy)
  og, cg = o // g, spec.rhs_shape[-2]
  sg = quant.scale_from_clip(quant.absmax(gy.reshape(-1, g, og), axis=(0, 2)))  # (G,)
  sx = quant.scale_from_clip(quant.absmax(x))
  sw = quant.scale_from_clip(quant.absmax(w))
  gq = np.asarray(quant.quantize(gy, jnp.repeat(sg, og)))
  xq, wq = (np.asarray(quant.quantize(a, sc)) for a, sc in ((x, sx), (w, sw)))
  for got, ref, sc in ((dx, reference.conv_dgrad(gq, wq, spec), np.repeat(sg * sw, cg)),
                       (dw, reference.conv_wgrad(xq, gq, spec), np.repeat(sg * sx, og))):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.rint(got.astype(np.float64) / sc), ref)
    np.testing.assert_allclose(got, ref.astype(np.float32) * sc.astype(np.float32),
                               rtol=2.4e-7, atol=0)
  # per tensor, the small channels' gradients are lost: dw error is larger
  cfg_t = cfg.replace(grad_granularity="tensor")
  _, vjp_t = jax.vjp(jax.jit(_conv_op(case, cfg_t)), x, w)
  with jax.enable_x64():
    f64 = lambda a, b: lax.conv_general_dilated(a, b, s, p, ld, rd, _dn(len(x_shape)), g)
    _, vjp64 = jax.vjp(f64, *(jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w)))
    dw64 = np.asarray(vjp64(jnp.asarray(np.asarray(gy), jnp.float64))[1])
  small = np.arange(o) < o // 3  # the smallest channels
  err = lambda d: np.linalg.norm((np.asarray(d) - dw64)[..., small]) / np.linalg.norm(
      dw64[..., small])
  assert err(dw) < 0.05 < err(vjp_t(gy)[1]), (err(dw), err(vjp_t(gy)[1]))


def test_per_group_measurement_sees_small_channels():
  """A depthwise conv whose channels' gradients differ 1000x: per tensor,
  the mean per-channel distance is large while the global one is tiny;
  per group both are small."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 6))
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, 6))
  gy = jax.random.normal(jax.random.key(2), (4, 8, 8, 6)) * jnp.array(
      [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1.0])

  def measure(granularity):
    cfg = int8jax.QuantConfig(grad_granularity=granularity)
    f = lambda st: int8jax.quant_conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=FLAX_DN, feature_group_count=6,
        key=jax.random.key(3), grad_state=st, measure=True, config=cfg)
    _, vjp = jax.vjp(f, int8jax.GradQuantState.initial())
    return int8jax.read_measurement(vjp(gy)[0])

  t, g = measure("tensor"), measure("group")
  assert float(t.distance) < 0.01 < 0.3 < float(t.channel_distance_mean)
  assert float(t.channel_distance_max) > 0.3
  assert float(g.channel_distance_mean) < 0.01 and float(g.channel_distance_max) < 0.01


# ---------------------------------------------------------------------------
# Output dtypes (bf16 float parts).


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_bf16_activations_and_preferred_element_type(backend):
  """bf16 in: bf16 out and bf16 input cotangent; the kernel's cotangent keeps
  its dtype; the result is the float32 dequantization rounded to bf16 once."""
  case = CONV_CASES[1]
  x = jax.random.normal(jax.random.key(0), case[0], jnp.float32)
  w = jax.random.normal(jax.random.key(1), case[1], jnp.float32)
  cfg = int8jax.QuantConfig(grad_rounding="nearest", backend=backend)
  f32 = _conv_op(case, cfg)
  y32, vjp32 = jax.vjp(f32, x.astype(jnp.bfloat16).astype(jnp.float32), w)
  y, vjp = jax.vjp(_conv_op(case, cfg), x.astype(jnp.bfloat16), w)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y32.astype(jnp.bfloat16), np.float32))
  dx, dw = vjp(jnp.ones_like(y))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  dx32, dw32 = vjp32(jnp.ones_like(y32))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(dw32))
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(dx32.astype(jnp.bfloat16), np.float32))
  # preferred_element_type is honoured (it was ignored when quantizing):
  # bf16 in, float32 out -- the float32 dequantization itself
  xb = x.astype(jnp.bfloat16)
  yp = _conv_op(case, cfg, preferred_element_type=jnp.float32)(xb, w)
  assert yp.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(yp), np.asarray(f32(xb.astype(jnp.float32), w)))
  with pytest.raises(TypeError, match="narrower"):  # as lax
    _conv_op(case, cfg, preferred_element_type=jnp.bfloat16)(x, w)


# ---------------------------------------------------------------------------
# Empty convolutions (what lax returns).

EMPTY_CASES = [
    # lhs NCHW (2,2,9,10), rhs HWIO (4,5,2,2): the case a user hit
    ((2, 2, 9, 10), (4, 5, 2, 2), (2, 1), ((1, 2), (2, 0)), (1, 4), ("NCHW", "HWIO", "NCHW")),
    ((2, 0, 5, 3), (3, 3, 3, 4), (1, 1), "VALID", (1, 1), FLAX_DN),  # zero-height input
    ((2, 0, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), FLAX_DN),  # padding only
    ((0, 6, 5, 3), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), FLAX_DN),  # empty batch
]


@pytest.mark.parametrize("case", EMPTY_CASES)
def test_empty_convolutions_return_what_lax_returns(case):
  x_shape, w_shape, s, p, rd, dn = case
  x = jnp.ones(x_shape)
  w = jnp.ones(w_shape)
  f = lambda a, b: int8jax.quant_conv_general_dilated(a, b, s, p, None, rd, dn,
                                                      key=jax.random.key(0))
  g = lambda a, b: lax.conv_general_dilated(a, b, s, p, None, rd, dn)
  y, vjp = jax.vjp(f, x, w)
  y_ref, vjp_ref = jax.vjp(g, x, w)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  np.testing.assert_array_equal(y, y_ref)
  for a, b in zip(vjp(jnp.ones_like(y)), vjp_ref(jnp.ones_like(y_ref))):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_static_measure_flag_needs_no_cond():
  """measure=True/False as Python bools: the same results as the traced flag,
  and no conditional in the program (no lax.cond)."""
  case = CONV_CASES[0]
  x = jax.random.normal(jax.random.key(0), case[0])
  w = jax.random.normal(jax.random.key(1), case[1])
  gy = jax.random.normal(jax.random.key(2), (2, 7, 9, 6))
  st = int8jax.GradQuantState.initial().replace(clip=jnp.float32(1.5), clip_ratio=jnp.float32(.7))

  def grads(measure, **kw):
    f = lambda a, b, st: _conv_op(case, int8jax.QuantConfig(), key=jax.random.key(3),
                                  grad_state=st, measure=measure, **kw)(a, b)
    _, vjp = jax.vjp(f, x, w, st)
    return vjp(gy), jax.make_jaxpr(lambda a, b, st, c: jax.vjp(
        lambda a, b, st: f(a, b, st), a, b, st)[1](c))(x, w, st, gy)

  for flag in (True, False):
    (got, jaxpr) = grads(flag)
    (want, _) = grads(jnp.asarray(flag))
    np.testing.assert_array_equal(got[0], want[0])  # dx, dw: the same integers
    np.testing.assert_array_equal(got[1], want[1])
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):  # sums: order
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=0)
    assert "cond" not in str(jaxpr) or flag is False  # False keeps the max|g| fallback
  _, jaxpr = grads(False, stored_clip_only=True)
  assert "cond[" not in str(jaxpr)  # nothing but the quantization reads g
