"""Tests of pallas_kernels.conv_direct: the forward conv by per-tap NHWC TMA boxes (issue 24).

On any machine (CPU included):
  * the kernel under Mosaic GPU interpret mode equals int8_conv_reference (and, as the
    dgrad, int8_conv_dgrad_reference; strided: one launch per output phase, stored in place
    into dx, phases without taps epilogue(0)) bit for bit on
    ragged shapes (odd H/W, C and O no tile multiples, C < 16, N no multiple of the tile's
    images), SAME / VALID / asymmetric / cropping padding, 1x1, 3x3 and 2x3 kernels, int32 /
    float32 / bfloat16 outputs, scalar and per-channel scale, bias; strides 2 and (2, 1)
    through int8_conv's phase split;
  * the compiled kernel lowers for CUDA from the host (Mosaic GPU's own TMA / layout / wgmma
    checks) with box starts below 0 and not multiples of 8, for every config;
  * the traced computation hands the kernel x itself: no pad, no copy (int8 operand bytes
    = x + the weight matrix); the strided dgrad's launches g itself and write one dx in
    place (no interleave);
  * argument errors name the argument and its value.
On a Hopper GPU (marked ``gpu``): the compiled kernel against the reference -- the check of
what interpret mode cannot see (the untiled box view, the out-of-bounds fill below 0; the
strided dgrad's 5-D box stores of swizzled slabs and its launches chained in place).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
import reference
from pallas_kernels import conv_direct as cd

# Several blocks in M and N, several K chunks, the 32-byte swizzle, a 2-deep ring that wraps.
SMALL = pk.Int8ConvConfig(tile_m=64, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=2)

needs_gpu = pytest.mark.skipif(not pk.available(),
                               reason="needs a Hopper GPU (sm_90) with Mosaic GPU")


_int8 = reference.saturated_int8


def _epilogue(o, seed=3):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(0.25, 2.0, (o,)), jnp.float32),
          jnp.asarray(rng.uniform(-4.0, 4.0, (o,)), jnp.float32))


def _check(x_shape, w_shape, padding, *, out_dtype=jnp.float32, config=SMALL, tile=None,
           scale="vector", bias=True, strides=(1, 1)):
  x, w = _int8(x_shape, 1), _int8(w_shape, 2)
  o = w_shape[3]
  s, b = _epilogue(o)
  kw = dict(padding=padding, out_dtype=out_dtype, window_strides=strides)
  if out_dtype != jnp.int32:
    kw["scale"] = {"vector": s, "scalar": 0.375, None: None}[scale]
    kw["bias"] = b if bias else None
  got = cd.int8_conv_direct(x, w, config=config, tile=tile, interpret=True, **kw)
  want = pk.int8_conv_reference(x, w, **kw)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# (x shape, w shape, padding, out dtype, scale kind, bias, tile)
INTERPRET_CASES = {
    "3x3_same_f32": ((2, 5, 7, 24), (3, 3, 24, 40), "SAME", jnp.float32, "vector", True, None),
    "1x1_valid_i32": ((1, 6, 9, 40), (1, 1, 40, 24), "VALID", jnp.int32, None, False, None),
    "3x3_valid_bf16": ((1, 7, 6, 33), (3, 3, 33, 8), "VALID", jnp.bfloat16, "scalar", False,
                       None),
    # a 2x3 kernel, asymmetric padding, and a crop (negative padding)
    "2x3_asym_f32": ((2, 6, 5, 16), (2, 3, 16, 40), ((2, 0), (0, 1)), jnp.float32, "vector",
                     True, None),
    "3x3_crop_i32": ((1, 7, 8, 16), (3, 3, 16, 24), ((-1, 2), (1, -2)), jnp.int32, None, False,
                     None),
    # C = 3 (padded to 16 bytes for TMA), 3 images in tiles of 2 (the last one half empty)
    "3x3_c3_batched": ((3, 3, 4, 3), (3, 3, 3, 12), "SAME", jnp.float32, "vector", True,
                       cd.DirectTile(2, 4, 8)),
}


@pytest.mark.parametrize("case", list(INTERPRET_CASES))
def test_interpret_matches_reference(case):
  x_shape, w_shape, padding, dt, scale, bias, tile = INTERPRET_CASES[case]
  _check(x_shape, w_shape, padding, out_dtype=dt, scale=scale, bias=bias, tile=tile)


# (x shape, w shape, strides, padding, out dtype)
STRIDED_CASES = {
    "3x3_s2_same_f32": ((2, 7, 9, 24), (3, 3, 24, 40), (2, 2), "SAME", jnp.float32),
    "1x1_s2_i32": ((1, 9, 6, 16), (1, 1, 16, 24), (2, 2), "VALID", jnp.int32),
    "3x2_s21_crop_i32": ((2, 8, 5, 16), (3, 2, 16, 8), (2, 1), ((1, -1), (1, 0)), jnp.int32),
}


@pytest.mark.parametrize("case", list(STRIDED_CASES))
def test_interpret_strided_matches_reference(case):
  """Strides > 1: the phase images stacked along N, per-tap image offsets (1x1 stride 2: one
  phase; 3x3: four, with 4 / 2 / 2 / 1 taps; (2, 1): two row phases)."""
  x_shape, w_shape, strides, padding, dt = STRIDED_CASES[case]
  _check(x_shape, w_shape, padding, out_dtype=dt, strides=strides,
         bias=dt != jnp.int32, scale="vector" if dt != jnp.int32 else None)


def test_interpret_default_config_matches_reference():
  """select_conv_config's CONV_64x128 (tile_m 128, tile_k 64 > C): one chunk, zero-filled."""
  _check((1, 9, 10, 20), (3, 3, 20, 72), "SAME", config=None)


