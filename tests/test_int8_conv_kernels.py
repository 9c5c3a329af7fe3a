"""Tests of pallas_kernels.int8_conv: implicit-GEMM int8 conv, dgrad, wgrad.

On any machine (CPU included):
  * every kernel config, run under Mosaic GPU interpret mode, equals the XLA
    reference bit for bit on shapes that are no tile multiples (odd spatial
    sizes, ragged channels, strides 1 and 2, 1x1 stride 2, batch > 1,
    saturated +-127 operands), for int32 / float32 / bfloat16 outputs,
    scalar and per-channel scales and bias;
  * the decomposition itself (phases, row pitch, shifted copies, sub-pixel
    dgrad, interleave) on many geometries through the plan's XLA launcher;
  * the references against independent computations (int64 numpy, the
    float VJP of ``lax.conv_general_dilated``);
  * every config, and fwd + dgrad of ResNet-50 layers at batch 256, lowered
    for CUDA from the host (Mosaic GPU's own layout / TMA / wgmma checks);
  * the traced computation holds no im2col-sized array;
  * argument errors name the argument and its value.
On a Hopper GPU (marked ``gpu``): the compiled kernels against the reference
(computed on the CPU: XLA:GPU has no int8 backward convs).
"""

import functools
import importlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

from pallas_kernels import _common
from pallas_kernels import conv_common
from pallas_kernels import conv_dgrad
from pallas_kernels import conv_forward
from pallas_kernels import conv_wgrad

# A small config: several blocks in M and N, several K chunks, the 32-byte
# swizzle, and a 2-deep ring that wraps around.
SMALL_CONFIG = pk.Int8ConvConfig(tile_m=64, tile_n=32, tile_k=32, swizzle=32,
                                 max_concurrent_steps=2)
ALL_CONFIGS = pk.CONV_CONFIGS + (SMALL_CONFIG,)
CONFIG_IDS = [c.name for c in ALL_CONFIGS]
# wgrad: tile_m input channels, tile_n output channels, tile_k pixels.
SMALL_WGRAD = pk.Int8ConvConfig(tile_m=64, tile_n=32, tile_k=64, swizzle=32,
                                max_concurrent_steps=2)
ALL_WGRAD = pk.WGRAD_CONFIGS + (SMALL_WGRAD,)
WGRAD_IDS = [c.name for c in ALL_WGRAD]

needs_gpu = pytest.mark.skipif(not pk.available(),
                               reason="needs a Hopper GPU (sm_90) with Mosaic GPU")

C, O = 24, 40  # ragged channel counts (no multiple of any tile)


