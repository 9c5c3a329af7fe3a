"""Tests of pallas_kernels.conv_direct_wgrad_ws: the persistent, warp-specialised direct weight
gradient (issue 24, item 2).

On any machine (CPU included):
  * under the Mosaic GPU interpreter (a producer and 1-2 consumer warpgroups a block, their
    barriers, one TMA ring across all of a block's work items) the kernel equals
    int8_conv_wgrad_reference bit for bit on small ragged shapes: stride 1 SAME with odd
    sizes, stride 2, channel counts no tile multiples, several work items per block (the ring
    wraps across items), 1 and 2 consumers split either way, the default config; its race
    detector sees no race in one case, and does see one when the consumers do not wait for
    their TMA stores before reusing the output slot;
  * its halves are the non-persistent kernel's exact integer, and the channel-major entry gives
    the NHWC entry's bits;
  * every default config (tile shape x swizzle) lowers for CUDA from the host (Mosaic GPU's
    checks), at stride 1 (boxes starting below 0) and 2;
  * config and argument errors name the argument and value.
On a Hopper GPU (marked ``gpu``): the compiled kernel against the reference.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
import reference
from pallas_kernels import conv_direct_wgrad as dw
from pallas_kernels import conv_direct_wgrad_ws as dws

C = dws.DirectWgradWSConfig
needs_gpu = pytest.mark.skipif(not pk.available(),
                               reason="needs a Hopper GPU (sm_90) with Mosaic GPU")
_int8 = reference.saturated_int8

# Small configs for the interpreter: 32-pixel steps, a 2- or 3-slot ring and few blocks, so
# every block runs several work items and the ring's slots wrap across them.
TWO_N = C(tile_m=64, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=2, wg_split="n",
          num_ctas=2)
TWO_M = C(tile_m=128, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=3, num_ctas=3)
ONE = C(tile_m=64, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=2, num_consumers=1,
        num_ctas=3)
NONWS_SMALL = pk.Int8ConvConfig(tile_m=64, tile_n=32, tile_k=32, swizzle=32,
                                max_concurrent_steps=2)


# (x shape, kernel shape, strides, padding, config, out dtype, scale)
CASES = {
    # N = 2 padded to N' = 16 (W = 7); 2 O tiles (ragged); 9 taps x parts x 2 items, 2 blocks
    "s1_same_2wg_n": ((2, 5, 7, 24), (3, 3, 24, 40), (1, 1), "SAME", TWO_N, jnp.float32,
                      "vector"),
    # stride 2 (phase images), one consumer, bfloat16
    "s2_same_1wg": ((2, 7, 9, 24), (3, 3, 24, 40), (2, 2), "SAME", ONE, jnp.bfloat16, 0.375),
    # C = 97 over two consumers of 64 channels (the second ragged), O = 72 in 3 tiles
    "s1_valid_ragged_2wg_m": ((2, 6, 5, 97), (2, 2, 97, 72), (1, 1), "VALID", TWO_M,
                              jnp.float32, None),
}


def _run(case, fn):
  x_shape, kernel_shape, strides, padding, config, out_dtype, scale = CASES[case]
  g_shape = pk.conv_output_shape(x_shape, kernel_shape, strides, padding)
  x, g = _int8(x_shape, 1), _int8(g_shape, 2)
  if scale == "vector":
    scale = jnp.asarray(np.random.default_rng(3).uniform(0.25, 2.0, kernel_shape[3]),
                        jnp.float32)
  kw = dict(kernel_shape=kernel_shape, window_strides=strides, padding=padding, scale=scale,
            out_dtype=out_dtype)
  return fn(x, g, config, kw)


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_matches_reference(case):
  """The first case with the interpreter's race detector: the ring across work items and the
  consumers' output slots reused while their stores drain have no race it can see."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  races = case == "s1_same_2wg_n"
  interpret = plgpu.InterpretGPUParams(detect_races=True) if races else True

  def check(x, g, config, kw):
    got = dws.int8_conv_wgrad_direct_ws(x, g, config=config, interpret=interpret, **kw)
    want = pk.int8_conv_wgrad_reference(x, g, **kw)
    assert got.shape == want.shape == kw["kernel_shape"] and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  gpu_callbacks.reset_gpu_interpret_mode_state()
  _run(case, check)
  if races:
    assert gpu_callbacks.get_races().races_found is False


