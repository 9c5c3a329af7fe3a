"""What the implicit-GEMM INT8 conv kernels share (forward, dgrad, wgrad).

The three conv GEMMs of UI8 (Zhu et al., "Towards Unified INT8 Training for
Convolutional Neural Network", CVPR 2020, §3 and §5 "fused quantized
convolution") run as Mosaic GPU kernels that never build the im2col patch
matrix: every kernel tap (kh, kw) is a *shifted window of rows* of a
flattened, zero-padded NHWC input, streamed by TMA into shared memory, and
all taps x channel chunks are accumulated into one int32 ``wgmma``
accumulator (``m64nNk32.s32.s8.s8``). The kernels and their wrappers live in
:mod:`pallas_kernels.conv_forward` (:func:`int8_conv`, and the row-window
kernel that dgrad launches too), :mod:`pallas_kernels.conv_dgrad` and
:mod:`pallas_kernels.conv_wgrad`; this module holds what they share:

* configs: :class:`Int8ConvConfig`, ``CONV_CONFIGS`` /
  :func:`select_conv_config` (forward and dgrad), ``WGRAD_CONFIGS`` /
  :func:`select_wgrad_config`;
* argument checks and :func:`conv_output_shape`;
* plans (:class:`Taps`, :class:`Plan`, :func:`forward_plan`, the row-pitch
  cost model :func:`pick_pitch`) and the wrapper-side int8 data movement in
  XLA (:func:`forward_source`, :func:`shifted_copies`,
  :func:`weight_matrix`);
* kernel building blocks: the TMA ring (:func:`ring_scratch`,
  :func:`pipelined_accumulate`, :func:`copy_from_tap_source`);
* the reference conv (:func:`conv_reference_impl`), :func:`launcher_for`,
  :func:`empty_or_zero_k`.

Layouts and dtypes
------------------
* x: (N, H, W, C) int8 (NHWC); w: (KH, KW, C, O) int8 (HWIO), ungrouped, no
  dilation; g (dgrad, wgrad): (N, Ho, Wo, O) int8.
* ``window_strides`` (sh, sw) >= 1 (any; 1 and 2 are what ResNets use);
  ``padding`` ((lo_h, hi_h), (lo_w, hi_w)) of ints (negative crops, as in
  ``lax.conv_general_dilated``), or "SAME" / "VALID" / "SAME_LOWER".
* result: (N, Ho, Wo, O) (forward) / (N, H, W, C) (dgrad) of ``out_dtype``:
  float32 or bfloat16 = ``(float32(acc) * scale[ch] + bias[ch]).astype(
  out_dtype)``, evaluated in that order (one multiply, then the add, which
  XLA and LLVM contract into one FMA in kernel and reference alike); or int32
  = the raw exact accumulator (``scale`` and ``bias`` must be None).
  ``scale``: None (= 1), a scalar, or one value per output channel; ``bias``:
  None or per output channel. ``acc`` is the exact int32 sum
  ``sum_{kh,kw,c} x[n, sh*h+kh-lo_h, sw*w+kw-lo_w, c] * w[kh, kw, c, o]``.
  wgrad: (KH, KW, C, O) float32 / bfloat16 (see its module).

The decomposition (in the wrapper: a few cheap int8 XLA passes -- pad, phase
split, shifted copies; the kernel only ever sees stride-1 "shifted row
window" problems)
-----------------------------------------------------------------------------
1. **Phases** (stride s > 1, forward). The zero-padded input xp (Hp x Wp) is
   split into s*s phase images ``P[a, b] = xp[:, a::s, b::s]`` (space to
   depth; one int8 pass that writes each input byte once). Tap (kh, kw) =
   (s*dh + a, s*dw + b) reads ``P[a, b][h + dh, w + dw]``: the strided conv is
   the sum of s*s stride-1 convs with sub-kernels of ceil((K-a)/s) taps, all
   accumulated into the same accumulator. Phases without taps are not built
   (a 1x1 stride-2 conv only builds ``xp[:, ::2, ::2]``, 1/4 of x). Stride 1
   is the single phase xp.
2. **Flattening.** The phase images are stacked and flattened to rows
   ``(P * N * Hg * Wg, Cp)`` with a row pitch Wg >= Wq (zero columns appended)
   and the channels zero-padded to Cp (a multiple of ``tile_k``). Output pixel
   (n, h, w) is computed on the *grid* row r = n*Hg*Wg + h*Wg + w, and tap t
   reads row ``r + off_t`` with ``off_t = phase_base + dh*Wg + dw`` -- every
   tap is one contiguous row window, so an output tile of ``tile_m`` grid rows
   is ``tile_m`` consecutive source rows per tap. Grid rows with h >= Ho or
   w >= Wo are computed and dropped (the waste is Hg*Wg / (Ho*Wo), e.g. 1.18x
   at 56x56, 1.31x at 14x14).
3. **Aligned shifted copies.** Mosaic GPU's TMA copies into the (8, swizzle)
   -tiled shared memory that int8 ``wgmma`` needs split the row coordinate
   into (row // 8, row % 8): a window must start on a multiple of 8 rows (the
   lowering demands a proof, "prove the divisibility of index 0 using
   pl.multiple_of"; a start off by kw rows would otherwise load garbage on
   hardware, while interpret mode would still compute the right numbers). So
   the wrapper materialises one copy of the flat source per distinct residue
   ``off_t mod 8``, shifted up by that residue; tap t then reads copy j(t) at
   the 8-aligned offset ``off_t - residue_j``. With Wg a multiple of 8 the
   residues are the dw values: 3 copies for a 3x3 stride-1 conv, 2 for 3x3
   stride 2 (sub-kernels of width 2 and 1), 1 (no copy at all when no padding
   is needed) for 1x1. The row pitch is chosen per shape by a small cost
   model (MACs on the padded grid vs bytes of the copies): for 7x7 images the
   unrounded pitch Wg = 9 with 5 copies beats Wg = 16 (2.9x grid waste).
   (wgrad aligns to the swizzle width instead: see its module.)

Exactness: every product of two int8 values is exact in int32; the forward
and dgrad kernels sum K = KH*KW*C (forward) or taps*O (dgrad) products per
output in one int32 accumulator and refuse K > INT32_SAFE_K = 131,072
(127*127*131,072 < 2^31), so no sum can overflow (no float chunking:
ResNet-50's largest K is 4,608); wgrad parts hold <= INT32_SAFE_K pixels
each and are combined exactly. Zero padding (channels, pixels, rows) adds
exact zeros. The references compute the same integers with
``lax.conv_general_dilated(..., preferred_element_type=jnp.int32)`` (wgrad:
int32 dots over pixel chunks, combined the same way) and apply the same
jitted epilogue, so interpret-mode results equal them bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import INT32_SAFE_K
from pallas_kernels._common import OUT_DTYPES
from pallas_kernels._common import check_smem
from pallas_kernels._common import check_tiling
from pallas_kernels._common import check_vector
from pallas_kernels._common import epilogue
from pallas_kernels._common import round_up

__all__ = [
    "CONV_CONFIGS",
    "Int8ConvConfig",
    "WGRAD_CONFIGS",
    "conv_output_shape",
    "select_conv_config",
    "select_wgrad_config",
]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Int8ConvConfig:
  """Tiling of the implicit-GEMM conv kernels (static, hashable).

  Attributes:
    tile_m: output-grid rows (pixels) per thread block; a multiple of 64 (the
      M of one ``wgmma``).
    tile_n: output channels per thread block; a multiple of 8 in [8, 256].
    tile_k: input channels per pipeline step (one tap x one channel chunk);
      a multiple of ``swizzle``. The channels are zero-padded to a multiple
      of it, so 64 suits 64-wide layers and 128 wider ones.
    swizzle: shared-memory swizzle in bytes for both operands: 128, 64 or 32.
    max_concurrent_steps: depth of the TMA ring (steps in flight), >= 1.
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  swizzle: int = 128
  max_concurrent_steps: int = 4

  def __post_init__(self):
    check_tiling(self)

  def smem_bytes(self, out_dtype=jnp.float32) -> int:
    """Shared memory the kernel allocates with this config, in bytes."""
    ring = (self.tile_m + self.tile_n) * self.tile_k * self.max_concurrent_steps
    out_tile = self.tile_m * self.tile_n * jnp.dtype(out_dtype).itemsize
    return ring + out_tile + 2 * self.tile_n * 4 + 1024  # + barriers/alignment

  @property
  def name(self) -> str:
    return (f"{self.tile_m}x{self.tile_n}x{self.tile_k}s{self.swizzle}"
            f"d{self.max_concurrent_steps}")


