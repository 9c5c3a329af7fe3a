"""Flax NNX layers: drop-in equality with Flax, state, periodic measurement."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import int8jax
from int8jax.nn import TRAINABLE, ActRange, GradQuant, QuantConv, QuantCounter, QuantDense

CONV_KW = [
    dict(in_features=4, out_features=6, kernel_size=(3, 3)),
    dict(in_features=4, out_features=6, kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(in_features=6, out_features=6, kernel_size=(3, 3), feature_group_count=6,
         use_bias=False),
    dict(in_features=4, out_features=8, kernel_size=(2, 3), kernel_dilation=(2, 1),
         padding=((1, 0), (2, 1)), feature_group_count=2),
    dict(in_features=4, out_features=6, kernel_size=(3, 3), input_dilation=2,
         padding=((1, 2), (2, 1))),
    dict(in_features=4, out_features=6, kernel_size=(3, 3), padding="CIRCULAR"),
    dict(in_features=4, out_features=5, kernel_size=(5,), strides=2),  # 1-D
]


def _input(kw, batch=(2,)):
  nsp = len(kw["kernel_size"])
  return jax.random.normal(jax.random.key(7), (*batch, *(9,) * nsp, kw["in_features"]))


@pytest.mark.parametrize("kw", CONV_KW)
def test_quantconv_off_matches_nnx_conv_exactly(kw):
  x = _input(kw)
  ref = nnx.Conv(**kw, rngs=nnx.Rngs(0))
  for switched in (False, True):
    # config=None, or a quantized layer switched off (it keeps its state tree)
    q = QuantConv(**kw, config=int8jax.QuantConfig() if switched else None, rngs=nnx.Rngs(0))
    q.config = None
    np.testing.assert_array_equal(q.kernel[...], ref.kernel[...])
    np.testing.assert_array_equal(q(x), ref(x))
    gq = nnx.grad(lambda m: (m(x) ** 2).sum())(q)
    gr = nnx.grad(lambda m: (m(x) ** 2).sum())(ref)
    np.testing.assert_array_equal(gq["kernel"][...], gr["kernel"][...])


@pytest.mark.parametrize("kw", CONV_KW)
def test_quantconv_on_is_close_to_float(kw):
  x = _input(kw)
  ref = nnx.Conv(**kw, rngs=nnx.Rngs(0))
  q = QuantConv(**kw, rngs=nnx.Rngs(0))
  want, got = ref(x), q(x)
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert err < 0.03, err
  g = nnx.grad(lambda m: (m(x) ** 2).sum())(q)["kernel"][...]
  g_ref = nnx.grad(lambda m: (m(x) ** 2).sum())(ref)["kernel"][...]
  assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) < 0.08


def test_quantconv_extra_batch_dims_and_dtype():
  kw = CONV_KW[0]
  x = _input(kw, batch=(2, 3))
  q = QuantConv(**kw, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = q(x)
  assert y.shape == (2, 3, 9, 9, 6) and y.dtype == jnp.bfloat16
  ref = nnx.Conv(**kw, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
  err = float(jnp.linalg.norm((y - ref).astype(jnp.float32))
              / jnp.linalg.norm(ref.astype(jnp.float32)))
  assert err < 0.03


@pytest.mark.parametrize("switched", [False, True])
def test_quantdense_off_matches_nnx_linear_exactly(switched):
  x = jax.random.normal(jax.random.key(0), (3, 5, 7))
  ref = nnx.Linear(7, 4, rngs=nnx.Rngs(1))
  q = QuantDense(7, 4, config=int8jax.QuantConfig() if switched else None, rngs=nnx.Rngs(1))
  q.config = None  # config=None, or a quantized layer switched off
  np.testing.assert_array_equal(q(x), ref(x))


def test_quantdense_on_is_close_to_float():
  x = jax.random.normal(jax.random.key(0), (3, 5, 32))
  ref = nnx.Linear(32, 8, rngs=nnx.Rngs(1))
  q = QuantDense(32, 8, rngs=nnx.Rngs(1))
  assert float(jnp.linalg.norm(q(x) - ref(x)) / jnp.linalg.norm(ref(x))) < 0.03


def test_state_lives_in_own_variable_types():
  q = QuantConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  params = nnx.state(q, nnx.Param)
  assert set(params.keys()) == {"kernel", "bias"}
  assert set(nnx.state(q, ActRange).keys()) == {"act_range"}
  assert set(nnx.state(q, GradQuant).keys()) == {"grad_quant"}
  assert set(nnx.state(q, QuantCounter).keys()) == {"call_count", "act_nonfinite"}
  # packed into one vector (survives optax/NNX optimizer-state round trips)
  assert q.grad_quant[...].shape == (int8jax.dsgc.NUM_FIELDS,)
  assert isinstance(q.grad_quant.state, int8jax.GradQuantState)


def test_bad_module_arguments():
  with pytest.raises(TypeError, match="config"):
    QuantConv(3, 4, (3, 3), config="int8", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="conv_general_dilated"):
    QuantConv(3, 4, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated, rngs=nnx.Rngs(0))
  q = QuantConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError):
    q(jnp.ones((2, 8, 8, 5)))  # wrong number of input features


def test_periodic_measurement_without_recompiling():
  """Measure on calls 0, 3, 6 (period 3, no early measurements); one
  compiled step for all steps."""
  q = QuantConv(2, 4, (3, 3), config=int8jax.QuantConfig(period=3, measure_early=False),
                rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def step(m, x):
    traces.append(1)
    return nnx.grad(lambda m: (m(x) ** 3).sum(), argnums=nnx.DiffState(0, TRAINABLE))(m)

  ranges, measured = [], []
  for i in range(7):
    x = jax.random.normal(jax.random.key(i), (2, 6, 6, 2)) * (i + 1)
    g = step(q, x)
    measured.append(float(int8jax.read_measurement(
        int8jax.GradQuantState.unpack(g["grad_quant"][...])).measurements))
    ranges.append(float(q.act_range[...]))
    if i % 3 == 0:
      assert ranges[-1] == float(int8jax.absmax(x))
    else:
      assert ranges[-1] == ranges[-2]  # cached between measurements
  assert measured == [1, 0, 0, 1, 0, 0, 1]
  assert len(traces) == 1
  assert int(q.call_count[...]) == 7


@pytest.mark.parametrize("period", [1, 2, 3, 8, 100])
def test_measure_early_schedule(period):
  """measure_early (the default): calls 0, 1, 2, 4, ... below the period,
  then every period; against a plain-Python reference."""
  counts = jnp.arange(0, 3 * period + 130, dtype=jnp.int32)
  got = np.asarray(jax.jit(lambda c: int8jax.nn.measure_step(c, period, True))(counts))
  want = [c % period == 0 or (c < period and c & (c - 1) == 0) for c in range(len(counts))]
  np.testing.assert_array_equal(got, want)
  off = np.asarray(int8jax.nn.measure_step(counts, period, False))
  np.testing.assert_array_equal(off, [c % period == 0 for c in range(len(counts))])
  assert int8jax.QuantConfig().measure_early is True


def test_measure_early_in_a_layer():
  """A layer with the default config measures on calls 0, 1, 2, 4 of period 8
  (then 8, 16, ...); the counts reach the state through the optimizer."""
  q = QuantConv(2, 4, (3, 3), config=int8jax.QuantConfig(period=8), rngs=nnx.Rngs(0))
  grad = nnx.jit(lambda m, x: nnx.grad(lambda m: (m(x) ** 2).sum(),
                                       argnums=nnx.DiffState(0, TRAINABLE))(m))
  measured = []
  for i in range(10):
    g = grad(q, jax.random.normal(jax.random.key(i), (2, 6, 6, 2)))
    measured.append(float(int8jax.read_measurement(
        int8jax.GradQuantState.unpack(g["grad_quant"][...])).measurements))
  assert measured == [1, 1, 1, 0, 1, 0, 0, 0, 1, 0]
  with pytest.raises(TypeError, match=r"measure_early must be a bool, got 1"):
    int8jax.QuantConfig(measure_early=1)


@pytest.mark.parametrize("warmup", [True, False])
def test_clip_warmup(warmup):
  """clip_warmup: below the period a non-measuring call clips the gradient at
  the learned ratio of its own max|g|; from call ``period`` on (and with
  clip_warmup off) at the cached clip. Checked against the op called with
  each clip stored explicitly (nearest rounding: exact comparison)."""
  cfg = int8jax.QuantConfig(period=4, measure_early=False, grad_rounding="nearest",
                            clip_warmup=warmup)
  q = QuantConv(2, 4, (3, 3), config=cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  ct = jax.random.normal(jax.random.key(1), (2, 6, 6, 4)) * 10.0
  q(x)  # call 0 measures: caches the activation range
  ratio, cached = jnp.float32(0.8), jnp.float32(0.5)  # cached << max|ct|: saturates
  q.grad_quant[...] = int8jax.GradQuantState.initial().replace(
      clip=cached, clip_ratio=ratio).pack()
  layer_dw = nnx.jit(lambda m: nnx.grad(lambda m: jnp.sum(m(x) * ct))(m)["kernel"][...])

  def op_dw(clip):
    state = int8jax.GradQuantState.initial().replace(clip=clip, clip_ratio=ratio)
    f = lambda w: jnp.sum(int8jax.quant_conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        grad_state=state, x_clip=q.act_range[...], measure=False, config=cfg) * ct)
    return jax.grad(f)(q.kernel[...])

  fresh, stored = op_dw(ratio * int8jax.absmax(ct)), op_dw(cached)
  assert not bool(jnp.all(fresh == stored))
  int8jax.nn.set_call_count(q, 1)  # in the warm-up, not a measure step
  np.testing.assert_array_equal(layer_dw(q), fresh if warmup else stored)
  int8jax.nn.set_call_count(q, 5)  # after the warm-up
  np.testing.assert_array_equal(layer_dw(q), stored)
  with pytest.raises(TypeError, match=r"clip_warmup must be a bool, got 'yes'"):
    int8jax.QuantConfig(clip_warmup="yes")


def test_eval_mode_does_not_count_or_measure():
  q = QuantConv(2, 4, (3, 3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  q(x)
  q.eval()
  before = nnx.state(q, nnx.Not(nnx.Param))
  y1, y2 = q(x * 3), q(x * 3)
  np.testing.assert_array_equal(y1, y2)  # deterministic, cached range
  after = nnx.state(q, nnx.Not(nnx.Param))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, after))
  q.train()
  q(x)
  assert int(q.call_count[...]) == 2


def test_nonfinite_activation_keeps_cached_range():
  q = QuantConv(2, 4, (3, 3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  q(x)
  r = float(q.act_range[...])
  int8jax.nn.set_call_count(q, 0)  # next call measures
  y = q(x.at[0, 0, 0, 0].set(jnp.nan))
  assert bool(jnp.all(jnp.isnan(y)))
  assert float(q.act_range[...]) == r and int(q.act_nonfinite[...]) == 1


def test_stochastic_rounding_uses_the_quant_rng_stream():
  q = QuantConv(2, 4, (3, 3), rngs=nnx.Rngs(0, quant=5))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  grad = lambda m: nnx.grad(lambda m: (m(x) ** 3).sum())(m)["kernel"][...]
  g1, g2 = grad(q), grad(q)  # the stream advances: different rounding noise
  assert not bool(jnp.all(g1 == g2))
  q2 = QuantConv(2, 4, (3, 3), rngs=nnx.Rngs(0, quant=5))
  np.testing.assert_array_equal(grad(q2), g1)  # same seed: reproducible


class SmallCNN(nnx.Module):
  def __init__(self, quant, rngs):
    self.c0 = nnx.Conv(1, 8, (3, 3), rngs=rngs)  # first conv float, as in the paper
    self.bn0 = nnx.BatchNorm(8, rngs=rngs)
    self.c1 = QuantConv(8, 16, (3, 3), strides=2, config=quant, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.c2 = QuantConv(16, 16, (3, 3), feature_group_count=16, config=quant, rngs=rngs)
    self.c3 = QuantConv(16, 16, (1, 1), config=quant, rngs=rngs)
    self.fc = nnx.Linear(16, 10, rngs=rngs)  # classifier float

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.c0(x)))
    x = nnx.relu(self.bn1(self.c1(x)))
    x = nnx.relu(self.c3(nnx.relu(self.c2(x))))
    return self.fc(x.mean((1, 2)))


def test_small_cnn_trains_with_ui8():
  """UI8 (learned clip + error-sensitive LR) on 8x8 digit images: loss falls,
  clip values are learned, deviations are recorded."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = jnp.asarray(digits.images[:256, :, :, None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:256])
  model = SmallCNN(int8jax.QuantConfig(period=2), nnx.Rngs(0))
  tx = int8jax.optim.ui8(optax.adam(1e-2))
  opt = nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
    opt.update(model, g)
    return loss

  losses = []
  for epoch in range(6):
    for i in range(0, 256, 64):
      losses.append(float(step(model, opt, x[i:i + 64], y[i:i + 64])))
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
  stats = int8jax.nn.grad_quant_stats(model)
  assert set(stats) == {"c1", "c2", "c3"}
  for s in stats.values():
    assert float(s.measurements) == 13  # 24 steps, period 2: calls 0, 1 (early), 2, 4, ...
    assert 0 < float(s.clip) <= float(s.grad_absmax)
    assert 0 <= float(s.channel_distance_mean) < 1


