"""Input gradient of the INT8 conv, implicit GEMM: :func:`int8_conv_dgrad`.

``dx[n, i, j, c] = sum g[n, h, w, o] * w[kh, kw, c, o]`` over
``s*h + kh = i + lo``. Sub-pixel decomposition: for each output phase
rho = (i + lo) mod s, only taps k = rho + s*m contribute and
``dx[s*q + rho - lo] = sum_m g[q - m] * w[rho + s*m]`` -- a stride-1
correlation of g with the flipped sub-kernel. All s*s phases read one shared
padded, flattened g (its shifted copies are built once, as in
:mod:`pallas_kernels.conv_common`); each phase is one launch of the forward's
row-window kernel (:func:`pallas_kernels.conv_forward.run_launch`) with its
own taps (weight blocks ``w[kh, kw]`` of shape (C, O), already K-major), and
an XLA interleave assembles dx (stride 1: one phase, no interleave; it is
exactly the stride-1 conv of g with the flipped, channel-swapped kernel).
Phases without taps (1x1 stride 2: the odd pixels) are ``epilogue(0)``. No
MAC is spent on the zeros a transposed conv of a zero-dilated g would
multiply. K = taps * O products per output in one int32 accumulator
(refused above INT32_SAFE_K); the epilogue is per input channel C.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels._common import round_up
from pallas_kernels.conv_common import Int8ConvConfig
from pallas_kernels.conv_common import Plan
from pallas_kernels.conv_common import Taps
from pallas_kernels.conv_common import assign_copies
from pallas_kernels.conv_common import config_and_launcher
from pallas_kernels.conv_common import check_contraction
from pallas_kernels.conv_common import check_epilogue_args
from pallas_kernels.conv_common import check_int8
from pallas_kernels.conv_common import check_padding
from pallas_kernels.conv_common import check_shape
from pallas_kernels.conv_common import check_strides
from pallas_kernels.conv_common import conv_output_shape
from pallas_kernels.conv_common import conv_reference_impl
from pallas_kernels.conv_common import empty_or_zero_k
from pallas_kernels.conv_common import output_size
from pallas_kernels.conv_common import pick_pitch
from pallas_kernels.conv_common import select_conv_config
from pallas_kernels.conv_common import shifted_copies
from pallas_kernels.conv_common import weight_matrix
from pallas_kernels.conv_forward import grid_to_image
from pallas_kernels.conv_forward import padded_vectors
from pallas_kernels.conv_forward import run_launch

__all__ = ["int8_conv_dgrad", "int8_conv_dgrad_reference"]


# ----------------------------------------------------------------------------
# Argument checking and reference.
# ----------------------------------------------------------------------------


def _dgrad_pads(size, k, stride, lo, out_size):
  """(lo, hi) padding of the lhs-dilated transposed conv (JAX's rule)."""
  dilated = (out_size - 1) * stride + 1 if out_size > 0 else 0
  pad_lo = k - 1 - lo
  return pad_lo, size + k - 1 - dilated - pad_lo


def check_dgrad_args(g, w, input_shape, window_strides, padding):
  check_int8("g", g, 4, "NHWC (N, Ho, Wo, O)")
  check_int8("w", w, 4, "HWIO (KH, KW, C, O)")
  input_shape = check_shape("input_shape", input_shape,
                            "(N, H, W, C) of the forward input")
  n, h, wd, c = input_shape
  kh, kw, c2, o = w.shape
  if c != c2:
    raise ValueError(f"input_shape (N, H, W, C) and w (KH, KW, C, O) must have "
                     f"the same C, got {input_shape=}, w.shape={w.shape}")
  strides = check_strides(window_strides)
  pads = check_padding(padding, (h, wd), (kh, kw), strides)
  want = conv_output_shape(input_shape, w.shape, strides, pads)
  if tuple(g.shape) != want:
    raise ValueError(
        f"g must have the forward output's shape {want} (from {input_shape=}, "
        f"w.shape={w.shape}, window_strides={strides}, padding={pads}), got "
        f"g.shape={g.shape}")
  return input_shape, strides, pads


def _check_dgrad_call(g, w, input_shape, window_strides, padding, scale, bias,
                      out_dtype):
  """The checked arguments of a dgrad call: ``(input_shape, strides, pads,
  scale, bias, out_dtype)``; K = KH*KW*O must fit one int32 accumulator."""
  input_shape, strides, pads = check_dgrad_args(g, w, input_shape,
                                                 window_strides, padding)
  scale, bias, out_dtype = check_epilogue_args(scale, bias, out_dtype,
                                               w.shape[2], "C")
  kh, kw, _, o = w.shape
  check_contraction(kh * kw * o, "this dgrad")
  return input_shape, strides, pads, scale, bias, out_dtype


def int8_conv_dgrad_reference(g, w, *, input_shape, window_strides=(1, 1),
                              padding="VALID", scale=None, bias=None,
                              out_dtype=jnp.float32):
  """Exact XLA reference for :func:`int8_conv_dgrad` (same bits).

  The transposed conv of JAX's ``conv_general_dilated`` transpose rule: g
  dilated by the strides (``lhs_dilation``), the kernel flipped in space and
  with C and O swapped, int32 accumulation, then the jitted epilogue.
  """
  input_shape, strides, pads, scale, bias, out_dtype = _check_dgrad_call(
      g, w, input_shape, window_strides, padding, scale, bias, out_dtype)
  w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # (KH, KW, O, C)
  t_pads = tuple(
      _dgrad_pads(input_shape[1 + d], w.shape[d], strides[d], pads[d][0],
                  g.shape[1 + d]) for d in range(2))
  return conv_reference_impl(g, w_t, scale, bias, strides=(1, 1), pads=t_pads,
                             lhs_dilation=strides, out_dtype=out_dtype)


# ----------------------------------------------------------------------------
# Plan: sub-pixel phases.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def dgrad_plan(input_shape, kernel_shape, strides, pads, tile_m, kp, np_,
                out_bytes):
  """Sub-pixel phases of dgrad over one shared padded g (module docstring).

  Returns (plan, per launch: (output phase offset (i0_h, i0_w), its size
  (Q_h, Q_w)), padding of g ((lo_h, hi_h), (lo_w, hi_w)), zero phases).
  """
  n, h, w, _ = input_shape
  kh, kw, _, _ = kernel_shape
  sh, sw = strides
  ho = output_size(h, kh, sh, *pads[0])
  wo = output_size(w, kw, sw, *pads[1])

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
        launches.append(Taps(tuple(offsets), tuple(weights)))
        valid.append((q_h, q_w))
        where.append(((i0_h, i0_w), (q_h, q_w)))
    residues = tuple(sorted({o % 8 for t in launches for o in t.offsets}))
    plan = Plan(n=n, hg=hg, wg=wg, src_len=n * hg * wg, residues=residues,
                launches=assign_copies(launches, residues),
                valid=tuple(valid), tile_m=tile_m)
    return plan, tuple(where), tuple(zero)

  taps = max((len(t.offsets) for t in build(lw)[0].launches), default=0)
  macs_per_row = max(taps, 1) * kp * np_
  plans = {}

  def build_plan(wg):
    plans[wg] = build(wg)
    return plans[wg][0]

  plan = pick_pitch(lw, build_plan, macs_per_row, kp, np_ * out_bytes)
  _, where, zero = plans[plan.wg]
  g_pads = ((plo_h, hg - plo_h - ho), (plo_w, plan.wg - plo_w - wo))
  return plan, where, g_pads, zero