def test_interpret_race_detector_sees_an_unawaited_store(monkeypatch):
  """The check above can fail: without waiting for its previous TMA store to have read the
  output slot, a consumer's next write to it is a race."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  # A shape no other test uses: the jit cache must not serve this kernel.
  x, g = _int8((1, 5, 6, 24), 1), _int8((1, 5, 6, 40), 2)
  monkeypatch.setattr(plgpu, "wait_smem_to_gmem", lambda n, wait_read_only=False: None)
  gpu_callbacks.reset_gpu_interpret_mode_state()
  try:
    with pytest.raises(Exception, match="RACE DETECTED|no threads observed phase"):
      jax.block_until_ready(dws.int8_conv_wgrad_direct_ws(
          x, g, kernel_shape=(3, 3, 24, 40), padding="SAME", config=TWO_N,
          interpret=plgpu.InterpretGPUParams(detect_races=True)))
  finally:
    gpu_callbacks.reset_gpu_interpret_mode_state()


def test_several_items_per_block():
  """The interpreter cases do give each block several work items (the ring wraps across
  items: more ring steps a block than slots)."""
  for case in CASES:
    x_shape, ks, strides, padding, config, _, _ = CASES[case]
    ops = dw.channel_major_operands(x_shape, ks, window_strides=strides, padding=padding,
                                    interpret=True)
    _, _, taps, _ = ops._geometry()
    _, _, parts, steps, cp, op = dw._plan(ops.g_shape, ks, config, ops.layout.n_img)
    items = len(taps) * parts * (cp // config.tile_m) * (op // config.tile_n)
    assert items >= 3 * config.num_ctas, (case, items)
    assert (items // config.num_ctas) * steps > 2 * config.max_concurrent_steps, case


def test_interpret_default_config():
  """direct_wgrad_ws_config: the 64x64 tile with one consumer, tile_k = swizzle = 64 for
  rows of 4 * 16 elements, every item its own block."""
  cfg = dws.direct_wgrad_ws_config(20, 12, 4 * 16)
  assert (cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.num_consumers) == (64, 64, 64, 1)
  x_shape, ks = (3, 5, 4, 20), (3, 3, 20, 12)
  x, g = _int8(x_shape, 1), _int8(pk.conv_output_shape(x_shape, ks, (1, 1), "SAME"), 2)
  got = dws.int8_conv_wgrad_direct_ws(x, g, kernel_shape=ks, padding="SAME", interpret=True)
  want = pk.int8_conv_wgrad_reference(x, g, kernel_shape=ks, padding="SAME")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_channel_major_halves_are_the_non_ws_integer():
  """On ChannelMajorOperands' tensors (what the quantizing fusions write in the library):
  the halves equal the non-persistent kernel's exact integer, and the scaled result the NHWC
  entry's bits."""
  x_shape, ks, strides = (2, 7, 5, 24), (3, 3, 24, 40), (2, 2)
  g_shape = pk.conv_output_shape(x_shape, ks, strides, "SAME")
  x, g = _int8(x_shape, 4), _int8(g_shape, 5)
  ops = dw.channel_major_operands(x_shape, ks, window_strides=strides, padding="SAME",
                                  interpret=True)
  xt, gt = ops.x(x), ops.g(g)
  hi, lo = dws.int8_conv_wgrad_channel_major_ws_halves(xt, gt, operands=ops, config=TWO_N,
                                                       interpret=True)
  hi0, lo0 = dw.int8_conv_wgrad_channel_major_halves(xt, gt, operands=ops, config=NONWS_SMALL,
                                                     interpret=True)
  exact = np.asarray(hi, np.int64) * 65536 + np.asarray(lo)
  np.testing.assert_array_equal(exact, np.asarray(hi0, np.int64) * 65536 + np.asarray(lo0))
  assert np.abs(exact).max() > 0
  got = dws.int8_conv_wgrad_channel_major_ws(xt, gt, operands=ops, scale=0.5, config=TWO_N,
                                             interpret=True)
  np.testing.assert_array_equal(np.asarray(got), (exact * 0.5).astype(np.float32))
  hi2, lo2 = dws.int8_conv_wgrad_direct_ws_halves(x, g, kernel_shape=ks, window_strides=strides,
                                                  padding="SAME", config=TWO_N, interpret=True)
  np.testing.assert_array_equal(np.asarray(hi2, np.int64) * 65536 + np.asarray(lo2), exact)