class _StemNet(nnx.Module):
  """The README's network: float stem -> QuantConv -> float head (no ReLU
  after the QuantConv, so a NaN loss reaches its output gradient)."""

  def __init__(self, rngs, period=1):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.conv = QuantConv(8, 8, (3, 3), config=int8jax.QuantConfig(period=period), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = self.conv(nnx.relu(self.bn(self.stem(x))))
    return self.head(x.mean((1, 2)))


def _readme_step(model, opt, x, y):
  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
  opt.update(model, g)
  return loss


def test_nan_pixel_in_a_jitted_ui8_step_is_counted_and_never_stored():
  """One NaN pixel through a float stem (BatchNorm spreads it everywhere):
  inside the fused jitted step max|x| may come out finite, but the cached
  range and clip must stay, and both counters must count."""
  model = _StemNet(nnx.Rngs(0, quant=1))
  opt = nnx.Optimizer(model, int8jax.optim.ui8(optax.sgd(0.01)), wrt=TRAINABLE)
  step = nnx.jit(_readme_step)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  y = jnp.arange(4) % 10
  step(model, opt, x, y)  # a finite step: range and clip are stored
  r, st = float(model.conv.act_range[...]), model.conv.grad_quant.state
  assert r > 0 and float(st.clip) > 0
  step(model, opt, x.at[1, 2, 3, 0].set(jnp.nan), y)
  assert float(model.conv.act_range[...]) == r
  assert int(model.conv.act_nonfinite[...]) == 1
  new = model.conv.grad_quant.state
  assert float(new.nonfinite) == 1.0
  assert float(new.clip) == float(st.clip) and float(new.clip_ratio) == float(st.clip_ratio)
  assert float(new.measurements) == float(st.measurements)


def test_quantconv_bf16_float_parts():
  """dtype=bfloat16 as nnx.Conv: bf16 activations in and out, bf16 input
  cotangent, float32 master weights and their gradients."""
  q = QuantConv(4, 6, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ref = nnx.Conv(4, 6, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4), jnp.bfloat16)
  y = q(x)
  assert y.dtype == ref(x).dtype == jnp.bfloat16
  assert q.kernel[...].dtype == jnp.float32
  err = float(jnp.linalg.norm((y - ref(x)).astype(jnp.float32))
              / jnp.linalg.norm(ref(x).astype(jnp.float32)))
  assert err < 0.03, err
  dx = nnx.grad(lambda m, a: m(a).astype(jnp.float32).sum(), argnums=1)(q, x)
  assert dx.dtype == jnp.bfloat16
  g = nnx.grad(lambda m: m(x).astype(jnp.float32).sum())(q)
  assert g["kernel"][...].dtype == jnp.float32
  # preferred_element_type is honoured like nnx.Conv's
  kw = dict(dtype=jnp.bfloat16, preferred_element_type=jnp.float32, use_bias=False,
            rngs=nnx.Rngs(0))
  assert QuantConv(4, 6, (3, 3), **kw)(x).dtype == nnx.Conv(4, 6, (3, 3), **kw)(x).dtype \
      == jnp.float32


def test_measure_mode_never_and_always():
  """'always' measures every call, 'never' none (and reuses the stored clip);
  a layer never measured gives NaN gradients in 'never' mode, counted."""
  q = QuantConv(2, 4, (3, 3), config=int8jax.QuantConfig(period=1000), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  grad = nnx.grad(lambda m: (m(x) ** 2).sum(), argnums=nnx.DiffState(0, TRAINABLE))
  count = lambda g: float(int8jax.read_measurement(
      int8jax.GradQuantState.unpack(g["grad_quant"][...])).measurements)
  int8jax.nn.set_measure_mode(q, "never")
  g = grad(q)
  assert count(g) == 0 and bool(jnp.all(jnp.isnan(g["kernel"][...])))
  assert float(int8jax.read_measurement(
      int8jax.GradQuantState.unpack(g["grad_quant"][...])).nonfinite) == 1
  int8jax.nn.set_measure_mode(q, "always")
  assert count(grad(q)) == 1 and count(grad(q)) == 1
  with pytest.raises(ValueError, match="mode must be one of"):
    int8jax.nn.set_measure_mode(q, "sometimes")


CONVT_KW = [
    dict(strides=2), dict(strides=2, padding="VALID"), dict(strides=(2, 1), padding="CIRCULAR"),
    dict(strides=2, transpose_kernel=True), dict(strides=3, padding=((1, 2), (0, 1)),
                                                 kernel_dilation=2),
]


@pytest.mark.parametrize("kw", CONVT_KW)
def test_quantconvtranspose_matches_nnx_convtranspose(kw):
  """Off: bit-equal to nnx.ConvTranspose (forward and gradients); on: close."""
  from int8jax.nn import QuantConvTranspose
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  ref = nnx.ConvTranspose(3, 4, (3, 3), rngs=nnx.Rngs(0), **kw)
  off = QuantConvTranspose(3, 4, (3, 3), config=None, rngs=nnx.Rngs(0), **kw)
  q = QuantConvTranspose(3, 4, (3, 3), rngs=nnx.Rngs(0), **kw)
  np.testing.assert_array_equal(off(x), ref(x))
  want, got = ref(x), q(x)
  assert got.shape == want.shape
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.03
  loss = lambda m: (m(x) ** 2).sum()
  g, g_ref = nnx.grad(loss)(q)["kernel"][...], nnx.grad(loss)(ref)["kernel"][...]
  assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) < 0.08


def test_deprecated_names_still_work_and_warn():
  """The layer argument ``quant=`` (``config=`` since 0.1) is gone."""
  cfg = int8jax.QuantConfig(period=3)
  with pytest.raises(TypeError, match="'quant'"):
    QuantConv(2, 4, (3, 3), quant=cfg, rngs=nnx.Rngs(0))
  assert QuantConv(2, 4, (3, 3), config=cfg, rngs=nnx.Rngs(0)).config == cfg
  with pytest.raises(TypeError, match="config must be an int8jax.QuantConfig"):
    QuantConv(2, 4, (3, 3), config="ui8", rngs=nnx.Rngs(0))
  params = {"w": jnp.zeros(3), "grad_quant": jnp.zeros(int8jax.dsgc.NUM_FIELDS)}
  assert int8jax.optim.grad_quant_labels(params) == {"w": "params", "grad_quant": "grad_quant"}
  with pytest.warns(DeprecationWarning, match="use int8jax.optim.grad_quant_labels"):
    assert int8jax.optim.quant_state_labels(params) == {"w": "params", "grad_quant": "grad_quant"}
  with pytest.warns(DeprecationWarning, match="state_label"):
    assert int8jax.optim.quant_state_labels(params, quant="q", other="o") == {
        "w": "o", "grad_quant": "q"}


def test_layer_built_under_eval_shape_names_what_to_set():
  """flax's own pattern (linear_test; Orbax abstract restore): build under
  nnx.eval_shape, then set the weights. The quantization state is abstract
  too: a clear error says what to set; reset_quant_state makes the layer
  compute exactly what a new layer with the same weights computes."""
  import numpy as np
  from int8jax.nn import QuantDense
  kernel = jnp.linspace(-0.5, 0.5, 32 * 64).reshape(32, 64)
  x = jnp.linspace(-1.0, 1.0, 4 * 32).reshape(4, 32)
  m = nnx.eval_shape(lambda r: QuantDense(32, 64, rngs=r), nnx.Rngs(0))
  m.kernel, m.bias = nnx.Param(kernel), nnx.Param(jnp.zeros((64,)))
  with pytest.raises(ValueError, match=r"QuantDense: its quantization state .* is abstract.*"
                     r"reset_quant_state"):
    m(x)
  m.reset_quant_state(nnx.Rngs(0))
  ref = QuantDense(32, 64, rngs=nnx.Rngs(0))
  ref.kernel, ref.bias = nnx.Param(kernel), nnx.Param(jnp.zeros((64,)))
  np.testing.assert_array_equal(m(x), ref(x))
  assert float(m.act_range[...]) == float(ref.act_range[...]) > 0
