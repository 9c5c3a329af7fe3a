"""Weight gradient of the INT8 conv, split-K implicit GEMM: :func:`int8_conv_wgrad`.

``dw[t] = sum_r x_flat[r + off_t] (x) g_grid[r]`` over the forward's grid
rows r (g zero-padded onto the grid), per tap t: the forward's phases and
flattening (:func:`pallas_kernels.conv_common.forward_plan`) with the roles
turned. It contracts over pixels, so both int8 operands must be
pixel-major: XLA transposes the shifted copies to (Cp, pixels) and g to
(Op, pixels). The tap shift now moves the *contraction* coordinate, which
the tiled TMA splits by the swizzle width instead of by 8 rows: the wgrad
configs (``WGRAD_CONFIGS``) use swizzle 32, so the copies are per residue
``off_t mod 32`` (3 for 3x3 stride 1 with Wg a multiple of 32; the cost
model may prefer the unrounded pitch and more copies on small images, up
to one per tap, i.e. a transposed im2col, on 7x7).

Split-K: the grid is (taps x parts, C tiles, O tiles), each block sums one
part of at most INT32_SAFE_K pixels into an int32 accumulator (the same TMA
ring as the forward kernel) and stores it; XLA combines the parts exactly
(:func:`pallas_kernels._common.split_halves` / ``join_halves``: signed high
/ unsigned low 16-bit halves summed in int32, joined in float32 -- the exact
sum rounded once, independent of the split, the same functions as
``int8jax.exact``), then ``* scale[o]``. At most 256 parts (N*Ho*Wo <=
33.5M pixels). :func:`int8_conv_wgrad_halves` returns the unrounded halves
(summed across devices by int8jax's data-parallel path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import INT32_SAFE_K
from pallas_kernels._common import MAX_EXACT_PARTS
from pallas_kernels._common import OUT_DTYPES
from pallas_kernels._common import check_vector
from pallas_kernels._common import combine_int32_chunks
from pallas_kernels._common import epilogue
from pallas_kernels._common import join_halves
from pallas_kernels._common import out_transforms
from pallas_kernels._common import round_up
from pallas_kernels._common import split_halves
from pallas_kernels.conv_common import Int8ConvConfig
from pallas_kernels.conv_common import Taps
from pallas_kernels.conv_common import config_and_launcher
from pallas_kernels.conv_common import check_int8
from pallas_kernels.conv_common import check_padding
from pallas_kernels.conv_common import check_shape
from pallas_kernels.conv_common import check_strides
from pallas_kernels.conv_common import conv_output_shape
from pallas_kernels.conv_common import copy_from_tap_source
from pallas_kernels.conv_common import forward_plan
from pallas_kernels.conv_common import forward_source
from pallas_kernels.conv_common import pipelined_accumulate
from pallas_kernels.conv_common import ring_scratch
from pallas_kernels.conv_common import select_wgrad_config
from pallas_kernels.conv_common import static_lookup

__all__ = ["int8_conv_wgrad", "int8_conv_wgrad_halves", "int8_conv_wgrad_reference"]


# Thread blocks the split-K grid aims for (2 per SM of an H100/H200).
_TARGET_BLOCKS = 264


def check_wgrad_args(x, g, kernel_shape, window_strides, padding):
  check_int8("x", x, 4, "NHWC (N, H, W, C)")
  check_int8("g", g, 4, "NHWC (N, Ho, Wo, O)")
  kernel_shape = check_shape("kernel_shape", kernel_shape, "(KH, KW, C, O)")
  kh, kw, c, o = kernel_shape
  if kh < 1 or kw < 1 or c != x.shape[3]:
    raise ValueError(f"kernel_shape (KH, KW, C, O) must have a non-empty "
                     f"window and x's C, got {kernel_shape=}, "
                     f"x.shape={x.shape}")
  strides = check_strides(window_strides)
  pads = check_padding(padding, x.shape[1:3], (kh, kw), strides)
  want = conv_output_shape(x.shape, kernel_shape, strides, pads)
  if tuple(g.shape) != want:
    raise ValueError(
        f"g must have the forward output's shape {want} (from x.shape="
        f"{x.shape}, {kernel_shape=}, window_strides={strides}, padding="
        f"{pads}), got g.shape={g.shape}")
  return kernel_shape, strides, pads


def wgrad_epilogue(dw_f32, scale, out_dtype):
  return epilogue(dw_f32, scale, None, out_dtype)


@functools.partial(jax.jit, static_argnames=("kernel_shape", "strides", "pads",
                                             "out_dtype"))
def _wgrad_reference_impl(x, g, scale, *, kernel_shape, strides, pads,
                          out_dtype):
  kh, kw, c, o = kernel_shape
  n, ho, wo, _ = g.shape
  xp = lax.pad(x, jnp.int8(0), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0),
                                (0, 0, 0)))
  gm = g.reshape(n * ho * wo, o)
  pixels = n * ho * wo
  taps = []
  for i in range(kh):
    for j in range(kw):
      win = lax.slice(xp, (0, i, j, 0),
                      (n, i + strides[0] * (ho - 1) + 1,
                       j + strides[1] * (wo - 1) + 1, c),
                      (1, strides[0], strides[1], 1)).reshape(pixels, c)
      parts = [lax.dot_general(win[s:s + INT32_SAFE_K],
                               gm[s:s + INT32_SAFE_K],
                               (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)
               for s in range(0, pixels, INT32_SAFE_K)]
      taps.append(combine_int32_chunks(jnp.stack(parts)))
  dw = jnp.stack(taps).reshape(kh, kw, c, o)
  return wgrad_epilogue(dw, scale, out_dtype)


def check_wgrad_epilogue(scale, out_dtype, o):
  try:
    out_dtype = jnp.dtype(out_dtype)
  except TypeError:
    out_dtype = None
  if out_dtype not in OUT_DTYPES[:2]:
    raise TypeError("out_dtype must be float32 or bfloat16 (weight-gradient "
                    f"sums exceed int32), got {out_dtype}")
  return check_vector("scale", scale, o, "O"), out_dtype


def check_wgrad_pixels(pixels):
  if pixels > MAX_EXACT_PARTS * INT32_SAFE_K:
    raise ValueError(
        f"the weight gradient sums over N*Ho*Wo={pixels} pixels, more than "
        f"{MAX_EXACT_PARTS} * INT32_SAFE_K = {MAX_EXACT_PARTS * INT32_SAFE_K} (the exact "
        "int32-parts combination); split the batch and add the results")


def int8_conv_wgrad_reference(x, g, *, kernel_shape, window_strides=(1, 1),
                              padding="VALID", scale=None,
                              out_dtype=jnp.float32):
  """Exact XLA reference for :func:`int8_conv_wgrad` (same bits).

  Per tap, the strided window of the padded x (explicit slices) contracted
  with g over the pixels by ``lax.dot_general(..., preferred_element_type=
  jnp.int32)`` in chunks of INT32_SAFE_K pixels, the int32 chunks combined
  exactly (:func:`combine_int32_chunks`: one rounding to float32), then
  ``* scale`` and the cast.
  """
  kernel_shape, strides, pads = check_wgrad_args(x, g, kernel_shape,
                                                  window_strides, padding)
  scale, out_dtype = check_wgrad_epilogue(scale, out_dtype, kernel_shape[3])
  check_wgrad_pixels(int(np.prod(g.shape[:3])))
  if min(g.shape) == 0 or x.shape[3] == 0:
    return wgrad_epilogue(jnp.zeros(kernel_shape, jnp.float32), scale,
                           out_dtype)
  return _wgrad_reference_impl(x, g, scale, kernel_shape=kernel_shape,
                               strides=strides, pads=pads, out_dtype=out_dtype)


@dataclasses.dataclass(frozen=True)
class _WgradSplit:
  """Split-K of the wgrad contraction: ``parts`` parts of ``part_len``
  grid rows (a multiple of tile_k, <= INT32_SAFE_K) each."""
  parts: int
  part_len: int

  @property
  def k_pad(self):
    return self.parts * self.part_len


def _wgrad_split(grid_rows, blocks_per_part, tile_k):
  parts = max(-(-_TARGET_BLOCKS // blocks_per_part),
              -(-grid_rows // INT32_SAFE_K))
  parts = min(parts, MAX_EXACT_PARTS, max(-(-grid_rows // tile_k), 1))
  part_len = round_up(-(-grid_rows // parts), tile_k)
  part_len = min(part_len, INT32_SAFE_K // tile_k * tile_k)
  parts = -(-grid_rows // part_len)
  if parts > MAX_EXACT_PARTS:
    raise ValueError(f"wgrad needs {parts} parts of {part_len} pixels, more "
                     f"than {MAX_EXACT_PARTS}")
  return _WgradSplit(parts=parts, part_len=part_len)


def _wgrad_kernel(*refs, taps: Taps, config: Int8ConvConfig,
                  split: _WgradSplit):
  """One (tile_m input channels, tile_n output channels) int32 partial of
  one tap over one part of the pixels per block.

  Refs (GMEM): the transposed shifted copies (Cp, cols) int8, g^T (Op,
  k_pad) int8, out (taps * parts, Cp, Op) int32. SMEM: the TMA ring, the
  output tile.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  n_src = len(taps.residues)
  srcs = refs[:n_src]
  gt_gmem, out_gmem, a_smem, b_smem, barriers, out_smem = refs[n_src:]
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  align = taps.align
  ks_idx = lax.axis_index("ks")
  m_idx = lax.axis_index("m")
  n_idx = lax.axis_index("n")
  tap = lax.div(ks_idx, jnp.int32(split.parts))
  part = ks_idx - tap * split.parts
  offq = static_lookup(tap, taps.tap_offq)
  num_steps = split.part_len // tile_k
  depth = min(config.max_concurrent_steps, num_steps)
  a_rows = pl.ds(m_idx * tile_m, tile_m)
  b_rows = pl.ds(n_idx * tile_n, tile_n)

  def issue(step, slot):
    k_step = part * num_steps + step
    # Pixel columns: align-aligned by construction (align * (...)).
    col = (k_step * (tile_k // align) + offq) * align
    copy_from_tap_source(srcs, taps, tap, (a_rows, pl.ds(col, tile_k)),
                         a_smem.at[slot], barriers.at[slot])
    plgpu.copy_gmem_to_smem(gt_gmem.at[b_rows, pl.ds(k_step * tile_k, tile_k)],
                            b_smem.at[slot], barriers.at[slot])

  acc = pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem,
                             barriers, (tile_m, tile_n))
  out_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[ks_idx, a_rows, b_rows])
  plgpu.wait_smem_to_gmem(0)