def _int8(shape, seed):
  """Random int8 in [-127, 127] with saturated blocks mixed in."""
  rng = np.random.default_rng(seed)
  a = rng.integers(-127, 128, shape).astype(np.int8)
  flat = a.reshape(-1, shape[-1])
  flat[: max(1, len(flat) // 5)] = 127             # a run of all +127 rows
  flat[len(flat) // 2: len(flat) // 2 + 3] = -127  # and of -127
  return jnp.asarray(a)


def _operands(x_shape, w_shape, seed=0):
  x = _int8(x_shape, seed)
  w = _int8(w_shape, seed + 1)
  # One output channel of saturated weights: worst-case-magnitude sums.
  w = w.at[..., 0].set(127).at[..., 1].set(-127)
  return x, w


def _epilogue_args(n, seed=2):
  rng = np.random.default_rng(seed)
  scale = jnp.asarray(rng.uniform(1e-3, 2.0, (n,)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
  return scale, bias


def _assert_bits_equal(x, y):
  x, y = np.asarray(x), np.asarray(y)
  assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape,
                                                    y.shape)
  mismatches = int(np.sum(x.view(np.uint8) != y.view(np.uint8)))
  assert mismatches == 0, f"{mismatches} bytes differ"


def _numpy_pad(x, pads):
  """NHWC zero padding with (lo, hi) pairs; negative values crop."""
  (lo_h, hi_h), (lo_w, hi_w) = pads
  xp = np.pad(np.asarray(x, np.int64),
              ((0, 0), (max(lo_h, 0), max(hi_h, 0)),
               (max(lo_w, 0), max(hi_w, 0)), (0, 0)))
  return xp[:, max(-lo_h, 0): xp.shape[1] - max(-hi_h, 0),
            max(-lo_w, 0): xp.shape[2] - max(-hi_w, 0)]


def _numpy_wgrad(x, g, kernel_shape, strides, pads):
  """Exact int64 weight gradient by explicit windows."""
  xp = _numpy_pad(x, pads)
  g = np.asarray(g, np.int64)
  kh, kw = kernel_shape[:2]
  ho, wo = g.shape[1:3]
  out = np.zeros(kernel_shape, np.int64)
  for i in range(kh):
    for j in range(kw):
      win = xp[:, i: i + strides[0] * (ho - 1) + 1: strides[0],
               j: j + strides[1] * (wo - 1) + 1: strides[1]]
      out[i, j] = np.einsum("nhwc,nhwo->co", win, g)
  return out


def _numpy_conv(x, w, strides, pads):
  """Exact int64 conv by explicit windows (independent of lax)."""
  xp = _numpy_pad(x, pads)
  w = np.asarray(w, np.int64)
  kh, kw = w.shape[:2]
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]), np.int64)
  for i in range(kh):
    for j in range(kw):
      win = xp[:, i: i + strides[0] * (ho - 1) + 1: strides[0],
               j: j + strides[1] * (wo - 1) + 1: strides[1]]
      out += np.einsum("nhwc,co->nhwo", win, w[i, j])
  return out


# ---------------------------------------------------------------------------
# (a) the kernels under interpret mode == reference, bit for bit.
# ---------------------------------------------------------------------------

# name: (x shape, w shape, strides, padding)
FWD_GEOMETRIES = {
    "3x3_s1_7x9_b2": ((2, 7, 9, C), (3, 3, C, O), (1, 1), ((1, 1), (1, 1))),
    "3x3_s2_9x11": ((1, 9, 11, C), (3, 3, C, O), (2, 2), ((1, 1), (1, 1))),
    "3x3_s2_same_10x8_b2": ((2, 10, 8, C), (3, 3, C, O), (2, 2), "SAME"),
    "1x1_s2_9x11_b2": ((2, 9, 11, C), (1, 1, C, O), (2, 2), "VALID"),
    "1x1_s1_7x9": ((1, 7, 9, C), (1, 1, C, O), (1, 1), "VALID"),
}

# name: (out_dtype, epilogue kwargs builder)
EPILOGUES = {
    "int32": (jnp.int32, lambda n: {}),
    "f32_channel_scale_bias": (
        jnp.float32, lambda n: dict(zip(("scale", "bias"), _epilogue_args(n)))),
    "bf16_scalar_scale": (jnp.bfloat16, lambda n: dict(scale=0.0123)),
    "f32_unscaled_bias": (jnp.float32,
                          lambda n: dict(bias=_epilogue_args(n)[1])),
}


def _fwd_case(geometry, epilogue, config, jit=False, interpret=True):
  x_shape, w_shape, strides, padding = FWD_GEOMETRIES[geometry]
  x, w = _operands(x_shape, w_shape)
  out_dtype, build = EPILOGUES[epilogue]
  static = dict(window_strides=strides, padding=padding, out_dtype=out_dtype)
  arrays = build(w_shape[3])
  kernel = functools.partial(pk.int8_conv, config=config, interpret=interpret,
                             **static)
  if jit:  # the wrapper inside a caller's jit, scale and bias traced
    kernel = jax.jit(kernel)
  got = kernel(x, w, **arrays)
  _assert_bits_equal(got, pk.int8_conv_reference(x, w, **static, **arrays))
  if out_dtype == jnp.int32:  # and the integers against int64 numpy
    pads = conv_common.check_padding(padding, x_shape[1:3], w_shape[:2], strides)
    np.testing.assert_array_equal(np.asarray(got),
                                  _numpy_conv(x, w, strides, pads))


# (SMALL_CONFIG runs in the geometry tests below.)
@pytest.mark.parametrize("config", pk.CONV_CONFIGS,
                         ids=[c.name for c in pk.CONV_CONFIGS])
def test_forward_interpret_every_config(config):
  """Each config on a 3x3 stride-1 batch-2 conv with the full epilogue."""
  _fwd_case("3x3_s1_7x9_b2", "f32_channel_scale_bias", config)


# One interpret run per geometry (each run is a compile of seconds), each
# with a different epilogue, so every geometry and every epilogue is covered.
@pytest.mark.parametrize("geometry, epilogue, jit", [
    ("3x3_s2_9x11", "int32", False),
    ("3x3_s2_same_10x8_b2", "bf16_scalar_scale", False),
    ("1x1_s2_9x11_b2", "f32_unscaled_bias", False),
    ("1x1_s1_7x9", "f32_channel_scale_bias", True),
])
def test_forward_interpret_geometries(geometry, epilogue, jit):
  if geometry != "3x3_s2_9x11":
    _fwd_case(geometry, epilogue, SMALL_CONFIG, jit=jit)
    return
  # This one with the interpreter's race detector: the TMA ring (2 slots,
  # wrapping 9 times, 2 shifted copies) has no race it can see.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  gpu_callbacks.reset_gpu_interpret_mode_state()
  _fwd_case(geometry, epilogue, SMALL_CONFIG, jit=jit,
            interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert gpu_callbacks.get_races().races_found is False


def test_interpret_race_detector_sees_missing_barrier_waits(monkeypatch):
  """The check above can fail: the same kernel without its barrier waits."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  kwargs = dict(window_strides=(2, 2), padding="SAME", out_dtype=jnp.int32,
                config=SMALL_CONFIG,
                interpret=plgpu.InterpretGPUParams(detect_races=True))
  # A shape no other test uses: the jit cache must not serve this kernel.
  x, w = _operands((1, 5, 7, C), (3, 3, C, O))
  monkeypatch.setattr(plgpu, "barrier_wait", lambda barrier: None)
  try:
    # jax 0.12: the race detector; 0.11.2: its barrier-phase check.
    with pytest.raises(Exception,
                       match="RACE DETECTED|no threads observed phase"):
      jax.block_until_ready(pk.int8_conv(x, w, **kwargs))
  finally:
    gpu_callbacks.reset_gpu_interpret_mode_state()


# name: (input shape, w shape, strides, padding)
DGRAD_GEOMETRIES = {
    "3x3_s1_7x9_b2": ((2, 7, 9, C), (3, 3, C, O), (1, 1), ((1, 1), (1, 1))),
    "3x3_s2_9x11": ((1, 9, 11, C), (3, 3, C, O), (2, 2), ((1, 1), (1, 1))),
    "1x1_s2_9x11_b2": ((2, 9, 11, C), (1, 1, C, O), (2, 2), "VALID"),
}


# Strides 2 (4 launches, one a 1x1 with 3 all-zero phases) and 1; more
# dgrad geometries run through the XLA launcher in (b).
@pytest.mark.parametrize("geometry, epilogue, config", [
    ("3x3_s1_7x9_b2", "int32", SMALL_CONFIG),
    ("3x3_s2_9x11", "f32_channel_scale_bias", pk.CONV_CONFIGS[3]),
    ("1x1_s2_9x11_b2", "bf16_scalar_scale", pk.CONV_CONFIGS[0]),
], ids=lambda v: v.name if isinstance(v, pk.Int8ConvConfig) else None)
def test_dgrad_interpret(geometry, epilogue, config):
  x_shape, w_shape, strides, padding = DGRAD_GEOMETRIES[geometry]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  g, w = _operands(g_shape, w_shape, seed=5)
  out_dtype, build = EPILOGUES[epilogue]
  kwargs = dict(input_shape=x_shape, window_strides=strides, padding=padding,
                out_dtype=out_dtype, **build(x_shape[3]))
  got = pk.int8_conv_dgrad(g, w, config=config, interpret=True, **kwargs)
  _assert_bits_equal(got, pk.int8_conv_dgrad_reference(g, w, **kwargs))


# ---------------------------------------------------------------------------
# (a') weight gradient under interpret mode == reference == int64 numpy.
# ---------------------------------------------------------------------------

WGRAD_GEOMETRIES = {
    "3x3_s1_7x9_b2": ((2, 7, 9, C), (3, 3, C, O), (1, 1), ((1, 1), (1, 1))),
    "3x3_s2_9x11": ((1, 9, 11, C), (3, 3, C, O), (2, 2), ((1, 1), (1, 1))),
    "1x1_s2_9x11_b2": ((2, 9, 11, C), (1, 1, C, O), (2, 2), "VALID"),
}


def _wgrad_case(geometry, config, out_dtype=jnp.float32, scaled=True):
  x_shape, k_shape, strides, padding = WGRAD_GEOMETRIES[geometry]
  x = _int8(x_shape, 11)
  g = _int8(pk.conv_output_shape(x_shape, k_shape, strides, padding), 12)
  kwargs = dict(kernel_shape=k_shape, window_strides=strides, padding=padding,
                out_dtype=out_dtype)
  if scaled:
    kwargs["scale"] = _epilogue_args(k_shape[3])[0]
  got = pk.int8_conv_wgrad(x, g, config=config, interpret=True, **kwargs)
  _assert_bits_equal(got, pk.int8_conv_wgrad_reference(x, g, **kwargs))
  if not scaled and out_dtype == jnp.float32:
    pads = conv_common.check_padding(padding, x_shape[1:3], k_shape[:2], strides)
    want = _numpy_wgrad(x, g, k_shape, strides, pads).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got), want)


# (SMALL_WGRAD runs in the geometry tests below.)
@pytest.mark.parametrize("config", pk.WGRAD_CONFIGS,
                         ids=[c.name for c in pk.WGRAD_CONFIGS])
def test_wgrad_interpret_every_config(config):
  _wgrad_case("3x3_s1_7x9_b2", config)


@pytest.mark.parametrize("geometry, out_dtype, scaled", [
    ("3x3_s2_9x11", jnp.float32, False),
    ("1x1_s2_9x11_b2", jnp.bfloat16, True),
])
def test_wgrad_interpret_geometries(geometry, out_dtype, scaled):
  _wgrad_case(geometry, SMALL_WGRAD, out_dtype, scaled)


def test_wgrad_parts_combine_exactly_past_int32():
  """N*Ho*Wo = 140,000 all-127 products per weight: int32 would overflow
  (127*127*140,000 > 2**31); the parts (<= 131,072 pixels each) are
  combined exactly, in the reference and in the kernel's plan (XLA
  launcher: the same parts and combination as the kernel)."""
  x = jnp.full((1, 350, 400, 2), 127, jnp.int8)
  g = jnp.full((1, 350, 400, 3), 127, jnp.int8).at[..., 1].set(-127)
  k_shape = (1, 1, 2, 3)
  want = np.full(k_shape, np.float32(127 * 127 * 140_000))
  want[..., 1] *= -1
  ref = pk.int8_conv_wgrad_reference(x, g, kernel_shape=k_shape)
  np.testing.assert_array_equal(np.asarray(ref), want)
  got = conv_wgrad._int8_conv_wgrad_impl(
      x, g, None, kernel_shape=k_shape, strides=(1, 1),
      pads=((0, 0), (0, 0)), out_dtype=jnp.dtype(jnp.float32),
      config=SMALL_WGRAD, launcher="xla")
  np.testing.assert_array_equal(np.asarray(got), want)
  split = conv_wgrad.wgrad_plan(x.shape, k_shape, (1, 1), ((0, 0), (0, 0)),
                                 SMALL_WGRAD)[2]
  assert split.parts >= 2 and split.part_len <= pk.INT32_SAFE_K, split


def test_combine_int32_chunks_is_exact_and_order_free():
  rng = np.random.default_rng(0)
  parts = rng.integers(-2**31 + 1, 2**31 - 1, (200, 50), dtype=np.int64)
  exact = parts.sum(axis=0)
  got = np.asarray(_common.combine_int32_chunks(jnp.asarray(parts, jnp.int32)))
  np.testing.assert_array_equal(got, exact.astype(np.float32))


def test_int8jax_exact_uses_the_kernels_halves_arithmetic():
  """One definition of the int32 halves arithmetic: int8jax.exact's public
  names are pallas_kernels' functions (the Pallas wgrad and the XLA route
  combine their parts identically)."""
  from int8jax import exact
  assert exact.split_halves is pk.split_halves is _common.split_halves
  assert exact.join_halves is pk.join_halves is _common.join_halves
  assert exact.combine_int32_chunks is pk.combine_int32_chunks


# ---------------------------------------------------------------------------
# (b) the decomposition on many geometries (XLA launcher, fast).
# ---------------------------------------------------------------------------

PLAN_GEOMETRIES = [
    # (x shape, w shape, strides, padding)
    ((2, 7, 9, 5), (3, 3, 5, 3), (1, 1), "SAME"),
    ((1, 10, 8, 5), (3, 3, 5, 3), (2, 2), ((1, 2), (0, 1))),
    ((2, 9, 7, 5), (2, 3, 5, 3), (1, 2), "VALID"),
    ((1, 11, 10, 5), (5, 1, 5, 3), (3, 2), "SAME"),
    ((2, 7, 9, 5), (3, 3, 5, 3), (2, 2), ((-1, 2), (2, -1))),
    ((1, 2, 3, 5), (3, 3, 5, 3), (2, 2), "SAME"),   # image smaller than 3x3
]


@pytest.mark.parametrize("geometry", PLAN_GEOMETRIES, ids=str)
def test_plans_match_reference_xla_launcher(geometry):
  """Phases, pitch, copies, taps, sub-pixel dgrad, interleave, wgrad's
  transposed copies and split: all exact."""
  x_shape, w_shape, strides, padding = geometry
  x, w = _operands(x_shape, w_shape, seed=7)
  strides_n, pads = conv_forward.check_conv_args(x, w, strides, padding)
  i32 = jnp.dtype(jnp.int32)
  got = conv_forward._int8_conv_impl(x, w, None, None, strides=strides_n, pads=pads,
                                     out_dtype=i32, config=SMALL_CONFIG, launcher="xla")
  np.testing.assert_array_equal(np.asarray(got),
                                _numpy_conv(x, w, strides_n, pads))
  g = _int8(pk.conv_output_shape(x_shape, w_shape, strides, padding), 8)
  got = conv_dgrad._int8_conv_dgrad_impl(g, w, None, None, input_shape=x_shape,
                                         strides=strides_n, pads=pads, out_dtype=i32,
                                         config=SMALL_CONFIG, launcher="xla")
  want = pk.int8_conv_dgrad_reference(g, w, input_shape=x_shape,
                                      window_strides=strides, padding=padding,
                                      out_dtype=jnp.int32)
  _assert_bits_equal(got, want)
  got = conv_wgrad._int8_conv_wgrad_impl(x, g, None, kernel_shape=w_shape,
                                         strides=strides_n, pads=pads,
                                         out_dtype=jnp.dtype(jnp.float32),
                                         config=SMALL_WGRAD, launcher="xla")
  np.testing.assert_array_equal(
      np.asarray(got),
      _numpy_wgrad(x, g, w_shape, strides_n, pads).astype(np.float32))


@pytest.mark.parametrize("geometry", PLAN_GEOMETRIES[:5], ids=str)
def test_dgrad_reference_is_the_conv_vjp(geometry):
  """The dgrad reference equals JAX's own transpose of the conv (exact in
  float32 here: |sums| < 2**24)."""
  x_shape, w_shape, strides, padding = geometry
  w = _int8(w_shape, 3)
  g = _int8(pk.conv_output_shape(x_shape, w_shape, strides, padding), 4)
  conv = lambda x: jax.lax.conv_general_dilated(
      x, w.astype(jnp.float32), strides, padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  _, vjp = jax.vjp(conv, jnp.zeros(x_shape, jnp.float32))
  want = vjp(g.astype(jnp.float32))[0]
  got = pk.int8_conv_dgrad_reference(g, w, input_shape=x_shape,
                                     window_strides=strides, padding=padding,
                                     out_dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want))


def test_row_pitch_and_copies_of_resnet_layers():
  """The plans the benchmark shapes get: copies and grid waste as documented."""
  def plan(h, c, o, k, s, pads):
    cfg = pk.select_conv_config(c, o)
    p, _ = conv_common.forward_plan(256, h, h, c, k, k, o, (s, s), pads, cfg.tile_m,
                                    _common.round_up(c, cfg.tile_k),
                                    _common.round_up(o, cfg.tile_n), 4)
    return p.wg, len(p.residues), p.m_pad / (256 * ((h + sum(pads[0]) - k) //
                                                     s + 1) ** 2)
  same3 = ((1, 1), (1, 1))
  assert plan(56, 64, 64, 3, 1, same3)[:2] == (64, 3)      # 3 copies, pitch 64
  assert plan(56, 128, 128, 3, 2, same3)[:2] == (32, 2)    # 4 phases, 2 copies
  wg, copies, waste = plan(56, 256, 512, 1, 2, ((0, 0), (0, 0)))
  assert (wg, copies, waste) == (28, 1, 1.0)               # the subsample only
  assert plan(7, 512, 512, 3, 1, same3)[:2] == (9, 5)      # unrounded pitch
  assert plan(56, 64, 64, 3, 1, same3)[2] < 1.2


# ---------------------------------------------------------------------------
# (c) lowering for CUDA from the host (Mosaic GPU's own checks).
# ---------------------------------------------------------------------------


def _lower_for_cuda(f, *args):
  lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the module"
  return text


def _sds(shape, dtype=jnp.int8):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_forward_lowers_for_cuda(config):
  """Stride 1 (3 shifted copies) with f32 + bias, stride 2 (4 phases, 2
  copies) with bf16 and with int32: every output path of every config."""
  for strides, out_dtype, has_bias in (((1, 1), jnp.float32, True),
                                       ((2, 2), jnp.bfloat16, False),
                                       ((2, 2), jnp.int32, False)):
    def f(x, w, s, strides=strides, out_dtype=out_dtype, has_bias=has_bias):
      kwargs = {} if out_dtype == jnp.int32 else dict(scale=s)
      if has_bias:
        kwargs["bias"] = s
      return pk.int8_conv(x, w, window_strides=strides, padding="SAME",
                          out_dtype=out_dtype, config=config, **kwargs)
    _lower_for_cuda(f, _sds((2, 9, 11, C)), _sds((3, 3, C, O)),
                    _sds((O,), jnp.float32))


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=CONFIG_IDS)
def test_dgrad_lowers_for_cuda(config):
  x_shape, w_shape = (2, 9, 11, C), (3, 3, C, O)
  g_shape = pk.conv_output_shape(x_shape, w_shape, (1, 1), "SAME")

  def f(g, w, s):
    return pk.int8_conv_dgrad(g, w, input_shape=x_shape, padding="SAME",
                              scale=s, bias=s, config=config)
  _lower_for_cuda(f, _sds(g_shape), _sds(w_shape), _sds((C,), jnp.float32))


@pytest.mark.parametrize("config", ALL_WGRAD, ids=WGRAD_IDS)
def test_wgrad_lowers_for_cuda(config):
  for strides in ((1, 1), (2, 2)):
    x_shape, k_shape = (2, 9, 11, C), (3, 3, C, O)
    g_shape = pk.conv_output_shape(x_shape, k_shape, strides, "SAME")

    def f(x, g, s, strides=strides):
      return pk.int8_conv_wgrad(x, g, kernel_shape=k_shape,
                                window_strides=strides, padding="SAME",
                                scale=s, config=config)
    _lower_for_cuda(f, _sds(x_shape), _sds(g_shape), _sds((O,), jnp.float32))


RESNET_LAYERS = {
    # name: (input (N, H, W, C), kernel (KH, KW, C, O), strides, padding)
    "3x3_64_56": ((256, 56, 56, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
    "3x3s2_128_56": ((256, 56, 56, 128), (3, 3, 128, 128), (2, 2),
                     ((1, 1), (1, 1))),
    "1x1s2_256_512": ((256, 56, 56, 256), (1, 1, 256, 512), (2, 2),
                      ((0, 0), (0, 0))),
    "3x3_512_7": ((256, 7, 7, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1))),
}


@pytest.mark.parametrize("layer", list(RESNET_LAYERS))
def test_resnet50_fwd_dgrad_wgrad_lower_for_cuda(layer):
  """The forward, input and weight gradients of a ResNet-50 layer, batch
  256, with the default configs (what int8jax would run)."""
  x_shape, w_shape, strides, padding = RESNET_LAYERS[layer]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)

  def f(x, w, g, s_out, s_in):
    y = pk.int8_conv(x, w, window_strides=strides, padding=padding,
                     scale=s_out, out_dtype=jnp.bfloat16)
    dx = pk.int8_conv_dgrad(g, w, input_shape=x_shape, window_strides=strides,
                            padding=padding, scale=s_in)
    dw = pk.int8_conv_wgrad(x, g, kernel_shape=w_shape, window_strides=strides,
                            padding=padding, scale=s_out)
    return y, dx, dw
  text = _lower_for_cuda(f, _sds(x_shape), _sds(w_shape), _sds(g_shape),
                         _sds((w_shape[3],), jnp.float32),
                         _sds((w_shape[2],), jnp.float32))
  launches = text.count("custom_call @mosaic_gpu")
  # forward + one dgrad launch per output phase with taps (1x1 stride 2:
  # the even pixels only; the other three phases are epilogue(0)) + wgrad.
  want = {"3x3s2_128_56": 1 + 4 + 1}.get(layer, 3)
  assert launches == want, (launches, want)


def _unaligned_window_copy(x, *, row, interpret):
  """A minimal kernel: TMA rows [row, row+64) of x into tiled SMEM, store."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  def body(x_gmem, o_gmem, a_smem, o_smem, barrier):
    start = jax.lax.axis_index("m") * 8 + row  # dynamic, row + 8*m
    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(start, 64), :], a_smem, barrier)
    plgpu.barrier_wait(barrier)
    o_smem[...] = a_smem[...]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)

  tiled = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((64, 128), jnp.int8),
      scratch_types=[plgpu.SMEM((64, 128), jnp.int8, transforms=tiled),
                     plgpu.SMEM((64, 128), jnp.int8, transforms=tiled),
                     plgpu.Barrier()],
      grid=(1,), grid_names=("m",),
      interpret=plgpu.InterpretGPUParams() if interpret else None)(x)


