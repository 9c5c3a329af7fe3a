"""Implicit-GEMM INT8 convolutions with a fused dequantizing epilogue (Hopper).

The three conv GEMMs of UI8 (Zhu et al., "Towards Unified INT8 Training for
Convolutional Neural Network", CVPR 2020, §3 and §5 "fused quantized
convolution") -- forward, input gradient, weight gradient -- as Mosaic GPU
kernels that never build the im2col patch matrix: every kernel tap (kh, kw)
is a *shifted window of rows* of a flattened, zero-padded NHWC input,
streamed by TMA into shared memory, and all taps x input-channel chunks are
accumulated into one int32 ``wgmma`` accumulator (``m64nNk32.s32.s8.s8``),
dequantized in registers before the only write to memory (wgrad: int32
partial sums over pixel parts, combined exactly).

Public API: :class:`Int8ConvConfig`, :func:`select_conv_config`,
:func:`select_wgrad_config`, :func:`int8_conv`, :func:`int8_conv_reference`,
:func:`int8_conv_dgrad`, :func:`int8_conv_dgrad_reference`,
:func:`int8_conv_wgrad`, :func:`int8_conv_wgrad_reference`,
:func:`conv_output_shape`.

Layouts and dtypes
------------------
* x: (N, H, W, C) int8 (NHWC); w: (KH, KW, C, O) int8 (HWIO), ungrouped, no
  dilation; g (dgrad): (N, Ho, Wo, O) int8.
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
4. **Kernel.** Grid (grid_rows / tile_m, Op / tile_n), one warpgroup per
   block; steps = taps x (Cp / tile_k); a ``max_concurrent_steps``-deep TMA
   ring of (tile_m, tile_k) source and (tile_n, tile_k) weight tiles, one
   barrier per slot, ``wgmma`` with one group in flight (a slot is refilled
   one step after its wgmma was issued). Weights are the K-major matrix
   (Op, taps * Cp), block t = w[kh_t, kw_t].T.

Bytes, 3x3 stride 1, ResNet-50 layer1 (x: 256x56x56x64 int8 = 51.4 MB): each
copy is the padded source 256x58x64x64 = 60.8 MB (1.18x x); three copies
182 MB are written once and read by the kernel (the kh taps of a tile re-read
the same rows from L2). The im2col patch matrix is 9 x 51.4 = 462 MB written
and read. Stride 2 (56x56 -> 28x28): 4 phases of 29x32 = 1.18x x per copy,
2 copies. 1x1 stride 2: the 1/4 subsample (0.25x). Largest int8
intermediate: ~1.2x the input; int8 bytes the kernel reads: 3.6x (3x3
stride 1), 2.4x (3x3 stride 2) -- tests/test_int8_conv_kernels.py checks
both on the traced jaxpr.

Input gradient (:func:`int8_conv_dgrad`)
----------------------------------------
``dx[n, i, j, c] = sum g[n, h, w, o] * w[kh, kw, c, o]`` over
``s*h + kh = i + lo``. Sub-pixel decomposition: for each output phase
rho = (i + lo) mod s, only taps k = rho + s*m contribute and
``dx[s*q + rho - lo] = sum_m g[q - m] * w[rho + s*m]`` -- a stride-1
correlation of g with the flipped sub-kernel. All s*s phases read one shared
padded, flattened g (its shifted copies are built once); each phase is one
kernel launch with its own taps (weight blocks ``w[kh, kw]`` of shape (C, O),
already K-major), and an XLA interleave assembles dx (stride 1: one phase,
no interleave; it is exactly the stride-1 conv of g with the flipped,
channel-swapped kernel). Phases without taps (1x1 stride 2: the odd pixels)
are ``epilogue(0)``. No MAC is spent on the zeros a transposed conv of a
zero-dilated g would multiply.

Weight gradient (:func:`int8_conv_wgrad`)
-----------------------------------------
``dw[t] = sum_r x_flat[r + off_t] (x) g_grid[r]`` over the forward's grid
rows r (g zero-padded onto the grid), per tap t. It contracts over pixels,
so both int8 operands must be pixel-major: XLA transposes the shifted
copies to (Cp, pixels) and g to (Op, pixels). The tap shift now moves the
*contraction* coordinate, which the tiled TMA splits by the swizzle width
instead of by 8 rows: the wgrad configs use swizzle 32, so the copies are
per residue ``off_t mod 32`` (3 for 3x3 stride 1 with Wg a multiple of 32;
the cost model may prefer the unrounded pitch and more copies on small
images, up to one per tap, i.e. a transposed im2col, on 7x7). Split-K: the
grid is (taps x parts, C tiles, O tiles), each block sums one part of at
most INT32_SAFE_K pixels into an int32 accumulator and stores it; XLA
combines the parts exactly (signed high / unsigned low 16-bit halves summed
in int32, joined in float32: the exact sum rounded once, independent of
the split, like int8jax's ``combine_int32_chunks``), then ``* scale[o]``.
At most 256 parts (N*Ho*Wo <= 33.5M pixels).

Exactness: every product of two int8 values is exact in int32; the kernels
sum K = KH*KW*C (forward) or taps*O (dgrad) products per output in one
int32 accumulator and refuse K > INT32_SAFE_K = 131,072 (127*127*131,072 <
2^31), so no sum can overflow (no float chunking: ResNet-50's largest K is
4,608); wgrad parts hold <= INT32_SAFE_K pixels each and are combined
exactly. Zero padding (channels, pixels, rows) adds exact zeros. The
references compute the same integers with ``lax.conv_general_dilated(...,
preferred_element_type=jnp.int32)`` (wgrad: int32 dots over pixel chunks,
combined the same way) and apply the same jitted epilogue, so
interpret-mode results equal them bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul import INT32_SAFE_K
from pallas_kernels.int8_matmul import _SMEM_LIMIT_BYTES
from pallas_kernels.int8_matmul import _out_transforms
from pallas_kernels.int8_matmul import _round_up

__all__ = [
    "CONV_CONFIGS",
    "Int8ConvConfig",
    "WGRAD_CONFIGS",
    "conv_output_shape",
    "int8_conv",
    "int8_conv_dgrad",
    "int8_conv_dgrad_reference",
    "int8_conv_reference",
    "int8_conv_wgrad",
    "int8_conv_wgrad_halves",
    "int8_conv_wgrad_reference",
    "select_conv_config",
    "select_wgrad_config",
]

_OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
               jnp.dtype(jnp.int32))
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
    for name in ("tile_m", "tile_n", "tile_k", "swizzle",
                 "max_concurrent_steps"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"Int8ConvConfig.{name} must be an int, got "
                        f"{value!r} of type {type(value).__name__}")
    tile_m, tile_n, tile_k = self.tile_m, self.tile_n, self.tile_k
    swizzle, max_concurrent_steps = self.swizzle, self.max_concurrent_steps
    if tile_m <= 0 or tile_m % 64:
      raise ValueError(f"{tile_m=} must be a positive multiple of 64")
    if not 0 < tile_n <= 256 or tile_n % 8:
      raise ValueError(f"{tile_n=} must be a multiple of 8 in [8, 256]")
    if swizzle not in (128, 64, 32):
      raise ValueError(f"{swizzle=} must be 128, 64 or 32 (bytes)")
    if tile_k <= 0 or tile_k % swizzle:
      raise ValueError(f"{tile_k=} must be a multiple of {swizzle=}")
    if max_concurrent_steps < 1:
      raise ValueError(f"{max_concurrent_steps=} must be >= 1")

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
  wide_k = _round_up(max(k_channels, 1), 128) == _round_up(max(k_channels, 1),
                                                           64)
  wide_n = n_channels > 64
  return {(False, False): CONV_64x64, (False, True): CONV_64x128,
          (True, False): CONV_128x64, (True, True): CONV_128x128}[
              (wide_k, wide_n)]


# ----------------------------------------------------------------------------
# Argument checking.
# ----------------------------------------------------------------------------


def _check_int8(name, x, ndim, layout):
  dtype = getattr(x, "dtype", None)
  if dtype is None or jnp.dtype(dtype) != jnp.int8:
    raise TypeError(f"{name} must be an int8 array, got dtype {dtype}")
  if np.ndim(x) != ndim:
    raise ValueError(f"{name} must be {ndim}-D {layout}, got "
                     f"{name}.shape={tuple(np.shape(x))}")


def _check_strides(window_strides):
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


def _check_padding(padding, in_hw, k_hw, strides):
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


def _out_size(size, k, stride, lo, hi):
  span = size + lo + hi - k
  return span // stride + 1 if span >= 0 else 0


def _check_shape(name, shape, layout):
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
  n, h, w, _ = _check_shape("input_shape", input_shape, "(N, H, W, C)")
  kh, kw, _, o = _check_shape("kernel_shape", kernel_shape,
                              "(KH, KW, C, O)")
  strides = _check_strides(window_strides)
  pads = _check_padding(padding, (h, w), (kh, kw), strides)
  return (n, _out_size(h, kh, strides[0], *pads[0]),
          _out_size(w, kw, strides[1], *pads[1]), o)


def _check_vector(name, v, size, size_name):
  """v as a float32 (size,) vector, or None."""
  if v is None:
    return None
  dtype = getattr(v, "dtype", None)
  if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating)
                                or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"{name} must be a real number array, got dtype {dtype}")
  shape = tuple(np.shape(v))
  if shape not in ((), (size,)):
    raise ValueError(f"{name} must be a scalar or have shape ({size},) "
                     f"(= ({size_name},)), got {name}.shape={shape}")
  return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (size,))


def _check_epilogue_args(scale, bias, out_dtype, size, size_name):
  try:
    out_dtype = jnp.dtype(out_dtype)
  except TypeError:
    out_dtype = None
  if out_dtype not in _OUT_DTYPES:
    raise TypeError(
        f"out_dtype must be float32, bfloat16 or int32, got {out_dtype}")
  if out_dtype == jnp.int32:
    given = [n for n, v in (("scale", scale), ("bias", bias)) if v is not None]
    if given:
      raise ValueError(f"out_dtype=int32 returns the raw int32 accumulator: "
                       f"{', '.join(given)} must be None")
  return (_check_vector("scale", scale, size, size_name),
          _check_vector("bias", bias, size, size_name), out_dtype)


def _check_contraction(k, what):
  if k > INT32_SAFE_K:
    raise ValueError(
        f"{what} sums K={k} int8 products per output, more than "
        f"INT32_SAFE_K={INT32_SAFE_K} (127*127*K could overflow the int32 "
        "accumulator); split the input channels and add the partial results")


def _check_config(config, out_dtype, interpret):
  if not isinstance(config, Int8ConvConfig):
    raise TypeError(f"config must be an Int8ConvConfig, got {config!r}")
  if not interpret and config.smem_bytes(out_dtype) > _SMEM_LIMIT_BYTES:
    raise ValueError(
        f"config={config.name} needs {config.smem_bytes(out_dtype)} bytes of "
        f"shared memory, more than the {_SMEM_LIMIT_BYTES} a Hopper block can "
        "have; lower max_concurrent_steps or the tile sizes")


def _check_conv_args(x, w, window_strides, padding):
  _check_int8("x", x, 4, "NHWC (N, H, W, C)")
  _check_int8("w", w, 4, "HWIO (KH, KW, C, O)")
  n, h, wd, c = x.shape
  kh, kw, c2, o = w.shape
  if c != c2:
    raise ValueError(
        "x (N, H, W, C) and w (KH, KW, C, O) must have the same C "
        f"(ungrouped conv), got x.shape={x.shape}, w.shape={w.shape}")
  if kh < 1 or kw < 1:
    raise ValueError(f"w must have a non-empty window, got w.shape={w.shape}")
  strides = _check_strides(window_strides)
  pads = _check_padding(padding, (h, wd), (kh, kw), strides)
  return strides, pads


# ----------------------------------------------------------------------------
# Epilogue and references.
# ----------------------------------------------------------------------------


def _epilogue(acc_f32, scale, bias, out_dtype):
  """``acc * scale[ch] + bias[ch]``, cast; channels last. Kernel order."""
  out = acc_f32
  if scale is not None:
    out = out * scale
  if bias is not None:
    out = out + bias
  return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("strides", "pads", "lhs_dilation",
                                             "out_dtype"))
def _conv_reference_impl(x, w, scale, bias, *, strides, pads, lhs_dilation,
                         out_dtype):
  acc = lax.conv_general_dilated(
      x, w, window_strides=strides, padding=pads, lhs_dilation=lhs_dilation,
      dimension_numbers=_DIMENSION_NUMBERS, preferred_element_type=jnp.int32)
  if out_dtype == jnp.int32:
    return acc
  return _epilogue(acc.astype(jnp.float32), scale, bias, out_dtype)


def int8_conv_reference(x, w, *, window_strides=(1, 1), padding="VALID",
                        scale=None, bias=None, out_dtype=jnp.float32):
  """Exact XLA reference for :func:`int8_conv` (same arguments, same bits).

  ``lax.conv_general_dilated(x, w, ..., preferred_element_type=jnp.int32)``
  (NHWC x HWIO -> NHWC), then ``float32(acc) * scale + bias`` cast to
  ``out_dtype``, jitted like the kernel's epilogue so both round alike.
  """
  strides, pads = _check_conv_args(x, w, window_strides, padding)
  scale, bias, out_dtype = _check_epilogue_args(scale, bias, out_dtype,
                                                w.shape[3], "O")
  kh, kw, c, _ = w.shape
  _check_contraction(kh * kw * c, "this conv")
  return _conv_reference_impl(x, w, scale, bias, strides=strides, pads=pads,
                              lhs_dilation=(1, 1), out_dtype=out_dtype)


def _dgrad_pads(size, k, stride, lo, out_size):
  """(lo, hi) padding of the lhs-dilated transposed conv (JAX's rule)."""
  dilated = (out_size - 1) * stride + 1 if out_size > 0 else 0
  pad_lo = k - 1 - lo
  return pad_lo, size + k - 1 - dilated - pad_lo


def _check_dgrad_args(g, w, input_shape, window_strides, padding):
  _check_int8("g", g, 4, "NHWC (N, Ho, Wo, O)")
  _check_int8("w", w, 4, "HWIO (KH, KW, C, O)")
  input_shape = _check_shape("input_shape", input_shape,
                             "(N, H, W, C) of the forward input")
  n, h, wd, c = input_shape
  kh, kw, c2, o = w.shape
  if c != c2:
    raise ValueError(f"input_shape (N, H, W, C) and w (KH, KW, C, O) must have "
                     f"the same C, got {input_shape=}, w.shape={w.shape}")
  strides = _check_strides(window_strides)
  pads = _check_padding(padding, (h, wd), (kh, kw), strides)
  want = conv_output_shape(input_shape, w.shape, strides, pads)
  if tuple(g.shape) != want:
    raise ValueError(
        f"g must have the forward output's shape {want} (from {input_shape=}, "
        f"w.shape={w.shape}, window_strides={strides}, padding={pads}), got "
        f"g.shape={g.shape}")
  return input_shape, strides, pads


def int8_conv_dgrad_reference(g, w, *, input_shape, window_strides=(1, 1),
                              padding="VALID", scale=None, bias=None,
                              out_dtype=jnp.float32):
  """Exact XLA reference for :func:`int8_conv_dgrad` (same bits).

  The transposed conv of JAX's ``conv_general_dilated`` transpose rule: g
  dilated by the strides (``lhs_dilation``), the kernel flipped in space and
  with C and O swapped, int32 accumulation, then the jitted epilogue.
  """
  input_shape, strides, pads = _check_dgrad_args(g, w, input_shape,
                                                 window_strides, padding)
  scale, bias, out_dtype = _check_epilogue_args(scale, bias, out_dtype,
                                                w.shape[2], "C")
  kh, kw, _, o = w.shape
  _check_contraction(kh * kw * o, "this dgrad")
  w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # (KH, KW, O, C)
  t_pads = tuple(
      _dgrad_pads(input_shape[1 + d], w.shape[d], strides[d], pads[d][0],
                  g.shape[1 + d]) for d in range(2))
  return _conv_reference_impl(g, w_t, scale, bias, strides=(1, 1), pads=t_pads,
                              lhs_dilation=strides, out_dtype=out_dtype)


# ----------------------------------------------------------------------------
# Plans: the stride-1 shifted-row-window problems the kernel runs.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Taps:
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


def _assign_copies(taps_list: Sequence[_Taps], residues, align=8):
  out = []
  for taps in taps_list:
    copies = tuple(residues.index(o % align) for o in taps.offsets)
    offq = tuple((o - residues[j]) // align
                 for o, j in zip(taps.offsets, copies))
    out.append(dataclasses.replace(taps, residues=residues, tap_copy=copies,
                                   tap_offq=offq, align=align))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Plan:
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
  launches: tuple[_Taps, ...]
  valid: tuple[tuple[int, int], ...]
  tile_m: int

  @property
  def grid_rows(self) -> int:
    return self.n * self.hg * self.wg

  @property
  def m_pad(self) -> int:
    return _round_up(max(self.grid_rows, 1), self.tile_m)

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


def _pick_pitch(wq, build, macs_per_row, src_row_bytes, out_row_bytes,
                align=8):
  """The plan of least estimated time over the row pitches Wq, round_up(Wq,
  8) and round_up(Wq, align): MACs on the padded grid plus the bytes of the
  shifted copies (written once, read once) and of the grid output."""
  best = None
  for wg in sorted({wq, _round_up(wq, 8), _round_up(wq, align)}):
    plan = build(wg)
    copy_bytes = 2 * len(plan.residues) * plan.copy_rows * src_row_bytes
    cost = (plan.m_pad * macs_per_row / _MACS_PER_S +
            (copy_bytes + plan.m_pad * out_row_bytes) / _BYTES_PER_S)
    if best is None or cost < best[0]:
      best = (cost, plan)
  return best[1]


def _forward_phase_taps(k, stride):
  """[(phase a, [dh...])] for one dimension, phases with taps only."""
  out = []
  for a in range(stride):
    dhs = list(range((k - a + stride - 1) // stride))
    if dhs:
      out.append((a, dhs))
  return out


@functools.lru_cache(maxsize=None)
def _forward_plan(n, h, w, c, kh, kw, o, strides, pads, tile_m, cp, op,
                  out_bytes, align=8):
  """Phases + flattening + copies of a forward conv (module docstring).

  ``align``: the alignment the kernel's tap windows need (8 rows; wgrad:
  the swizzle width along the pixels of its transposed copies).
  """
  sh, sw = strides
  ho = _out_size(h, kh, sh, *pads[0])
  wo = _out_size(w, kw, sw, *pads[1])
  hq = -(-(h + pads[0][0] + pads[0][1]) // sh)
  wq = -(-(w + pads[1][0] + pads[1][1]) // sw)
  ph, pw = _forward_phase_taps(kh, sh), _forward_phase_taps(kw, sw)
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
    launches = _assign_copies([_Taps(tuple(offsets), tuple(weights))],
                              residues, align)
    return _Plan(n=n, hg=hq, wg=wg, src_len=len(phases) * base,
                 residues=residues, launches=launches, valid=((ho, wo),),
                 tile_m=tile_m)

  return _pick_pitch(wq, build, kh * kw * cp * op, cp, op * out_bytes,
                     align), phases


@functools.lru_cache(maxsize=None)
def _dgrad_plan(input_shape, kernel_shape, strides, pads, tile_m, kp, np_,
                out_bytes):
  """Sub-pixel phases of dgrad over one shared padded g (module docstring).

  Returns (plan, per launch: (output phase offset (i0_h, i0_w), its size
  (Q_h, Q_w)), padding of g ((lo_h, hi_h), (lo_w, hi_w)), zero phases).
  """
  n, h, w, _ = input_shape
  kh, kw, _, _ = kernel_shape
  sh, sw = strides
  ho = _out_size(h, kh, sh, *pads[0])
  wo = _out_size(w, kw, sw, *pads[1])

  def dim_phases(size, k, s, lo, out_size):
    """Per phase rho: (i0, Q, q_lo, [m...]) and the g padding it needs."""
    phases, need_lo, need_hi = [], 0, 0
    for rho in range(s):
      q_lo = -((rho - lo) // s)           # ceil((lo - rho) / s)
      q_hi = (size - 1 + lo - rho) // s   # floor
      count = max(q_hi - q_lo + 1, 0)
      ms = list(range(len(range(rho, k, s))))
      i0 = s * q_lo + rho - lo
      phases.append((rho, i0, count, q_lo, ms))
      if ms and count:
        need_lo = max(need_lo, ms[-1] - q_lo)
        need_hi = max(need_hi, q_hi - (out_size - 1))
    return phases, need_lo, need_hi

  phs_h, plo_h, phi_h = dim_phases(h, kh, sh, pads[0][0], ho)
  phs_w, plo_w, phi_w = dim_phases(w, kw, sw, pads[1][0], wo)
  hg = plo_h + ho + phi_h
  lw = plo_w + wo + phi_w

  def build(wg):
    launches, valid, where, zero = [], [], [], []
    for rho_h, i0_h, q_h, qlo_h, ms_h in phs_h:
      for rho_w, i0_w, q_w, qlo_w, ms_w in phs_w:
        if not (q_h and q_w):
          continue  # no output pixel in this phase (image smaller than s)
        if not (ms_h and ms_w):
          zero.append(((i0_h, i0_w), (q_h, q_w)))
          continue
        offsets, weights = [], []
        for mh in ms_h:
          for mw in ms_w:
            offsets.append((qlo_h - mh + plo_h) * wg + (qlo_w - mw + plo_w))
            weights.append((rho_h + sh * mh, rho_w + sw * mw))
        launches.append(_Taps(tuple(offsets), tuple(weights)))
        valid.append((q_h, q_w))
        where.append(((i0_h, i0_w), (q_h, q_w)))
    residues = tuple(sorted({o % 8 for t in launches for o in t.offsets}))
    plan = _Plan(n=n, hg=hg, wg=wg, src_len=n * hg * wg, residues=residues,
                 launches=_assign_copies(launches, residues),
                 valid=tuple(valid), tile_m=tile_m)
    return plan, tuple(where), tuple(zero)

  taps = max((len(t.offsets) for t in build(lw)[0].launches), default=0)
  macs_per_row = max(taps, 1) * kp * np_
  plans = {}

  def build_plan(wg):
    plans[wg] = build(wg)
    return plans[wg][0]

  plan = _pick_pitch(lw, build_plan, macs_per_row, kp, np_ * out_bytes)
  _, where, zero = plans[plan.wg]
  g_pads = ((plo_h, hg - plo_h - ho), (plo_w, plan.wg - plo_w - wo))
  return plan, where, g_pads, zero


# ----------------------------------------------------------------------------
# Wrapper-side int8 data movement (XLA).
# ----------------------------------------------------------------------------


def _shifted_copies(flat, plan: _Plan):
  """Copy j: rows r -> flat[r + residue_j], zero past the end; (rows, Cp)."""
  rows = plan.copy_rows
  copies = []
  for res in plan.residues:
    part = flat[res:]
    copies.append(lax.pad(part, jnp.int8(0),
                          ((0, rows - part.shape[0], 0), (0, 0, 0))))
  return copies


def _forward_source(x, plan: _Plan, phases, strides, pads, cp):
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


def _weight_matrix(w_blocks, taps: _Taps, rows, cols):
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
# Mosaic GPU kernel.
# ----------------------------------------------------------------------------


def _select(index, values):
  """``values[index]`` for a traced int32 scalar index and static ints."""
  values = [int(v) for v in values]
  out = jnp.int32(values[0])
  for i, v in enumerate(values[1:], 1):
    if v != values[0]:
      out = jnp.where(index == i, jnp.int32(v), out)
  return out


def _copy_from_tap_source(srcs, taps: _Taps, tap, window, dst, barrier):
  """TMA ``srcs[tap_copy[tap]].at[window]`` -> dst (one ``pl.when`` per
  source copy when there are several)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if len(srcs) == 1:
    plgpu.copy_gmem_to_smem(srcs[0].at[window], dst, barrier)
    return
  copy = _select(tap, taps.tap_copy)
  for j, src in enumerate(srcs):
    @pl.when(copy == j)
    def _(src=src):
      plgpu.copy_gmem_to_smem(src.at[window], dst, barrier)


def _pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem, barriers,
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


def _ring_scratch(config: Int8ConvConfig, depth):
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


def _conv_kernel(*refs, taps: _Taps, config: Int8ConvConfig, k_chunks: int,
                 has_bias: bool, int_out: bool):
  """One (tile_m grid rows, tile_n channels) output tile per block.

  Refs (GMEM): the shifted source copies (rows, Cp) int8, the weight matrix
  (Op, taps*Cp) int8, scale (Op,) f32, bias (Op,) f32, out (m_pad, Op).
  SMEM scratch: the TMA ring (a, b), its barriers, the epilogue vectors,
  their barrier, the output tile.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  n_src = len(taps.residues)
  srcs = refs[:n_src]
  (w_gmem, scale_gmem, bias_gmem, out_gmem, a_smem, b_smem, barriers,
   scale_smem, bias_smem, vec_barriers, out_smem) = refs[n_src:]
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  m_idx = lax.axis_index("m")
  n_idx = lax.axis_index("n")
  n_slice = pl.ds(n_idx * tile_n, tile_n)
  num_steps = len(taps.offsets) * k_chunks
  depth = min(config.max_concurrent_steps, num_steps)

  if not int_out:
    plgpu.copy_gmem_to_smem(scale_gmem.at[n_slice], scale_smem,
                            vec_barriers.at[0])
    if has_bias:
      plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice], bias_smem,
                              vec_barriers.at[1])

  def issue(step, slot):
    """Starts the TMA loads of pipeline step ``step`` into ring ``slot``."""
    tap = lax.div(step, jnp.int32(k_chunks))
    chunk = step - tap * k_chunks
    # 8-row-aligned by construction; written as 8 * (...) so Mosaic can
    # prove it (it refuses TMA windows it cannot prove aligned).
    row = (m_idx * (tile_m // 8) + _select(tap, taps.tap_offq)) * 8
    _copy_from_tap_source(srcs, taps, tap, (pl.ds(row, tile_m),
                                            pl.ds(chunk * tile_k, tile_k)),
                          a_smem.at[slot], barriers.at[slot])
    plgpu.copy_gmem_to_smem(w_gmem.at[n_slice, pl.ds(step * tile_k, tile_k)],
                            b_smem.at[slot], barriers.at[slot])

  acc = _pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem,
                              barriers, (tile_m, tile_n))
  out_slice = out_gmem.at[pl.ds(m_idx * tile_m, tile_m), n_slice]
  if int_out:
    out_smem[...] = acc
  else:
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per column
    plgpu.barrier_wait(vec_barriers.at[0])
    scale = plgpu.load(scale_smem, layout=col_layout)
    out = acc.astype(jnp.float32) * lax.broadcast_in_dim(
        scale, (tile_m, tile_n), [1])
    if has_bias:
      plgpu.barrier_wait(vec_barriers.at[1])
      bias = plgpu.load(bias_smem, layout=col_layout)
      out = out + lax.broadcast_in_dim(bias, (tile_m, tile_n), [1])
    out_smem[...] = out.astype(out_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_slice)
  plgpu.wait_smem_to_gmem(0)


def _run_launch_xla(copies, wmat, scale, bias, *, taps: _Taps, m_pad,
                    out_dtype, has_bias, k_chunks, tile_k):
  """What one kernel launch computes, in XLA: for tests of the plans.

  Row r of the result is ``sum_t copies[j_t][r + 8*offq_t] @ wmat_t.T``
  (exact int32), then the epilogue; the kernel's tiles and pipeline aside,
  the same arithmetic.
  """
  cp = k_chunks * tile_k
  acc = None
  for t, (j, offq) in enumerate(zip(taps.tap_copy, taps.tap_offq)):
    off = taps.align * offq
    rows = lax.slice_in_dim(copies[j], off, off + m_pad)
    part = lax.dot_general(rows, wmat[:, t * cp:(t + 1) * cp],
                           (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.int32)
    acc = part if acc is None else acc + part
  if out_dtype == jnp.int32:
    return acc
  return _epilogue(acc.astype(jnp.float32), scale, bias if has_bias else None,
                   out_dtype)


def _run_launch(copies, wmat, scale, bias, *, taps: _Taps, m_pad, out_dtype,
                config: Int8ConvConfig, launcher, has_bias, k_chunks):
  """One kernel launch: (m_pad, Op) of ``out_dtype``.

  ``launcher``: "mosaic_gpu" (the compiled kernel), a
  ``plgpu.InterpretGPUParams`` (the same kernel in interpret mode) or "xla"
  (:func:`_run_launch_xla`, tests of the decomposition only).
  """
  if isinstance(launcher, str) and launcher == "xla":
    return _run_launch_xla(copies, wmat, scale, bias, taps=taps, m_pad=m_pad,
                           out_dtype=out_dtype, has_bias=has_bias,
                           k_chunks=k_chunks, tile_k=config.tile_k)
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if not (isinstance(launcher, plgpu.InterpretGPUParams) or
          launcher == "mosaic_gpu"):
    raise ValueError(f"unknown {launcher=}")

  op = wmat.shape[0]
  depth = min(config.max_concurrent_steps, len(taps.offsets) * k_chunks)
  kernel = plgpu.kernel(
      functools.partial(_conv_kernel, taps=taps, config=config,
                        k_chunks=k_chunks, has_bias=has_bias,
                        int_out=out_dtype == jnp.int32),
      out_type=jax.ShapeDtypeStruct((m_pad, op), out_dtype),
      scratch_types=_ring_scratch(config, depth) + [
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.Barrier(num_barriers=2),
          plgpu.SMEM((config.tile_m, config.tile_n), out_dtype,
                     transforms=_out_transforms(config.tile_n, out_dtype)),
      ],
      grid=(m_pad // config.tile_m, op // config.tile_n),
      grid_names=("m", "n"),
      interpret=None if launcher == "mosaic_gpu" else launcher,
      kernel_name="int8_conv",
  )
  return kernel(*copies, wmat, scale, bias)


def _grid_to_image(out, plan: _Plan, valid, channels):
  """(m_pad, Op) grid rows -> (N, rows, cols, channels) valid region."""
  rows, cols = valid
  img = out[:plan.grid_rows].reshape(plan.n, plan.hg, plan.wg, out.shape[1])
  return img[:, :rows, :cols, :channels]


def _vectors(scale, bias, size, padded):
  ones = jnp.ones((size,), jnp.float32)
  scale = ones if scale is None else scale
  bias = jnp.zeros((size,), jnp.float32) if bias is None else bias
  pad = lambda v: lax.pad(v, jnp.float32(0), ((0, padded - size, 0),))
  return pad(scale), pad(bias)


@functools.partial(jax.jit, static_argnames=(
    "strides", "pads", "out_dtype", "config", "launcher"))
def _int8_conv_impl(x, w, scale, bias, *, strides, pads, out_dtype, config,
                    launcher):
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  cp = _round_up(max(c, 1), config.tile_k)
  op = _round_up(o, config.tile_n)
  plan, phases = _forward_plan(n, h, wd, c, kh, kw, o, strides, pads,
                               config.tile_m, cp, op,
                               jnp.dtype(out_dtype).itemsize)
  flat = _forward_source(x, plan, phases, strides, pads, cp)
  copies = _shifted_copies(flat, plan)
  taps = plan.launches[0]
  wmat = _weight_matrix(jnp.transpose(w, (0, 1, 3, 2)), taps, op, cp)
  scale_p, bias_p = _vectors(scale, bias, o, op)
  out = _run_launch(copies, wmat, scale_p, bias_p, taps=taps, m_pad=plan.m_pad,
                    out_dtype=out_dtype, config=config, launcher=launcher,
                    has_bias=bias is not None, k_chunks=cp // config.tile_k)
  return _grid_to_image(out, plan, plan.valid[0], o)


def _launcher(interpret):
  """The static launcher for an ``interpret=`` argument (False, True or a
  ``plgpu.InterpretGPUParams``)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else "mosaic_gpu"


def _empty_or_zero_k(shape, scale, bias, out_dtype):
  """Result of a conv with no products: epilogue(0) (or empty)."""
  acc = jnp.zeros(shape, jnp.float32)
  if out_dtype == jnp.int32:
    return jnp.zeros(shape, jnp.int32)
  return _epilogue(acc, scale, bias, out_dtype)


def int8_conv(x, w, *, window_strides=(1, 1), padding="VALID", scale=None,
              bias=None, out_dtype=jnp.float32,
              config: Int8ConvConfig | None = None, interpret: bool = False):
  """Implicit-GEMM int8 conv ``(conv(x, w) * scale + bias)`` (Hopper).

  Runs a Mosaic GPU (sm_90a) kernel: per-tap shifted TMA windows of the
  padded int8 input, one int32 ``wgmma`` accumulator over all taps and input
  channels, and a fused epilogue; no patch matrix in memory. See the module
  docstring for the decomposition (phases for strides > 1, aligned shifted
  copies) and its byte counts.

  Args:
    x: (N, H, W, C) int8, NHWC.
    w: (KH, KW, C, O) int8, HWIO.
    window_strides: (sh, sw), positive ints.
    padding: "SAME", "VALID", "SAME_LOWER" or ((lo_h, hi_h), (lo_w, hi_w))
      (ints; negative crops), as in ``lax.conv_general_dilated``.
    scale: None (= 1), a scalar, or (O,) float -- per-output-channel
      dequantization scale (e.g. ``s_x * s_w``).
    bias: None or (O,) float (a scalar is broadcast), added after scaling.
    out_dtype: float32, bfloat16, or int32 (the exact accumulator; scale and
      bias must be None).
    config: tiling (:class:`Int8ConvConfig`); ``select_conv_config(C, O)`` if
      None.
    interpret: True runs the kernel under ``plgpu.InterpretGPUParams()``
      (CPU, bit-exact, slow; for tests); an ``InterpretGPUParams`` instance
      is used as given (e.g. ``detect_races=True``).

  Returns:
    (N, Ho, Wo, O) of ``out_dtype``, bit-equal to
    :func:`int8_conv_reference` with the same arguments.

  Raises:
    ValueError / TypeError naming the offending argument and value, and
    ValueError when KH*KW*C > INT32_SAFE_K (int32 overflow possible).
  """
  strides, pads = _check_conv_args(x, w, window_strides, padding)
  scale, bias, out_dtype = _check_epilogue_args(scale, bias, out_dtype,
                                                w.shape[3], "O")
  kh, kw, c, o = w.shape
  _check_contraction(kh * kw * c, "this conv")
  if config is None:
    config = select_conv_config(c, o)
  launcher = _launcher(interpret)
  _check_config(config, out_dtype, launcher != "mosaic_gpu")
  out_shape = conv_output_shape(x.shape, w.shape, strides, pads)
  if min(out_shape) == 0 or c == 0:
    return _empty_or_zero_k(out_shape, scale, bias, out_dtype)
  return _int8_conv_impl(x, w, scale, bias, strides=strides, pads=pads,
                         out_dtype=out_dtype, config=config, launcher=launcher)


# ----------------------------------------------------------------------------
# Input gradient.
# ----------------------------------------------------------------------------


def _interleave(parts, shape, strides, dtype):
  """dx (N, H, W, C) from its phases: parts[(i0_h, i0_w)] = dx[:, i0_h::sh,
  i0_w::sw] (every phase present)."""
  n, h, w, c = shape
  sh, sw = strides
  hc, wc = -(-h // sh), -(-w // sw)
  rows = []
  for i0_h in range(sh):
    cols = []
    for i0_w in range(sw):
      part = parts[(i0_h, i0_w)]
      part = lax.pad(part, jnp.zeros((), dtype),
                     ((0, 0, 0), (0, hc - part.shape[1], 0),
                      (0, wc - part.shape[2], 0), (0, 0, 0)))
      cols.append(part)
    rows.append(jnp.stack(cols, axis=3))  # (N, hc, wc, sw, C)
  full = jnp.stack(rows, axis=2)          # (N, hc, sh, wc, sw, C)
  return full.reshape(n, hc * sh, wc * sw, c)[:, :h, :w]


@functools.partial(jax.jit, static_argnames=(
    "input_shape", "strides", "pads", "out_dtype", "config", "launcher"))
def _int8_conv_dgrad_impl(g, w, scale, bias, *, input_shape, strides, pads,
                          out_dtype, config, launcher):
  n, h, wd, c = input_shape
  kh, kw, _, o = w.shape
  kp = _round_up(max(o, 1), config.tile_k)   # contracted: g's channels
  np_ = _round_up(c, config.tile_n)          # produced: dx's channels
  plan, where, g_pads, zero = _dgrad_plan(
      input_shape, w.shape, strides, pads, config.tile_m, kp, np_,
      jnp.dtype(out_dtype).itemsize)
  gp = lax.pad(g, jnp.int8(0), ((0, 0, 0), (*g_pads[0], 0), (*g_pads[1], 0),
                                (0, kp - o, 0)))
  copies = _shifted_copies(gp.reshape(plan.src_len, kp), plan)
  scale_p, bias_p = _vectors(scale, bias, c, np_)
  parts = {}
  for taps, valid, (i0, _) in zip(plan.launches, plan.valid, where):
    wmat = _weight_matrix(w, taps, np_, kp)  # blocks w[kh, kw]: (C, O)
    out = _run_launch(
        copies, wmat, scale_p, bias_p, taps=taps, m_pad=plan.m_pad,
        out_dtype=out_dtype, config=config, launcher=launcher,
        has_bias=bias is not None, k_chunks=kp // config.tile_k)
    parts[i0] = _grid_to_image(out, plan, valid, c)
  for i0, (q_h, q_w) in zero:
    parts[i0] = _empty_or_zero_k((n, q_h, q_w, c), scale, bias, out_dtype)
  if strides == (1, 1):
    return parts[(0, 0)]
  for i0_h in range(strides[0]):  # phases without output pixels (H < s)
    for i0_w in range(strides[1]):
      parts.setdefault((i0_h, i0_w), jnp.zeros((n, 0, 0, c), out_dtype))
  return _interleave(parts, input_shape, strides, out_dtype)


def int8_conv_dgrad(g, w, *, input_shape, window_strides=(1, 1),
                    padding="VALID", scale=None, bias=None,
                    out_dtype=jnp.float32,
                    config: Int8ConvConfig | None = None,
                    interpret: bool = False):
  """Input gradient of :func:`int8_conv`, implicit GEMM (Hopper).

  ``dx[n, i, j, c] = sum_{kh, kw, o} g[n, h, w, o] * w[kh, kw, c, o]`` over
  ``sh*h + kh = i + lo_h``, ``sw*w + kw = j + lo_w``, then
  ``float32(dx) * scale[c] + bias[c]`` cast to ``out_dtype`` (int32: raw).
  Sub-pixel decomposition into one stride-1 launch per output phase over a
  shared padded g (module docstring); stride 1 is a single launch.

  Args:
    g: (N, Ho, Wo, O) int8 -- the (quantized) gradient of the conv output;
      must have the forward output's shape.
    w: (KH, KW, C, O) int8, HWIO -- the forward kernel, unflipped.
    input_shape: (N, H, W, C) of the forward input.
    window_strides, padding: the forward conv's.
    scale: None, a scalar or (C,) float; bias: None or (C,) float.
    out_dtype: float32, bfloat16 or int32.
    config: tiling; ``select_conv_config(O, C)`` if None.
    interpret: as for :func:`int8_conv`.

  Returns:
    (N, H, W, C) of ``out_dtype``, bit-equal to
    :func:`int8_conv_dgrad_reference`.
  """
  input_shape, strides, pads = _check_dgrad_args(g, w, input_shape,
                                                 window_strides, padding)
  scale, bias, out_dtype = _check_epilogue_args(scale, bias, out_dtype,
                                                w.shape[2], "C")
  kh, kw, c, o = w.shape
  _check_contraction(kh * kw * o, "this dgrad")
  if config is None:
    config = select_conv_config(o, c)
  launcher = _launcher(interpret)
  _check_config(config, out_dtype, launcher != "mosaic_gpu")
  if min(input_shape) == 0 or min(g.shape) == 0:
    return _empty_or_zero_k(input_shape, scale, bias, out_dtype)
  return _int8_conv_dgrad_impl(g, w, scale, bias, input_shape=input_shape,
                               strides=strides, pads=pads, out_dtype=out_dtype,
                               config=config, launcher=launcher)


# ----------------------------------------------------------------------------
# Weight gradient.
# ----------------------------------------------------------------------------

# Parts of at most INT32_SAFE_K products each, combined exactly: the halves'
# sums stay exact in float32 for up to 256 parts.
_MAX_PARTS = 256
# Thread blocks the split-K grid aims for (2 per SM of an H100/H200).
_TARGET_BLOCKS = 264


def _int32_halves(parts, axis=0):
  """The exact sum of int32 partial sums along ``axis`` as two int32 arrays:
  the sums of the signed high halves (``>> 16``) and of the unsigned low
  halves (``& 0xffff``); the integer is ``hi * 65536 + lo``."""
  hi = jnp.sum(jnp.right_shift(parts, 16), axis=axis, dtype=jnp.int32)
  lo = jnp.sum(jnp.bitwise_and(parts, 0xFFFF), axis=axis, dtype=jnp.int32)
  return hi, lo


def _join_halves(hi, lo):
  return hi.astype(jnp.float32) * 65536.0 + lo.astype(jnp.float32)


def _combine_int32_parts(parts, axis=0):
  """Sum int32 partial sums along ``axis`` into float32 with one rounding.

  The signed high halves (``>> 16``) and unsigned low halves (``& 0xffff``)
  are summed in int32 and joined in float32 (``hi * 65536`` is exact), so
  the result is the exact integer sum rounded once -- whatever the split
  into parts (<= 256 of them). The same formula as int8jax's
  ``combine_int32_chunks``.
  """
  return _join_halves(*_int32_halves(parts, axis))


def _check_wgrad_args(x, g, kernel_shape, window_strides, padding):
  _check_int8("x", x, 4, "NHWC (N, H, W, C)")
  _check_int8("g", g, 4, "NHWC (N, Ho, Wo, O)")
  kernel_shape = _check_shape("kernel_shape", kernel_shape, "(KH, KW, C, O)")
  kh, kw, c, o = kernel_shape
  if kh < 1 or kw < 1 or c != x.shape[3]:
    raise ValueError(f"kernel_shape (KH, KW, C, O) must have a non-empty "
                     f"window and x's C, got {kernel_shape=}, "
                     f"x.shape={x.shape}")
  strides = _check_strides(window_strides)
  pads = _check_padding(padding, x.shape[1:3], (kh, kw), strides)
  want = conv_output_shape(x.shape, kernel_shape, strides, pads)
  if tuple(g.shape) != want:
    raise ValueError(
        f"g must have the forward output's shape {want} (from x.shape="
        f"{x.shape}, {kernel_shape=}, window_strides={strides}, padding="
        f"{pads}), got g.shape={g.shape}")
  return kernel_shape, strides, pads


def _wgrad_epilogue(dw_f32, scale, out_dtype):
  out = dw_f32 if scale is None else dw_f32 * scale
  return out.astype(out_dtype)


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
      taps.append(_combine_int32_parts(jnp.stack(parts)))
  dw = jnp.stack(taps).reshape(kh, kw, c, o)
  return _wgrad_epilogue(dw, scale, out_dtype)


def _check_wgrad_epilogue(scale, out_dtype, o):
  try:
    out_dtype = jnp.dtype(out_dtype)
  except TypeError:
    out_dtype = None
  if out_dtype not in _OUT_DTYPES[:2]:
    raise TypeError("out_dtype must be float32 or bfloat16 (weight-gradient "
                    f"sums exceed int32), got {out_dtype}")
  return _check_vector("scale", scale, o, "O"), out_dtype


def _check_wgrad_pixels(pixels):
  if pixels > _MAX_PARTS * INT32_SAFE_K:
    raise ValueError(
        f"the weight gradient sums over N*Ho*Wo={pixels} pixels, more than "
        f"{_MAX_PARTS} * INT32_SAFE_K = {_MAX_PARTS * INT32_SAFE_K} (the exact "
        "int32-parts combination); split the batch and add the results")


def int8_conv_wgrad_reference(x, g, *, kernel_shape, window_strides=(1, 1),
                              padding="VALID", scale=None,
                              out_dtype=jnp.float32):
  """Exact XLA reference for :func:`int8_conv_wgrad` (same bits).

  Per tap, the strided window of the padded x (explicit slices) contracted
  with g over the pixels by ``lax.dot_general(..., preferred_element_type=
  jnp.int32)`` in chunks of INT32_SAFE_K pixels, the int32 chunks combined
  exactly (:func:`_combine_int32_parts`: one rounding to float32), then
  ``* scale`` and the cast.
  """
  kernel_shape, strides, pads = _check_wgrad_args(x, g, kernel_shape,
                                                  window_strides, padding)
  scale, out_dtype = _check_wgrad_epilogue(scale, out_dtype, kernel_shape[3])
  _check_wgrad_pixels(int(np.prod(g.shape[:3])))
  if min(g.shape) == 0 or x.shape[3] == 0:
    return _wgrad_epilogue(jnp.zeros(kernel_shape, jnp.float32), scale,
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
  parts = min(parts, _MAX_PARTS, max(-(-grid_rows // tile_k), 1))
  part_len = _round_up(-(-grid_rows // parts), tile_k)
  part_len = min(part_len, INT32_SAFE_K // tile_k * tile_k)
  parts = -(-grid_rows // part_len)
  if parts > _MAX_PARTS:
    raise ValueError(f"wgrad needs {parts} parts of {part_len} pixels, more "
                     f"than {_MAX_PARTS}")
  return _WgradSplit(parts=parts, part_len=part_len)


def _wgrad_kernel(*refs, taps: _Taps, config: Int8ConvConfig,
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
  offq = _select(tap, taps.tap_offq)
  num_steps = split.part_len // tile_k
  depth = min(config.max_concurrent_steps, num_steps)
  a_rows = pl.ds(m_idx * tile_m, tile_m)
  b_rows = pl.ds(n_idx * tile_n, tile_n)

  def issue(step, slot):
    k_step = part * num_steps + step
    # Pixel columns: align-aligned by construction (align * (...)).
    col = (k_step * (tile_k // align) + offq) * align
    _copy_from_tap_source(srcs, taps, tap, (a_rows, pl.ds(col, tile_k)),
                          a_smem.at[slot], barriers.at[slot])
    plgpu.copy_gmem_to_smem(gt_gmem.at[b_rows, pl.ds(k_step * tile_k, tile_k)],
                            b_smem.at[slot], barriers.at[slot])

  acc = _pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem,
                              barriers, (tile_m, tile_n))
  out_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[ks_idx, a_rows, b_rows])
  plgpu.wait_smem_to_gmem(0)


def _run_wgrad_launch(copies_t, gt, *, taps: _Taps, split: _WgradSplit,
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
      scratch_types=_ring_scratch(config, depth) + [
          plgpu.SMEM((config.tile_m, config.tile_n), jnp.int32,
                     transforms=_out_transforms(config.tile_n, jnp.int32)),
      ],
      grid=(n_taps * split.parts, cp // config.tile_m, op // config.tile_n),
      grid_names=("ks", "m", "n"),
      interpret=None if launcher == "mosaic_gpu" else launcher,
      kernel_name="int8_conv_wgrad",
  )
  return kernel(*copies_t, gt)


@functools.lru_cache(maxsize=None)
def _wgrad_plan(x_shape, kernel_shape, strides, pads, config):
  n, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  cp = _round_up(c, config.tile_m)
  op = _round_up(o, config.tile_n)
  # The forward plan's phases, flattening and taps, with the copies aligned
  # to the swizzle width along the pixels (the K of this GEMM); the cost
  # model sees the pixels as rows of one byte per (C + O) channel.
  plan, phases = _forward_plan(n, h, w, c, kh, kw, o, strides, pads,
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
  plan, phases, split, cp, op = _wgrad_plan(x.shape, kernel_shape, strides,
                                            pads, config)
  taps = plan.launches[0]
  flat = _forward_source(x, plan, phases, strides, pads, cp)
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
  hi, lo = _int32_halves(parts.reshape(len(taps.offsets), split.parts, cp, op), axis=1)
  order = sorted(range(len(taps.weights)),
                 key=lambda t: taps.weights[t][0] * kw + taps.weights[t][1])
  hi, lo = (jnp.stack([v[t, :c, :o] for t in order]).reshape(kh, kw, c, o) for v in (hi, lo))
  if halves:
    return hi, lo
  return _wgrad_epilogue(_join_halves(hi, lo), scale, out_dtype)


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


def _wgrad_setup(x, g, kernel_shape, window_strides, padding, config, interpret):
  """Checked arguments of a weight-gradient call: ``(kernel_shape, strides,
  pads, config, launcher, empty)``; ``empty``: the result is all zeros."""
  kernel_shape, strides, pads = _check_wgrad_args(x, g, kernel_shape, window_strides, padding)
  _check_wgrad_pixels(int(np.prod(g.shape[:3])))
  if config is None:
    config = select_wgrad_config(kernel_shape[2], kernel_shape[3])
  launcher = _launcher(interpret)
  _check_config(config, jnp.int32, launcher != "mosaic_gpu")
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
  combined exactly (:func:`_combine_int32_parts`, hi/lo 16-bit halves), so
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
  scale, out_dtype = _check_wgrad_epilogue(scale, out_dtype, kernel_shape[3])
  if empty:
    return _wgrad_epilogue(jnp.zeros(kernel_shape, jnp.float32), scale,
                           out_dtype)
  return _int8_conv_wgrad_impl(x, g, scale, kernel_shape=kernel_shape,
                               strides=strides, pads=pads, out_dtype=out_dtype,
                               config=config, launcher=launcher)