def test_interpret_tiles_are_fixed_points():
  """A wrong tile origin / tap offset would move rows: a tile with 1-wide rows and many images
  (the extreme shape direct_tile picks for 7x7 maps) against one 8 wide."""
  for tile in (cd.DirectTile(16, 4, 1), cd.DirectTile(1, 8, 8)):
    _check((3, 3, 4, 16), (2, 2, 16, 32), ((1, 0), (0, 1)), tile=tile, out_dtype=jnp.int32)


def _run_slabs(x, w, out_dtype, config, **kw):
  """The compiled kernel's epilogue (output tile as swizzled column slabs, sliced from the
  accumulator) run by the interpreter."""
  _, pads = cd.check_conv_args(x, w, (1, 1), kw.pop("padding"))
  n, ho, wo, _ = pk.conv_output_shape(x.shape, w.shape, (1, 1), pads)
  import jax.experimental.pallas.mosaic_gpu as plgpu
  s, b = cd._check_epilogue_args(kw.get("scale"), kw.get("bias"), out_dtype, w.shape[3], "O")[:2]
  return cd._int8_conv_direct_impl(
      x, w, s, b, strides=(1, 1), pads=pads, out_dtype=out_dtype, config=config,
      launcher=plgpu.InterpretGPUParams(), tile=cd.direct_tile(n, ho, wo, config.tile_m, 3, 3),
      low_pad_in_xla=True, slab_out=True)