def test_cuda_lowering_refuses_unaligned_tap_windows():
  """Why the shifted copies exist, and a check interpret mode cannot make.

  A TMA window into (8, swizzle)-tiled SMEM starting 3 rows off the 8-row
  grid: the interpreter copies the right rows, Mosaic GPU refuses to lower
  it (on hardware the tiled TMA would split the row into (row // 8,
  row % 8) and load zeros/garbage). With 8-aligned starts both agree.
  """
  x = jnp.asarray(np.arange(256 * 128).reshape(256, 128) % 251 - 125,
                  jnp.int8)
  got = _unaligned_window_copy(x, row=3, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(x[3:67]))
  with pytest.raises(Exception, match="divisibility"):
    _lower_for_cuda(functools.partial(_unaligned_window_copy, row=3,
                                      interpret=False), x)
  _lower_for_cuda(functools.partial(_unaligned_window_copy, row=8,
                                    interpret=False), x)


# ---------------------------------------------------------------------------
# (d) memory: no patch matrix.
# ---------------------------------------------------------------------------


def _intermediates(fn, *args):
  """Every array the traced computation creates (avals), kernel body aside."""
  closed = jax.make_jaxpr(fn)(*args)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.extend(v.aval for v in eqn.outvars)
      if eqn.primitive.name == "custom_vmap_call":
        continue  # the Mosaic GPU kernel: its refs are SMEM / registers
      for param in eqn.params.values():
        if isinstance(param, jax.extend.core.ClosedJaxpr):
          walk(param.jaxpr)
        elif isinstance(param, jax.extend.core.Jaxpr):
          walk(param)
  walk(closed.jaxpr)
  return found