# ----------------------------------------------------------------------------
# Launches.
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
  kp = round_up(max(o, 1), config.tile_k)   # contracted: g's channels
  np_ = round_up(c, config.tile_n)          # produced: dx's channels
  plan, where, g_pads, zero = dgrad_plan(
      input_shape, w.shape, strides, pads, config.tile_m, kp, np_,
      jnp.dtype(out_dtype).itemsize)
  gp = lax.pad(g, jnp.int8(0), ((0, 0, 0), (*g_pads[0], 0), (*g_pads[1], 0),
                                (0, kp - o, 0)))
  copies = shifted_copies(gp.reshape(plan.src_len, kp), plan)
  scale_p, bias_p = padded_vectors(scale, bias, c, np_)
  parts = {}
  for taps, valid, (i0, _) in zip(plan.launches, plan.valid, where):
    wmat = weight_matrix(w, taps, np_, kp)  # blocks w[kh, kw]: (C, O)
    out = run_launch(
        copies, wmat, scale_p, bias_p, taps=taps, m_pad=plan.m_pad,
        out_dtype=out_dtype, config=config, launcher=launcher,
        has_bias=bias is not None, k_chunks=kp // config.tile_k)
    parts[i0] = grid_to_image(out, plan, valid, c)
  for i0, (q_h, q_w) in zero:
    parts[i0] = empty_or_zero_k((n, q_h, q_w, c), scale, bias, out_dtype)
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
  input_shape, strides, pads, scale, bias, out_dtype = _check_dgrad_call(
      g, w, input_shape, window_strides, padding, scale, bias, out_dtype)
  _, _, c, o = w.shape
  config, launcher = config_and_launcher(config, select_conv_config(o, c), out_dtype,
                                         interpret)
  if min(input_shape) == 0 or min(g.shape) == 0:
    return empty_or_zero_k(input_shape, scale, bias, out_dtype)
  return _int8_conv_dgrad_impl(g, w, scale, bias, input_shape=input_shape,
                               strides=strides, pads=pads, out_dtype=out_dtype,
                               config=config, launcher=launcher)
