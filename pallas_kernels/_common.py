"""What the kernel modules of pallas_kernels share (package-internal).

Used by :mod:`pallas_kernels.int8_matmul` and the conv modules
(``conv_common``, ``conv_forward``, ``conv_dgrad``, ``conv_wgrad``), so that
none of them imports another's private names:

* limits: :data:`INT32_SAFE_K` (products one int32 accumulator may sum),
  :data:`SMEM_LIMIT_BYTES`, :data:`OUT_DTYPES`;
* argument checking (:func:`check_vector`), :func:`round_up`, zero padding
  (:func:`pad1d`, :func:`pad2d`);
* the float epilogue :func:`epilogue` in the order the kernels apply it, and
  the SMEM transforms of an output tile (:func:`out_transforms`);
* the exact combination of int32 partial sums (:func:`split_halves`,
  :func:`join_halves`, :func:`combine_int32_chunks`), exported by the package
  and used by ``int8jax.exact`` too (one definition: the Pallas and XLA
  routes round the same integers identically).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Largest power of two K with 127 * 127 * K < 2**31 (overflow starts past
# K = 133,144): one int32 accumulator never sums more than this many products.
INT32_SAFE_K = 131072

# Hopper (sm_90) opt-in shared memory per block, in bytes.
SMEM_LIMIT_BYTES = 227 * 1024

# The output dtypes of the GEMM kernels (int32: the raw exact accumulator).
OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
              jnp.dtype(jnp.int32))

# int32 partial sums that :func:`split_halves` may combine: each half is below
# 2^16 in magnitude, so the sums of 256 of them stay below 2^24 (exact in
# int32 and in float32).
MAX_EXACT_PARTS = 256


def check_tiling(config, extra_int_fields=()):
  """Validates the fields every kernel config has -- tile_m, tile_n, tile_k,
  swizzle, max_concurrent_steps (and ``extra_int_fields``) must be ints;
  wgmma's M and N, the swizzles TMA supports -- naming the field and value."""
  for name in ("tile_m", "tile_n", "tile_k", "swizzle", "max_concurrent_steps",
               *extra_int_fields):
    value = getattr(config, name)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise TypeError(f"{type(config).__name__}.{name} must be an int, got "
                      f"{value!r} of type {type(value).__name__}")
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  swizzle, max_concurrent_steps = config.swizzle, config.max_concurrent_steps
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


def check_smem(config, out_dtype, interpret, name=None):
  """A compiled kernel's block fits Hopper's shared memory: ``config.smem_bytes(out_dtype)``
  <= :data:`SMEM_LIMIT_BYTES` (interpret mode has no such limit). ``name``: how the error
  names the config (default: its repr)."""
  if interpret or config.smem_bytes(out_dtype) <= SMEM_LIMIT_BYTES:
    return
  raise ValueError(
      f"config={name or config!r} needs {config.smem_bytes(out_dtype)} bytes of shared memory "
      f"with out_dtype={jnp.dtype(out_dtype).name}, more than the {SMEM_LIMIT_BYTES} a Hopper "
      "block can have; lower max_concurrent_steps or the tile sizes")


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad2d(x, rows: int, cols: int):
  """``x`` (2-D) zero-padded at the end to ``(rows, cols)``."""
  pad = ((0, rows - x.shape[0]), (0, cols - x.shape[1]))
  return x if pad == ((0, 0), (0, 0)) else jnp.pad(x, pad)


def pad1d(x, size: int):
  """``x`` (1-D) zero-padded at the end to ``size``."""
  return x if x.shape[0] == size else jnp.pad(x, (0, size - x.shape[0]))


def check_vector(name, v, size, size_name):
  """``v`` as a float32 vector of length ``size`` (None -> None); a scalar is
  broadcast. Errors name the argument, its shape and the expected size."""
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


def epilogue(acc_f32, scale, bias, out_dtype):
  """``acc * scale + bias`` cast to ``out_dtype``, channels last, in the
  order the kernels apply it (XLA and LLVM contract it into one FMA alike
  when jitted). ``scale`` / ``bias``: None or broadcastable vectors."""
  out = acc_f32
  if scale is not None:
    out = out * scale
  if bias is not None:
    out = out + bias
  return out.astype(out_dtype)


def out_transforms(tile_n: int, out_dtype):
  """SMEM tiling + swizzle of a (tile_m, tile_n) output tile for its TMA
  store."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  bits = jnp.dtype(out_dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(tile_n * bits, "out")
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


# ----------------------------------------------------------------------------
# Exact sums of int32 partial sums.
# ----------------------------------------------------------------------------


def split_halves(parts: jax.Array, axis: int = 0) -> tuple:
  """The exact sum of int32 partial sums ``parts`` along ``axis``, as two
  int32 arrays ``(hi, lo)``: the sums of the signed high halves (``>> 16``)
  and of the unsigned low halves (``& 0xffff``); the integer is
  ``hi * 65536 + lo``. Exact for up to :data:`MAX_EXACT_PARTS` parts; the
  halves of different partitions of one sum add up exactly (int32), which is
  how sums computed on different devices combine bit-exactly."""
  hi = jnp.sum(jnp.right_shift(parts, 16), axis=axis, dtype=jnp.int32)
  lo = jnp.sum(jnp.bitwise_and(parts, 0xFFFF), axis=axis, dtype=jnp.int32)
  return hi, lo


def join_halves(halves) -> jax.Array:
  """float32 of ``hi * 65536 + lo`` for ``halves = (hi, lo)``, with one
  rounding (both halves are below 2^24 in magnitude for up to
  :data:`MAX_EXACT_PARTS` parts, so they convert exactly, and ``hi * 65536``
  is exact)."""
  hi, lo = halves
  return hi.astype(jnp.float32) * 65536.0 + lo.astype(jnp.float32)


def combine_int32_chunks(parts: jax.Array, axis: int = 0) -> jax.Array:
  """Sum int32 partial sums along ``axis`` into float32 with one rounding:
  the exact integer sum, correctly rounded, whatever the split into parts
  (up to :data:`MAX_EXACT_PARTS` of them)."""
  return join_halves(split_halves(parts, axis))
