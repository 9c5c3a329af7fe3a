"""Direct-box forward INT8 conv: per-tap TMA boxes of the NHWC tensor (issue 24).

A prototype of the forward conv kernel that reads the quantized NHWC int8
tensor *as produced* -- no pad, no flattening, no shifted copies -- and
stores its result straight into the NHWC output. Not wired into
:func:`pallas_kernels.int8_conv.int8_conv`; same arguments, same bits. The
Pallas backend of int8jax runs it behind a switch (``INT8JAX_DIRECT_CONV=1``:
forward and input gradient, any stride; the weight gradient on
:mod:`pallas_kernels.conv_direct_wgrad`), off by default until a GPU has run it.
:func:`int8_conv_direct_dgrad`: the input gradient by the same kernel (stride 1:
g with the flipped, channel-swapped kernel; strides > 1: below).

How (stride 1; strides s > 1: below):

* An output tile is ``tb`` images x ``th`` output rows x ``tw`` output
  columns (``tb*th*tw = tile_m`` pixels, the M of the ``wgmma``;
  :func:`direct_tile` picks the shape that computes the fewest pixels) times
  ``tile_n`` output channels. Steps = taps (KH*KW) x input-channel chunks of
  ``tile_k`` channels; the TMA ring and the ``wgmma`` accumulation are
  :mod:`pallas_kernels.int8_conv`'s (``_pipelined_accumulate``).
* Step (tap (kh, kw), chunk c) loads one 4-D TMA box
  ``x[n0:n0+tb, h0+kh-lo_h : +th, w0+kw-lo_w : +tw, c*tk : +tk]``. The box
  start is any element: with ``tile_k == swizzle`` a box row (one pixel's
  ``tile_k`` channels) is exactly one swizzle row, so the box lands in SMEM
  as the row-major ``(tile_m, tile_k)`` matrix, which *is* the
  ``(8, swizzle)``-tiled, swizzled layout ``wgmma`` reads (the tiling is the
  identity when the tile has a single column of tiles, and the swizzle is a
  function of the SMEM address). So the kernel writes the box through an
  untiled, swizzled 4-D view of the very SMEM slot that ``wgmma`` reads
  through its tiled view (:func:`untiled_view`). (Through the tiled
  view itself, Mosaic GPU tiles the GMEM box too, splitting W into
  (W // 8, W % 8): the start must then be a multiple of 8 -- the reason for
  the shifted copies of :mod:`pallas_kernels.int8_conv`.)
* Padding is TMA's out-of-bounds zero fill: box coordinates below 0 (the
  low padding) and past the end (high padding, ragged tiles, channels past
  C) read zeros. No XLA pad unless C is not a multiple of 16 (TMA needs
  16-byte GMEM strides).
* Epilogue: ``acc * scale[o] + bias[o]`` in registers (int8_conv's), then
  the tile goes to SMEM as swizzled column slabs of ``swizzle`` bytes
  (``(8, slab)``-tiled = row-major again, :func:`_out_layout`), each stored
  by one 4-D TMA box into the (N, Ho, Wo, O') output (O' = O rounded up to
  16 bytes; TMA clips the parts past the edges). No grid slice, no copy
  (O' > O costs a slice).

Interpret mode (CPU): the GPU interpreter neither reshapes refs nor reads
boxes that start below 0, so under it the kernel copies the same boxes row
by row into / out of the tiled tiles (the same bytes, row-major), the
wrapper pads the low side in XLA, and the output tile is stored whole (its
XLA:CPU contracts a sliced multiply-add differently from the reference's,
off by an ulp; the slabs are tested under it on int32 outputs). Everything
else -- tile origins, tap offsets, steps, ring, wgmma, epilogue, clipping --
is the code the GPU runs. What only a GPU can confirm: the untiled-view
box bytes and the zero fill below 0 (``tests/test_conv_direct.py``'s
``gpu`` tests run both paddings).

Lowering: Mosaic GPU's "Lane" semantics (the untiled view is built on the
physical SMEM ref; the default warpgroup semantics infers SMEM layouts and
refuses the aliasing view).

Strides s > 1: int8_conv's phase split in XLA (pad, then the s*s phase
images ``xp[:, a::s, b::s]`` with taps, stacked along N: one int8 pass
writing ~1x x), tap (s*dh+a, s*dw+b) = box of phase (a, b) at (dh, dw);
the kernel is the same (per-tap image / row / column offsets). TMA's
element strides would read the phases in place, but Mosaic GPU does not
expose them.

Strided input gradient (:func:`int8_conv_direct_dgrad`, s > 1): the
sub-pixel phases of :mod:`pallas_kernels.conv_dgrad` indexed by the output
pixel's residue (:func:`direct_dgrad_phases`): ``dx[s*q + a] = sum_m
g[q + (a+lo)//s - m] * w[(a+lo)%s + s*m]`` per dimension, a stride-1
correlation of g over the phase grid (N, ceil(H/sh), ceil(W/sw)), run by this
kernel with per-tap box offsets into g itself (below 0 / past the end: TMA
zero fill; no padded g, no shifted copies). Each phase's tile goes straight
into dx: dx (N, H', W', C') (H' = ceil(H/sh)*sh, W' likewise, C' = C rounded
up to 16 bytes) *is*, row-major, the 5-D array (N, H'/sh, sh, W'/sw, sw*C'),
in which phase (a, b) is the box ``[n, q_h, a, q_w, b*C' + c]``: the kernel's
output store is one 5-D TMA box per swizzled slab (:class:`PhaseStore`). No
interleave pass; dx is written once.

* One launch per phase, chained through one buffer: the first launch makes dx
  (its ``out_type``), the others take it as a ``jax.Ref``
  (``jax.new_ref`` / ``jax.freeze``), which ``plgpu.kernel`` lowers as the
  launch's ``input_output_aliases`` (checked on jax 0.11.2 and 0.12: the
  lowered custom calls alias dx; XLA writes it in place). Why not one launch
  over all phases: the phases have different tap counts (3x3 stride 2: 4 / 2
  / 2 / 1), and the TMA ring's prologue and trip count are static per launch;
  one grid would need a per-block step count or every phase padded to the
  most taps (3x3 stride 2: 16 steps instead of 9, 1.78x the MACs). The cost
  of separate launches: sh*sw launches instead of one, each reading its
  boxes of g (the launches together read g sh*sw times: for C = O at
  stride 2, the int8 input's bytes; L2 absorbs part of it when g fits).
* Each launch writes only its own phase's bytes (order-independent): a
  store never crosses into the next phase's channels, so the store slab is
  the widest (128 / 64 / 32 bytes) whose channels divide C' (a tile's chunks
  at or past C' are skipped: ``pl.when``); if none does, C' is rounded up to
  the 32-byte slab instead and dx costs a slice (:func:`_phase_layout`:
  float32 C = 4 mod 8, bfloat16 C = 8 mod 16). H or W no multiple of the
  stride: dx' has H' > H rows, sliced (one XLA pass of dx). ResNet-50's
  strided convs (even sizes, C a multiple of 64) have neither.
* Phases no kernel tap reaches (1x1 stride 2: a or b odd) are a launch with
  no taps -- no g, no weights, no TMA ring -- that stores the epilogue of a
  zero accumulator (bias, or 0 times scale) into its phase: it writes those
  pixels once, as any route must, and reads only scale / bias (one launch
  each: 25-30 registers, 18-34 KiB of SMEM). No fill pass of dx before.
* Interpret mode: g padded on the low side in XLA by the most negative tap
  offset (as :func:`resolve_low_pad`), boxes and stores row by row, the tile
  stored whole then copied by column chunks (same chunks, same skips).

Not done: tile_k > swizzle (several boxes per step), and wgrad here (a
separate problem: its operands are pixel-major; :mod:`conv_direct_wgrad`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import round_up as _round_up
from pallas_kernels.conv_common import Int8ConvConfig
from pallas_kernels.conv_common import Taps as _Taps
from pallas_kernels.conv_common import check_config as _check_config
from pallas_kernels.conv_common import check_contraction as _check_contraction
from pallas_kernels.conv_common import check_epilogue_args as _check_epilogue_args
from pallas_kernels.conv_common import conv_output_shape
from pallas_kernels.conv_common import empty_or_zero_k as _empty_or_zero_k
from pallas_kernels.conv_common import forward_phase_taps
from pallas_kernels.conv_common import launcher_for as _launcher
from pallas_kernels.conv_common import pipelined_accumulate as _pipelined_accumulate
from pallas_kernels.conv_common import select_conv_config
from pallas_kernels.conv_common import static_lookup as _select
from pallas_kernels.conv_common import weight_matrix as _weight_matrix
from pallas_kernels.conv_dgrad import check_dgrad_args
from pallas_kernels.conv_forward import check_conv_args
from pallas_kernels.conv_forward import padded_vectors as _vectors

__all__ = ["DirectTile", "PhaseStore", "direct_dgrad_phases", "direct_kernel_operand_bytes",
           "direct_tile", "int8_conv_direct", "int8_conv_direct_dgrad", "resolve_low_pad",
           "untiled_view"]

_GMEM_STRIDE_BYTES = 16  # TMA: every GMEM stride but the last a multiple of 16 bytes
_MAX_BOX = 256           # TMA: at most 256 elements per box dimension


@dataclasses.dataclass(frozen=True)
class DirectTile:
  """An output tile: ``tb`` images x ``th`` rows x ``tw`` columns."""
  tb: int
  th: int
  tw: int

  @property
  def pixels(self) -> int:
    return self.tb * self.th * self.tw


def direct_tile(n: int, ho: int, wo: int, tile_m: int, kh: int = 1, kw: int = 1) -> DirectTile:
  """The (tb, th, tw) of ``tile_m`` pixels that computes the fewest pixels.

  Powers of two (``tile_m`` is a multiple of 64); ties go to the smallest
  input footprint (tiles x tb x (th+kh-1) x (tw+kw-1)), then fewer images.
  Every tap loads its own box, so SMEM traffic is taps x tile_m rows per
  tile whatever the shape; the footprint is what DRAM / L2 must supply.
  E.g. 56x56 at tile_m 128 -> 2 x 8 x 8 (no wasted pixel), 7x7 -> 128 x 1 x 1.
  """
  best = None
  for lb in range(int(np.log2(tile_m)) + 1):
    tb = 1 << lb
    for lh in range(int(np.log2(tile_m // tb)) + 1):
      th = 1 << lh
      tw = tile_m // (tb * th)
      if tb * th * tw != tile_m or max(tb, th, tw) > _MAX_BOX:
        continue
      tiles = -(-n // tb) * -(-ho // th) * -(-wo // tw)
      key = (tiles * tile_m, tiles * tb * (th + kh - 1) * (tw + kw - 1), tb)
      if best is None or key < best[0]:
        best = (key, DirectTile(tb, th, tw))
  return best[1]


def _ring(config: Int8ConvConfig, depth: int, arrivals: int):
  """SMEM of the TMA ring: a (depth, tile_m, tile_k), b (depth, tile_n,
  tile_k), both (8, swizzle)-tiled and swizzled, one barrier per slot."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  transforms = (plgpu.TilingTransform((8, config.swizzle)),
                plgpu.SwizzleTransform(config.swizzle))
  return [
      plgpu.SMEM((depth, config.tile_m, config.tile_k), jnp.int8, transforms=transforms),
      plgpu.SMEM((depth, config.tile_n, config.tile_k), jnp.int8, transforms=transforms),
      plgpu.Barrier(num_arrivals=arrivals, num_barriers=depth),
  ]