def _nbytes(aval):
  return int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize


def _memory_profile(fn, x, w, out_bytes):
  """(largest int8 intermediate, int8 bytes the kernels read, largest other
  intermediate), relative to the input x (int8) and output (float) bytes."""
  closed = jax.make_jaxpr(fn)(x, w)
  avals = _intermediates(fn, x, w)
  int8 = [_nbytes(a) for a in avals if a.dtype == jnp.int8]
  other = [_nbytes(a) for a in avals if a.dtype != jnp.int8]
  kernel_in = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "custom_vmap_call":
        kernel_in.extend(_nbytes(v.aval) for v in eqn.invars
                         if v.aval.dtype == jnp.int8)
      for param in eqn.params.values():
        if isinstance(param, jax.extend.core.ClosedJaxpr):
          walk(param.jaxpr)
  walk(closed.jaxpr)
  x_bytes = _nbytes(x)
  return (max(int8) / x_bytes, sum(kernel_in) / x_bytes,
          max(other) / out_bytes)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_no_intermediate_near_im2col_size(strides):
  x = _sds((8, 56, 56, 64))
  w = _sds((3, 3, 64, 64))
  out = pk.conv_output_shape(x.shape, w.shape, strides, "SAME")
  out_bytes = int(np.prod(out)) * 4
  conv = lambda x, w: pk.int8_conv(x, w, window_strides=strides,
                                   padding="SAME", scale=0.5)
  largest, kernel_reads, largest_float = _memory_profile(conv, x, w,
                                                         out_bytes)
  # Measured (8x56x56x64): stride 1: largest 1.19x (one shifted copy of the
  # padded source), the kernel's int8 operands 3.59x (3 copies + weights);
  # stride 2: 1.18x, 2.39x (4 phases of 29x32, 2 copies). The float result
  # grid is 1.18x the output (the dropped rows / columns).
  assert largest <= 1.25, largest
  assert kernel_reads <= (3.6 if strides == (1, 1) else 2.45), kernel_reads
  assert largest_float <= 1.25, largest_float

  # The same measure on an explicit im2col conv finds the 9x patch matrix,
  # so the bound above is one the im2col route fails.
  def im2col(x, w):
    patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), strides, "SAME",
        dimension_numbers=("NHWC", "OIHW", "NHWC"))
    return pk.int8_matmul_reference(
        patches.reshape(-1, patches.shape[-1]),
        w.transpose(3, 2, 0, 1).reshape(64, -1))
  largest_im2col = _memory_profile(im2col, x, w, out_bytes)[0]
  assert largest_im2col >= 9 / strides[0] ** 2 - 0.01, largest_im2col

  # The weight gradient (x and g int8; the transposed shifted copies).
  g = _sds(out)
  wgrad = lambda x, g: pk.int8_conv_wgrad(x, g, kernel_shape=w.shape,
                                          window_strides=strides,
                                          padding="SAME")
  largest, kernel_reads, _ = _memory_profile(wgrad, x, g, 1)
  # Measured: stride 1: 1.19x, 3.6x (3 copies + g^T); stride 2: 1.19x, 2.4x.
  assert largest <= 1.25, largest
  assert kernel_reads <= (4.8 if strides == (1, 1) else 3.0), kernel_reads


