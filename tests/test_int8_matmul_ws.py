"""Tests of pallas_kernels.int8_matmul_ws (persistent, warp-specialised int8 GEMM).

On any machine: the kernel under the Mosaic GPU interpreter (several warpgroups a block, the
producer's TMA ring shared by all tiles of a block) equals int8_matmul's reference bit for bit
on small ragged shapes, for every epilogue and output dtype; every config the library picks
lowers for CUDA from the host (Mosaic GPU's own checks); config and argument errors name the
argument and value. On a Hopper GPU (marked ``gpu``): the compiled kernel against the
reference.
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
ws = importlib.import_module("pallas_kernels.int8_matmul_ws")  # pk.int8_matmul_ws: the function

C = ws.Int8MatmulWSConfig
needs_gpu = pytest.mark.skipif(not pk.available(),
                               reason="needs a Hopper GPU (sm_90) with Mosaic GPU")

# Small configs for the interpreter. Each block gets several tiles (num_ctas < tiles), so
# the ring's slots wrap across tile boundaries; K is ragged (zero-padded to whole steps).
TWO_M = C(tile_m=128, tile_n=32, tile_k=64, swizzle=64, max_concurrent_steps=3,
          epi_tile_n=None, num_ctas=2)
TWO_N = C(tile_m=64, tile_n=64, tile_k=32, swizzle=32, max_concurrent_steps=2,
          wg_split="n", epi_tile_n=16, grid_minor="m", grid_tile_width=2, num_ctas=3)
ONE = C(tile_m=64, tile_n=32, tile_k=64, swizzle=64, max_concurrent_steps=2,
        num_consumers=1, epi_tile_n=None, grid_tile_width=1, num_ctas=4)
SMALL_CONFIGS = {"2wg_m": TWO_M, "2wg_n_epi16": TWO_N, "1wg": ONE}

M, N, K = 130, 72, 200  # no multiples of any tile


def _operands(m=M, n=N, k=K, seed=0):
  """Random int8 operands with saturated rows and an all-zero output column."""
  rng = np.random.default_rng(seed)
  a = rng.integers(-127, 128, (m, k)).astype(np.int8)
  b = rng.integers(-127, 128, (n, k)).astype(np.int8)
  a[0], a[1], b[0], b[1] = 127, -127, 127, -127
  b[2] = 0
  return jnp.asarray(a), jnp.asarray(b)


def _scales(m=M, n=N, seed=1):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(1e-3, 2.0, (m,)), jnp.float32),
          jnp.asarray(rng.uniform(1e-3, 2.0, (n,)), jnp.float32),
          jnp.asarray(rng.normal(size=(n,)), jnp.float32))


def _exact_int(a, b):
  return np.asarray(a, np.int64) @ np.asarray(b, np.int64).T


def _assert_bits_equal(x, y):
  x, y = np.asarray(x), np.asarray(y)
  assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
  mismatches = int(np.sum(x.view(np.uint8) != y.view(np.uint8)))
  assert mismatches == 0, f"{mismatches} bytes differ"


# name: (kwargs from (a_scale, b_scale, bias), out_dtype)
EPILOGUES = {
    "unscaled_f32": (lambda s: {}, jnp.float32),
    "row_col_bias_f32": (lambda s: dict(a_scale=s[0], b_scale=s[1], bias=s[2]), jnp.float32),
    "per_tensor_bf16": (lambda s: dict(a_scale=jnp.float32(0.013), b_scale=0.25),
                        jnp.bfloat16),
    "col_bias_bf16": (lambda s: dict(b_scale=s[1], bias=s[2]), jnp.bfloat16),
    "int32": (lambda s: {}, jnp.int32),
}


# ---------------------------------------------------------------------------
# Interpreter == reference, bit for bit.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, epilogue", [
    ("2wg_m", "row_col_bias_f32"), ("2wg_m", "int32"), ("2wg_n_epi16", "per_tensor_bf16"),
    ("2wg_n_epi16", "unscaled_f32"), ("1wg", "col_bias_bf16"),
])
def test_interpret_matches_reference(name, epilogue):
  config = SMALL_CONFIGS[name]
  a, b = _operands()
  build, out_dtype = EPILOGUES[epilogue]
  kwargs = build(_scales())
  got = ws.int8_matmul_ws(a, b, out_dtype=out_dtype, config=config, interpret=True, **kwargs)
  want = pk.int8_matmul_reference(a, b, out_dtype=out_dtype, k_chunk=config.k_chunk, **kwargs)
  assert got.shape == (M, N) and got.dtype == jnp.dtype(out_dtype)
  _assert_bits_equal(got, want)
  if epilogue in ("unscaled_f32", "int32"):  # and the integers themselves
    np.testing.assert_array_equal(np.asarray(got), _exact_int(a, b).astype(got.dtype))


def test_interpret_k_chunks_flush_to_float32():
  """k_chunk = 3 steps, K = 8 steps (460 padded to 512): two full chunks and a shorter
  last one, each a fresh int32 accumulator, summed in float32 in chunk order (the
  reference's)."""
  a, b = _operands(m=70, n=40, k=460)
  config = C(tile_m=64, tile_n=32, tile_k=64, swizzle=64, max_concurrent_steps=2,
             k_chunk=192, num_consumers=1, epi_tile_n=None, num_ctas=2)
  a_scale, b_scale, bias = _scales(70, 40)
  got = ws.int8_matmul_ws(a, b, a_scale=a_scale, b_scale=b_scale, bias=bias, config=config,
                          interpret=True)
  want = pk.int8_matmul_reference(a, b, a_scale=a_scale, b_scale=b_scale, bias=bias,
                                  k_chunk=192)
  _assert_bits_equal(got, want)
  unscaled = ws.int8_matmul_ws(a, b, config=config, interpret=True)
  np.testing.assert_array_equal(np.asarray(unscaled), _exact_int(a, b).astype(np.float32))


def test_interpret_tiny_and_empty_shapes():
  a, b = _operands(m=3, n=5, k=7)  # one tile, one K step, one block
  got = ws.int8_matmul_ws(a, b, config=ONE, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), _exact_int(a, b).astype(np.float32))
  assert ws.int8_matmul_ws(a[:0], b, interpret=True).shape == (0, 5)
  got = ws.int8_matmul_ws(a[:, :0], b[:, :0], config=ONE, interpret=True)  # K = 0
  np.testing.assert_array_equal(np.asarray(got), np.zeros((3, 5), np.float32))