# 64-wide layers (ResNet-50 stage 1): no half-empty 128 tiles in N or K.
CONV_64x64 = Int8ConvConfig(tile_m=128, tile_n=64, tile_k=64, swizzle=64,
                            max_concurrent_steps=6)
# 64 input channels, >= 128 outputs (stage-1 expansion 1x1s).
CONV_64x128 = Int8ConvConfig(tile_m=128, tile_n=128, tile_k=64, swizzle=64,
                             max_concurrent_steps=6)
# >= 128 input channels, 64 outputs (the 256 -> 64 reductions).
CONV_128x64 = Int8ConvConfig(tile_m=128, tile_n=64, tile_k=128, swizzle=128,
                             max_concurrent_steps=4)
# 128+ in and out (stages 2-4).
CONV_128x128 = Int8ConvConfig(tile_m=128, tile_n=128, tile_k=128, swizzle=128,
                              max_concurrent_steps=4)
# Every config select_conv_config can return; the tests run each.
CONV_CONFIGS = (CONV_64x64, CONV_64x128, CONV_128x64, CONV_128x128)


def select_conv_config(k_channels: int, n_channels: int) -> Int8ConvConfig:
  """The config the conv kernels use by default.

  Args:
    k_channels: channels contracted per tap (C for the forward, O for dgrad).
    n_channels: channels produced (O for the forward, C for dgrad).
  """
  # tile_k 128 unless 64 pads less (C = 64, 192, 320, ... or C <= 64).
  wide_k = round_up(max(k_channels, 1), 128) == round_up(max(k_channels, 1),
                                                           64)
  wide_n = n_channels > 64
  return {(False, False): CONV_64x64, (False, True): CONV_64x128,
          (True, False): CONV_128x64, (True, True): CONV_128x128}[
              (wide_k, wide_n)]