def untiled_view(smem, index, lead=None):
  """``smem.at[index]`` of a tiled, swizzled SMEM ref whose last dimension is one tile
  (``swizzle`` bytes) wide, as an untiled, swizzled ref of shape ``(*lead, last)``
  (default ``lead``: (rows,)): the same bytes, since the (8, last) tiling of (rows, last)
  is the row-major layout. TMA can then write a box at any start into it."""
  from jax._src.pallas import core as pallas_core
  from jax._src.pallas.mosaic_gpu import core as gpu_core

  layout = tuple(smem.transforms)
  if not (len(layout) == 2 and isinstance(layout[0], gpu_core.UnswizzleRef)
          and isinstance(layout[1], gpu_core.UntilingTransform)):
    raise NotImplementedError(f"unexpected SMEM transforms {layout}")
  physical = pallas_core.TransformedRef(smem.ref, (layout[0],))  # (..., rows/8, 1, 8, last)
  slot = physical.at[index]
  if lead is None:
    lead = (slot.shape[0] * slot.shape[2],)
  return slot.reshape(*lead, slot.shape[-1])


def _untiled_box_view(smem, index, tile: DirectTile):
  """:func:`untiled_view` as the (tb, th, tw, last) box of an output tile."""
  return untiled_view(smem, index, (tile.tb, tile.th, tile.tw))