def test_interpret_output_slabs():
  """O=40 with tile_n 64: two 32-channel slabs per tile (128-byte swizzle; the second one
  clipped at channel 40 by the TMA store); int32: bit-exact. float32: the interpreter's
  XLA:CPU does not contract the sliced multiply-add into one FMA as the reference does, so
  at most 1 ulp."""
  cfg = pk.Int8ConvConfig(tile_m=64, tile_n=64, tile_k=32, swizzle=32, max_concurrent_steps=2)
  o = 40
  assert cd._out_layout(64, o, jnp.float32) == (128, 32)
  assert cd._out_layout(64, o, jnp.int32) == (128, 32)
  assert cd._out_layout(64, o, jnp.bfloat16) == (64, 32)   # 128 bytes > the 80-byte row
  assert cd._out_layout(32, 8, jnp.float32) == (32, 8)
  assert cd._out_layout(8, 8, jnp.bfloat16) == (None, None)  # 16-byte rows: one untiled tile
  x, w = _int8((2, 5, 7, 24), 1), _int8((3, 3, 24, o), 2)
  got = _run_slabs(x, w, jnp.int32, cfg, padding="SAME")
  want = pk.int8_conv_reference(x, w, padding="SAME", out_dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  s, b = _epilogue(o)
  got = np.asarray(_run_slabs(x, w, jnp.float32, cfg, padding="SAME", scale=s, bias=b))
  want = np.asarray(pk.int8_conv_reference(x, w, padding="SAME", scale=s, bias=b))
  assert np.all(np.abs(got - want) <= np.spacing(np.abs(want))), np.abs(got - want).max()


# (input shape, w shape, padding, out dtype)
DGRAD_CASES = {
    "3x3_same_f32": ((2, 5, 7, 40), (3, 3, 40, 24), "SAME", jnp.float32),
    "2x3_asym_i32": ((1, 6, 5, 16), (2, 3, 16, 40), ((2, 0), (0, 1)), jnp.int32),
    "3x3_valid_bf16": ((1, 7, 6, 8), (3, 3, 8, 33), "VALID", jnp.bfloat16),
    "1x1_crop_i32": ((2, 4, 5, 24), (1, 1, 24, 3), ((-1, 0), (0, -2)), jnp.int32),
}


@pytest.mark.parametrize("case", list(DGRAD_CASES))
def test_interpret_dgrad_matches_reference(case):
  """dx by the forward kernel on g (O = 3: g's channels padded to 16 bytes for TMA; a crop:
  dx rows no output depends on are epilogue(0))."""
  x_shape, w_shape, padding, dt = DGRAD_CASES[case]
  g_shape = pk.conv_output_shape(x_shape, w_shape, (1, 1), padding)
  g, w = _int8(g_shape, 5), _int8(w_shape, 6)
  kw = dict(input_shape=x_shape, padding=padding, out_dtype=dt)
  if dt != jnp.int32:
    kw["scale"], kw["bias"] = _epilogue(x_shape[3])
  got = cd.int8_conv_direct_dgrad(g, w, config=SMALL, interpret=True, **kw)
  want = pk.int8_conv_dgrad_reference(g, w, **kw)
  assert got.shape == want.shape == x_shape and got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# (input shape, w shape, strides, padding, out dtype, scale kind, bias)
STRIDED_DGRAD_CASES = {
    # odd H/W; C = 40: stores of 8 float32 channels, the tile's chunks past C' skipped
    "3x3_s2_same_f32": ((2, 7, 9, 40), (3, 3, 40, 24), (2, 2), "SAME", jnp.float32, "vector",
                        True),
    # three of the four phases have no tap: epilogue(0) = bias
    "1x1_s2_bias": ((1, 9, 6, 24), (1, 1, 24, 16), (2, 2), "VALID", jnp.float32, "vector",
                    True),
    "3x2_s21_crop_i32": ((2, 8, 5, 16), (3, 2, 16, 8), (2, 1), ((1, -1), (1, 0)), jnp.int32,
                         None, False),
    # C = 20 bfloat16: no store slab divides C' = 24, so C' = 32 and a slice; O = 3: g's
    # channels padded to 16 bytes for TMA
    "3x3_s2_c20_bf16": ((1, 6, 5, 20), (3, 3, 20, 3), (2, 2), "SAME", jnp.bfloat16, "scalar",
                        False),
}


def _strided_dgrad_args(case):
  x_shape, w_shape, strides, padding, dt, scale, bias = STRIDED_DGRAD_CASES[case]
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  g, w = _int8(g_shape, 5), _int8(w_shape, 6)
  kw = dict(input_shape=x_shape, window_strides=strides, padding=padding, out_dtype=dt)
  if dt != jnp.int32:
    s, b = _epilogue(x_shape[3])
    kw["scale"] = {"vector": s, "scalar": 0.375}[scale]
    kw["bias"] = b if bias else None
  return g, w, kw


@pytest.mark.parametrize("case", list(STRIDED_DGRAD_CASES))
def test_interpret_strided_dgrad_matches_reference(case):
  """Strides > 1: one launch per output phase, each a stride-1 correlation of g stored into
  its phase of the (N, H/s, s, W/s, s*C') view of dx (3x3 stride 2: 4 / 2 / 2 / 1 taps)."""
  g, w, kw = _strided_dgrad_args(case)
  got = cd.int8_conv_direct_dgrad(g, w, config=SMALL, interpret=True, **kw)
  want = pk.int8_conv_dgrad_reference(g, w, **kw)
  assert got.shape == want.shape == kw["input_shape"] and got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_interpret_strided_dgrad_slabs():
  """The compiled kernel's phase stores (swizzled slabs of 8 int32 channels, one store per
  slab and phase) under the interpreter: bit-exact."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  g, w, kw = _strided_dgrad_args("3x3_s2_same_f32")
  kw = dict(kw, out_dtype=jnp.int32, scale=None, bias=None)
  x_shape, strides, pads = cd.check_dgrad_args(g, w, kw["input_shape"], (2, 2), "SAME")
  assert cd._phase_layout(32, 40, jnp.int32) == (32, 8, 40)
  got = cd._int8_conv_direct_dgrad_impl(
      g, w, None, None, input_shape=x_shape, strides=strides, pads=pads, out_dtype=jnp.int32,
      config=SMALL, launcher=plgpu.InterpretGPUParams(), tile=cd.direct_tile(2, 4, 5, 64, 2, 2),
      low_pad_in_xla=True, slab_out=True)
  want = pk.int8_conv_dgrad_reference(g, w, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_strided_dgrad_phases_are_dgrad_plans():
  """direct_dgrad_phases has the implicit kernel's sub-pixel phases (dgrad_plan: the same
  kernel taps per phase), indexed by the output pixel's residue; 1x1 stride 2: one phase."""
  from pallas_kernels.conv_dgrad import dgrad_plan
  for x_shape, w_shape, pads in (((1, 8, 8, 8), (3, 3, 8, 8), ((0, 1), (0, 1))),
                                 ((1, 9, 7, 8), (3, 3, 8, 8), ((1, 1), (1, 1))),
                                 ((1, 8, 7, 8), (3, 2, 8, 8), ((2, 0), (0, 1))),
                                 ((1, 8, 8, 8), (1, 1, 8, 8), ((0, 0), (0, 0)))):
    phases = cd.direct_dgrad_phases(w_shape[:2], (2, 2), pads)
    plan, *_ = dgrad_plan(x_shape, w_shape, (2, 2), pads, 64, 32, 32, 4)
    assert (sorted(sorted(wt) for *_, wt in phases if wt)
            == sorted(sorted(t.weights) for t in plan.launches)), (x_shape, w_shape, pads)
  taps = [len(t) for *_, t, _ in cd.direct_dgrad_phases((3, 3), (2, 2), ((1, 1), (1, 1)))]
  assert taps == [1, 2, 2, 4]
  assert [len(t) for *_, t, _ in cd.direct_dgrad_phases((1, 1), (2, 2), ((0, 0),) * 2)] == \
      [1, 0, 0, 0]