# Split-K configs of the weight gradient: tile_m input channels x tile_n
# output channels per block, tile_k pixels per step; swizzle 32 so the tap
# offsets along the pixels need only be multiples of 32.
WGRAD_64x64 = Int8ConvConfig(tile_m=64, tile_n=64, tile_k=128, swizzle=32,
                             max_concurrent_steps=6)
WGRAD_64x128 = Int8ConvConfig(tile_m=64, tile_n=128, tile_k=128, swizzle=32,
                              max_concurrent_steps=6)
WGRAD_128x64 = Int8ConvConfig(tile_m=128, tile_n=64, tile_k=128, swizzle=32,
                              max_concurrent_steps=6)
WGRAD_128x128 = Int8ConvConfig(tile_m=128, tile_n=128, tile_k=128, swizzle=32,
                               max_concurrent_steps=4)
WGRAD_CONFIGS = (WGRAD_64x64, WGRAD_64x128, WGRAD_128x64, WGRAD_128x128)


def select_wgrad_config(c: int, o: int) -> Int8ConvConfig:
  """The wgrad config for C input and O output channels."""
  return {(False, False): WGRAD_64x64, (False, True): WGRAD_64x128,
          (True, False): WGRAD_128x64, (True, True): WGRAD_128x128}[
              (c > 64, o > 64)]


# ----------------------------------------------------------------------------
# Argument checking.
# ----------------------------------------------------------------------------