# ---------------------------------------------------------------------------
# (e) argument errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [pk.int8_conv, pk.int8_conv_reference])
def test_forward_bad_arguments(fn):
  x, w = _operands((1, 5, 6, 8), (3, 3, 8, 4))
  with pytest.raises(TypeError, match="x must be an int8 array.*float32"):
    fn(x.astype(jnp.float32), w)
  with pytest.raises(TypeError, match="w must be an int8 array.*int32"):
    fn(x, w.astype(jnp.int32))
  with pytest.raises(ValueError, match=r"x must be 4-D NHWC.*\(5, 6, 8\)"):
    fn(x[0], w)
  with pytest.raises(ValueError, match=r"same C.*\(1, 5, 6, 8\).*\(3, 3, 7, 4\)"):
    fn(x, w[:, :, :7])
  with pytest.raises(ValueError, match=r"window_strides.*\(0, 1\)"):
    fn(x, w, window_strides=(0, 1))
  with pytest.raises(ValueError, match=r"window_strides.*2"):
    fn(x, w, window_strides=2)
  with pytest.raises(ValueError, match="padding.*'FULL'"):
    fn(x, w, padding="FULL")
  with pytest.raises(ValueError, match=r"padding.*\(1, 1, 1\)"):
    fn(x, w, padding=((1, 1, 1), (1, 1)))
  with pytest.raises(ValueError, match=r"scale.*\(4,\).*\(8,\)"):
    fn(x, w, scale=jnp.ones((8,)))
  with pytest.raises(ValueError, match=r"bias.*\(4,\).*\(4, 1\)"):
    fn(x, w, bias=jnp.ones((4, 1)))
  with pytest.raises(TypeError, match="scale.*complex"):
    fn(x, w, scale=jnp.ones((4,), jnp.complex64))
  with pytest.raises(TypeError, match="out_dtype.*int16"):
    fn(x, w, out_dtype=jnp.int16)
  with pytest.raises(ValueError, match="out_dtype=int32.*scale, bias must be None"):
    fn(x, w, scale=2.0, bias=1.0, out_dtype=jnp.int32)
  big_w = jnp.zeros((3, 3, 14564, 2), jnp.int8)  # K = 131,076
  with pytest.raises(ValueError, match="K=131076.*INT32_SAFE_K=131072"):
    fn(jnp.zeros((1, 3, 3, 14564), jnp.int8), big_w)