def test_interpret_under_jit():
  a, b = _operands()
  a_scale, b_scale, _ = _scales()
  f = jax.jit(functools.partial(ws.int8_matmul_ws, config=TWO_M, interpret=True))
  _assert_bits_equal(f(a, b, a_scale=a_scale, b_scale=b_scale),
                     pk.int8_matmul_reference(a, b, a_scale=a_scale, b_scale=b_scale))


# ---------------------------------------------------------------------------
# Lowering for CUDA from the host.
# ---------------------------------------------------------------------------


def _lower_for_cuda(f, *args):
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the module"
  return text


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("config", ws.WS_CONFIGS, ids=lambda c: f"{c.tile_m}x{c.tile_n}")
def test_library_configs_lower_for_cuda(config, out_dtype):
  m, n, k = 1000, 300, 700  # ragged for every config
  S = jax.ShapeDtypeStruct

  def f(a, b, s):
    kw = {} if out_dtype == jnp.int32 else dict(b_scale=s, bias=s)
    return ws.int8_matmul_ws(a, b, out_dtype=out_dtype, config=config, **kw)

  _lower_for_cuda(f, S((m, k), jnp.int8), S((n, k), jnp.int8), S((n,), jnp.float32))


def test_multi_chunk_lowers_for_cuda():
  """A weight-gradient-like GEMM, K = 300,000: three int32 chunks per tile."""
  S = jax.ShapeDtypeStruct
  _lower_for_cuda(lambda a, b: ws.int8_matmul_ws(a, b), S((64, 300_000), jnp.int8),
                  S((576, 300_000), jnp.int8))


def test_select_ws_config():
  assert ws.select_ws_config(802816, 64, 576) is ws.WS_NARROW_CONFIG
  assert ws.select_ws_config(64, 576, 802816) is ws.WS_SHORT_CONFIG
  assert ws.select_ws_config(4096, 4096, 4096) is ws.WS_DEFAULT_CONFIG
  for k in (64, 576, 4160):  # 128-wide steps would pad these by 64
    assert ws.select_ws_config(802816, 256, k) is ws.WS_DEFAULT_K64_CONFIG
  for k in (128, 640, 740):
    assert ws.select_ws_config(802816, 256, k) is ws.WS_DEFAULT_CONFIG
  assert all(ws.select_ws_config(m, n, k) in ws.WS_CONFIGS for m in (1, 64, 65, 10**6)
             for n in (1, 64, 65, 4096) for k in (1, 64, 65, 128, 10**6))
  for config in ws.WS_CONFIGS:
    for out_dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
      assert config.smem_bytes(out_dtype) <= _common.SMEM_LIMIT_BYTES, (config, out_dtype)
  assert ws.WS_DEFAULT_CONFIG == C() and ws.WS_DEFAULT_CONFIG.wg_tile == (64, 256)
  assert ws.WS_SHORT_CONFIG.wg_tile == (64, 96)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields, error", [
    (dict(tile_m=96), "tile_m=96"),
    (dict(tile_n=512), "tile_n=512"),
    (dict(tile_k=96, swizzle=64), "tile_k=96 must be a multiple of swizzle=64"),
    (dict(k_chunk=262144), "k_chunk=262144"),
    (dict(k_chunk=200), "k_chunk=200 must be a multiple of tile_k=128"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps=1 must be >= 2"),
    (dict(num_consumers=3), "num_consumers=3 must be 1 or 2"),
    (dict(wg_split="k"), "wg_split='k' must be 'm' or 'n'"),
    (dict(tile_m=64), "tile_m=64 must be a multiple of 128"),
    (dict(tile_n=24, wg_split="n"), "tile_n=24 must be a multiple of 16"),
    (dict(epi_tile_n=24), "epi_tile_n=24 must be None or a multiple of 16"),
    (dict(epi_tile_n=96), "epi_tile_n=96 .* 256 columns"),
    (dict(grid_minor="k"), "grid_minor='k'"),
    (dict(grid_tile_width=0), "grid_tile_width=0 must be >= 1"),
    (dict(num_ctas=0), "num_ctas=0 must be None or an int >= 1"),
])
def test_bad_config(fields, error):
  with pytest.raises(ValueError, match=error):
    C(**fields)


