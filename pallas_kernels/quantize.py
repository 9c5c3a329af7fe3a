"""Fused float -> int8 quantization that writes GEMM operands K-major.

UI8 (Zhu et al., CVPR 2020, §3.1) quantizes symmetrically and linearly:

  nearest:     q = clamp(round(x * (1 / scale)), -127, 127)    (x, w)
  stochastic:  q = clamp(floor(x * (1 / scale) + u), -127, 127), (gradients)
               u ~ U[0, 1) i.i.d.

``round`` is round-half-to-even (``jnp.round``); -128 is never produced so the
grid stays symmetric. The int8 GEMM (:mod:`pallas_kernels.int8_matmul`) wants
both operands K-major, so this pass can write ``x.T`` directly
(``transpose=True``) instead of materialising a float transpose first.

The random numbers for stochastic rounding are drawn with
``jax.random.uniform(key, x.shape, jnp.float32)`` outside the kernel and read
by it, so a key gives the same bits in the kernel, in the reference and on any
backend.

Not used by int8jax's ops, on purpose: there the quantization of an
activation or gradient is elementwise work that XLA fuses into the fusion
that *produces* the tensor (BatchNorm-apply + ReLU forward, the BN/ReLU
backward), so the int8 operand is written once and the float tensor is not
read again; a separate kernel would add that pass back. This kernel stays as
a standalone building block (layer 1 of the library, usable without the
ops) for callers that start from a float tensor in memory.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

__all__ = ["quantize_kmajor", "quantize_kmajor_reference", "QMAX"]

QMAX = 127
_ROUNDINGS = ("nearest", "stochastic")

# Block of x handled by one thread block (one warpgroup). 64 x 128 float32 is
# 32 KiB of SMEM in, 8 KiB out.
_TILE_R = 64
_TILE_C = 128


def _check_args(x, scale, rounding, key):
  x_dtype = getattr(x, "dtype", None)
  if x_dtype is None or not jnp.issubdtype(x_dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array, got dtype {x_dtype}")
  if np.ndim(x) != 2:
    raise ValueError(f"x must be 2-D, got x.shape={tuple(np.shape(x))}")
  if np.shape(scale) != ():
    raise ValueError(
        f"scale must be a scalar (per-tensor), got shape {np.shape(scale)}")
  if rounding not in _ROUNDINGS:
    raise ValueError(f"{rounding=} must be one of {_ROUNDINGS}")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key, got key=None")


def _noise(key, shape):
  """U[0, 1) float32 noise of ``shape`` (the (R, C) shape of x)."""
  return jax.random.uniform(key, shape, jnp.float32)


def _inverse(scale):
  """``1 / scale`` in float32, computed once by XLA for kernel and reference."""
  return jnp.float32(1.0) / jnp.asarray(scale, jnp.float32)


def _quantize_values(x, inv, u, out_dtype=jnp.int8):
  """The quantizer on float32 values; shared by kernel body and reference.

  ``x * inv`` with ``inv = 1 / scale`` (see :func:`_inverse`): a correctly
  rounded multiply on every device. ``x / scale`` in the kernel differed from
  XLA:GPU's division in one byte of 700,000 on an H200 (2026-11-26).
  """
  y = x * inv
  if u is None:
    y = jnp.round(y)
  else:
    y = y + u
  y = jnp.clip(y, -QMAX, QMAX)
  if u is not None:
    # floor(y) for y in [-127, 127], written without floor_p (Mosaic GPU has
    # no lowering for it): truncate, then step down where truncation rounded
    # a negative non-integer up. Bit-identical to jnp.floor on this range.
    t = y.astype(jnp.int32)
    q = jnp.where(t.astype(jnp.float32) > y, t - 1, t)
  else:
    q = y.astype(jnp.int32)
  return q.astype(out_dtype)


def quantize_kmajor_reference(x, scale, *, rounding: str = "nearest",
                              key=None, transpose: bool = False):
  """jnp reference of :func:`quantize_kmajor` (same arguments, same bits)."""
  _check_args(x, scale, rounding, key)
  u = _noise(key, x.shape) if rounding == "stochastic" else None
  return _reference_impl(x, _inverse(scale), u, transpose=bool(transpose))


@functools.partial(jax.jit, static_argnames=("transpose",))
def _reference_impl(x, inv, u, *, transpose):
  y = x.astype(jnp.float32) * inv
  if u is None:
    y = jnp.round(y)
  else:
    y = jnp.floor(y + u)
  q = jnp.clip(y, -QMAX, QMAX).astype(jnp.int8)
  return q.T if transpose else q


def _quantize_kernel(inv_gmem, x_gmem, *rest, stochastic: bool,
                     transpose: bool):
  """One (_TILE_R, _TILE_C) block of x per thread block.

  GMEM refs: inv = 1/scale (1,) f32, x (R_pad, C_pad) f32, [u (R_pad, C_pad) f32],
  out (R_pad, C_pad) or (C_pad, R_pad) int8. SMEM scratch: x (and u) blocks,
  the int8 out block, one TMA barrier per input.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if stochastic:
    u_gmem, out_gmem, x_smem, u_smem, out_smem, barriers = rest
  else:
    out_gmem, x_smem, out_smem, barriers = rest
    u_gmem = u_smem = None
  r_slice = pl.ds(lax.axis_index("r") * _TILE_R, _TILE_R)
  c_slice = pl.ds(lax.axis_index("c") * _TILE_C, _TILE_C)
  plgpu.copy_gmem_to_smem(x_gmem.at[r_slice, c_slice], x_smem, barriers.at[0])
  if stochastic:
    plgpu.copy_gmem_to_smem(u_gmem.at[r_slice, c_slice], u_smem,
                            barriers.at[1])
  inv = inv_gmem[0]
  plgpu.barrier_wait(barriers.at[0])
  if stochastic:
    plgpu.barrier_wait(barriers.at[1])
  if transpose:
    # Read the block through a transposed view. WGMMA_TRANSPOSED keeps each
    # thread's vector along the view's dim 0, which is contiguous in x_smem;
    # the 32-bit codes are then shuffled into the WGMMA layout, whose vectors
    # run along the rows of the (tile_c, tile_r) output block.
    transposed = plgpu.Layout.WGMMA_TRANSPOSED
    x = plgpu.load(x_smem.T, layout=transposed)
    u = plgpu.load(u_smem.T, layout=transposed) if stochastic else None
    q32 = _quantize_values(x, inv, u, out_dtype=jnp.int32)
    q = plgpu.layout_cast(q32, plgpu.Layout.WGMMA).astype(jnp.int8)
  else:
    x = x_smem[...]
    u = u_smem[...] if stochastic else None
    q = _quantize_values(x, inv, u)
  out_smem[...] = q
  plgpu.commit_smem()
  if transpose:
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[c_slice, r_slice])
  else:
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[r_slice, c_slice])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("transpose", "interpret"))
def _quantize_padded(x, inv, u, *, transpose, interpret):
  import jax.experimental.pallas.mosaic_gpu as plgpu

  r, c = x.shape
  stochastic = u is not None
  out_shape = (c, r) if transpose else (r, c)
  out_block = (_TILE_C, _TILE_R) if transpose else (_TILE_R, _TILE_C)
  scratch = [plgpu.SMEM((_TILE_R, _TILE_C), jnp.float32)]
  if stochastic:
    scratch.append(plgpu.SMEM((_TILE_R, _TILE_C), jnp.float32))
  scratch += [plgpu.SMEM(out_block, jnp.int8), plgpu.Barrier(num_barriers=2)]
  kernel = plgpu.kernel(
      functools.partial(_quantize_kernel, stochastic=stochastic,
                        transpose=transpose),
      out_type=jax.ShapeDtypeStruct(out_shape, jnp.int8),
      scratch_types=scratch,
      grid=(r // _TILE_R, c // _TILE_C),
      grid_names=("r", "c"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="quantize_kmajor",
  )
  args = (inv.reshape(1), x) + ((u,) if stochastic else ())
  return kernel(*args)


def quantize_kmajor(x, scale, *, rounding: str = "nearest", key=None,
                    transpose: bool = False, interpret: bool = False):
  """Quantizes float ``x`` to int8 and writes it in GEMM (K-major) layout.

  Args:
    x: (R, C) float array (any float dtype; computed in float32).
    scale: scalar quantization step ``s = clip / 127`` (> 0).
    rounding: "nearest" (``round(x / s)``, ties to even) or "stochastic"
      (``floor(x / s + u)``, ``u ~ U[0, 1)`` from ``key``).
    key: a ``jax.random`` key; required for stochastic rounding. The same key
      gives the same bits, in the kernel and in the reference.
    transpose: if True, return ``q.T`` with shape (C, R) -- written transposed
      by the kernel, no float transpose in memory.
    interpret: run the Mosaic GPU kernel under ``plgpu.InterpretGPUParams()``
      (CPU; for tests).

  Returns:
    int8 array, (R, C) or (C, R) if ``transpose``, values in [-127, 127].

  Shapes that are not multiples of the (64, 128) block are zero-padded by the
  wrapper and the result is sliced.
  """
  _check_args(x, scale, rounding, key)
  r, c = x.shape
  if r == 0 or c == 0:
    return jnp.zeros((c, r) if transpose else (r, c), jnp.int8)
  u = _noise(key, x.shape) if rounding == "stochastic" else None
  r_pad = -(-r // _TILE_R) * _TILE_R
  c_pad = -(-c // _TILE_C) * _TILE_C
  pad = ((0, r_pad - r), (0, c_pad - c))
  xf = x.astype(jnp.float32)
  if pad != ((0, 0), (0, 0)):
    xf = jnp.pad(xf, pad)
    u = None if u is None else jnp.pad(u, pad)
  q = _quantize_padded(xf, _inverse(scale), u,
                       transpose=bool(transpose), interpret=bool(interpret))
  if transpose:
    return q[:c, :r] if (c_pad, r_pad) != (c, r) else q
  return q[:r, :c] if (r_pad, c_pad) != (r, c) else q