def check_int8(name, x, ndim, layout):
  dtype = getattr(x, "dtype", None)
  if dtype is None or jnp.dtype(dtype) != jnp.int8:
    raise TypeError(f"{name} must be an int8 array, got dtype {dtype}")
  if np.ndim(x) != ndim:
    raise ValueError(f"{name} must be {ndim}-D {layout}, got "
                     f"{name}.shape={tuple(np.shape(x))}")


def check_strides(window_strides):
  try:
    strides = tuple(window_strides)
  except TypeError:
    strides = None
  if (strides is None or len(strides) != 2 or
      not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
              and s >= 1 for s in strides)):
    raise ValueError("window_strides must be two positive ints (sh, sw), got "
                     f"window_strides={window_strides!r}")
  return tuple(int(s) for s in strides)


def check_padding(padding, in_hw, k_hw, strides):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or "
                       f"((lo_h, hi_h), (lo_w, hi_w)), got {padding=}")
    pads = lax.padtype_to_pads(in_hw, k_hw, strides, padding.upper())
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  try:
    pads = tuple(tuple(p) for p in padding)
  except TypeError:
    pads = None
  if (pads is None or len(pads) != 2 or any(len(p) != 2 for p in pads) or
      not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
              for p in pads for v in p)):
    raise ValueError("padding must be 'SAME', 'VALID' or ((lo_h, hi_h), "
                     f"(lo_w, hi_w)) of ints, got padding={padding!r}")
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def output_size(size, k, stride, lo, hi):
  span = size + lo + hi - k
  return span // stride + 1 if span >= 0 else 0


def check_shape(name, shape, layout):
  try:
    shape = tuple(int(d) for d in shape)
  except TypeError:
    shape = None
  if shape is None or len(shape) != 4 or min(shape) < 0:
    raise ValueError(f"{name} must be 4 non-negative ints {layout}, got "
                     f"{name}={shape!r}")
  return shape


def conv_output_shape(input_shape, kernel_shape, window_strides, padding):
  """(N, Ho, Wo, O) of a conv of an NHWC input with an HWIO kernel."""
  n, h, w, _ = check_shape("input_shape", input_shape, "(N, H, W, C)")
  kh, kw, _, o = check_shape("kernel_shape", kernel_shape,
                             "(KH, KW, C, O)")
  strides = check_strides(window_strides)
  pads = check_padding(padding, (h, w), (kh, kw), strides)
  return (n, output_size(h, kh, strides[0], *pads[0]),
          output_size(w, kw, strides[1], *pads[1]), o)


def check_epilogue_args(scale, bias, out_dtype, size, size_name):
  try:
    out_dtype = jnp.dtype(out_dtype)
  except TypeError:
    out_dtype = None
  if out_dtype not in OUT_DTYPES:
    raise TypeError(
        f"out_dtype must be float32, bfloat16 or int32, got {out_dtype}")
  if out_dtype == jnp.int32:
    given = [n for n, v in (("scale", scale), ("bias", bias)) if v is not None]
    if given:
      raise ValueError(f"out_dtype=int32 returns the raw int32 accumulator: "
                       f"{', '.join(given)} must be None")
  return (check_vector("scale", scale, size, size_name),
          check_vector("bias", bias, size, size_name), out_dtype)


def check_contraction(k, what):
  if k > INT32_SAFE_K:
    raise ValueError(
        f"{what} sums K={k} int8 products per output, more than "
        f"INT32_SAFE_K={INT32_SAFE_K} (127*127*K could overflow the int32 "
        "accumulator); split the input channels and add the partial results")


def config_and_launcher(config, default, out_dtype, interpret):
  """``(config or default, launcher_for(interpret))``, the config checked
  (its shared memory too, unless interpreted)."""
  config = default if config is None else config
  launcher = launcher_for(interpret)
  check_config(config, out_dtype, launcher != "mosaic_gpu")
  return config, launcher


def check_config(config, out_dtype, interpret):
  if not isinstance(config, Int8ConvConfig):
    raise TypeError(f"config must be an Int8ConvConfig, got {config!r}")
  check_smem(config, out_dtype, interpret, config.name)