def test_bad_config_types():
  with pytest.raises(TypeError, match="tile_m.*float"):
    C(tile_m=128.0)
  with pytest.raises(TypeError, match="num_consumers.*str"):
    C(num_consumers="2")
  with pytest.raises(ValueError, match="num_ctas=2.5"):
    C(num_ctas=2.5)


def test_bad_inputs():
  a, b = _operands(m=4, n=5, k=6)
  # int8_matmul's own checks, shared
  with pytest.raises(TypeError, match="a must be an int8 array.*float32"):
    ws.int8_matmul_ws(a.astype(jnp.float32), b)
  with pytest.raises(ValueError, match=r"same K.*\(4, 6\).*\(5, 5\)"):
    ws.int8_matmul_ws(a, b[:, :5])
  with pytest.raises(ValueError, match=r"bias.*\(5,\).*\(4,\)"):
    ws.int8_matmul_ws(a, b, bias=jnp.ones((4,)))
  with pytest.raises(ValueError, match="out_dtype=int32.*b_scale must be None"):
    ws.int8_matmul_ws(a, b, b_scale=2.0, out_dtype=jnp.int32)
  with pytest.raises(ValueError, match="K <= k_chunk.*K=70, k_chunk=64"):
    ws.int8_matmul_ws(*_operands(m=4, n=5, k=70), out_dtype=jnp.int32,
                      config=C(tile_m=128, tile_n=32, tile_k=64, swizzle=64, k_chunk=64,
                               max_concurrent_steps=2, epi_tile_n=None))
  # and its own
  with pytest.raises(TypeError, match="config must be an Int8MatmulWSConfig"):
    ws.int8_matmul_ws(a, b, config=pk.DEFAULT_CONFIG)
  with pytest.raises(ValueError, match="shared memory with out_dtype=float32"):
    ws.int8_matmul_ws(a, b, config=C(max_concurrent_steps=4))
  with pytest.raises(ValueError, match="rows of 16 bytes of bfloat16"):
    ws.int8_matmul_ws(a, b, out_dtype=jnp.bfloat16,
                      config=C(tile_m=64, tile_n=16, wg_split="n", epi_tile_n=None))


# ---------------------------------------------------------------------------
# On a Hopper GPU.
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(M, N, K), (1000, 520, 4104), (4096, 64, 576),
                                   (64, 576, 300_000)])
@pytest.mark.parametrize("num_ctas", [None, 3])  # 3: several tiles a block
@pytest.mark.parametrize("epilogue", ["row_col_bias_f32", "col_bias_bf16", "int32"])
def test_gpu_matches_reference(shape, num_ctas, epilogue):
  m, n, k = shape
  build, out_dtype = EPILOGUES[epilogue]
  if out_dtype == jnp.int32 and k > pk.INT32_SAFE_K:
    pytest.skip("int32 output needs one K chunk")
  config = dataclasses.replace(ws.select_ws_config(m, n, k), num_ctas=num_ctas)
  a, b = _operands(m, n, k)
  kwargs = build(_scales(m, n))
  got = jax.jit(functools.partial(ws.int8_matmul_ws, out_dtype=out_dtype,
                                  config=config))(a, b, **kwargs)
  want = pk.int8_matmul_reference(a, b, out_dtype=out_dtype, **kwargs)
  if epilogue in ("unscaled_f32", "int32"):
    np.testing.assert_array_equal(np.asarray(got), _exact_int(a, b).astype(got.dtype))
  # The epilogue's float rounding (mul, FMA) may differ by an ulp from XLA's.
  tol = 1e-6 if out_dtype == jnp.float32 else 8e-3
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)
