"""Tests of pallas_kernels: the int8 GEMM kernel (and the deprecated quantize names).

On any machine (CPU included):
  * every kernel config runs under Mosaic GPU interpret mode and equals the
    XLA reference bit for bit;
  * every kernel config is lowered for CUDA from the host, which runs Mosaic
    GPU's layout / tiling / swizzle checks (no ptxas: that needs a GPU);
  * int32 overflow, ragged shapes and argument errors.
On a Hopper GPU (marked ``gpu``): the compiled kernels against the reference.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _common
mm_lib = importlib.import_module("pallas_kernels.int8_matmul")

M, N, K = 130, 72, 200  # deliberately no multiples of any tile

# A small config so interpret mode exercises several blocks and K steps, a
# 64-byte swizzle and the delayed-release pipeline.
SMALL_CONFIG = pk.Int8MatmulConfig(tile_m=64, tile_n=32, tile_k=64, swizzle=64,
                                   max_concurrent_steps=2)
# Every config the library itself uses, plus the small one.
ALL_CONFIGS = pk.LIBRARY_CONFIGS + (SMALL_CONFIG,)
CONFIG_IDS = [f"{c.tile_m}x{c.tile_n}x{c.tile_k}s{c.swizzle}"
              for c in ALL_CONFIGS]

needs_gpu = pytest.mark.skipif(not pk.available(),
                               reason="needs a Hopper GPU (sm_90) with Mosaic GPU")


def _operands(m=M, n=N, k=K, seed=0):
  """Random int8 operands with saturated extremes mixed in."""
  rng = np.random.default_rng(seed)
  a = rng.integers(-127, 128, (m, k)).astype(np.int8)
  b = rng.integers(-127, 128, (n, k)).astype(np.int8)
  a[0, :] = 127          # all +127 row
  a[1, :] = -127         # all -127 row
  b[0, :] = 127
  b[1, :] = -127
  a[2, : k // 2] = 127   # half saturated
  b[2, :] = 0            # an all-zero output column
  return jnp.asarray(a), jnp.asarray(b)


def _scales(m=M, n=N, seed=1):
  rng = np.random.default_rng(seed)
  a_scale = jnp.asarray(rng.uniform(1e-3, 2.0, (m,)), jnp.float32)
  b_scale = jnp.asarray(rng.uniform(1e-3, 2.0, (n,)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
  return a_scale, b_scale, bias


def _exact_int(a, b):
  return np.asarray(a, np.int64) @ np.asarray(b, np.int64).T


def _assert_bits_equal(x, y):
  x, y = np.asarray(x), np.asarray(y)
  assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape,
                                                    y.shape)
  mismatches = int(np.sum(x.view(np.uint8) != y.view(np.uint8)))
  assert mismatches == 0, f"{mismatches} bytes differ"


CASES = {
    # name: (kwargs builder, out_dtype)
    "unscaled_f32": (lambda s: {}, jnp.float32),
    "per_row_col_bias_f32": (
        lambda s: dict(a_scale=s[0], b_scale=s[1], bias=s[2]), jnp.float32),
    "per_tensor_bf16": (
        lambda s: dict(a_scale=jnp.float32(0.013), b_scale=0.25),
        jnp.bfloat16),
    "per_col_bias_bf16": (
        lambda s: dict(b_scale=s[1], bias=s[2]), jnp.bfloat16),
}


# ---------------------------------------------------------------------------
# (a) interpret mode == reference, bit for bit.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_matmul_interpret_matches_reference(config, case):
  a, b = _operands()
  build, out_dtype = CASES[case]
  kwargs = build(_scales())
  got = pk.int8_matmul(a, b, out_dtype=out_dtype, config=config,
                       interpret=True, **kwargs)
  want = pk.int8_matmul_reference(a, b, out_dtype=out_dtype,
                                  k_chunk=config.k_chunk, **kwargs)
  assert got.shape == (M, N) and got.dtype == jnp.dtype(out_dtype)
  _assert_bits_equal(got, want)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_matmul_interpret_int32_out_is_exact(config):
  """out_dtype=int32: the raw accumulator, no epilogue (int8jax's backend
  combines chunk parts and sums patch gradients exactly with it)."""
  a, b = _operands()
  got = pk.int8_matmul(a, b, out_dtype=jnp.int32, config=config, interpret=True)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), _exact_int(a, b))
  _assert_bits_equal(got, pk.int8_matmul_reference(a, b, out_dtype=jnp.int32))


def test_matmul_int32_out_needs_one_chunk():
  a, b = _operands(k=520)
  config = pk.Int8MatmulConfig(tile_m=64, tile_n=32, tile_k=64, swizzle=64,
                               max_concurrent_steps=3, k_chunk=192)
  with pytest.raises(ValueError, match="K <= k_chunk.*K=520, k_chunk=192"):
    pk.int8_matmul(a, b, out_dtype=jnp.int32, config=config, interpret=True)
  with pytest.raises(ValueError, match="K <= k_chunk"):
    pk.int8_matmul_reference(a, b, out_dtype=jnp.int32, k_chunk=192)


def test_reference_is_exact_integer_matmul():
  a, b = _operands()
  got = np.asarray(pk.int8_matmul_reference(a, b))
  np.testing.assert_array_equal(got, _exact_int(a, b).astype(np.float32))


def test_reference_scaled_close_to_float64():
  """Guards against kernel and reference being wrong the same way."""
  a, b = _operands()
  a_scale, b_scale, bias = _scales()
  got = np.asarray(pk.int8_matmul_reference(a, b, a_scale=a_scale,
                                            b_scale=b_scale, bias=bias))
  want = (_exact_int(a, b) * np.asarray(a_scale, np.float64)[:, None]
          * np.asarray(b_scale, np.float64)[None, :]
          + np.asarray(bias, np.float64)[None, :])
  np.testing.assert_allclose(got, want, rtol=3e-7, atol=1e-6)


def test_matmul_interpret_unscaled_is_exact():
  a, b = _operands()
  got = pk.int8_matmul(a, b, config=SMALL_CONFIG, interpret=True)
  np.testing.assert_array_equal(np.asarray(got),
                                _exact_int(a, b).astype(np.float32))


def test_matmul_interpret_k_chunks_flush_to_float32():
  """A small k_chunk forces several int32 accumulators per output tile."""
  a, b = _operands(k=520)
  config = pk.Int8MatmulConfig(tile_m=64, tile_n=32, tile_k=64, swizzle=64,
                               max_concurrent_steps=3, k_chunk=192)
  got = pk.int8_matmul(a, b, config=config, interpret=True)
  want = pk.int8_matmul_reference(a, b, k_chunk=192)
  _assert_bits_equal(got, want)
  np.testing.assert_array_equal(np.asarray(got),
                                _exact_int(a, b).astype(np.float32))


def test_matmul_interpret_tiny_and_single_step_shapes():
  # K smaller than one tile (one pipeline step, no delayed release), M < 64.
  a, b = _operands(m=3, n=5, k=7)
  got = pk.int8_matmul(a, b, config=SMALL_CONFIG, interpret=True)
  np.testing.assert_array_equal(np.asarray(got),
                                _exact_int(a, b).astype(np.float32))


def test_matmul_empty():
  a = jnp.zeros((0, 16), jnp.int8)
  b = jnp.zeros((4, 16), jnp.int8)
  assert pk.int8_matmul(a, b, interpret=True).shape == (0, 4)
  a = jnp.zeros((3, 0), jnp.int8)
  b = jnp.zeros((4, 0), jnp.int8)
  np.testing.assert_array_equal(
      pk.int8_matmul(a, b, config=SMALL_CONFIG, interpret=True),
      np.zeros((3, 4), np.float32))
  np.testing.assert_array_equal(pk.int8_matmul_reference(a, b),
                                np.zeros((3, 4), np.float32))


def test_matmul_under_jit():
  a, b = _operands()
  a_scale, b_scale, _ = _scales()
  f = jax.jit(functools.partial(pk.int8_matmul, config=SMALL_CONFIG,
                                interpret=True))
  got = f(a, b, a_scale=a_scale, b_scale=b_scale)
  want = pk.int8_matmul_reference(a, b, a_scale=a_scale, b_scale=b_scale)
  _assert_bits_equal(got, want)


def test_select_config_only_returns_library_configs():
  for n in (1, 8, 64, 65, 128, 1000, 4096):
    assert pk.select_config(4096, n, 4096) in pk.LIBRARY_CONFIGS
  for config in pk.LIBRARY_CONFIGS:
    assert config.smem_bytes(jnp.float32) <= _common.SMEM_LIMIT_BYTES


# ---------------------------------------------------------------------------
# (b) lowering for CUDA from the host (Mosaic GPU's own checks).
# ---------------------------------------------------------------------------


def _lower_for_cuda(f, *args):
  lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the module"
  return text


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_matmul_int32_out_lowers_for_cuda(config):
  a = jax.ShapeDtypeStruct((M, K), jnp.int8)
  b = jax.ShapeDtypeStruct((N, K), jnp.int8)
  _lower_for_cuda(lambda a, b: pk.int8_matmul(a, b, out_dtype=jnp.int32,
                                              config=config), a, b)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_matmul_lowers_for_cuda(config, out_dtype, has_bias):
  a = jax.ShapeDtypeStruct((M, K), jnp.int8)
  b = jax.ShapeDtypeStruct((N, K), jnp.int8)
  a_scale = jax.ShapeDtypeStruct((M,), jnp.float32)
  b_scale = jax.ShapeDtypeStruct((N,), jnp.float32)

  def f(a, b, a_scale, b_scale):
    return pk.int8_matmul(a, b, a_scale=a_scale, b_scale=b_scale,
                          bias=b_scale if has_bias else None,
                          out_dtype=out_dtype, config=config)

  _lower_for_cuda(f, a, b, a_scale, b_scale)


def test_matmul_lowers_for_cuda_multi_chunk():
  """K = 300,000: three int32 accumulators per tile in the lowered kernel."""
  a = jax.ShapeDtypeStruct((128, 300_000), jnp.int8)
  b = jax.ShapeDtypeStruct((128, 300_000), jnp.int8)
  _lower_for_cuda(lambda a, b: pk.int8_matmul(a, b), a, b)


def test_smem_budget_checked_before_launch():
  config = pk.Int8MatmulConfig(tile_m=128, tile_n=256, tile_k=128,
                               max_concurrent_steps=8)
  a, b = _operands(m=4, n=5, k=6)
  with pytest.raises(ValueError, match="shared memory"):
    pk.int8_matmul(a, b, config=config)


def _unchecked_config(**fields):
  """An Int8MatmulConfig that skips __post_init__ validation."""
  config = object.__new__(pk.Int8MatmulConfig)
  for name, value in dataclasses.asdict(pk.DEFAULT_CONFIG).items():
    object.__setattr__(config, name, fields.get(name, value))
  return config


@pytest.mark.parametrize("fields, error", [
    (dict(tile_m=32, tile_n=32), "accumulator's first dimension"),  # wgmma M
    (dict(tile_m=64, tile_n=264), "<=256 elements"),                # TMA box
])
def test_cuda_lowering_catches_what_interpret_misses(fields, error):
  """The CUDA lowering check can fail where interpret mode passes.

  Configs that Int8MatmulConfig rejects, built without its validation: the
  interpreter computes the right numbers, Mosaic GPU refuses to lower them.
  """
  config = _unchecked_config(tile_k=64, swizzle=64, max_concurrent_steps=2,
                             **fields)
  a, b = _operands(m=2 * config.tile_m, n=config.tile_n, k=128)
  padded = functools.partial(mm_lib._int8_matmul_padded, out_dtype=jnp.float32,
                             config=config, has_bias=False)
  args = (a, b, jnp.ones((a.shape[0],)), jnp.ones((b.shape[0],)),
          jnp.zeros((b.shape[0],)))
  got = padded(*args, interpret=True)
  np.testing.assert_array_equal(np.asarray(got),
                                _exact_int(a, b).astype(np.float32))
  with pytest.raises(Exception, match=error):
    _lower_for_cuda(functools.partial(padded, interpret=False), *args)


# ---------------------------------------------------------------------------
# (c) int32 overflow.
# ---------------------------------------------------------------------------

K_OVERFLOW = 140_000  # 127 * 127 * K > 2**31 - 1


def test_naive_int32_dot_overflows():
  """Shows the overflow the chunking prevents is real (so (c) can fail)."""
  a = jnp.full((1, K_OVERFLOW), 127, jnp.int8)
  naive = jax.lax.dot_general(a, a, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
  assert int(naive[0, 0]) != 127 * 127 * K_OVERFLOW


@pytest.mark.parametrize("sign", [1, -1])
def test_reference_no_int32_overflow(sign):
  a = jnp.full((2, K_OVERFLOW), 127, jnp.int8)
  b = jnp.full((3, K_OVERFLOW), 127 * sign, jnp.int8)
  got = np.asarray(pk.int8_matmul_reference(a, b))
  np.testing.assert_array_equal(got, np.float32(sign * 127 * 127 * K_OVERFLOW))


def test_kernel_no_int32_overflow_interpret():
  a = jnp.full((64, K_OVERFLOW), 127, jnp.int8)
  b = jnp.full((8, K_OVERFLOW), 127, jnp.int8).at[1].set(-127)
  config = pk.Int8MatmulConfig(tile_m=64, tile_n=8, tile_k=4096,
                               max_concurrent_steps=2)
  got = pk.int8_matmul(a, b, config=config, interpret=True)
  want = np.full((64, 8), np.float32(127 * 127 * K_OVERFLOW))
  want[:, 1] *= -1
  np.testing.assert_array_equal(np.asarray(got), want)
  _assert_bits_equal(got, pk.int8_matmul_reference(a, b))


# ---------------------------------------------------------------------------
# (d) bad inputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [pk.int8_matmul, pk.int8_matmul_reference])
def test_matmul_bad_inputs(fn):
  a, b = _operands(m=4, n=5, k=6)
  with pytest.raises(TypeError, match="a must be an int8 array.*float32"):
    fn(a.astype(jnp.float32), b)
  with pytest.raises(TypeError, match="b must be an int8 array.*uint8"):
    fn(a, b.astype(jnp.uint8))
  with pytest.raises(ValueError, match=r"a must be 2-D.*\(1, 4, 6\)"):
    fn(a[None], b)
  with pytest.raises(ValueError, match=r"same K.*\(4, 6\).*\(5, 5\)"):
    fn(a, b[:, :5])
  with pytest.raises(ValueError, match=r"a_scale.*\(4,\).*\(5,\)"):
    fn(a, b, a_scale=jnp.ones((5,)))
  with pytest.raises(ValueError, match=r"b_scale.*\(5,\).*\(5, 1\)"):
    fn(a, b, b_scale=jnp.ones((5, 1)))
  with pytest.raises(ValueError, match=r"bias.*\(5,\).*\(4,\)"):
    fn(a, b, bias=jnp.ones((4,)))
  with pytest.raises(TypeError, match="out_dtype.*int16"):
    fn(a, b, out_dtype=jnp.int16)
  with pytest.raises(ValueError, match="out_dtype=int32.*b_scale, bias must be None"):
    fn(a, b, b_scale=2.0, bias=1.0, out_dtype=jnp.int32)
  with pytest.raises(TypeError, match="a_scale.*complex"):
    fn(a, b, a_scale=jnp.ones((4,), jnp.complex64))


def test_matmul_bad_config():
  with pytest.raises(ValueError, match="tile_k=96 must be a multiple of swizzle=64"):
    pk.Int8MatmulConfig(tile_k=96, swizzle=64)
  with pytest.raises(ValueError, match="tile_m=96"):
    pk.Int8MatmulConfig(tile_m=96)
  with pytest.raises(ValueError, match="tile_n=512"):
    pk.Int8MatmulConfig(tile_n=512)
  with pytest.raises(ValueError, match="tile_n=12"):
    pk.Int8MatmulConfig(tile_n=12)
  with pytest.raises(ValueError, match="swizzle=16"):
    pk.Int8MatmulConfig(swizzle=16, tile_k=128)
  with pytest.raises(ValueError, match="max_concurrent_steps=0"):
    pk.Int8MatmulConfig(max_concurrent_steps=0)
  with pytest.raises(ValueError, match="k_chunk=262144"):
    pk.Int8MatmulConfig(k_chunk=262144)
  with pytest.raises(ValueError, match="k_chunk=200 must be a multiple of tile_k=128"):
    pk.Int8MatmulConfig(k_chunk=200)
  with pytest.raises(TypeError, match="tile_m.*float"):
    pk.Int8MatmulConfig(tile_m=128.0)
  a, b = _operands(m=4, n=5, k=6)
  with pytest.raises(TypeError, match="config must be an Int8MatmulConfig"):
    pk.int8_matmul(a, b, config={"tile_m": 64})
  with pytest.raises(ValueError, match="k_chunk=0"):
    pk.int8_matmul_reference(a, b, k_chunk=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quantize_bad_inputs():
  x = jnp.ones((4, 6), jnp.float32)
  with pytest.raises(TypeError, match="x must be a floating-point.*int8"):
    pk.quantize_kmajor(x.astype(jnp.int8), 1.0)
  with pytest.raises(ValueError, match=r"x must be 2-D.*\(24,\)"):
    pk.quantize_kmajor(x.reshape(-1), 1.0)
  with pytest.raises(ValueError, match=r"scale must be a scalar.*\(4,\)"):
    pk.quantize_kmajor(x, jnp.ones((4,)))
  with pytest.raises(ValueError, match="rounding='up'"):
    pk.quantize_kmajor(x, 1.0, rounding="up")
  with pytest.raises(ValueError, match="key=None"):
    pk.quantize_kmajor_reference(x, 1.0, rounding="stochastic")


# ---------------------------------------------------------------------------
# The deprecated quantize names (the kernel is removed): the quantizer itself.
# ---------------------------------------------------------------------------


def _float_input(shape=(M, K), seed=0):
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 40.0
  # Ties (to even), values past the clip in both directions, zeros.
  x = x.at[0, :8].set(jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9, 0.0]))
  return x


def test_quantize_kmajor_is_deprecated():
  """The quantize kernel is removed (int8jax quantizes in XLA, fused into the
  producer); its names warn, name the replacement, and compute the XLA
  reference: (R, C), or (C, R) with transpose, any float input dtype."""
  x = _float_input()
  for fn in (pk.quantize_kmajor, pk.quantize_kmajor_reference):
    with pytest.warns(DeprecationWarning, match=r"int8jax\.quant\.quantize"):
      q = fn(x, 1.0)
    with pytest.warns(DeprecationWarning, match=fn.__name__):
      qt = fn(x.astype(jnp.bfloat16), 0.3, transpose=True)
    assert q.shape == (M, K) and qt.shape == (K, M) and q.dtype == qt.dtype == jnp.int8
    want = np.clip(np.round(np.asarray(x, np.float32) * np.float32(1.0)), -127, 127)
    np.testing.assert_array_equal(np.asarray(q), want)
    xt = np.asarray(x.astype(jnp.bfloat16), np.float32) * (np.float32(1) / np.float32(0.3))
    np.testing.assert_array_equal(np.asarray(qt), np.clip(np.round(xt), -127, 127).T)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quantize_reference_values():
  x = jnp.array([[0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9, 0.0, 253.9, -254.1]])
  got = np.asarray(pk.quantize_kmajor_reference(x, 2.0))
  # x / 2 = .25 .75 1.25 -.25 -.75 5e8 -5e8 0 126.95 -127.05
  np.testing.assert_array_equal(got, [[0, 1, 1, 0, -1, 127, -127, 0, 127, -127]])
  got = np.asarray(pk.quantize_kmajor_reference(x, 1.0))
  np.testing.assert_array_equal(got[0, :5], [0, 2, 2, 0, -2])  # ties to even


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_stochastic_rounding_reproducible_and_unbiased():
  x = jnp.full((64, 256), 0.3, jnp.float32)
  k1, k2 = jax.random.key(7), jax.random.key(8)
  q1 = pk.quantize_kmajor_reference(x, 1.0, rounding="stochastic", key=k1)
  q1b = pk.quantize_kmajor_reference(x, 1.0, rounding="stochastic", key=k1)
  q2 = pk.quantize_kmajor_reference(x, 1.0, rounding="stochastic", key=k2)
  _assert_bits_equal(q1, q1b)
  assert not np.array_equal(np.asarray(q1), np.asarray(q2))
  assert set(np.unique(np.asarray(q1))) <= {0, 1}
  mean = float(np.mean(np.asarray(q1, np.float64)))
  assert abs(mean - 0.3) < 0.02, mean  # 16384 draws: sd ~ 0.0036
  neg = pk.quantize_kmajor_reference(-x, 1.0, rounding="stochastic", key=k1)
  assert set(np.unique(np.asarray(neg))) <= {-1, 0}
  assert abs(float(np.mean(np.asarray(neg, np.float64))) + 0.3) < 0.02


def test_available_is_false_without_hopper():
  if jax.default_backend() != "gpu":
    assert pk.available() is False


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(M, N, K), (512, 256, 1024), (257, 8, 4104)])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_matmul_gpu_matches_reference(config, case, shape):
  m, n, k = shape
  a, b = _operands(m, n, k)
  build, out_dtype = CASES[case]
  kwargs = build(_scales(m, n))
  got = jax.jit(functools.partial(pk.int8_matmul, out_dtype=out_dtype,
                                  config=config))(a, b, **kwargs)
  want = pk.int8_matmul_reference(a, b, out_dtype=out_dtype, **kwargs)
  if case == "unscaled_f32":
    np.testing.assert_array_equal(np.asarray(got),
                                  _exact_int(a, b).astype(np.float32))
  # The epilogue's float rounding (mul, FMA) may differ by an ulp from XLA.
  tol = 1e-6 if out_dtype == jnp.float32 else 8e-3
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.gpu
@needs_gpu
def test_matmul_gpu_no_int32_overflow():
  a = jnp.full((256, K_OVERFLOW), 127, jnp.int8)
  b = jnp.full((128, K_OVERFLOW), -127, jnp.int8)
  got = jax.jit(pk.int8_matmul)(a, b)
  np.testing.assert_array_equal(np.asarray(got),
                                np.float32(-127 * 127 * K_OVERFLOW))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_matmul_gpu_int32_out_is_exact(config):
  a, b = _operands(257, 72, 4104)
  got = jax.jit(functools.partial(pk.int8_matmul, out_dtype=jnp.int32,
                                  config=config))(a, b)
  np.testing.assert_array_equal(np.asarray(got), _exact_int(a, b))


def test_check_smem_names_the_config_and_the_bytes():
  """One shared-memory check for every kernel (pallas_kernels._common.check_smem): a
  compiled block over Hopper's 227 KiB is refused with the config and its bytes;
  interpret mode has no limit."""
  big = pk.Int8MatmulConfig(tile_m=256, tile_n=256, tile_k=256, max_concurrent_steps=8)
  need = big.smem_bytes(jnp.float32)
  assert need > _common.SMEM_LIMIT_BYTES
  with pytest.raises(ValueError, match=f"needs {need} bytes of shared memory with "
                     "out_dtype=float32"):
    _common.check_smem(big, jnp.float32, interpret=False)
  _common.check_smem(big, jnp.float32, interpret=True)
  _common.check_smem(pk.select_config(128, 128, 128), jnp.float32, interpret=False)