def test_forward_bad_config():
  x, w = _operands((1, 5, 6, 8), (3, 3, 8, 4))
  with pytest.raises(TypeError, match="config must be an Int8ConvConfig"):
    pk.int8_conv(x, w, config={"tile_m": 64})
  with pytest.raises(ValueError, match="shared memory"):
    pk.int8_conv(x, w, config=pk.Int8ConvConfig(tile_n=256, tile_k=256,
                                                 max_concurrent_steps=8))
  with pytest.raises(ValueError, match="tile_m=96"):
    pk.Int8ConvConfig(tile_m=96)
  with pytest.raises(ValueError, match="tile_n=260"):
    pk.Int8ConvConfig(tile_n=260)
  with pytest.raises(ValueError, match="tile_k=96 must be a multiple of swizzle=64"):
    pk.Int8ConvConfig(tile_k=96, swizzle=64)
  with pytest.raises(ValueError, match="swizzle=16"):
    pk.Int8ConvConfig(swizzle=16, tile_k=128)
  with pytest.raises(ValueError, match="max_concurrent_steps=0"):
    pk.Int8ConvConfig(max_concurrent_steps=0)
  with pytest.raises(TypeError, match="tile_n.*float"):
    pk.Int8ConvConfig(tile_n=64.0)


@pytest.mark.parametrize("fn", [pk.int8_conv_dgrad,
                                pk.int8_conv_dgrad_reference])