def test_direct_tile_picks_least_waste():
  assert cd.direct_tile(256, 56, 56, 128, 3, 3) == cd.DirectTile(2, 8, 8)   # 56 = 7 x 8
  assert cd.direct_tile(256, 56, 56, 64, 3, 3) == cd.DirectTile(1, 8, 8)
  assert cd.direct_tile(256, 7, 7, 128, 3, 3) == cd.DirectTile(128, 1, 1)   # no waste
  for args in ((256, 28, 28, 128), (2, 5, 7, 64), (1, 1, 1, 256)):
    assert cd.direct_tile(*args).pixels == args[3]


# ---------------------------------------------------------------------------
# Lowering for CUDA from the host, and what the kernel is handed.
# ---------------------------------------------------------------------------


def _sds(shape, dtype=jnp.int8):
  return jax.ShapeDtypeStruct(shape, dtype)


def _lower_for_cuda(f, *args):
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the module"
  return text


@pytest.mark.parametrize("config", pk.CONV_CONFIGS + (SMALL,), ids=lambda c: c.name)
def test_compiled_kernel_lowers_for_cuda(config):
  """SAME padding: tap boxes start at -1 and at columns that are no multiple of 8; and a
  stride-2 conv (phase images, per-tap image offsets)."""
  for x_shape, w_shape, dt, s in (((2, 9, 13, 64), (3, 3, 64, 72), jnp.float32, 1),
                                  ((1, 7, 7, 24), (1, 1, 24, 8), jnp.bfloat16, 1),
                                  ((2, 5, 6, 16), (3, 3, 16, 40), jnp.int32, 1),
                                  ((2, 9, 13, 64), (3, 3, 64, 72), jnp.bfloat16, 2)):
    f = functools.partial(cd.int8_conv_direct, padding="SAME", out_dtype=dt, config=config,
                          window_strides=(s, s))
    text = _lower_for_cuda(f, _sds(x_shape), _sds(w_shape))
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_compiled_dgrad_lowers_for_cuda(strides):
  """Stride 2: four kernels (output phases), the last three writing into the first's output
  (output_operand_aliases: dx in place); 1x1: three of them epilogue(0) only."""
  for w_shape, dt in (((3, 3, 72, 64), jnp.bfloat16), ((1, 1, 72, 64), jnp.float32)):
    x_shape = (2, 9, 13, 72)
    g_shape = pk.conv_output_shape(x_shape, w_shape, strides, "SAME")
    f = functools.partial(cd.int8_conv_direct_dgrad, input_shape=x_shape, padding="SAME",
                          out_dtype=dt, window_strides=strides, scale=jnp.ones((72,)))
    text = _lower_for_cuda(f, _sds(g_shape), _sds(w_shape))
    launches = strides[0] * strides[1]
    assert text.count("custom_call @mosaic_gpu") == launches
    assert text.count("output_operand_aliases") == launches - 1