# ----------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("strides", "pads", "lhs_dilation",
                                             "out_dtype"))
def conv_reference_impl(x, w, scale, bias, *, strides, pads, lhs_dilation,
                        out_dtype):
  acc = lax.conv_general_dilated(
      x, w, window_strides=strides, padding=pads, lhs_dilation=lhs_dilation,
      dimension_numbers=_DIMENSION_NUMBERS, preferred_element_type=jnp.int32)
  if out_dtype == jnp.int32:
    return acc
  return epilogue(acc.astype(jnp.float32), scale, bias, out_dtype)


# ----------------------------------------------------------------------------
# Plans: the stride-1 shifted-row-window problems the kernel runs.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Taps:
  """One kernel launch: output-grid rows r read source rows r + offsets[t].

  Attributes:
    offsets: row offset of each tap into the flat source.
    weights: (kh, kw) of the kernel tap each step multiplies with.
    residues: shift of each source copy (copy j row r = flat row r + res_j).
    tap_copy: per tap, the copy it reads.
    tap_offq: per tap, its ``align``-aligned offset into that copy, divided
      by ``align``.
    align: 8 (rows: forward / dgrad) or the swizzle width (pixel columns of
      the transposed copies: wgrad).
  """
  offsets: tuple[int, ...]
  weights: tuple[tuple[int, int], ...]
  residues: tuple[int, ...] = ()
  tap_copy: tuple[int, ...] = ()
  tap_offq: tuple[int, ...] = ()
  align: int = 8


