"""Direct-box weight gradient of the INT8 conv: channel-major operands, no shifted copies.

A prototype (issue 24, item 1) of the wgrad kernel that reads each quantized
tensor once, in one extra layout -- no shifted or transposed copy per tap --
taken by the Pallas backend's weight gradient when ``INT8JAX_DIRECT_CONV``
is on (``int8jax.backends.pallas.DIRECT_CONV["wgrad"]``, for the convs
:func:`direct_wgrad_accepts`); same arguments, same bits as
:func:`pallas_kernels.int8_conv.int8_conv_wgrad_reference`.

The GEMM: ``dw[t][c, o] = sum_p x_t[p, c] g[p, o]`` per tap t over the
pixels p; int8 ``wgmma`` needs both operands K-major (pixels contiguous in
SMEM): an A tile (tile_m channels, tile_k pixels), a B tile (tile_n output
channels, tile_k pixels).

Layout: the kernel takes x and g *channel-major*, (C, H, W', N') and (O,
Ho, Wo', N') (:func:`channel_major`: ``transpose(x, (3, 1, 2, 0))``,
zero-padded so that W'*N' and Wo'*N' are multiples of 16 bytes, TMA's GMEM
stride rule: :func:`channel_major_layout` adds the fewest bytes -- none
when N is a multiple of 16, one zero column at N = 8 and odd widths). One
transposed tensor each, which the quantize fusion producing x and g can
write as a second output (XLA fuses quantize + transpose into the pass that
writes the int8 tensor: one more int8 write); the prototype's wrapper
transposes in XLA, that pass. The kernel sees them as (C, H, W'*N') and
(O, Ho, Wo'*N'): the batch is the minor pixel dimension, merged with W.

How (stride 1):

* Steps: per tap, the pixel rows (h, chunk j) of g's rows (Wo*N' elements)
  in chunks of ``tile_k`` = ``swizzle`` elements: g's box ``gT[o-tile, h,
  j*tk : +tk]`` and x's box ``xT[c-tile, h + kh - lo_h, j*tk + (kw -
  lo_w)*N' : +tk]`` -- the same tk pixels (w, n), shifted by the tap. The
  merged (W', N') dimension keeps TMA's per-dimension out-of-bounds zero
  fill exact: a column outside [0, W') is an element outside [0, W'*N') (it
  cannot spill into the next row, another dimension), so the padding, rows
  and chunks past the end and channels past C / O all read zeros (the zero
  columns past W are read where the conv reads zeros anyway). The box
  starts at any element (not a multiple of tk): it is written through an
  untiled, swizzled view of the (8, swizzle)-tiled SMEM slot (one channel =
  one swizzle row: the tiling is the identity), the trick of
  :mod:`pallas_kernels.conv_direct`. Mosaic GPU requires a swizzled box's
  minor dimension to be exactly ``swizzle`` bytes ("Async copies with
  swizzle=... require the last dimension of the slice to be exactly ...
  bytes"), hence ``tile_k == swizzle`` and one image row per step (a box of
  several rows would have a minor dimension of W'*N' / rows elements).
* Split-K: the grid is (taps x parts, C tiles, O tiles); a block sums one
  part of at most INT32_SAFE_K pixels (``part_steps`` steps) of one tap in an
  int32 ``wgmma`` accumulator (the TMA ring of
  :mod:`pallas_kernels.conv_common`) and stores it; XLA combines the parts
  exactly (:func:`pallas_kernels._common.split_halves` / ``join_halves``, as
  int8_conv_wgrad: the result does not depend on the split), then ``*
  scale[o]``. Steps of the last part past the last row read g out of bounds
  (zeros).

Strides s > 1: x^T is the padded x's s*s phase images ``xp[:, a::sh,
b::sw]`` (those with taps), stacked along H (Hq rows each) -- one XLA pass
(pad, phase split, transpose: the same fusion), ~1.07x x for ResNet-50's
56x56 stride-2 3x3, 1/4 x for a 1x1 stride 2; tap (sh*dh + a, sw*dw + b)
reads its phase p at row offset p*Hq + dh, column dw (valid output rows
never leave their phase; rows past Ho are multiplied by g's zeros).

Interpret mode (CPU): the GPU interpreter neither reshapes refs nor reads
boxes that start below 0, so the same boxes are copied into the tiled slots
(the same logical (rows, tk) tile) and, at stride 1, the wrapper pads the
low side of x's H and W in XLA. What only a GPU can confirm: the
untiled-view bytes and the zero fill below 0 (the ``gpu`` tests of
``tests/test_conv_direct_wgrad.py`` run both paddings).

Lowering: Mosaic GPU's "Lane" semantics (as conv_direct).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import INT32_SAFE_K
from pallas_kernels._common import MAX_EXACT_PARTS
from pallas_kernels._common import join_halves
from pallas_kernels._common import out_transforms
from pallas_kernels._common import round_up
from pallas_kernels._common import split_halves
from pallas_kernels.conv_common import Int8ConvConfig
from pallas_kernels.conv_common import check_config
from pallas_kernels.conv_common import check_padding
from pallas_kernels.conv_common import conv_output_shape
from pallas_kernels.conv_common import forward_phase_taps
from pallas_kernels.conv_common import launcher_for
from pallas_kernels.conv_common import pipelined_accumulate
from pallas_kernels.conv_common import ring_scratch
from pallas_kernels.conv_common import select_wgrad_config
from pallas_kernels.conv_common import static_lookup
from pallas_kernels.conv_direct import resolve_low_pad
from pallas_kernels.conv_direct import untiled_view
from pallas_kernels.conv_wgrad import check_wgrad_args
from pallas_kernels.conv_wgrad import check_wgrad_epilogue
from pallas_kernels.conv_wgrad import check_wgrad_pixels
from pallas_kernels.conv_wgrad import wgrad_epilogue

__all__ = ["ChannelMajorLayout", "ChannelMajorOperands", "channel_major", "channel_major_layout",
           "channel_major_operands", "direct_wgrad_config", "direct_wgrad_accepts",
           "direct_wgrad_operand_bytes", "int8_conv_wgrad_channel_major",
           "int8_conv_wgrad_channel_major_halves", "int8_conv_wgrad_direct",
           "int8_conv_wgrad_direct_halves"]

_GMEM_STRIDE_BYTES = 16  # TMA: every GMEM stride but the last a multiple of 16 bytes
_TARGET_BLOCKS = 264     # thread blocks the split-K grid aims for (2 per SM of an H100/H200)


@dataclasses.dataclass(frozen=True)
class ChannelMajorLayout:
  """The padded channel-major shapes: ``n_img`` images (N' >= N), x^T's and g^T's columns
  ``wx`` / ``wo`` (>= the tensors' own), with ``wx * n_img`` and ``wo * n_img`` multiples
  of 16 (TMA's GMEM stride rule). The padding is zeros: x's is read where the conv reads
  zeros anyway (past W), g's multiplies as zero."""
  n_img: int
  wx: int
  wo: int


def channel_major_layout(n: int, x_hwc, g_hwc) -> ChannelMajorLayout:
  """The layout of fewest bytes for N images, x^T of (H', W', C) and g^T of (Ho, Wo, O)
  per image: N' = N rounded up to 2^k (k = 0..4) and both widths to multiples of
  16 / gcd(16, N'). N a multiple of 16: no padding; N = 8: even widths (7x7 -> 8 columns);
  N = 1: widths of 16."""
  (hx, wx, c), (ho, wo, o) = x_hwc, g_hwc
  best = None
  for k in range(5):
    n_img = round_up(max(n, 1), 1 << k)
    q = _GMEM_STRIDE_BYTES // math.gcd(_GMEM_STRIDE_BYTES, n_img)
    layout = ChannelMajorLayout(n_img, round_up(wx, q), round_up(wo, q))
    cost = n_img * (hx * layout.wx * c + ho * layout.wo * o)
    if best is None or (cost, n_img) < best[0]:
      best = ((cost, n_img), layout)
  return best[1]


def channel_major(x, n_img: int, width: int):
  """(N, H, W, C) -> (C, H, width, n_img) int8, zero-padded: the layout the kernel reads
  (:func:`channel_major_layout`), the one the quantize fusion should emit as a second
  output."""
  n, _, w, _ = x.shape
  xt = jnp.transpose(x, (3, 1, 2, 0))
  if (n_img, width) != (n, w):
    xt = lax.pad(xt, jnp.int8(0), ((0, 0, 0),) * 2 + ((0, width - w, 0), (0, n_img - n, 0)))
  return xt


def direct_wgrad_config(c: int, o: int, row_len: int) -> Int8ConvConfig:
  """select_wgrad_config's tile_m x tile_n with tile_k = swizzle: the swizzle of 128, 64
  or 32 bytes that pads a (Wo*N')-element row least (ties: the wider)."""
  base = select_wgrad_config(c, o)
  sw = min((128, 64, 32), key=lambda s: (round_up(row_len, s), -s))
  depth = 4 if sw == 128 else 6
  return Int8ConvConfig(tile_m=base.tile_m, tile_n=base.tile_n, tile_k=sw, swizzle=sw,
                        max_concurrent_steps=depth)


def _split(total_steps: int, blocks_per_part: int, tile_k: int) -> tuple[int, int]:
  """(parts, steps per part): parts of <= INT32_SAFE_K pixels, enough blocks to fill the
  GPU, at most MAX_EXACT_PARTS."""
  max_steps = INT32_SAFE_K // tile_k
  parts = max(-(-_TARGET_BLOCKS // blocks_per_part), -(-total_steps // max_steps))
  parts = min(parts, MAX_EXACT_PARTS, total_steps)
  part_steps = min(-(-total_steps // parts), max_steps)
  parts = -(-total_steps // part_steps)
  if parts > MAX_EXACT_PARTS:
    raise ValueError(f"wgrad needs {parts} parts of {part_steps * tile_k} pixels, more than "
                     f"{MAX_EXACT_PARTS}")
  return parts, part_steps


def step_issuer(xt_gmem, gt_gmem, a_ring, b_ring, barriers, *, tap, part, c_rows, o_rows,
                taps, n_img, row_chunks, part_steps, tile_k, tiled_copies):
  """``issue(step, slot)``: the TMA loads of one step of a (tap, part) work item into ring
  slot ``slot`` -- x^T's box shifted by the tap, g^T's box, the same tile_k pixels (w, n)
  of image row h -- through the untiled views (``tiled_copies``: the tiled slots, for the
  interpreter). Shared by this kernel and :mod:`pallas_kernels.conv_direct_wgrad_ws`'s
  producer."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  dh = static_lookup(tap, [t[0] for t in taps])
  dwn = static_lookup(tap, [t[1] * n_img for t in taps])  # column shift in elements

  def issue(step, slot):
    s = part * part_steps + step
    h = lax.div(s, jnp.int32(row_chunks))
    col = (s - h * row_chunks) * tile_k
    x_box = xt_gmem.at[c_rows, h + dh, pl.ds(col + dwn, tile_k)]
    g_box = gt_gmem.at[o_rows, h, pl.ds(col, tile_k)]
    if tiled_copies:
      a_dst, b_dst = a_ring.at[slot], b_ring.at[slot]
    else:
      a_dst, b_dst = untiled_view(a_ring, slot), untiled_view(b_ring, slot)
    plgpu.copy_gmem_to_smem(x_box, a_dst, barriers.at[slot])
    plgpu.copy_gmem_to_smem(g_box, b_dst, barriers.at[slot])

  return issue


def _wgrad_kernel(xt_gmem, gt_gmem, out_gmem, a_smem, b_smem, barriers, out_smem, *,
                  taps: tuple[tuple[int, int], ...], n_img: int, row_chunks: int,
                  parts: int, part_steps: int, config: Int8ConvConfig, tiled_copies: bool):
  """One (tile_m input channels, tile_n output channels) int32 partial sum of one tap over
  one part of the pixels per block.

  GMEM: xT (C, H', W'*N') int8, gT (O, Ho, Wo*N') int8, out (taps*parts, Cp, Op) int32.
  ``taps``: per tap, its (row, column) offset into xT (kh - lo_h, kw - lo_w, plus the low
  padding added in XLA, if any). ``tiled_copies``: load into the tiled slots (interpret
  mode) instead of through the untiled views.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  ks_idx = lax.axis_index("ks")
  m_idx = lax.axis_index("m")
  n_idx = lax.axis_index("n")
  tap = lax.div(ks_idx, jnp.int32(parts))
  part = ks_idx - tap * parts
  c_rows = pl.ds(m_idx * tile_m, tile_m)
  o_rows = pl.ds(n_idx * tile_n, tile_n)
  depth = min(config.max_concurrent_steps, part_steps)
  issue = step_issuer(xt_gmem, gt_gmem, a_smem, b_smem, barriers, tap=tap, part=part,
                      c_rows=c_rows, o_rows=o_rows, taps=taps, n_img=n_img,
                      row_chunks=row_chunks, part_steps=part_steps, tile_k=tile_k,
                      tiled_copies=tiled_copies)

  acc = pipelined_accumulate(issue, part_steps, depth, a_smem, b_smem, barriers,
                             (tile_m, tile_n))
  out_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[ks_idx, c_rows, o_rows])
  plgpu.wait_smem_to_gmem(0)


def _plan(g_shape, kernel_shape, config, n_img):
  """(row_chunks, total steps per tap, parts, part_steps, Cp, Op)."""
  _, ho, wo, _ = g_shape
  kh, kw, c, o = kernel_shape
  row_chunks = -(-(wo * n_img) // config.tile_k)
  total = ho * row_chunks
  cp, op = round_up(c, config.tile_m), round_up(o, config.tile_n)
  parts, part_steps = _split(total, kh * kw * (cp // config.tile_m) * (op // config.tile_n),
                             config.tile_k)
  return row_chunks, total, parts, part_steps, cp, op


def _x_geometry(x_shape, kernel_shape, strides, pads, low_pad_in_xla):
  """How the kernel reads x: ``(kind, (H', W') of the image rows it is handed, taps,
  weights)``; ``taps``: per tap its (row, column) offset into x^T's (H', W') image (the
  kernel multiplies the column offset by N'); ``weights``: per tap its (kh, kw).

  Stride 1: x itself (kind "plain"; (lo_h, lo_w) added in XLA if ``low_pad_in_xla``), tap
  (kh, kw) at (kh - lo_h, kw - lo_w) (plus that padding). Strides s > 1 (kind "phases"):
  the padded x split into the s*s phase images ``xp[:, a::sh, b::sw]`` that have taps
  (pallas_kernels.conv_common.forward_phase_taps), stacked along H (Hq rows each); tap
  (sh*dh + a, sw*dw + b) at (p*Hq + dh, dw) of its phase p.
  """
  _, h, w, _ = x_shape
  kh, kw, _, _ = kernel_shape
  if strides == (1, 1):
    plo = tuple(max(lo, 0) if low_pad_in_xla else 0 for lo, _ in pads)
    taps = tuple((i + plo[0] - pads[0][0], j + plo[1] - pads[1][0])
                 for i in range(kh) for j in range(kw))
    weights = tuple((i, j) for i in range(kh) for j in range(kw))
    return ("plain", plo), (h + plo[0], w + plo[1]), taps, weights
  sh, sw = strides
  hq = -(-(h + pads[0][0] + pads[0][1]) // sh)
  wq = -(-(w + pads[1][0] + pads[1][1]) // sw)
  ph, pw = forward_phase_taps(kh, sh), forward_phase_taps(kw, sw)
  phases = tuple((a, b) for a, _ in ph for b, _ in pw)
  taps, weights = [], []
  for p, ((a, dhs), (b, dws)) in enumerate((u, v) for u in ph for v in pw):
    for dh in dhs:
      for dw in dws:
        taps.append((p * hq + dh, dw))
        weights.append((sh * dh + a, sw * dw + b))
  return ("phases", phases, hq, wq), (len(phases) * hq, wq), tuple(taps), tuple(weights)


def _x_channel_major(x, kind, strides, pads, layout: ChannelMajorLayout):
  """x^T as the kernel reads it: (C, H', W', N') (:func:`_x_geometry`)."""
  if kind[0] == "plain":
    plo = kind[1]
    if any(plo):
      x = lax.pad(x, jnp.int8(0), ((0, 0, 0), (plo[0], 0, 0), (plo[1], 0, 0), (0, 0, 0)))
    return channel_major(x, layout.n_img, layout.wx)
  _, phases, hq, wq = kind
  _, h, w, _ = x.shape
  (sh, sw), ((lo_h, _), (lo_w, _)) = strides, pads
  xp = lax.pad(x, jnp.int8(0), ((0, 0, 0), (lo_h, hq * sh - h - lo_h, 0),
                                (lo_w, wq * sw - w - lo_w, 0), (0, 0, 0)))
  split = xp.reshape(x.shape[0], hq, sh, wq, sw, x.shape[3])
  stacked = jnp.concatenate([split[:, :, a, :, b, :] for a, b in phases], axis=1)
  # One XLA fusion: pad, phases, transpose.
  return channel_major(stacked, layout.n_img, layout.wx)


@dataclasses.dataclass(frozen=True)
class ChannelMajorOperands:
  """How the direct weight gradient of one conv reads x and g (static, hashable; made by
  :func:`channel_major_operands`, which checks the arguments).

  :meth:`x` and :meth:`g` map the NHWC int8 tensors to the (C, H', W'*N') and
  (O, Ho, Wo'*N') int8 tensors the kernel reads (:func:`_x_geometry`,
  :func:`channel_major_layout`). They are plain XLA (pad, phase split, transpose), so the
  caller can trace them in the fusion that quantizes x and g, as a second output of it:
  int8jax's Pallas backend does (its ``conv_wgrad_layout``), and then hands the results to
  :func:`int8_conv_wgrad_channel_major`. :func:`int8_conv_wgrad_direct` is that with the
  two maps traced in its own wrapper (one extra XLA pass each).
  """
  x_shape: tuple
  g_shape: tuple
  kernel_shape: tuple
  strides: tuple
  pads: tuple
  low_pad_in_xla: bool

  def _geometry(self):
    return _x_geometry(self.x_shape, self.kernel_shape, self.strides, self.pads,
                       self.low_pad_in_xla)

  @property
  def layout(self) -> ChannelMajorLayout:
    _, (hx, wx), _, _ = self._geometry()
    _, ho, wo, o = self.g_shape
    return channel_major_layout(self.x_shape[0], (hx, wx, self.x_shape[3]), (ho, wo, o))

  @property
  def x_cm_shape(self) -> tuple[int, int, int]:
    _, (hx, _), _, _ = self._geometry()
    lay = self.layout
    return (self.x_shape[3], hx, lay.wx * lay.n_img)

  @property
  def g_cm_shape(self) -> tuple[int, int, int]:
    lay = self.layout
    return (self.g_shape[3], self.g_shape[1], lay.wo * lay.n_img)

  def x(self, x: jax.Array) -> jax.Array:
    """x (N, H, W, C) int8 -> x^T (C, H', W'*N') as the kernel reads it."""
    _check_operand("x", x, self.x_shape)
    kind, _, _, _ = self._geometry()
    return _x_channel_major(x, kind, self.strides, self.pads, self.layout).reshape(
        self.x_cm_shape)

  def g(self, g: jax.Array) -> jax.Array:
    """g (N, Ho, Wo, O) int8 -> g^T (O, Ho, Wo'*N') as the kernel reads it."""
    _check_operand("g", g, self.g_shape)
    lay = self.layout
    return channel_major(g, lay.n_img, lay.wo).reshape(self.g_cm_shape)


def _check_operand(name, a, shape):
  if tuple(a.shape) != tuple(shape) or a.dtype != jnp.int8:
    raise ValueError(f"{name} must be int8 of shape {tuple(shape)} (the shape these "
                     f"ChannelMajorOperands were made for), got {a.dtype}{list(a.shape)}")


def channel_major_operands(x_shape, kernel_shape, *, window_strides=(1, 1), padding="VALID",
                           low_pad_in_xla: bool | None = None,
                           interpret=False) -> ChannelMajorOperands:
  """The :class:`ChannelMajorOperands` of the direct weight gradient of a conv of an
  (N, H, W, C) int8 input with ``kernel_shape`` (KH, KW, C, O); ``low_pad_in_xla`` and
  ``interpret`` as :func:`int8_conv_wgrad_direct`'s (together they decide the layout: pass
  the same ``interpret`` to :func:`int8_conv_wgrad_channel_major`)."""
  x_shape = tuple(int(d) for d in x_shape)
  x = jax.ShapeDtypeStruct(x_shape, jnp.int8)
  if len(x_shape) != 4:
    raise ValueError(f"x_shape must be NHWC (N, H, W, C), got {x_shape}")
  kernel_shape = tuple(int(d) for d in kernel_shape)
  strides = tuple(int(s) for s in window_strides)
  pads = check_padding(padding, x_shape[1:3], kernel_shape[:2], strides)
  g = jax.ShapeDtypeStruct(conv_output_shape(x_shape, kernel_shape, strides, pads), jnp.int8)
  kernel_shape, strides, pads = check_wgrad_args(x, g, kernel_shape, strides, padding)
  interpret_mode = launcher_for(interpret) != "mosaic_gpu"
  low = resolve_low_pad(low_pad_in_xla, interpret_mode, strides, pads)
  return ChannelMajorOperands(x_shape, tuple(g.shape), kernel_shape, strides, pads, bool(low))


@functools.partial(jax.jit, static_argnames=("operands", "out_dtype", "config", "launcher",
                                             "halves"))
def _wgrad_channel_major_impl(xt, gt, scale, *, operands: ChannelMajorOperands, out_dtype,
                              config, launcher, halves):
  import jax.experimental.pallas.mosaic_gpu as plgpu

  interpret = launcher != "mosaic_gpu"
  _, _, taps, _ = operands._geometry()
  n_img = operands.layout.n_img
  row_chunks, _, parts, part_steps, cp, op = _plan(operands.g_shape, operands.kernel_shape,
                                                   config, n_img)
  ntaps = len(taps)
  depth = min(config.max_concurrent_steps, part_steps)
  kernel = plgpu.kernel(
      functools.partial(_wgrad_kernel, taps=taps, n_img=n_img, row_chunks=row_chunks,
                        parts=parts, part_steps=part_steps, config=config,
                        tiled_copies=interpret),
      out_type=jax.ShapeDtypeStruct((ntaps * parts, cp, op), jnp.int32),
      scratch_types=ring_scratch(config, depth) + [
          plgpu.SMEM((config.tile_m, config.tile_n), jnp.int32,
                     transforms=out_transforms(config.tile_n, jnp.int32)),
      ],
      grid=(ntaps * parts, cp // config.tile_m, op // config.tile_n),
      grid_names=("ks", "m", "n"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=launcher if interpret else None,
      kernel_name="int8_conv_wgrad_direct",
  )
  return _join_parts(kernel(xt, gt), scale, operands=operands, parts=parts,
                     out_dtype=out_dtype, halves=halves)


def _join_parts(out, scale, *, operands: ChannelMajorOperands, parts, out_dtype, halves):
  """The kernel's (taps*parts, Cp, Op) int32 partial sums (tap-major, in
  :func:`_x_geometry`'s tap order) -> the exact (hi, lo) halves (KH, KW, C, O), or, unless
  ``halves``, the exact sum rounded once ``* scale`` (also used by
  :mod:`pallas_kernels.conv_direct_wgrad_ws`)."""
  kh, kw, c, o = operands.kernel_shape
  _, _, taps, weights = operands._geometry()
  ntaps = len(taps)
  hi, lo = split_halves(out.reshape(ntaps, parts, *out.shape[1:]), axis=1)
  order = sorted(range(ntaps), key=lambda t: weights[t][0] * kw + weights[t][1])
  hi, lo = (jnp.stack([v[t, :c, :o] for t in order]).reshape(kh, kw, c, o) for v in (hi, lo))
  if halves:
    return hi, lo
  return wgrad_epilogue(join_halves((hi, lo)), scale, out_dtype)


@functools.partial(jax.jit, static_argnames=("operands", "out_dtype", "config", "launcher",
                                             "halves"))
def _int8_conv_wgrad_direct_impl(x, g, scale, *, operands, out_dtype, config, launcher,
                                 halves):
  # The two channel-major tensors: one XLA pass each here (in the library, the quantize
  # fusions' second outputs instead: ChannelMajorOperands).
  return _wgrad_channel_major_impl(operands.x(x), operands.g(g), scale, operands=operands,
                                   out_dtype=out_dtype, config=config, launcher=launcher,
                                   halves=halves)


def _config_for(operands: ChannelMajorOperands, config, interpret):
  launcher = launcher_for(interpret)
  interpret_mode = launcher != "mosaic_gpu"
  check_wgrad_pixels(int(np.prod(operands.g_shape[:3])))
  if config is None:
    _, ho, wo, _ = operands.g_shape
    config = direct_wgrad_config(operands.kernel_shape[2], operands.kernel_shape[3],
                                 wo * operands.layout.n_img)
  if not isinstance(config, Int8ConvConfig):
    raise TypeError(f"config must be an Int8ConvConfig, got {config!r}")
  if config.tile_k != config.swizzle:
    raise ValueError(
        f"config.tile_k={config.tile_k} must equal config.swizzle={config.swizzle}: each step "
        "loads one swizzle row of pixels per channel through an untiled view")
  check_config(config, jnp.int32, interpret_mode)
  return config, launcher


def _setup(x, g, kernel_shape, window_strides, padding, config, interpret, low_pad_in_xla):
  kernel_shape, strides, pads = check_wgrad_args(x, g, kernel_shape, window_strides, padding)
  operands = channel_major_operands(x.shape, kernel_shape, window_strides=strides,
                                    padding=pads, low_pad_in_xla=low_pad_in_xla,
                                    interpret=interpret)
  config, launcher = _config_for(operands, config, interpret)
  empty = min(g.shape) == 0 or min(kernel_shape) == 0
  return operands, config, launcher, empty


def _check_cm(xt, gt, operands):
  if not isinstance(operands, ChannelMajorOperands):
    raise TypeError(f"operands must be ChannelMajorOperands (channel_major_operands(...)), "
                    f"got {type(operands).__name__}")
  for name, a, shape in (("xt", xt, operands.x_cm_shape), ("gt", gt, operands.g_cm_shape)):
    if tuple(a.shape) != shape or a.dtype != jnp.int8:
      raise ValueError(f"{name} must be int8 of shape {shape} (operands.{name[0]}(...)), got "
                       f"{a.dtype}{list(a.shape)}")


def int8_conv_wgrad_channel_major(xt, gt, *, operands: ChannelMajorOperands, scale=None,
                                  out_dtype=jnp.float32, config: Int8ConvConfig | None = None,
                                  interpret=False):
  """:func:`int8_conv_wgrad_direct` on operands already in the kernel's layout:
  ``xt = operands.x(x)``, ``gt = operands.g(g)`` (:class:`ChannelMajorOperands`), e.g.
  written by the fusions that quantize x and g. Same result, bit for bit."""
  _check_cm(xt, gt, operands)
  config, launcher = _config_for(operands, config, interpret)
  scale, out_dtype = check_wgrad_epilogue(scale, out_dtype, operands.kernel_shape[3])
  if min(operands.g_shape) == 0 or min(operands.kernel_shape) == 0:
    return wgrad_epilogue(jnp.zeros(operands.kernel_shape, jnp.float32), scale, out_dtype)
  return _wgrad_channel_major_impl(xt, gt, scale, operands=operands, out_dtype=out_dtype,
                                   config=config, launcher=launcher, halves=False)


def int8_conv_wgrad_channel_major_halves(xt, gt, *, operands: ChannelMajorOperands,
                                         config: Int8ConvConfig | None = None,
                                         interpret=False):
  """:func:`int8_conv_wgrad_direct_halves` on operands in the kernel's layout (as
  :func:`int8_conv_wgrad_channel_major`)."""
  _check_cm(xt, gt, operands)
  config, launcher = _config_for(operands, config, interpret)
  if min(operands.g_shape) == 0 or min(operands.kernel_shape) == 0:
    zero = jnp.zeros(operands.kernel_shape, jnp.int32)
    return zero, zero
  return _wgrad_channel_major_impl(xt, gt, None, operands=operands, out_dtype=jnp.float32,
                                   config=config, launcher=launcher, halves=True)


def int8_conv_wgrad_direct_halves(x, g, *, kernel_shape, window_strides=(1, 1),
                                  padding="VALID", config: Int8ConvConfig | None = None,
                                  low_pad_in_xla: bool | None = None, interpret=False):
  """:func:`int8_conv_wgrad_direct`'s exact integer result, unrounded: (hi, lo) int32
  (KH, KW, C, O), the integer ``hi * 65536 + lo`` (as
  :func:`pallas_kernels.int8_conv.int8_conv_wgrad_halves`; the split may differ, the
  integer does not)."""
  operands, config, launcher, empty = _setup(
      x, g, kernel_shape, window_strides, padding, config, interpret, low_pad_in_xla)
  if empty:
    zero = jnp.zeros(operands.kernel_shape, jnp.int32)
    return zero, zero
  return _int8_conv_wgrad_direct_impl(x, g, None, operands=operands, out_dtype=jnp.float32,
                                      config=config, launcher=launcher, halves=True)


def int8_conv_wgrad_direct(x, g, *, kernel_shape, window_strides=(1, 1), padding="VALID",
                           scale=None, out_dtype=jnp.float32,
                           config: Int8ConvConfig | None = None,
                           low_pad_in_xla: bool | None = None, interpret=False):
  """:func:`pallas_kernels.int8_conv.int8_conv_wgrad` on channel-major boxes.

  Same arguments and result (bit-equal to :func:`int8_conv_wgrad_reference`), plus:

  Args:
    config: tile_m input channels x tile_n output channels per block, tile_k == swizzle
      pixels per step; :func:`direct_wgrad_config` if None.
    low_pad_in_xla: pad the low side of x^T's H and W in XLA instead of reading it as
      TMA's out-of-bounds zeros. None: only under interpret mode (whose TMA model cannot
      start a box below 0). Strides > 1 pad in the phase split anyway.

  The channel-major tensors are made here, one XLA pass each; to have the fusions that
  produce x and g write them instead, use :func:`channel_major_operands` and
  :func:`int8_conv_wgrad_channel_major`.
  """
  operands, config, launcher, empty = _setup(
      x, g, kernel_shape, window_strides, padding, config, interpret, low_pad_in_xla)
  scale, out_dtype = check_wgrad_epilogue(scale, out_dtype, operands.kernel_shape[3])
  if empty:
    return wgrad_epilogue(jnp.zeros(operands.kernel_shape, jnp.float32), scale, out_dtype)
  return _int8_conv_wgrad_direct_impl(x, g, scale, operands=operands, out_dtype=out_dtype,
                                      config=config, launcher=launcher, halves=False)


def direct_wgrad_accepts(x_shape, kernel_shape, *, window_strides=(1, 1), padding="VALID",
                         interpret=False) -> bool:
  """Whether :func:`int8_conv_wgrad_direct` with its default config runs this weight
  gradient (valid arguments assumed; no error raised): N*Ho*Wo within the exact parts'
  bound, and the row-padded steps of one tap (Ho rows of ceil(Wo*N' / tile_k) steps) in
  at most MAX_EXACT_PARTS parts of INT32_SAFE_K pixels. ``interpret`` as the call's (it
  decides where the low padding goes, hence the layout)."""
  n, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  strides = tuple(window_strides)
  pads = check_padding(padding, (h, w), (kh, kw), strides)
  _, ho, wo, _ = conv_output_shape(x_shape, kernel_shape, strides, pads)
  if n * ho * wo > MAX_EXACT_PARTS * INT32_SAFE_K:
    return False
  if min(n, ho, wo, kh, kw, c, o) == 0:
    return True  # the zero result, no kernel
  low_pad_in_xla = launcher_for(interpret) != "mosaic_gpu"
  _, (hx, wx), _, _ = _x_geometry(x_shape, kernel_shape, strides, pads, low_pad_in_xla)
  n_img = channel_major_layout(n, (hx, wx, c), (ho, wo, o)).n_img
  config = direct_wgrad_config(c, o, wo * n_img)
  total = ho * -(-(wo * n_img) // config.tile_k)
  return total <= MAX_EXACT_PARTS * (INT32_SAFE_K // config.tile_k)


def direct_wgrad_operand_bytes(x_shape, kernel_shape, *, window_strides=(1, 1),
                               padding="SAME") -> dict[str, int]:
  """Int8 bytes of the direct wgrad, from the shapes (the census of issue 24): ``handed``
  (x^T + g^T as the compiled kernel reads them: each tensor once, padded by
  :func:`channel_major_layout`; strides > 1: x^T's phase images of the padded x), ``x`` and
  ``g`` (the int8 NHWC tensors)."""
  n, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  strides = tuple(window_strides)
  pads = check_padding(padding, (h, w), (kh, kw), strides)
  _, ho, wo, _ = conv_output_shape(x_shape, kernel_shape, strides, pads)
  _, (hx, wx), _, _ = _x_geometry(x_shape, kernel_shape, strides, pads, False)
  lay = channel_major_layout(n, (hx, wx, c), (ho, wo, o))
  return {"handed": (c * hx * lay.wx + o * ho * lay.wo) * lay.n_img, "x": n * h * w * c,
          "g": n * ho * wo * o}