_kernel_int8_operands = reference.kernel_int8_operands


def test_kernel_is_handed_x_itself():
  """3x3 SAME stride 1 (8x56x56x64): the kernel reads x as given -- no pad, no shifted copy;
  its int8 operands are x + the (O, 9*Cp) weight matrix: 1.023x x at batch 8, 1.0007x at
  batch 256 (int8_conv: 3.59x, three padded shifted copies)."""
  x, w = _sds((8, 56, 56, 64)), _sds((3, 3, 64, 64))
  conv = lambda x, w: cd.int8_conv_direct(x, w, padding="SAME", scale=0.5)
  operands, made = _kernel_int8_operands(conv, x, w)
  assert operands[0] == x.shape
  assert operands[1:] == [(64, 9 * 64)]
  assert all(int(np.prod(s)) <= 9 * 64 * 64 for _, s in made), made  # weights only
  handed, x_bytes = cd.direct_kernel_operand_bytes(x.shape, w.shape)
  assert handed == sum(int(np.prod(s)) for s in operands)
  assert handed == x_bytes + 64 * 9 * 64
  # Stride 2: the four 29x29 phase images of the padded 57x57 input (1.07x x).
  conv2 = lambda x, w: cd.int8_conv_direct(x, w, window_strides=(2, 2), padding="SAME")
  operands, _ = _kernel_int8_operands(conv2, x, w)
  assert operands == [(4 * 8, 29, 29, 64), (64, 9 * 64)]
  assert cd.direct_kernel_operand_bytes((256, 56, 56, 64), w.shape)[0] / (256 * 56 * 56 * 64) \
      < 1.001