def _run_wgrad_launch(copies_t, gt, *, taps: Taps, split: _WgradSplit,
                      config: Int8ConvConfig, launcher):
  """(taps * parts, Cp, Op) int32 partial sums."""
  cp, op = copies_t[0].shape[0], gt.shape[0]
  n_taps = len(taps.offsets)
  if isinstance(launcher, str) and launcher == "xla":
    # The blocks' arithmetic: per tap and part, an exact int32 dot.
    shape = (-1, split.parts, split.part_len)
    b = gt.reshape(shape)
    dims = (((2,), (2,)), ((1,), (1,)))  # batch over parts
    parts = []
    for j, offq in zip(taps.tap_copy, taps.tap_offq):
      start = taps.align * offq
      a = lax.slice_in_dim(copies_t[j], start, start + split.k_pad, axis=1)
      parts.append(lax.dot_general(a.reshape(shape), b, dims,
                                   preferred_element_type=jnp.int32))
    return jnp.concatenate(parts)  # (taps * parts, Cp, Op), tap-major
  import jax.experimental.pallas.mosaic_gpu as plgpu

  depth = min(config.max_concurrent_steps, split.part_len // config.tile_k)
  kernel = plgpu.kernel(
      functools.partial(_wgrad_kernel, taps=taps, config=config, split=split),
      out_type=jax.ShapeDtypeStruct((n_taps * split.parts, cp, op), jnp.int32),
      scratch_types=ring_scratch(config, depth) + [
          plgpu.SMEM((config.tile_m, config.tile_n), jnp.int32,
                     transforms=out_transforms(config.tile_n, jnp.int32)),
      ],
      grid=(n_taps * split.parts, cp // config.tile_m, op // config.tile_n),
      grid_names=("ks", "m", "n"),
      interpret=None if launcher == "mosaic_gpu" else launcher,
      kernel_name="int8_conv_wgrad",
  )
  return kernel(*copies_t, gt)


@functools.lru_cache(maxsize=None)
def wgrad_plan(x_shape, kernel_shape, strides, pads, config):
  n, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  cp = round_up(c, config.tile_m)
  op = round_up(o, config.tile_n)
  # The forward plan's phases, flattening and taps, with the copies aligned
  # to the swizzle width along the pixels (the K of this GEMM); the cost
  # model sees the pixels as rows of one byte per (C + O) channel.
  plan, phases = forward_plan(n, h, w, c, kh, kw, o, strides, pads,
                              config.tile_k, cp, op, 1, config.swizzle)
  taps = plan.launches[0]
  blocks = len(taps.offsets) * (cp // config.tile_m) * (op // config.tile_n)
  split = _wgrad_split(plan.grid_rows, blocks, config.tile_k)
  return plan, phases, split, cp, op


@functools.partial(jax.jit, static_argnames=(
    "kernel_shape", "strides", "pads", "out_dtype", "config", "launcher", "halves"))
def _int8_conv_wgrad_impl(x, g, scale, *, kernel_shape, strides, pads,
                          out_dtype, config, launcher, halves=False):
  n, h, w, c = x.shape
  kh, kw, _, o = kernel_shape
  plan, phases, split, cp, op = wgrad_plan(x.shape, kernel_shape, strides,
                                            pads, config)
  taps = plan.launches[0]
  flat = forward_source(x, plan, phases, strides, pads, cp)
  cols = split.k_pad + max(taps.align * q for q in taps.tap_offq)
  copies_t = []
  for res in plan.residues:  # (Cp, cols): column r = flat row r + res
    part = flat[res:]
    part = lax.pad(part, jnp.int8(0), ((0, cols - part.shape[0], 0),
                                       (0, 0, 0)))
    copies_t.append(part.T)
  _, ho, wo, _ = g.shape
  g_grid = lax.pad(g, jnp.int8(0), ((0, 0, 0), (0, plan.hg - ho, 0),
                                    (0, plan.wg - wo, 0), (0, op - o, 0)))
  g_grid = g_grid.reshape(plan.grid_rows, op)
  gt = lax.pad(g_grid, jnp.int8(0),
               ((0, split.k_pad - plan.grid_rows, 0), (0, 0, 0))).T
  parts = _run_wgrad_launch(copies_t, gt, taps=taps, split=split,
                            config=config, launcher=launcher)
  hi, lo = split_halves(parts.reshape(len(taps.offsets), split.parts, cp, op), axis=1)
  order = sorted(range(len(taps.weights)),
                 key=lambda t: taps.weights[t][0] * kw + taps.weights[t][1])
  hi, lo = (jnp.stack([v[t, :c, :o] for t in order]).reshape(kh, kw, c, o) for v in (hi, lo))
  if halves:
    return hi, lo
  return wgrad_epilogue(join_halves((hi, lo)), scale, out_dtype)


def _wgrad_setup(x, g, kernel_shape, window_strides, padding, config, interpret):
  """Checked arguments of a weight-gradient call: ``(kernel_shape, strides,
  pads, config, launcher, empty)``; ``empty``: the result is all zeros."""
  kernel_shape, strides, pads = check_wgrad_args(x, g, kernel_shape, window_strides, padding)
  check_wgrad_pixels(int(np.prod(g.shape[:3])))
  config, launcher = config_and_launcher(
      config, select_wgrad_config(kernel_shape[2], kernel_shape[3]), jnp.int32, interpret)
  empty = min(g.shape) == 0 or x.shape[3] == 0 or kernel_shape[3] == 0
  return kernel_shape, strides, pads, config, launcher, empty


def int8_conv_wgrad_halves(x, g, *, kernel_shape, window_strides=(1, 1), padding="VALID",
                           config: Int8ConvConfig | None = None, interpret=False):
  """:func:`int8_conv_wgrad`'s exact integer result, not yet rounded: two
  (KH, KW, C, O) int32 arrays ``(hi, lo)``, the sums of the signed high and
  unsigned low 16-bit halves of the kernel's int32 parts, the integer being
  ``hi * 65536 + lo``. Halves of sums over different pixels (e.g. batch
  shards on different devices) add up exactly in int32, so a sharded weight
  gradient is bit-equal to the single-device one."""
  kernel_shape, strides, pads, config, launcher, empty = _wgrad_setup(
      x, g, kernel_shape, window_strides, padding, config, interpret)
  if empty:
    zero = jnp.zeros(kernel_shape, jnp.int32)
    return zero, zero
  return _int8_conv_wgrad_impl(x, g, None, kernel_shape=kernel_shape, strides=strides,
                               pads=pads, out_dtype=jnp.float32, config=config,
                               launcher=launcher, halves=True)


def int8_conv_wgrad(x, g, *, kernel_shape, window_strides=(1, 1),
                    padding="VALID", scale=None, out_dtype=jnp.float32,
                    config: Int8ConvConfig | None = None, interpret=False):
  """Weight gradient of :func:`int8_conv`, implicit split-K GEMM (Hopper).

  ``dw[kh, kw, c, o] = sum_{n, h, w} x[n, sh*h+kh-lo_h, sw*w+kw-lo_w, c] *
  g[n, h, w, o]`` exactly, rounded once to float32, then ``* scale[o]`` and
  cast to ``out_dtype``.

  The forward's phases and flattening, with the roles turned: per tap, the
  GEMM (C x pixels) @ (pixels x O), both operands pixel-major -- x's shifted
  copies and g on the output grid (zero at the dropped grid rows) are
  transposed to (C, pixels) / (O, pixels) by XLA, the copies aligned to
  the swizzle width (32) along the pixels. The kernel's grid is (taps x
  parts, C tiles, O tiles): each block sums one part of <= INT32_SAFE_K
  pixels of one tap into an int32 accumulator and stores it; the parts are
  combined exactly (:func:`combine_int32_chunks`, hi/lo 16-bit halves), so
  the result does not depend on the split.

  Args:
    x: (N, H, W, C) int8, the forward input.
    g: (N, Ho, Wo, O) int8, the gradient of the forward output.
    kernel_shape: (KH, KW, C, O) of the forward kernel.
    window_strides, padding: the forward conv's.
    scale: None, a scalar or (O,) float (e.g. ``s_x * s_g``).
    out_dtype: float32 or bfloat16.
    config: tiling; ``select_wgrad_config(C, O)`` if None (tile_m: input
      channels, tile_n: output channels, tile_k: pixels per step).
    interpret: as for :func:`int8_conv`.

  Returns:
    (KH, KW, C, O) of ``out_dtype``, bit-equal to
    :func:`int8_conv_wgrad_reference`.
  """
  kernel_shape, strides, pads, config, launcher, empty = _wgrad_setup(
      x, g, kernel_shape, window_strides, padding, config, interpret)
  scale, out_dtype = check_wgrad_epilogue(scale, out_dtype, kernel_shape[3])
  if empty:
    return wgrad_epilogue(jnp.zeros(kernel_shape, jnp.float32), scale,
                           out_dtype)
  return _int8_conv_wgrad_impl(x, g, scale, kernel_shape=kernel_shape,
                               strides=strides, pads=pads, out_dtype=out_dtype,
                               config=config, launcher=launcher)