def assign_copies(taps_list: Sequence[Taps], residues, align=8):
  out = []
  for taps in taps_list:
    copies = tuple(residues.index(o % align) for o in taps.offsets)
    offq = tuple((o - residues[j]) // align
                 for o, j in zip(taps.offsets, copies))
    out.append(dataclasses.replace(taps, residues=residues, tap_copy=copies,
                                   tap_offq=offq, align=align))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static geometry of one conv: a flat int8 source and its launches.

  The flat source has ``src_len`` rows; its first ``n*hg*wg`` rows (phase 0,
  or the only image) are the output grid: grid row n*hg*wg + h*wg + w is
  output (n, h, w) of every launch. ``launches`` hold each launch's taps;
  ``valid`` its valid output region (rows, cols) of the grid.
  """
  n: int
  hg: int
  wg: int
  src_len: int
  residues: tuple[int, ...]
  launches: tuple[Taps, ...]
  valid: tuple[tuple[int, int], ...]
  tile_m: int

  @property
  def grid_rows(self) -> int:
    return self.n * self.hg * self.wg

  @property
  def m_pad(self) -> int:
    return round_up(max(self.grid_rows, 1), self.tile_m)

  @property
  def copy_rows(self) -> int:
    """Rows of each shifted copy: every row any tile of any launch reads."""
    max_off = max((t.align * max(t.tap_offq) for t in self.launches
                   if t.offsets), default=0)
    return self.m_pad + max_off


# Cost model for the row pitch: int8 tensor-core MACs/s and HBM bytes/s of an
# H100/H200 (orders of magnitude; only the ratio matters).
_MACS_PER_S = 3.0e14
_BYTES_PER_S = 3.0e12


def pick_pitch(wq, build, macs_per_row, src_row_bytes, out_row_bytes,
               align=8):
  """The plan of least estimated time over the row pitches Wq, round_up(Wq,
  8) and round_up(Wq, align): MACs on the padded grid plus the bytes of the
  shifted copies (written once, read once) and of the grid output."""
  best = None
  for wg in sorted({wq, round_up(wq, 8), round_up(wq, align)}):
    plan = build(wg)
    copy_bytes = 2 * len(plan.residues) * plan.copy_rows * src_row_bytes
    cost = (plan.m_pad * macs_per_row / _MACS_PER_S +
            (copy_bytes + plan.m_pad * out_row_bytes) / _BYTES_PER_S)
    if best is None or cost < best[0]:
      best = (cost, plan)
  return best[1]


def forward_phase_taps(k, stride):
  """[(phase a, [dh...])] for one dimension, phases with taps only."""
  out = []
  for a in range(stride):
    dhs = list(range((k - a + stride - 1) // stride))
    if dhs:
      out.append((a, dhs))
  return out


@functools.lru_cache(maxsize=None)
def forward_plan(n, h, w, c, kh, kw, o, strides, pads, tile_m, cp, op,
                 out_bytes, align=8):
  """Phases + flattening + copies of a forward conv (module docstring).

  ``align``: the alignment the kernel's tap windows need (8 rows; wgrad:
  the swizzle width along the pixels of its transposed copies).
  """
  sh, sw = strides
  ho = output_size(h, kh, sh, *pads[0])
  wo = output_size(w, kw, sw, *pads[1])
  hq = -(-(h + pads[0][0] + pads[0][1]) // sh)
  wq = -(-(w + pads[1][0] + pads[1][1]) // sw)
  ph, pw = forward_phase_taps(kh, sh), forward_phase_taps(kw, sw)
  phases = [(a, b) for a, _ in ph for b, _ in pw]

  def build(wg):
    base = n * hq * wg
    offsets, weights = [], []
    for p, ((a, dhs), (b, dws)) in enumerate(
        (x, y) for x in ph for y in pw):
      for dh in dhs:
        for dw in dws:
          offsets.append(p * base + dh * wg + dw)
          weights.append((sh * dh + a, sw * dw + b))
    residues = tuple(sorted({off % align for off in offsets}))
    launches = assign_copies([Taps(tuple(offsets), tuple(weights))],
                             residues, align)
    return Plan(n=n, hg=hq, wg=wg, src_len=len(phases) * base,
                residues=residues, launches=launches, valid=((ho, wo),),
                tile_m=tile_m)

  return pick_pitch(wq, build, kh * kw * cp * op, cp, op * out_bytes,
                    align), phases


# ----------------------------------------------------------------------------
# Wrapper-side int8 data movement (XLA).
# ----------------------------------------------------------------------------


def shifted_copies(flat, plan: Plan):
  """Copy j: rows r -> flat[r + residue_j], zero past the end; (rows, Cp)."""
  rows = plan.copy_rows
  copies = []
  for res in plan.residues:
    part = flat[res:]
    copies.append(lax.pad(part, jnp.int8(0),
                          ((0, rows - part.shape[0], 0), (0, 0, 0))))
  return copies


def forward_source(x, plan: Plan, phases, strides, pads, cp):
  n, h, w, c = x.shape
  sh, sw = strides
  hq, wg = plan.hg, plan.wg
  wq = -(-(w + pads[1][0] + pads[1][1]) // sw)
  xp = lax.pad(x, jnp.int8(0),
               ((0, 0, 0),
                (pads[0][0], hq * sh - h - pads[0][0], 0),
                (pads[1][0], wq * sw - w - pads[1][0], 0),
                (0, cp - c, 0)))
  if (sh, sw) == (1, 1):
    stacked = xp[None]
  else:
    split = xp.reshape(n, hq, sh, wq, sw, cp)
    stacked = jnp.stack([split[:, :, a, :, b, :] for a, b in phases])
  if wg != wq:
    stacked = lax.pad(stacked, jnp.int8(0), ((0, 0, 0),) * 3 +
                      ((0, wg - wq, 0), (0, 0, 0)))
  return stacked.reshape(plan.src_len, cp)


def weight_matrix(w_blocks, taps: Taps, rows, cols):
  """(rows, taps*cols) int8: block t = w_blocks[kh_t, kw_t] zero-padded.

  ``w_blocks``: (KH, KW, R, K) with R the output and K the contracted
  channels (K-major blocks).
  """
  blocks = jnp.stack([w_blocks[kh, kw] for kh, kw in taps.weights], axis=1)
  r, k = blocks.shape[0], blocks.shape[2]
  blocks = lax.pad(blocks, jnp.int8(0),
                   ((0, rows - r, 0), (0, 0, 0), (0, cols - k, 0)))
  return blocks.reshape(rows, len(taps.weights) * cols)


# ----------------------------------------------------------------------------
# Kernel building blocks: the TMA ring over tap windows.
# ----------------------------------------------------------------------------


def static_lookup(index, values):
  """``values[index]`` for a traced int32 scalar index and static ints."""
  values = [int(v) for v in values]
  out = jnp.int32(values[0])
  for i, v in enumerate(values[1:], 1):
    if v != values[0]:
      out = jnp.where(index == i, jnp.int32(v), out)
  return out


def copy_from_tap_source(srcs, taps: Taps, tap, window, dst, barrier):
  """TMA ``srcs[tap_copy[tap]].at[window]`` -> dst (one ``pl.when`` per
  source copy when there are several)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if len(srcs) == 1:
    plgpu.copy_gmem_to_smem(srcs[0].at[window], dst, barrier)
    return
  copy = static_lookup(tap, taps.tap_copy)
  for j, src in enumerate(srcs):
    @pl.when(copy == j)
    def _(src=src):
      plgpu.copy_gmem_to_smem(src.at[window], dst, barrier)


def pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem, barriers,
                         acc_shape):
  """``sum_step a_smem[step] @ b_smem[step].T`` in an int32 wgmma accumulator.

  ``issue(step, slot)`` starts the two TMA loads of a step into ring slot
  ``slot`` (both arriving on ``barriers.at[slot]``). A ``depth``-slot ring:
  the prologue fills it, each step waits for its slot, issues its wgmma,
  keeps one wgmma group in flight and refills the slot of the step before
  (whose wgmma is then complete). Returns the accumulator value.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  delay = 1 if depth > 1 else 0  # wgmma groups left in flight per step
  for step in range(depth):  # prologue: fill the ring
    issue(jnp.int32(step), step)

  def accumulate(acc_ref):
    def body(step, carry):
      slot = lax.rem(step, jnp.int32(depth))
      plgpu.barrier_wait(barriers.at[slot])
      # b_smem is (tile_n, tile_k), K-major: wgmma reads it transposed.
      plgpu.wgmma(acc_ref, a_smem.at[slot], b_smem.at[slot].transpose((1, 0)))
      plgpu.wgmma_wait(delay)  # step - delay is done: its slot is free
      refill = step - delay + depth

      @pl.when((step >= delay) & (refill < num_steps))
      def _():
        issue(refill, lax.rem(refill, jnp.int32(depth)))

      return carry

    lax.fori_loop(0, num_steps, body, None)
    plgpu.wgmma_wait(0)
    return acc_ref[...]

  return pl.run_scoped(accumulate, plgpu.ACC(acc_shape, jnp.int32))


def ring_scratch(config: Int8ConvConfig, depth):
  """SMEM of the TMA ring: a (depth, tile_m, tile_k), b (depth, tile_n,
  tile_k), both (8, swizzle)-tiled and swizzled, and one barrier per slot."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  transforms = (plgpu.TilingTransform((8, config.swizzle)),
                plgpu.SwizzleTransform(config.swizzle))
  return [
      plgpu.SMEM((depth, config.tile_m, config.tile_k), jnp.int8,
                 transforms=transforms),
      plgpu.SMEM((depth, config.tile_n, config.tile_k), jnp.int8,
                 transforms=transforms),
      plgpu.Barrier(num_arrivals=2, num_barriers=depth),
  ]


# ----------------------------------------------------------------------------
# Launchers and empty results.
# ----------------------------------------------------------------------------


def launcher_for(interpret):
  """The static launcher for an ``interpret=`` argument (False, True or a
  ``plgpu.InterpretGPUParams``)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else "mosaic_gpu"


def empty_or_zero_k(shape, scale, bias, out_dtype):
  """Result of a conv with no products: epilogue(0) (or empty)."""
  acc = jnp.zeros(shape, jnp.float32)
  if out_dtype == jnp.int32:
    return jnp.zeros(shape, jnp.int32)
  return epilogue(acc, scale, bias, out_dtype)