def _out_layout(tile_n: int, out_c: int, out_dtype):
  """(swizzle bytes, channels per chunk) of the output tile: the tile is stored as
  tile_n / chunk column chunks, each a row-major (tile_m, chunk) swizzled slab that one
  TMA box writes to the NHWC output; (None, None) (untiled, unswizzled tile, one box)
  when no swizzle of 32-128 bytes divides tile_n's row and fits in the output's width."""
  size = jnp.dtype(out_dtype).itemsize
  for swizzle in (128, 64, 32):
    if (tile_n * size) % swizzle == 0 and swizzle <= out_c * size:
      return swizzle, swizzle // size
  return None, None


def _store(ref, value, optimized):
  """``ref[...] = value`` without reading the old value. ``optimized=False`` for the
  untiled tile: jax 0.12 plans a bank-conflict-free transfer for it and finds none
  (TransferPlanDerivationError); jax 0.11 (the GPU machines') has no ``plgpu.store`` and
  lowers the assignment as it is."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  store = getattr(plgpu, "store", None)
  if store is None:
    ref[...] = value
  else:
    store(ref, value, optimized=optimized)


@dataclasses.dataclass(frozen=True)
class PhaseStore:
  """Where a strided-dgrad launch stores its tile: output phase (a, b) of dx viewed as
  (N, Hq, sh, Wq, sw*C') (row-major dx (N, Hq*sh, Wq*sw, C') itself), output channel c
  of the tile at column ``b*c_pad + c`` of the last dimension; ``chunk`` channels per
  store (a divisor of ``c_pad``: no store crosses into the next phase's channels)."""
  a: int
  b: int
  c_pad: int
  chunk: int
  guard: bool = True  # whether a tile's chunk can start at or past c_pad


def _store_phase(out_smem, out_gmem, phase: PhaseStore, *, tile: DirectTile, origin, n_col,
                 tile_n: int, swizzled: bool, row_copies: bool):
  """Stores the output tile (SMEM: ``tile_n // chunk`` swizzled slabs, or one untiled
  (tile_m, tile_n) tile) into phase (a, b) of the 5-D dx view (:class:`PhaseStore`):
  per chunk of ``chunk`` channels one 5-D TMA box ``[n0:+tb, h0:+th, a, w0:+tw,
  b*C' + c0 : +chunk]`` (row by row under the interpreter). Chunks at or past C'
  (channels of the tile beyond dx's) are skipped: in this view they are the next
  phase's channels, which TMA would not clip."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tb, th, tw = tile.tb, tile.th, tile.tw
  n0, h0, w0 = origin
  chunk = phase.chunk
  for j in range(tile_n // chunk):
    c0 = n_col + j * chunk

    def store(j=j, c0=c0):
      chans = pl.ds(phase.b * phase.c_pad + c0, chunk)
      if row_copies:
        for b in range(tb):
          for i in range(th):
            rows = pl.ds((b * th + i) * tw, tw)
            src = (out_smem.at[j, rows] if swizzled
                   else out_smem.at[rows, pl.ds(j * chunk, chunk)])
            plgpu.copy_smem_to_gmem(src, out_gmem.at[n0 + b, h0 + i, phase.a, pl.ds(w0, tw),
                                                     chans], commit_group=False)
      else:
        if not swizzled:
          raise NotImplementedError("the compiled strided dgrad stores swizzled slabs")
        plgpu.copy_smem_to_gmem(
            untiled_view(out_smem, j, (tb, th, 1, tw)),
            out_gmem.at[pl.ds(n0, tb), pl.ds(h0, th), pl.ds(phase.a, 1), pl.ds(w0, tw), chans],
            commit_group=False)

    if phase.guard:
      pl.when(c0 < phase.c_pad)(store)
    else:
      store()


def _direct_kernel(x_gmem, w_gmem, scale_gmem, bias_gmem, out_gmem, a_smem, b_smem,
                   barriers, scale_smem, bias_smem, vec_barriers, out_smem, *,
                   tile: DirectTile, grid_hw: tuple[int, int],
                   taps: tuple[tuple[int, int, int], ...], offset_hw: tuple[int, int],
                   config: Int8ConvConfig, k_chunks: int,
                   has_bias: bool, int_out: bool, row_copies: bool, out_chunk: int | None,
                   phase: PhaseStore | None = None):
  """One (tb x th x tw pixels, tile_n channels) output tile per block.

  GMEM: x (N', H', W', C') int8 (C' a multiple of 16; stride s > 1: the s*s
  phase images stacked along N), the weight matrix (Op, taps*Cp) int8,
  scale / bias (Op,) f32, out (N, Ho, Wo, O') NHWC. ``taps``: per tap (image
  offset, row offset, column offset) of its box; ``offset_hw``: added to
  every box's (row, column) (-lo: the low padding read out of bounds).
  ``row_copies``: copy each box row by row into the tiled slot (interpret
  mode) instead of one box into the untiled view. ``out_chunk``: output
  channels per swizzled output slab (None: one untiled tile;
  :func:`_out_layout`). ``phase``: store into output phase (a, b) of the 5-D view
  (N, Hq, sh, Wq, sw*C') of dx (:class:`PhaseStore`; strided dgrad) instead of the
  NHWC output. No taps (a dgrad phase no kernel tap reaches): no loads, the
  epilogue of a zero accumulator (x_gmem, w_gmem, a_smem, b_smem, barriers None).
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tb, th, tw = tile.tb, tile.th, tile.tw
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  tiles_h, tiles_w = grid_hw
  m_idx = lax.axis_index("m")
  n_idx = lax.axis_index("n")
  tile_w = lax.rem(m_idx, jnp.int32(tiles_w))
  rest = lax.div(m_idx, jnp.int32(tiles_w))
  tile_h = lax.rem(rest, jnp.int32(tiles_h))
  n0 = lax.div(rest, jnp.int32(tiles_h)) * tb
  h0 = tile_h * th
  w0 = tile_w * tw
  n_slice = pl.ds(n_idx * tile_n, tile_n)
  num_steps = len(taps) * k_chunks
  depth = min(config.max_concurrent_steps, num_steps)

  if not int_out:
    plgpu.copy_gmem_to_smem(scale_gmem.at[n_slice], scale_smem, vec_barriers.at[0])
    if has_bias:
      plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice], bias_smem, vec_barriers.at[1])

  def issue(step, slot):
    """Starts the TMA loads of pipeline step ``step`` into ring ``slot``."""
    tap = lax.div(step, jnp.int32(k_chunks))
    chunk = step - tap * k_chunks
    ns = n0 + _select(tap, [t[0] for t in taps])
    hs = h0 + _select(tap, [t[1] for t in taps]) + offset_hw[0]
    ws = w0 + _select(tap, [t[2] for t in taps]) + offset_hw[1]
    chans = pl.ds(chunk * tile_k, tile_k)
    if row_copies:
      for b in range(tb):
        for i in range(th):
          plgpu.copy_gmem_to_smem(
              x_gmem.at[ns + b, hs + i, pl.ds(ws, tw), chans],
              a_smem.at[slot, pl.ds((b * th + i) * tw, tw)], barriers.at[slot])
    else:
      plgpu.copy_gmem_to_smem(
          x_gmem.at[pl.ds(ns, tb), pl.ds(hs, th), pl.ds(ws, tw), chans],
          _untiled_box_view(a_smem, slot, tile), barriers.at[slot])
    plgpu.copy_gmem_to_smem(w_gmem.at[n_slice, pl.ds(step * tile_k, tile_k)],
                            b_smem.at[slot], barriers.at[slot])

  if num_steps:
    acc = _pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem, barriers,
                                (tile_m, tile_n))
  else:  # a phase without taps: epilogue(0)
    acc = pl.run_scoped(lambda acc_ref: acc_ref[...], plgpu.ACC((tile_m, tile_n), jnp.int32))
  swizzled = out_chunk is not None
  chunks = tile_n // out_chunk if swizzled else 1
  out_chunk = out_chunk or tile_n
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per column
  if not int_out:
    plgpu.barrier_wait(vec_barriers.at[0])
    if has_bias:
      plgpu.barrier_wait(vec_barriers.at[1])
  for j in range(chunks):
    cols = pl.ds(j * out_chunk, out_chunk)
    # Chunk by chunk from the accumulator on, so that the multiply-add of each
    # output is one expression (the interpreter's XLA then contracts it into one
    # FMA like the reference's; slicing after the add keeps it apart).
    out = acc if chunks == 1 else acc[:, j * out_chunk:(j + 1) * out_chunk]
    if not int_out:
      shape = (tile_m, out_chunk)
      scale = plgpu.load(scale_smem.at[cols], layout=col_layout)
      out = out.astype(jnp.float32) * lax.broadcast_in_dim(scale, shape, [1])
      if has_bias:
        bias = plgpu.load(bias_smem.at[cols], layout=col_layout)
        out = out + lax.broadcast_in_dim(bias, shape, [1])
      out = out.astype(out_smem.dtype)
    if swizzled:  # (tile_m, chunk) slabs
      _store(out_smem.at[j], out, optimized=True)
    else:
      _store(out_smem, out, optimized=False)
  plgpu.commit_smem()
  if phase is not None:
    _store_phase(out_smem, out_gmem, phase, tile=tile, origin=(n0, h0, w0),
                 n_col=n_idx * tile_n, tile_n=tile_n, swizzled=swizzled, row_copies=row_copies)
  for j in range(chunks if phase is None else 0):
    chans = pl.ds(n_idx * tile_n + j * out_chunk, out_chunk)
    src = out_smem.at[j] if swizzled else out_smem
    if row_copies:
      for b in range(tb):
        for i in range(th):
          plgpu.copy_smem_to_gmem(src.at[pl.ds((b * th + i) * tw, tw)],
                                  out_gmem.at[n0 + b, h0 + i, pl.ds(w0, tw), chans],
                                  commit_group=False)
    elif swizzled:
      plgpu.copy_smem_to_gmem(
          _untiled_box_view(out_smem, j, tile),
          out_gmem.at[pl.ds(n0, tb), pl.ds(h0, th), pl.ds(w0, tw), chans], commit_group=False)
    else:
      plgpu.copy_smem_to_gmem(
          out_smem.reshape(tb, th, tw, tile_n),
          out_gmem.at[pl.ds(n0, tb), pl.ds(h0, th), pl.ds(w0, tw), chans], commit_group=False)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _operands(x, w, scale, bias, *, strides, pads, config: Int8ConvConfig,
              low_pad_in_xla: bool):
  """What the kernel is handed and how it reads it.

  Stride 1: x as given (C padded to 16 bytes if needed; the low padding added
  if ``low_pad_in_xla``), taps (0, kh, kw), offset -lo (the low padding read
  out of bounds). Stride s > 1: int8_conv's phase split -- x padded, split
  into the s*s phase images (one int8 pass), those with taps stacked along N
  (phase p's image n at p*N + n) -- taps (p*N, dh, dw), offset 0. Plus the
  weight matrix (block t = w[kh_t, kw_t].T) and the epilogue vectors.
  """
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  sh, sw = strides
  cp = _round_up(max(c, 1), config.tile_k)
  op = _round_up(o, config.tile_n)
  c16 = _round_up(c, _GMEM_STRIDE_BYTES)
  if strides == (1, 1):
    plo = [max(lo, 0) if low_pad_in_xla else 0 for lo, _ in pads]
    if c16 != c or any(plo):
      x = lax.pad(x, jnp.int8(0), ((0, 0, 0), (plo[0], 0, 0), (plo[1], 0, 0), (0, c16 - c, 0)))
    offset = tuple(p - lo for p, (lo, _) in zip(plo, pads))
    taps = tuple((0, i, j) for i in range(kh) for j in range(kw))
    weights = tuple((i, j) for i in range(kh) for j in range(kw))
  else:
    hq = -(-(h + pads[0][0] + pads[0][1]) // sh)
    wq = -(-(wd + pads[1][0] + pads[1][1]) // sw)
    xp = lax.pad(x, jnp.int8(0), ((0, 0, 0), (pads[0][0], hq * sh - h - pads[0][0], 0),
                                  (pads[1][0], wq * sw - wd - pads[1][0], 0), (0, c16 - c, 0)))
    split = xp.reshape(n, hq, sh, wq, sw, c16)
    ph, pw = forward_phase_taps(kh, sh), forward_phase_taps(kw, sw)
    phases = [(a, b) for a, _ in ph for b, _ in pw]
    x = jnp.concatenate([split[:, :, a, :, b, :] for a, b in phases], axis=0)
    taps, weights = [], []
    for p, ((a, dhs), (b, dws)) in enumerate((u, v) for u in ph for v in pw):
      for dh in dhs:
        for dw in dws:
          taps.append((p * n, dh, dw))
          weights.append((sh * dh + a, sw * dw + b))
    taps, weights, offset = tuple(taps), tuple(weights), (0, 0)
  wmat = _weight_matrix(jnp.transpose(w, (0, 1, 3, 2)),
                        _Taps(offsets=(0,) * len(weights), weights=weights), op, cp)
  scale_p, bias_p = _vectors(scale, bias, o, op)
  return x, wmat, scale_p, bias_p, taps, offset, cp, op


@functools.partial(jax.jit, static_argnames=("strides", "pads", "out_dtype", "config",
                                             "launcher", "tile", "low_pad_in_xla", "slab_out"))
def _int8_conv_direct_impl(x, w, scale, bias, *, strides, pads, out_dtype, config, launcher,
                           tile, low_pad_in_xla, slab_out):
  """``slab_out``: the output tile as swizzled column slabs (:func:`_out_layout`) where
  possible, else one untiled tile."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  n, _, _, _ = x.shape
  kh, kw, _, o = w.shape
  _, ho, wo, _ = conv_output_shape(x.shape, w.shape, strides, pads)
  interpret = launcher != "mosaic_gpu"
  xk, wmat, scale_p, bias_p, taps, offset, cp, op = _operands(
      x, w, scale, bias, strides=strides, pads=pads, config=config,
      low_pad_in_xla=low_pad_in_xla)
  out_c = _round_up(o, _GMEM_STRIDE_BYTES // jnp.dtype(out_dtype).itemsize)
  grid_hw = (-(-ho // tile.th), -(-wo // tile.tw))
  k_chunks = cp // config.tile_k
  num_steps = kh * kw * k_chunks
  depth = min(config.max_concurrent_steps, num_steps)
  arrivals = 1 + (tile.tb * tile.th if interpret else 1)
  out_swizzle, out_chunk = (_out_layout(config.tile_n, out_c, out_dtype) if slab_out
                            else (None, None))
  if out_swizzle is None:  # rows = output pixels, stored as one NHWC box
    out_tile = plgpu.SMEM((config.tile_m, config.tile_n), out_dtype)
  else:  # column slabs, each (8, chunk)-tiled = row-major, swizzled, one box each
    out_tile = plgpu.SMEM((config.tile_n // out_chunk, config.tile_m, out_chunk), out_dtype,
                          transforms=(plgpu.TilingTransform((8, out_chunk)),
                                      plgpu.SwizzleTransform(out_swizzle)))
  kernel = plgpu.kernel(
      functools.partial(_direct_kernel, tile=tile, grid_hw=grid_hw, taps=taps,
                        offset_hw=offset, config=config, k_chunks=k_chunks,
                        has_bias=bias is not None, int_out=out_dtype == jnp.int32,
                        row_copies=interpret, out_chunk=out_chunk),
      out_type=jax.ShapeDtypeStruct((n, ho, wo, out_c), out_dtype),
      scratch_types=_ring(config, depth, arrivals) + [
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.Barrier(num_barriers=2),
          out_tile,
      ],
      grid=(-(-n // tile.tb) * grid_hw[0] * grid_hw[1], op // config.tile_n),
      grid_names=("m", "n"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=launcher if interpret else None,
      kernel_name="int8_conv_direct",
  )
  out = kernel(xk, wmat, scale_p, bias_p)
  return out if out_c == o else out[..., :o]


def resolve_low_pad(low_pad_in_xla, interpret_mode, strides, pads) -> bool:
  """Whether XLA pads the low side (``None``: in interpret mode only, whose TMA boxes cannot
  start below 0; the compiled kernel reads that padding as out-of-bounds zeros)."""
  if low_pad_in_xla is None:
    return interpret_mode
  if (interpret_mode and not low_pad_in_xla and strides == (1, 1)
      and any(lo > 0 for lo, _ in pads)):
    raise ValueError("low_pad_in_xla=False needs the compiled kernel: the GPU interpreter "
                     "cannot read a TMA box that starts below 0")
  return low_pad_in_xla


def _check_direct_config(config: Int8ConvConfig):
  if config.tile_k != config.swizzle:
    raise ValueError(
        f"config.tile_k={config.tile_k} must equal config.swizzle={config.swizzle}: the direct "
        "kernel writes each tap box through an untiled view, one swizzle row per pixel")


def int8_conv_direct(x, w, *, window_strides=(1, 1), padding="VALID", scale=None, bias=None,
                     out_dtype=jnp.float32, config: Int8ConvConfig | None = None,
                     tile: DirectTile | None = None, low_pad_in_xla: bool | None = None,
                     interpret=False):
  """:func:`pallas_kernels.int8_conv.int8_conv` by per-tap NHWC boxes.

  Same arguments and result (bit-equal to :func:`int8_conv_reference`),
  plus:

  Args:
    tile: the output tile (:class:`DirectTile`, ``pixels == config.tile_m``);
      :func:`direct_tile` if None.
    low_pad_in_xla: pad the low side of H and W in XLA (one int8 pass)
      instead of reading it as TMA's out-of-bounds zeros. None: only under
      interpret mode (whose TMA model cannot start a box below 0). Strides > 1
    pad in the phase split anyway.
  """
  strides, pads = check_conv_args(x, w, window_strides, padding)
  scale, bias, out_dtype = _check_epilogue_args(scale, bias, out_dtype, w.shape[3], "O")
  kh, kw, c, o = w.shape
  _check_contraction(kh * kw * c, "this conv")
  return _run_direct(x, w, scale, bias, strides=strides, pads=pads, out_dtype=out_dtype,
                     config=config or select_conv_config(c, o), tile=tile,
                     low_pad_in_xla=low_pad_in_xla, interpret=interpret)


def _run_direct(x, w, scale, bias, *, strides, pads, out_dtype, config, tile, low_pad_in_xla,
                interpret):
  """The conv of checked arguments (w: (KH, KW, K, N), contracting K)."""
  kh, kw, c, _ = w.shape
  _check_direct_config(config)
  launcher = _launcher(interpret)
  interpret_mode = launcher != "mosaic_gpu"
  _check_config(config, out_dtype, interpret_mode)
  out_shape = conv_output_shape(x.shape, w.shape, strides, pads)
  if min(out_shape) == 0 or c == 0:
    return _empty_or_zero_k(out_shape, scale, bias, out_dtype)
  if tile is None:
    tile = direct_tile(*out_shape[:3], config.tile_m, kh, kw)
  if not isinstance(tile, DirectTile) or tile.pixels != config.tile_m:
    raise ValueError(f"tile={tile!r} must be a DirectTile of config.tile_m={config.tile_m} "
                     "pixels")
  if max(tile.tb, tile.th, tile.tw) > _MAX_BOX:
    raise ValueError(f"tile={tile!r}: TMA boxes hold at most {_MAX_BOX} per dimension")
  low_pad_in_xla = resolve_low_pad(low_pad_in_xla, interpret_mode, strides, pads)
  # Interpret mode stores the tile whole: the per-slab epilogue would be bit-equal on the
  # GPU, but the interpreter's XLA:CPU does not contract a sliced multiply-add into one
  # FMA as the reference does (1-ulp differences). tests/test_conv_direct.py runs the
  # slabs under the interpreter on int32 outputs.
  return _int8_conv_direct_impl(x, w, scale, bias, strides=strides, pads=pads,
                                out_dtype=out_dtype,
                                config=config, launcher=launcher, tile=tile,
                                low_pad_in_xla=bool(low_pad_in_xla),
                                slab_out=not interpret_mode)


def int8_conv_direct_dgrad(g, w, *, input_shape, window_strides=(1, 1), padding="VALID",
                           scale=None, bias=None, out_dtype=jnp.float32,
                           config: Int8ConvConfig | None = None, tile: DirectTile | None = None,
                           low_pad_in_xla: bool | None = None, interpret=False):
  """:func:`pallas_kernels.int8_conv.int8_conv_dgrad` by the same kernel, any stride.

  Stride 1: the stride-1 conv of g with the kernel flipped in space and C, O
  swapped, padded (KH-1-lo, KH-1-hi) (a crop where negative): the kernel reads g
  as given (no pad, no copies) and writes dx (N, H, W, C). Strides s > 1: one
  launch per output phase (:func:`direct_dgrad_phases`), each a stride-1
  correlation of g (per-tap boxes, out-of-bounds zeros) stored in place into its
  phase of dx (module docstring). Arguments as :func:`int8_conv_dgrad`
  (``config``: ``select_conv_config(O, C)`` if None), plus ``tile`` (strided:
  a tile of the phase grid (N, ceil(H/sh), ceil(W/sw))) and ``low_pad_in_xla`` as
  :func:`int8_conv_direct`. Bit-equal to
  :func:`pallas_kernels.int8_conv.int8_conv_dgrad_reference`.
  """
  input_shape, strides, pads = check_dgrad_args(g, w, input_shape, window_strides, padding)
  scale, bias, out_dtype = _check_epilogue_args(scale, bias, out_dtype, w.shape[2], "C")
  kh, kw, c, o = w.shape
  _check_contraction(kh * kw * o, "this dgrad")
  if min(input_shape) == 0 or min(g.shape) == 0:
    return _empty_or_zero_k(input_shape, scale, bias, out_dtype)
  config = config or select_conv_config(o, c)
  if strides != (1, 1):
    return _run_direct_dgrad_strided(g, w, scale, bias, input_shape=input_shape,
                                     strides=strides, pads=pads, out_dtype=out_dtype,
                                     config=config, tile=tile, low_pad_in_xla=low_pad_in_xla,
                                     interpret=interpret)
  t_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads))
  w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # (KH, KW, O, C): a tiny XLA op
  return _run_direct(g, w_t, scale, bias, strides=(1, 1), pads=t_pads, out_dtype=out_dtype,
                     config=config, tile=tile, low_pad_in_xla=low_pad_in_xla,
                     interpret=interpret)


def _run_direct_dgrad_strided(g, w, scale, bias, *, input_shape, strides, pads, out_dtype,
                              config, tile, low_pad_in_xla, interpret):
  """The strided dgrad of checked, non-empty arguments (w: (KH, KW, C, O))."""
  n, h, wd, _ = input_shape
  kh, kw, _, _ = w.shape
  _check_direct_config(config)
  launcher = _launcher(interpret)
  interpret_mode = launcher != "mosaic_gpu"
  _check_config(config, out_dtype, interpret_mode)
  if _phase_layout(config.tile_n, 1, out_dtype) is None:
    raise ValueError(f"config.tile_n={config.tile_n}: the strided direct dgrad stores "
                     "32-byte slabs, so a tile row must be a multiple of 32 bytes of "
                     f"{jnp.dtype(out_dtype).name}")
  hq, wq = -(-h // strides[0]), -(-wd // strides[1])
  if tile is None:
    tile = direct_tile(n, hq, wq, config.tile_m, -(-kh // strides[0]), -(-kw // strides[1]))
  if not isinstance(tile, DirectTile) or tile.pixels != config.tile_m:
    raise ValueError(f"tile={tile!r} must be a DirectTile of config.tile_m={config.tile_m} "
                     "pixels")
  if max(tile.tb, tile.th, tile.tw) > _MAX_BOX:
    raise ValueError(f"tile={tile!r}: TMA boxes hold at most {_MAX_BOX} per dimension")
  # The low padding the boxes read out of bounds: the most negative tap offset into g.
  reach = [max(0, -min(t[d] for *_, taps, _ in direct_dgrad_phases((kh, kw), strides, pads)
                       for t in taps)) for d in (1, 2)]
  low_pad_in_xla = resolve_low_pad(low_pad_in_xla, interpret_mode, (1, 1),
                                   tuple((r, 0) for r in reach))
  # As _run_direct: interpret mode stores the tile whole (one epilogue expression).
  return _int8_conv_direct_dgrad_impl(g, w, scale, bias, input_shape=input_shape,
                                      strides=strides, pads=pads, out_dtype=out_dtype,
                                      config=config, launcher=launcher, tile=tile,
                                      low_pad_in_xla=bool(low_pad_in_xla),
                                      slab_out=not interpret_mode)


def direct_dgrad_phases(kernel_hw, strides, pads):
  """The output phases of a strided dgrad as stride-1 correlations of g.

  dx[s*q + a] = sum_m g[q + (a + lo) // s - m] * w[(a + lo) % s + s*m] per dimension
  (the sub-pixel phases of :func:`pallas_kernels.conv_dgrad.dgrad_plan`, indexed by
  a = i mod s instead of (i + lo) mod s; g is zero outside [0, Ho)). Returns per phase
  (a, b) in row-major order: (a, b, taps, weights) with taps ((0, dh, dw), ...) the box
  offsets into g and weights ((kh, kw), ...) the kernel tap of each; no taps: a phase
  no kernel tap reaches (1x1 stride 2: a or b odd), epilogue(0).
  """
  def dim(k, s, lo):
    out = []
    for a in range(s):
      rho = (a + lo) % s
      out.append([((a + lo) // s - m, rho + s * m) for m in range(len(range(rho, k, s)))])
    return out

  ph = dim(kernel_hw[0], strides[0], pads[0][0])
  pw = dim(kernel_hw[1], strides[1], pads[1][0])
  phases = []
  for a, hs in enumerate(ph):
    for b, ws in enumerate(pw):
      taps = tuple((0, dh, dw) for dh, _ in hs for dw, _ in ws)
      weights = tuple((kh, kw) for _, kh in hs for _, kw in ws)
      phases.append((a, b, taps, weights))
  return tuple(phases)


def _phase_layout(tile_n: int, c: int, out_dtype):
  """(swizzle bytes, channels per store, C') of the strided dgrad's phase stores: the
  widest swizzled slab (128, 64, 32 bytes) whose channels divide both the tile's and C'
  = C rounded up to 16 bytes (a store must not cross into the next phase's channels);
  if none divides C', C' = C rounded up to the 32-byte slab (dx then costs a slice).
  None if tile_n's row is no multiple of 32 bytes."""
  size = jnp.dtype(out_dtype).itemsize
  c16 = _round_up(c, _GMEM_STRIDE_BYTES // size)
  for swizzle in (128, 64, 32):
    chunk = swizzle // size
    if (tile_n * size) % swizzle == 0 and c16 % chunk == 0:
      return swizzle, chunk, c16
  if (tile_n * size) % 32:
    return None
  return 32, 32 // size, _round_up(c, 32 // size)


@functools.partial(jax.jit, static_argnames=(
    "input_shape", "strides", "pads", "out_dtype", "config", "launcher", "tile",
    "low_pad_in_xla", "slab_out"))
def _int8_conv_direct_dgrad_impl(g, w, scale, bias, *, input_shape, strides, pads,
                                 out_dtype, config, launcher, tile, low_pad_in_xla, slab_out):
  """One launch per output phase (:func:`direct_dgrad_phases`), each storing into its
  phase of the one dx buffer: the first launch creates it, the others take it as a
  ``jax.Ref`` (the launch's input_output_aliases: in place, no copy, no interleave)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  n, h, wd, c = input_shape
  kh, kw, _, o = w.shape
  sh, sw = strides
  hq, wq = -(-h // sh), -(-wd // sw)
  interpret = launcher != "mosaic_gpu"
  phases = direct_dgrad_phases((kh, kw), strides, pads)
  cp = _round_up(max(o, 1), config.tile_k)
  op = _round_up(c, config.tile_n)
  o16 = _round_up(o, _GMEM_STRIDE_BYTES)
  all_taps = [t for *_, taps, _ in phases for t in taps]
  low = tuple(max(0, -min(t[d] for t in all_taps)) if low_pad_in_xla else 0 for d in (1, 2))
  if o16 != o or any(low):
    g = lax.pad(g, jnp.int8(0), ((0, 0, 0), (low[0], 0, 0), (low[1], 0, 0), (0, o16 - o, 0)))
  swizzle, chunk, c_pad = _phase_layout(config.tile_n, c, out_dtype)
  scale_p, bias_p = _vectors(scale, bias, c, op)
  k_chunks = cp // config.tile_k
  grid_hw = (-(-hq // tile.th), -(-wq // tile.tw))
  grid = (-(-n // tile.tb) * grid_hw[0] * grid_hw[1], op // config.tile_n)
  if slab_out:
    out_tile = plgpu.SMEM((config.tile_n // chunk, config.tile_m, chunk), out_dtype,
                          transforms=(plgpu.TilingTransform((8, chunk)),
                                      plgpu.SwizzleTransform(swizzle)))
  else:
    out_tile = plgpu.SMEM((config.tile_m, config.tile_n), out_dtype)
  vectors = [plgpu.SMEM((config.tile_n,), jnp.float32), plgpu.SMEM((config.tile_n,), jnp.float32),
             plgpu.Barrier(num_barriers=2)]
  out_type = jax.ShapeDtypeStruct((n, hq, sh, wq, sw * c_pad), out_dtype)
  dx = None
  for a, b, taps, weights in phases:
    body = functools.partial(
        _direct_kernel, tile=tile, grid_hw=grid_hw, taps=taps, offset_hw=low, config=config,
        k_chunks=k_chunks, has_bias=bias is not None, int_out=out_dtype == jnp.int32,
        row_copies=interpret, out_chunk=chunk if slab_out else None,
        phase=PhaseStore(a, b, c_pad, chunk, guard=op > c_pad))
    if taps:
      depth = min(config.max_concurrent_steps, len(taps) * k_chunks)
      arrivals = 1 + (tile.tb * tile.th if interpret else 1)
      scratch = _ring(config, depth, arrivals) + vectors + [out_tile]
      operands = (g, _weight_matrix(w, _Taps(offsets=(0,) * len(weights), weights=weights),
                                    op, cp), scale_p, bias_p)
    else:  # epilogue(0): no g, no weights, no ring
      scratch = vectors + [out_tile]
      operands = (scale_p, bias_p)
      body = functools.partial(_zero_phase_body, body)
    kernel = plgpu.kernel(
        body, out_type=out_type if dx is None else (), scratch_types=scratch, grid=grid,
        grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=launcher if interpret else None,
        kernel_name=f"int8_conv_direct_dgrad_phase{a}{b}")
    if dx is None:
      dx = jax.new_ref(kernel(*operands))
    else:
      kernel(*operands, dx)
  dx = jax.freeze(dx).reshape(n, hq * sh, wq * sw, c_pad)
  if (hq * sh, wq * sw, c_pad) != (h, wd, c):  # ragged: a slice of dx
    dx = dx[:, :h, :wd, :c]
  return dx


def _zero_phase_body(body, scale_gmem, bias_gmem, out_gmem, scale_smem, bias_smem, vec_barriers,
                     out_smem):
  """``body`` (:func:`_direct_kernel` of a phase without taps) without g, weights, ring."""
  body(None, None, scale_gmem, bias_gmem, out_gmem, None, None, None, scale_smem, bias_smem,
       vec_barriers, out_smem)


def direct_kernel_operand_bytes(x_shape, w_shape, *, padding="SAME", config=None,
                                low_pad_in_xla=False):
  """(int8 bytes handed to the kernel, int8 bytes of x): x (as handed) + the
  weight matrix, from the shapes alone (the census of issue 24)."""
  n, h, wd, c = x_shape
  kh, kw, _, o = w_shape
  config = config or select_conv_config(c, o)
  _, pads = check_conv_args(jax.ShapeDtypeStruct(x_shape, jnp.int8),
                             jax.ShapeDtypeStruct(w_shape, jnp.int8), (1, 1), padding)
  plo = [max(lo, 0) if low_pad_in_xla else 0 for lo, _ in pads]
  xb = n * (h + plo[0]) * (wd + plo[1]) * _round_up(c, _GMEM_STRIDE_BYTES)
  wb = _round_up(o, config.tile_n) * kh * kw * _round_up(c, config.tile_k)
  return xb + wb, n * h * wd * c