def test_strided_dgrad_is_handed_g_itself():
  """Stride-2 dgrad of 8x32x32x64 (3x3 SAME): each phase launch is handed g itself and its
  weight matrix (4 / 2 / 2 / 1 taps), no pad, no copy; dx is made by the first launch,
  written in place by the others (a Ref) and only reshaped: no interleave, no slice."""
  x_shape, w = (8, 32, 32, 64), _sds((3, 3, 64, 64))
  g = _sds(pk.conv_output_shape(x_shape, w.shape, (2, 2), "SAME"))
  dgrad = lambda g, w: cd.int8_conv_direct_dgrad(g, w, input_shape=x_shape,
                                                 window_strides=(2, 2), padding="SAME",
                                                 scale=0.5)
  operands, made = _kernel_int8_operands(dgrad, g, w)
  assert operands == [g.shape, (64, 4 * 64), g.shape, (64, 2 * 64), g.shape, (64, 2 * 64),
                      g.shape, (64, 64)]
  assert all(int(np.prod(s)) <= 9 * 64 * 64 for _, s in made), made  # weights only
  jaxpr = jax.make_jaxpr(dgrad)(g, w).eqns[-1].params["jaxpr"]
  after = [e.primitive.name for e in jaxpr.eqns[[e.primitive.name for e in jaxpr.eqns]
                                                .index("new_ref"):]]
  assert [n for n in after if n not in ("slice", "squeeze", "stack", "pad", "reshape")] == \
      ["new_ref", "custom_vmap_call", "custom_vmap_call", "custom_vmap_call", "freeze"], after
  assert after[-2:] == ["freeze", "reshape"]


def test_interpret_path_pads_the_low_side_only():
  """Interpret mode: one pad of x by (lo_h, lo_w) (its TMA model cannot start a box below 0)."""
  x, w = _sds((1, 6, 7, 16)), _sds((3, 3, 16, 8))
  conv = lambda x, w: cd.int8_conv_direct(x, w, padding="SAME", interpret=True)
  operands, _ = _kernel_int8_operands(conv, x, w)
  assert operands[0] == (1, 7, 8, 16)
  handed, _ = cd.direct_kernel_operand_bytes(x.shape, w.shape, low_pad_in_xla=True)
  assert handed == sum(int(np.prod(s)) for s in operands)


# ---------------------------------------------------------------------------
# Argument errors.
# ---------------------------------------------------------------------------


def test_errors_name_the_argument():
  x, w = _int8((1, 5, 5, 16), 1), _int8((3, 3, 16, 8), 2)
  bad = pk.Int8ConvConfig(tile_m=64, tile_n=32, tile_k=64, swizzle=32)
  with pytest.raises(ValueError, match="tile_k=64 must equal config.swizzle=32"):
    cd.int8_conv_direct(x, w, config=bad, interpret=True)
  with pytest.raises(ValueError, match="tile=DirectTile"):
    cd.int8_conv_direct(x, w, config=SMALL, tile=cd.DirectTile(1, 4, 8), interpret=True)
  with pytest.raises(ValueError, match="low_pad_in_xla=False"):
    cd.int8_conv_direct(x, w, padding="SAME", config=SMALL, low_pad_in_xla=False,
                        interpret=True)
  with pytest.raises(TypeError, match="x must be an int8 array"):
    cd.int8_conv_direct(x.astype(jnp.int32), w, interpret=True)
  g = _int8((1, 3, 3, 8), 3)
  with pytest.raises(ValueError, match="low_pad_in_xla=False"):
    cd.int8_conv_direct_dgrad(g, w, input_shape=(1, 6, 6, 16), window_strides=(2, 2),
                              padding="SAME", config=SMALL, low_pad_in_xla=False,
                              interpret=True)
  narrow = pk.Int8ConvConfig(tile_m=64, tile_n=8, tile_k=32, swizzle=32)
  with pytest.raises(ValueError, match="config.tile_n=8"):
    cd.int8_conv_direct_dgrad(g, w, input_shape=(1, 6, 6, 16), window_strides=(2, 2),
                              padding="SAME", out_dtype=jnp.bfloat16, config=narrow,
                              interpret=True)
  with pytest.raises(ValueError, match="g must have the forward output's shape"):
    cd.int8_conv_direct_dgrad(g, w, input_shape=(1, 4, 4, 16), interpret=True)