# ---------------------------------------------------------------------------
# Configs and lowering for CUDA from the host.
# ---------------------------------------------------------------------------


def test_default_configs():
  """Every default config is a DIRECT_WGRAD_WS_CONFIGS tile with direct_wgrad_config's swizzle
  and depth, fits in SMEM; two consumers unless the tile is 64x64."""
  assert dws.DIRECT_WGRAD_WS_CONFIGS[-1] == C()
  for c in (64, 128, 256, 512):
    for o in (64, 128, 256, 512):
      for row in (16, 48, 112, 128, 1792):
        cfg = dws.direct_wgrad_ws_config(c, o, row)
        base = dw.direct_wgrad_config(c, o, row)
        assert (cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.swizzle, cfg.max_concurrent_steps) == (
            base.tile_m, base.tile_n, base.tile_k, base.swizzle, base.max_concurrent_steps)
        assert cfg.num_consumers == (1 if (cfg.tile_m, cfg.tile_n) == (64, 64) else 2)
        assert cfg.smem_bytes() <= 227 * 1024
        assert min(cfg.wg_tile) >= 64


def _sds(shape, dtype=jnp.int8):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("swizzle", [32, 64, 128])
@pytest.mark.parametrize("entry", dws.DIRECT_WGRAD_WS_CONFIGS,
                         ids=lambda c: f"{c.tile_m}x{c.tile_n}")
