"""Implicit-GEMM INT8 forward conv :func:`int8_conv` (Hopper, Mosaic GPU).

``conv(x, w) * scale + bias`` with x (N, H, W, C) int8 NHWC and w (KH, KW,
C, O) int8 HWIO, no im2col matrix. The wrapper reduces the conv to one
stride-1 "shifted row window" launch (phases, flattening and aligned shifted
copies: :mod:`pallas_kernels.conv_common`); this module holds that launch
and its kernel, which :mod:`pallas_kernels.conv_dgrad` launches too (one
launch per sub-pixel phase).

Kernel (:func:`run_launch`)
---------------------------
Grid (grid_rows / tile_m, Op / tile_n), one warpgroup per block; steps =
taps x (Cp / tile_k); a ``max_concurrent_steps``-deep TMA ring of (tile_m,
tile_k) source and (tile_n, tile_k) weight tiles, one barrier per slot,
``wgmma`` with one group in flight (a slot is refilled one step after its
wgmma was issued). The source tile of a step comes from its tap's shifted
copy at an 8-row-aligned offset; weights are the K-major matrix (Op, taps *
Cp), block t = w[kh_t, kw_t].T. Epilogue: per-column scale and bias loaded
by TMA during the main loop (``Layout.WGMMA.reduce(0)``), ``acc * scale +
bias`` in registers, cast, one SMEM tile, one TMA store; int32 output stores
the accumulator. ``run_launch`` takes a ``launcher``: the compiled kernel
("mosaic_gpu"), the same kernel in interpret mode (a
``plgpu.InterpretGPUParams``), or "xla" (:func:`_run_launch_xla`, the same
arithmetic without tiles, for tests of the plans); a kernel variant with
other addressing fits in as another launcher.

Bytes, 3x3 stride 1, ResNet-50 layer1 (x: 256x56x56x64 int8 = 51.4 MB): each
copy is the padded source 256x58x64x64 = 60.8 MB (1.18x x); three copies
182 MB are written once and read by the kernel (the kh taps of a tile re-read
the same rows from L2). The im2col patch matrix is 9 x 51.4 = 462 MB written
and read. Stride 2 (56x56 -> 28x28): 4 phases of 29x32 = 1.18x x per copy,
2 copies. 1x1 stride 2: the 1/4 subsample (0.25x). Largest int8
intermediate: ~1.2x the input; int8 bytes the kernel reads: 3.6x (3x3
stride 1), 2.4x (3x3 stride 2) -- tests/test_int8_conv_kernels.py checks
both on the traced jaxpr.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels._common import epilogue
from pallas_kernels._common import out_transforms
from pallas_kernels._common import round_up
from pallas_kernels.conv_common import Int8ConvConfig
from pallas_kernels.conv_common import Plan
from pallas_kernels.conv_common import Taps
from pallas_kernels.conv_common import config_and_launcher
from pallas_kernels.conv_common import check_contraction
from pallas_kernels.conv_common import check_epilogue_args
from pallas_kernels.conv_common import check_int8
from pallas_kernels.conv_common import check_padding
from pallas_kernels.conv_common import check_strides
from pallas_kernels.conv_common import conv_output_shape
from pallas_kernels.conv_common import conv_reference_impl
from pallas_kernels.conv_common import copy_from_tap_source
from pallas_kernels.conv_common import empty_or_zero_k
from pallas_kernels.conv_common import forward_plan
from pallas_kernels.conv_common import forward_source
from pallas_kernels.conv_common import pipelined_accumulate
from pallas_kernels.conv_common import ring_scratch
from pallas_kernels.conv_common import select_conv_config
from pallas_kernels.conv_common import shifted_copies
from pallas_kernels.conv_common import static_lookup
from pallas_kernels.conv_common import weight_matrix

__all__ = ["int8_conv", "int8_conv_reference"]


# ----------------------------------------------------------------------------
# Argument checking and reference.
# ----------------------------------------------------------------------------


def check_conv_args(x, w, window_strides, padding):
  check_int8("x", x, 4, "NHWC (N, H, W, C)")
  check_int8("w", w, 4, "HWIO (KH, KW, C, O)")
  n, h, wd, c = x.shape
  kh, kw, c2, o = w.shape
  if c != c2:
    raise ValueError(
        "x (N, H, W, C) and w (KH, KW, C, O) must have the same C "
        f"(ungrouped conv), got x.shape={x.shape}, w.shape={w.shape}")
  if kh < 1 or kw < 1:
    raise ValueError(f"w must have a non-empty window, got w.shape={w.shape}")
  strides = check_strides(window_strides)
  pads = check_padding(padding, (h, wd), (kh, kw), strides)
  return strides, pads


def _check_conv_call(x, w, window_strides, padding, scale, bias, out_dtype):
  """The checked arguments of a forward call: ``(strides, pads, scale,
  bias, out_dtype)``; K = KH*KW*C must fit one int32 accumulator."""
  strides, pads = check_conv_args(x, w, window_strides, padding)
  scale, bias, out_dtype = check_epilogue_args(scale, bias, out_dtype,
                                               w.shape[3], "O")
  kh, kw, c, _ = w.shape
  check_contraction(kh * kw * c, "this conv")
  return strides, pads, scale, bias, out_dtype


def int8_conv_reference(x, w, *, window_strides=(1, 1), padding="VALID",
                        scale=None, bias=None, out_dtype=jnp.float32):
  """Exact XLA reference for :func:`int8_conv` (same arguments, same bits).

  ``lax.conv_general_dilated(x, w, ..., preferred_element_type=jnp.int32)``
  (NHWC x HWIO -> NHWC), then ``float32(acc) * scale + bias`` cast to
  ``out_dtype``, jitted like the kernel's epilogue so both round alike.
  """
  strides, pads, scale, bias, out_dtype = _check_conv_call(
      x, w, window_strides, padding, scale, bias, out_dtype)
  return conv_reference_impl(x, w, scale, bias, strides=strides, pads=pads,
                             lhs_dilation=(1, 1), out_dtype=out_dtype)


# ----------------------------------------------------------------------------
# The row-window kernel (forward and dgrad launches).
# ----------------------------------------------------------------------------


def _conv_kernel(*refs, taps: Taps, config: Int8ConvConfig, k_chunks: int,
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
    row = (m_idx * (tile_m // 8) + static_lookup(tap, taps.tap_offq)) * 8
    copy_from_tap_source(srcs, taps, tap, (pl.ds(row, tile_m),
                                            pl.ds(chunk * tile_k, tile_k)),
                          a_smem.at[slot], barriers.at[slot])
    plgpu.copy_gmem_to_smem(w_gmem.at[n_slice, pl.ds(step * tile_k, tile_k)],
                            b_smem.at[slot], barriers.at[slot])

  acc = pipelined_accumulate(issue, num_steps, depth, a_smem, b_smem,
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


def _run_launch_xla(copies, wmat, scale, bias, *, taps: Taps, m_pad,
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
  return epilogue(acc.astype(jnp.float32), scale, bias if has_bias else None,
                  out_dtype)


def run_launch(copies, wmat, scale, bias, *, taps: Taps, m_pad, out_dtype,
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
      scratch_types=ring_scratch(config, depth) + [
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.Barrier(num_barriers=2),
          plgpu.SMEM((config.tile_m, config.tile_n), out_dtype,
                     transforms=out_transforms(config.tile_n, out_dtype)),
      ],
      grid=(m_pad // config.tile_m, op // config.tile_n),
      grid_names=("m", "n"),
      interpret=None if launcher == "mosaic_gpu" else launcher,
      kernel_name="int8_conv",
  )
  return kernel(*copies, wmat, scale, bias)


def grid_to_image(out, plan: Plan, valid, channels):
  """(m_pad, Op) grid rows -> (N, rows, cols, channels) valid region."""
  rows, cols = valid
  img = out[:plan.grid_rows].reshape(plan.n, plan.hg, plan.wg, out.shape[1])
  return img[:, :rows, :cols, :channels]


def padded_vectors(scale, bias, size, padded):
  ones = jnp.ones((size,), jnp.float32)
  scale = ones if scale is None else scale
  bias = jnp.zeros((size,), jnp.float32) if bias is None else bias
  pad = lambda v: lax.pad(v, jnp.float32(0), ((0, padded - size, 0),))
  return pad(scale), pad(bias)


# ----------------------------------------------------------------------------
# Forward conv.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "strides", "pads", "out_dtype", "config", "launcher"))
def _int8_conv_impl(x, w, scale, bias, *, strides, pads, out_dtype, config,
                    launcher):
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  cp = round_up(max(c, 1), config.tile_k)
  op = round_up(o, config.tile_n)
  plan, phases = forward_plan(n, h, wd, c, kh, kw, o, strides, pads,
                              config.tile_m, cp, op,
                              jnp.dtype(out_dtype).itemsize)
  flat = forward_source(x, plan, phases, strides, pads, cp)
  copies = shifted_copies(flat, plan)
  taps = plan.launches[0]
  wmat = weight_matrix(jnp.transpose(w, (0, 1, 3, 2)), taps, op, cp)
  scale_p, bias_p = padded_vectors(scale, bias, o, op)
  out = run_launch(copies, wmat, scale_p, bias_p, taps=taps, m_pad=plan.m_pad,
                   out_dtype=out_dtype, config=config, launcher=launcher,
                   has_bias=bias is not None, k_chunks=cp // config.tile_k)
  return grid_to_image(out, plan, plan.valid[0], o)


def int8_conv(x, w, *, window_strides=(1, 1), padding="VALID", scale=None,
              bias=None, out_dtype=jnp.float32,
              config: Int8ConvConfig | None = None, interpret: bool = False):
  """Implicit-GEMM int8 conv ``(conv(x, w) * scale + bias)`` (Hopper).

  Runs a Mosaic GPU (sm_90a) kernel: per-tap shifted TMA windows of the
  padded int8 input, one int32 ``wgmma`` accumulator over all taps and input
  channels, and a fused epilogue; no patch matrix in memory. The
  decomposition (phases for strides > 1, aligned shifted copies) is in
  :mod:`pallas_kernels.conv_common`'s docstring, the byte counts in this
  module's.

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
  strides, pads, scale, bias, out_dtype = _check_conv_call(
      x, w, window_strides, padding, scale, bias, out_dtype)
  _, _, c, o = w.shape
  config, launcher = config_and_launcher(config, select_conv_config(c, o), out_dtype,
                                         interpret)
  out_shape = conv_output_shape(x.shape, w.shape, strides, pads)
  if min(out_shape) == 0 or c == 0:
    return empty_or_zero_k(out_shape, scale, bias, out_dtype)
  return _int8_conv_impl(x, w, scale, bias, strides=strides, pads=pads,
                         out_dtype=out_dtype, config=config, launcher=launcher)