# ---------------------------------------------------------------------------
# On a Hopper GPU.
# ---------------------------------------------------------------------------


GPU_CASES = reference.DIRECT_GPU_CASES


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("low_pad_in_xla", [False, True])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_matches_reference(case, low_pad_in_xla):
  x_shape, w_shape, padding = GPU_CASES[case]
  strides = (2, 2) if case.endswith("_s2") else (1, 1)
  x, w = _int8(x_shape, 1), _int8(w_shape, 2)
  got = jax.jit(functools.partial(cd.int8_conv_direct, padding=padding, out_dtype=jnp.int32,
                                  window_strides=strides, low_pad_in_xla=low_pad_in_xla))(x, w)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    want = pk.int8_conv_reference(jax.device_put(x, cpu), jax.device_put(w, cpu),
                                  padding=padding, window_strides=strides, out_dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case, stride", [("conv2_3x3", 1), ("ragged", 1), ("conv3_3x3_s2", 2),
                                          ("ragged", 2), ("1x1", 2)])
def test_gpu_dgrad_matches_reference(case, stride):
  """Stride 2: the per-phase launches, their 5-D box stores into dx and the in-place
  chaining (1x1: three epilogue(0) phases)."""
  x_shape, w_shape, padding = GPU_CASES[case]
  strides = (stride, stride)
  g_shape = pk.conv_output_shape(x_shape, w_shape, strides, padding)
  g, w = _int8(g_shape, 5), _int8(w_shape, 6)
  kw = dict(input_shape=x_shape, window_strides=strides, padding=padding, out_dtype=jnp.int32)
  got = jax.jit(functools.partial(cd.int8_conv_direct_dgrad, **kw))(g, w)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    want = pk.int8_conv_dgrad_reference(jax.device_put(g, cpu), jax.device_put(w, cpu), **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.gpu
@needs_gpu
def test_gpu_strided_dgrad_epilogue():
  """1x1 stride 2 with scale and bias, C = 40 (stores of 8 float32 channels, some skipped):
  the three phases without taps are the bias exactly; the other within 1 float32 ulp (the
  GPU's fused multiply-add vs the CPU reference's)."""
  x_shape, w_shape = (2, 9, 11, 40), (1, 1, 40, 64)
  g = _int8(pk.conv_output_shape(x_shape, w_shape, (2, 2), "SAME"), 5)
  w = _int8(w_shape, 6)
  s, b = _epilogue(40)
  kw = dict(input_shape=x_shape, window_strides=(2, 2), padding="SAME", scale=s, bias=b)
  got = np.asarray(jax.jit(functools.partial(cd.int8_conv_direct_dgrad, **kw))(g, w))
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    want = np.asarray(pk.int8_conv_dgrad_reference(jax.device_put(g, cpu),
                                                   jax.device_put(w, cpu), **kw))
  np.testing.assert_array_equal(got[:, 1::2], want[:, 1::2])
  np.testing.assert_array_equal(got[:, :, 1::2], want[:, :, 1::2])
  assert np.all(np.abs(got - want) <= np.spacing(np.abs(want))), np.abs(got - want).max()