def test_default_configs_lower_for_cuda(entry, swizzle):
  """Each tile shape with each swizzle direct_wgrad_ws_config picks: SAME 3x3 at stride 1 (x
  boxes start at row -1 and element -N' of the merged (W, N') row: TMA's zero fill) and 2."""
  cfg = dataclasses.replace(entry, tile_k=swizzle, swizzle=swizzle,
                            max_concurrent_steps=4 if swizzle == 128 else 6)
  for x_shape, ks, s in (((8, 9, 14, 64), (3, 3, 64, 136), 1),
                         ((8, 9, 14, 64), (3, 3, 64, 72), 2)):
    g_shape = pk.conv_output_shape(x_shape, ks, (s, s), "SAME")
    f = functools.partial(dws.int8_conv_wgrad_direct_ws, kernel_shape=ks, window_strides=(s, s),
                          padding="SAME", scale=0.5, config=cfg)
    text = jax.jit(f).trace(_sds(x_shape), _sds(g_shape)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_default_config_lowers_for_cuda_channel_major():
  """The library's entry (channel-major operands), ResNet-50's conv5 3x3 at batch 8."""
  ops = dw.channel_major_operands((8, 7, 7, 512), (3, 3, 512, 512), padding="SAME")
  f = functools.partial(dws.int8_conv_wgrad_channel_major_ws, operands=ops, scale=0.5)
  text = jax.jit(f).trace(_sds(ops.x_cm_shape), _sds(ops.g_cm_shape)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 1


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields, error", [
    (dict(tile_m=96), "tile_m=96"),
    (dict(tile_n=512), "tile_n=512"),
    (dict(tile_k=256), "tile_k=256 must equal swizzle=128"),
    (dict(swizzle=16, tile_k=16), "swizzle=16"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps=1 must be >= 2"),
    (dict(num_consumers=3), "num_consumers=3 must be 1 or 2"),
    (dict(wg_split="k"), "wg_split='k' must be 'm' or 'n'"),
    (dict(tile_m=64), "tile_m=64 must be a multiple of 128"),
    (dict(tile_n=24, wg_split="n"), "tile_n=24 must be a multiple of 16"),
    (dict(num_ctas=0), "num_ctas=0 must be None or an int >= 1"),
    (dict(num_ctas=2.5), "num_ctas=2.5"),
])
def test_bad_config(fields, error):
  with pytest.raises(ValueError, match=error):
    C(**fields)


def test_bad_arguments():
  with pytest.raises(TypeError, match="num_consumers must be an int.*str"):
    C(num_consumers="2")
  x_shape, ks = (1, 5, 5, 16), (3, 3, 16, 8)
  x, g = _int8(x_shape, 1), _int8((1, 5, 5, 8), 2)
  kw = dict(kernel_shape=ks, padding="SAME", interpret=True)
  with pytest.raises(TypeError, match="config must be a DirectWgradWSConfig.*Int8ConvConfig"):
    dws.int8_conv_wgrad_direct_ws(x, g, config=NONWS_SMALL, **kw)
  with pytest.raises(ValueError, match="needs .* bytes of shared memory"):
    dws.int8_conv_wgrad_direct_ws(x, g, kernel_shape=ks, padding="SAME",
                                  config=C(max_concurrent_steps=8))
  with pytest.raises(ValueError, match="kernel_shape"):
    dws.int8_conv_wgrad_direct_ws(x, g, kernel_shape=(3, 3, 8, 8), padding="SAME",
                                  interpret=True)
  with pytest.raises(TypeError, match="out_dtype must be float32 or bfloat16"):
    dws.int8_conv_wgrad_direct_ws(x, g, out_dtype=jnp.int32, config=ONE, **kw)
  with pytest.raises(ValueError, match="low_pad_in_xla=False"):
    dws.int8_conv_wgrad_direct_ws(x, g, config=ONE, low_pad_in_xla=False, **kw)
  ops = dw.channel_major_operands(x_shape, ks, padding="SAME", interpret=True)
  xt, gt = ops.x(x), ops.g(g)
  with pytest.raises(ValueError, match="xt must be int8 of shape"):
    dws.int8_conv_wgrad_channel_major_ws(gt, xt, operands=ops, interpret=True)
  with pytest.raises(TypeError, match="operands must be ChannelMajorOperands"):
    dws.int8_conv_wgrad_channel_major_ws_halves(xt, gt, operands="SAME", interpret=True)


def test_empty_is_zero():
  x = _int8((2, 2, 5, 16), 1)
  got = dws.int8_conv_wgrad_direct_ws(x, jnp.zeros((2, 0, 3, 8), jnp.int8),
                                      kernel_shape=(3, 3, 16, 8), scale=2.0, interpret=True)
  assert got.shape == (3, 3, 16, 8) and not np.any(np.asarray(got))
  hi, lo = dws.int8_conv_wgrad_direct_ws_halves(x, jnp.zeros((2, 1, 5, 0), jnp.int8),
                                                kernel_shape=(2, 1, 16, 0), interpret=True)
  assert hi.shape == lo.shape == (2, 1, 16, 0)


# ---------------------------------------------------------------------------
# On a Hopper GPU.
# ---------------------------------------------------------------------------


GPU_CASES = reference.DIRECT_GPU_CASES


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case, low_pad_in_xla, num_ctas",
                         [(c, lo, None) for c in GPU_CASES for lo in (False, True)]
                         + [("conv5_3x3", False, 3), ("ragged", False, 3), ("1x1", True, 5)])
def test_gpu_matches_reference(case, low_pad_in_xla, num_ctas):
  """Default configs (one block per SM), and 3 or 5 blocks (many work items a block)."""
  x_shape, ks, padding = GPU_CASES[case]
  strides = (2, 2) if case.endswith("_s2") else (1, 1)
  g_shape = pk.conv_output_shape(x_shape, ks, strides, padding)
  x, g = _int8(x_shape, 1), _int8(g_shape, 2)
  ops = dw.channel_major_operands(x_shape, ks, window_strides=strides, padding=padding,
                                  low_pad_in_xla=low_pad_in_xla)
  _, _, wo, _ = g_shape
  cfg = dataclasses.replace(dws.direct_wgrad_ws_config(ks[2], ks[3], wo * ops.layout.n_img),
                            num_ctas=num_ctas)
  kw = dict(kernel_shape=ks, window_strides=strides, padding=padding, scale=0.5)
  got = jax.jit(functools.partial(dws.int8_conv_wgrad_direct_ws, **kw, config=cfg,
                                  low_pad_in_xla=low_pad_in_xla))(x, g)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    want = pk.int8_conv_wgrad_reference(jax.device_put(x, cpu), jax.device_put(g, cpu), **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