def test_dgrad_bad_arguments(fn):
  w = _int8((3, 3, 8, 4), 0)
  g = _int8((1, 3, 3, 4), 1)  # forward output of (1, 5, 6, 8), stride 2, SAME
  ok = dict(input_shape=(1, 5, 6, 8), window_strides=(2, 2), padding="SAME")
  run = {"interpret": True} if fn is pk.int8_conv_dgrad else {}
  # The valid baseline (traced only: the errors below are raised earlier).
  assert jax.eval_shape(lambda: fn(g, w, **ok, **run)).shape == (1, 5, 6, 8)
  with pytest.raises(TypeError, match="g must be an int8 array.*bfloat16"):
    fn(g.astype(jnp.bfloat16), w, **ok)
  with pytest.raises(ValueError, match=r"g must have the forward output's "
                     r"shape \(1, 3, 3, 4\).*g.shape=\(1, 3, 2, 4\)"):
    fn(g[:, :, :2], w, **ok)
  with pytest.raises(ValueError, match=r"input_shape.*\(5, 6, 8\)"):
    fn(g, w, **{**ok, "input_shape": (5, 6, 8)})
  with pytest.raises(ValueError, match=r"same C.*\(1, 5, 6, 7\)"):
    fn(g, w, **{**ok, "input_shape": (1, 5, 6, 7)})
  with pytest.raises(ValueError, match=r"scale.*\(8,\).*\(4,\)"):
    fn(g, w, scale=jnp.ones((4,)), **ok)


@pytest.mark.parametrize("fn", [pk.int8_conv_wgrad,
                                pk.int8_conv_wgrad_reference])
def test_wgrad_bad_arguments(fn):
  x = _int8((1, 5, 6, 8), 0)
  g = _int8((1, 3, 3, 4), 1)
  ok = dict(kernel_shape=(3, 3, 8, 4), window_strides=(2, 2), padding="SAME")
  run = {"interpret": True} if fn is pk.int8_conv_wgrad else {}
  # The valid baseline (traced only: the errors below are raised earlier).
  assert jax.eval_shape(lambda: fn(x, g, **ok, **run)).shape == (3, 3, 8, 4)
  with pytest.raises(TypeError, match="x must be an int8 array.*float32"):
    fn(x.astype(jnp.float32), g, **ok)
  with pytest.raises(ValueError, match=r"g must have the forward output's "
                     r"shape \(1, 3, 3, 4\).*\(1, 3, 3, 5\)"):
    fn(x, _int8((1, 3, 3, 5), 2), **ok)
  with pytest.raises(ValueError, match=r"kernel_shape.*\(3, 3, 7, 4\)"):
    fn(x, g, **{**ok, "kernel_shape": (3, 3, 7, 4)})
  with pytest.raises(ValueError, match=r"kernel_shape.*\(3, 3\)"):
    fn(x, g, **{**ok, "kernel_shape": (3, 3)})
  with pytest.raises(TypeError, match="out_dtype must be float32 or bfloat16"
                     ".*int32"):
    fn(x, g, out_dtype=jnp.int32, **ok)
  with pytest.raises(ValueError, match=r"scale.*\(4,\).*\(8,\)"):
    fn(x, g, scale=jnp.ones((8,)), **ok)


def test_empty_and_zero_channel_convs():
  x = jnp.zeros((2, 4, 5, 0), jnp.int8)
  w = jnp.zeros((3, 3, 0, 6), jnp.int8)
  bias = jnp.arange(6, dtype=jnp.float32)
  got = pk.int8_conv(x, w, padding="SAME", bias=bias, interpret=True)
  _assert_bits_equal(got, pk.int8_conv_reference(x, w, padding="SAME",
                                                 bias=bias))
  x = jnp.zeros((2, 2, 2, 3), jnp.int8)
  w = jnp.zeros((3, 3, 3, 6), jnp.int8)
  assert pk.int8_conv(x, w).shape == (2, 0, 0, 6)  # VALID: no output pixel


# ---------------------------------------------------------------------------
# (f) compiled kernels on a Hopper GPU.
# ---------------------------------------------------------------------------

GPU_LAYERS = {
    # ResNet-50 shapes at batch 8: (input, kernel, strides, padding)
    "3x3_64_56_b8": ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1),
                     ((1, 1), (1, 1))),
    "3x3s2_128": ((8, 56, 56, 128), (3, 3, 128, 128), (2, 2),
                  ((1, 1), (1, 1))),
    "1x1s2_256_512": ((8, 56, 56, 256), (1, 1, 256, 512), (2, 2),
                      ((0, 0), (0, 0))),
}


def _on_cpu(fn, *args, **kwargs):
  """fn on the CPU backend (XLA:GPU has no int8 backward convs)."""
  cpu = jax.devices("cpu")[0]
  put = lambda v: jax.device_put(v, cpu) if isinstance(v, jax.Array) else v
  args = [put(a) for a in args]
  kwargs = {k: put(v) for k, v in kwargs.items()}
  with jax.default_device(cpu):
    return np.asarray(fn(*args, **kwargs))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layer", list(GPU_LAYERS))
def test_forward_gpu_matches_reference(layer):
  x_shape, w_shape, strides, padding = GPU_LAYERS[layer]
  x, w = _operands(x_shape, w_shape)
  scale, bias = _epilogue_args(w_shape[3])
  kw = dict(window_strides=strides, padding=padding)
  got = jax.jit(functools.partial(pk.int8_conv, out_dtype=jnp.int32, **kw))(
      x, w)
  np.testing.assert_array_equal(
      np.asarray(got),
      _on_cpu(pk.int8_conv_reference, x, w, out_dtype=jnp.int32, **kw))
  got = jax.jit(functools.partial(pk.int8_conv, **kw))(x, w, scale=scale,
                                                       bias=bias)
  want = _on_cpu(pk.int8_conv_reference, x, w, scale=scale, bias=bias, **kw)
  # The epilogue's FMA may round differently from XLA:CPU by an ulp.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layer", list(GPU_LAYERS))
def test_wgrad_gpu_matches_reference(layer):
  x_shape, w_shape, strides, padding = GPU_LAYERS[layer]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  x, g = _int8(x_shape, 11), _int8(g_shape, 12)
  kw = dict(kernel_shape=w_shape, window_strides=strides, padding=padding)
  got = jax.jit(functools.partial(pk.int8_conv_wgrad, **kw))(x, g)
  # Unscaled: the exact sum rounded once, on both sides -- bit-equal.
  np.testing.assert_array_equal(
      np.asarray(got), _on_cpu(pk.int8_conv_wgrad_reference, x, g, **kw))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layer", list(GPU_LAYERS))
def test_dgrad_gpu_matches_reference(layer):
  x_shape, w_shape, strides, padding = GPU_LAYERS[layer]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  g, w = _operands(g_shape, w_shape, seed=5)
  kw = dict(input_shape=x_shape, window_strides=strides, padding=padding)
  got = jax.jit(functools.partial(pk.int8_conv_dgrad, out_dtype=jnp.int32,
                                  **kw))(g, w)
  np.testing.assert_array_equal(
      np.asarray(got),
      _on_cpu(pk.int8_conv_dgrad_reference, g, w, out_dtype=jnp.int32, **kw))
  scale, bias = _epilogue_args(w_shape[2])
  got = jax.jit(functools.partial(pk.int8_conv_dgrad, out_dtype=jnp.bfloat16,
                                  **kw))(g, w, scale=scale, bias=bias)
  want = _on_cpu(pk.int8_conv_dgrad_reference, g, w, scale=scale, bias=bias,
                 out_dtype=jnp.bfloat16, **kw)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=8e-3, atol=8e-3)


def _table_ids(table):
  """The module-level names of a config table's entries (test ids)."""
  module = importlib.import_module("pallas_kernels.int8_conv")
  return [next(k for k, v in vars(module).items() if k[:1].isupper() and v is c)
          for c in table]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", pk.CONV_CONFIGS, ids=_table_ids(pk.CONV_CONFIGS))
@pytest.mark.parametrize("layer", ["3x3_64_56_b8", "3x3s2_128"])
def test_every_conv_config_gpu_matches_reference(layer, config):
  """Every config of CONV_CONFIGS, not only the one select_conv_config picks,
  forward and input gradient (int32: exact) on a stride-1 and a stride-2 layer."""
  x_shape, w_shape, strides, padding = GPU_LAYERS[layer]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  x, w = _operands(x_shape, w_shape)
  g = _int8(g_shape, 13)
  kw = dict(window_strides=strides, padding=padding, out_dtype=jnp.int32)
  got = jax.jit(functools.partial(pk.int8_conv, config=config, **kw))(x, w)
  np.testing.assert_array_equal(np.asarray(got),
                                _on_cpu(pk.int8_conv_reference, x, w, **kw))
  got = jax.jit(functools.partial(pk.int8_conv_dgrad, input_shape=x_shape, config=config,
                                  **kw))(g, w)
  np.testing.assert_array_equal(
      np.asarray(got), _on_cpu(pk.int8_conv_dgrad_reference, g, w, input_shape=x_shape, **kw))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", pk.WGRAD_CONFIGS, ids=_table_ids(pk.WGRAD_CONFIGS))
@pytest.mark.parametrize("layer", ["3x3_64_56_b8", "3x3s2_128"])
def test_every_wgrad_config_gpu_matches_reference(layer, config):
  """Every config of WGRAD_CONFIGS (swizzle-32 int8 wgmma), unscaled: bit-equal."""
  x_shape, w_shape, strides, padding = GPU_LAYERS[layer]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  x, g = _int8(x_shape, 14), _int8(g_shape, 15)
  kw = dict(kernel_shape=w_shape, window_strides=strides, padding=padding)
  got = jax.jit(functools.partial(pk.int8_conv_wgrad, config=config, **kw))(x, g)
  np.testing.assert_array_equal(np.asarray(got),
                                _on_cpu(pk.int8_conv_wgrad_reference, x, g, **kw))
