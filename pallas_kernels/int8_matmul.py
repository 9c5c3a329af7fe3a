"""INT8 x INT8 -> INT32 matmul with a fused dequantizing epilogue (Hopper).

The GEMM at the heart of every quantized convolution of UI8 (Zhu et al.,
"Towards Unified INT8 Training for Convolutional Neural Network", CVPR 2020,
§3 and §5 "fused quantized convolution"): both operands are int8, products
are accumulated exactly in int32 on the tensor cores (``wgmma
m64nNk32.s32.s8.s8``), and the int32 accumulator is dequantized in registers
(``acc * a_scale[:, None] * b_scale[None, :] + bias[None, :]``) before the only
write to memory.

Layouts (both operands K-major, because 8-bit ``wgmma`` cannot transpose an
operand in shared memory):

  a: (M, K) int8, row-major.
  b: (N, K) int8, row-major -- i.e. the *transposed* right-hand side; the
     kernel hands ``b_smem.T`` to ``wgmma``.
  result: (M, N) ``out_dtype`` (float32 or bfloat16) =
     (a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias[None, :]).

Long contractions: ``127 * 127 * K`` overflows int32 once K > 133,144. The
kernel (and the reference) accumulate in int32 over chunks of at most
``config.k_chunk`` (<= 131,072) elements of K, convert each chunk's exact int32
sum to float32 and add the chunks in float32, in chunk order.

``out_dtype=jnp.int32`` returns the raw int32 accumulator instead (no scales,
no bias, K <= ``k_chunk``): the exact integer GEMM, for callers that combine
chunks or sum results exactly themselves (int8jax's Pallas backend does both).

Public API: :class:`Int8MatmulConfig`, :func:`int8_matmul`,
:func:`int8_matmul_reference`.
"""

from __future__ import annotations

import dataclasses
import functools

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
from pallas_kernels._common import out_transforms
from pallas_kernels._common import pad1d
from pallas_kernels._common import pad2d
from pallas_kernels._common import round_up

__all__ = [
    "INT32_SAFE_K",
    "Int8MatmulConfig",
    "DEFAULT_CONFIG",
    "LIBRARY_CONFIGS",
    "NARROW_CONFIG",
    "select_config",
    "int8_matmul",
    "int8_matmul_reference",
]


@dataclasses.dataclass(frozen=True)
class Int8MatmulConfig:
  """Tiling of :func:`int8_matmul` (static, hashable).

  Attributes:
    tile_m: rows of ``a`` (and of the result) per thread block; a multiple of
      64 (the M of one ``wgmma``).
    tile_n: rows of ``b`` (columns of the result) per thread block; a multiple
      of 8, at most 256 (the N range of ``wgmma``).
    tile_k: K elements per pipeline step; a multiple of ``swizzle`` (bytes ==
      int8 elements) and a divisor of ``k_chunk``.
    swizzle: shared-memory swizzle in bytes for both operands: 128, 64 or 32.
    max_concurrent_steps: pipeline depth (TMA copies in flight), >= 1.
    k_chunk: K elements summed in one int32 accumulator before the partial sum
      is flushed to float32; a multiple of ``tile_k``, at most
      :data:`INT32_SAFE_K` so worst-case int8 inputs cannot overflow.
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  swizzle: int = 128
  max_concurrent_steps: int = 4
  k_chunk: int = INT32_SAFE_K

  def __post_init__(self):
    check_tiling(self, ("k_chunk",))
    tile_k, k_chunk = self.tile_k, self.k_chunk
    if not 0 < k_chunk <= INT32_SAFE_K:
      raise ValueError(
          f"{k_chunk=} must be in [1, {INT32_SAFE_K}] (int32 overflow bound)")
    if k_chunk % tile_k:
      raise ValueError(f"{k_chunk=} must be a multiple of {tile_k=}")

  def smem_bytes(self, out_dtype=jnp.float32) -> int:
    """Shared memory the kernel allocates with this config, in bytes."""
    operands = (self.tile_m + self.tile_n) * self.tile_k * self.max_concurrent_steps
    out_tile = self.tile_m * self.tile_n * jnp.dtype(out_dtype).itemsize
    vectors = (self.tile_m + 2 * self.tile_n) * 4
    return operands + out_tile + vectors + 1024  # + barriers / alignment


DEFAULT_CONFIG = Int8MatmulConfig()
# For N <= 64 (early convs with few channels): no wasted half tile in N.
NARROW_CONFIG = Int8MatmulConfig(tile_n=64, max_concurrent_steps=5)
# Every config int8_matmul picks by itself (select_config); the tests run each.
LIBRARY_CONFIGS = (DEFAULT_CONFIG, NARROW_CONFIG)


def select_config(m: int, n: int, k: int) -> Int8MatmulConfig:
  """The config :func:`int8_matmul` uses for an (M, N, K) problem by default."""
  del m, k
  return NARROW_CONFIG if n <= 64 else DEFAULT_CONFIG


# ----------------------------------------------------------------------------
# Argument checking (shared by the kernel wrapper, the reference and
# int8_matmul_ws).
# ----------------------------------------------------------------------------


def _check_operand(name, x):
  x_dtype = getattr(x, "dtype", None)
  if x_dtype is None or jnp.dtype(x_dtype) != jnp.int8:
    raise TypeError(f"{name} must be an int8 array, got dtype {x_dtype}")
  if np.ndim(x) != 2:
    raise ValueError(f"{name} must be 2-D, got {name}.shape={tuple(np.shape(x))}")


def check_matmul_args(a, b, a_scale, b_scale, bias, out_dtype):
  """Checks the GEMM's arguments (errors name the argument and value); returns
  (a_scale, b_scale, bias) as float32 vectors of length M, N, N (or None)."""
  _check_operand("a", a)
  _check_operand("b", b)
  m, k = a.shape
  n, k2 = b.shape
  if k != k2:
    raise ValueError(
        "a (M, K) and b (N, K) must have the same K (both are K-major), got "
        f"a.shape={a.shape}, b.shape={b.shape}")
  if jnp.dtype(out_dtype) not in OUT_DTYPES:
    raise TypeError(
        f"out_dtype must be float32, bfloat16 or int32, got {out_dtype}")
  if jnp.dtype(out_dtype) == jnp.int32:
    given = [name for name, v in (("a_scale", a_scale), ("b_scale", b_scale),
                                  ("bias", bias)) if v is not None]
    if given:
      raise ValueError(f"out_dtype=int32 returns the raw int32 accumulator: "
                       f"{', '.join(given)} must be None")
  a_scale = check_vector("a_scale", a_scale, m, "M")
  b_scale = check_vector("b_scale", b_scale, n, "N")
  bias = check_vector("bias", bias, n, "N")
  return a_scale, b_scale, bias


def check_int32_k(k: int, k_chunk: int, out_dtype):
  """out_dtype=int32 returns one int32 accumulator: K must fit one chunk."""
  if jnp.dtype(out_dtype) == jnp.int32 and k > k_chunk:
    raise ValueError(
        f"out_dtype=int32 needs K <= k_chunk (one int32 accumulator), got "
        f"K={k}, {k_chunk=}; split K and combine the int32 parts exactly")


def _epilogue(acc_f32, a_scale, b_scale, bias, out_dtype):
  """The dequantizing epilogue, in the exact order the kernel applies it.

  acc_f32: (m, n) float32; a_scale: (m,) float32 or None; b_scale: (n,) or
  None; bias: (n,) or None. Shared by the reference so both round alike.
  """
  out = acc_f32 if a_scale is None else acc_f32 * a_scale[:, None]
  return epilogue(out, b_scale, bias, out_dtype)


# ----------------------------------------------------------------------------
# Reference (plain lax).
# ----------------------------------------------------------------------------


def int8_matmul_reference(a, b, *, a_scale=None, b_scale=None, bias=None,
                          out_dtype=jnp.float32, k_chunk: int = INT32_SAFE_K):
  """Exact XLA reference for :func:`int8_matmul`.

  Computes ``a @ b.T`` with ``lax.dot_general(..., preferred_element_type=
  jnp.int32)`` over K chunks of ``k_chunk`` elements (exact int32 per chunk),
  sums the chunks in float32 in chunk order, then applies the same epilogue as
  the kernel. Bit-exact with the kernel for the same ``k_chunk``.

  Args:
    a: (M, K) int8.
    b: (N, K) int8 (K-major right-hand side).
    a_scale: None, a scalar or (M,) -- per-row dequantization scale of ``a``.
    b_scale: None, a scalar or (N,) -- per-row scale of ``b``.
    bias: None, a scalar or (N,) -- added after scaling.
    out_dtype: float32, bfloat16, or int32 (the exact int32 sum; scales and
      bias must be None and K <= k_chunk).
    k_chunk: int32 accumulation length (<= INT32_SAFE_K).

  Returns:
    (M, N) array of ``out_dtype``.

  Rounding note: the float epilogue is evaluated under ``jax.jit``, where XLA
  contracts ``(acc * a_scale) * b_scale + bias`` into a multiply and an FMA;
  the kernel does the same, so results agree bit for bit.
  """
  a_scale, b_scale, bias = check_matmul_args(a, b, a_scale, b_scale, bias, out_dtype)
  if not 0 < k_chunk <= INT32_SAFE_K:
    raise ValueError(f"{k_chunk=} must be in [1, {INT32_SAFE_K}]")
  check_int32_k(a.shape[1], k_chunk, out_dtype)
  return _reference_impl(a, b, a_scale, b_scale, bias,
                         out_dtype=jnp.dtype(out_dtype), k_chunk=int(k_chunk))


@functools.partial(jax.jit, static_argnames=("out_dtype", "k_chunk"))
def _reference_impl(a, b, a_scale, b_scale, bias, *, out_dtype, k_chunk):
  # Always jitted: XLA fuses the last multiply and the bias add into one FMA,
  # as the kernel's epilogue does (LLVM contracts it on CPU and on NVPTX), so
  # the two round alike. Eager op-by-op evaluation would round twice.
  m, k = a.shape
  n = b.shape[0]
  dims = (((1,), (1,)), ((), ()))
  if out_dtype == jnp.int32:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
  acc = jnp.zeros((m, n), jnp.float32)
  for start in range(0, k, k_chunk):
    stop = min(start + k_chunk, k)
    part = lax.dot_general(a[:, start:stop], b[:, start:stop], dims,
                           preferred_element_type=jnp.int32)
    acc = part.astype(jnp.float32) if start == 0 else acc + part.astype(
        jnp.float32)
  return _epilogue(acc, a_scale, b_scale, bias, out_dtype)


# ----------------------------------------------------------------------------
# Mosaic GPU kernel.
# ----------------------------------------------------------------------------


def _int8_matmul_kernel(a_gmem, b_gmem, a_scale_gmem, b_scale_gmem, bias_gmem,
                        out_gmem, a_scale_smem, b_scale_smem, bias_smem,
                        vec_barriers, out_smem, *, config: Int8MatmulConfig,
                        k_iters: int, has_bias: bool, int_out: bool):
  """One (tile_m, tile_n) output tile per thread block (one warpgroup).

  Refs (GMEM): a (M_pad, K_pad) int8, b (N_pad, K_pad) int8, a_scale
  (M_pad,) f32, b_scale (N_pad,) f32, bias (N_pad,) f32, out (M_pad, N_pad).
  SMEM scratch: the three vector slices, their barriers and the output tile.
  ``int_out``: store the int32 accumulator (single K chunk), no epilogue.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  m_idx = lax.axis_index("m")
  n_idx = lax.axis_index("n")
  m_slice = pl.ds(m_idx * tile_m, tile_m)
  n_slice = pl.ds(n_idx * tile_n, tile_n)

  # The epilogue vectors travel while the main loop runs.
  if not int_out:
    plgpu.copy_gmem_to_smem(a_scale_gmem.at[m_slice], a_scale_smem,
                            vec_barriers.at[0])
    plgpu.copy_gmem_to_smem(b_scale_gmem.at[n_slice], b_scale_smem,
                            vec_barriers.at[1])
  if has_bias and not int_out:
    plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice], bias_smem,
                            vec_barriers.at[2])

  transforms = (plgpu.TilingTransform((8, config.swizzle)),
                plgpu.SwizzleTransform(config.swizzle))
  chunk_iters = config.k_chunk // tile_k

  total = None
  for chunk_start in range(0, k_iters, chunk_iters):
    n_steps = min(chunk_iters, k_iters - chunk_start)
    depth = min(config.max_concurrent_steps, n_steps)
    # Keep one wgmma in flight: its SMEM slot is released a step late.
    delay = 1 if depth > 1 else 0
    k_slice = pl.ds(chunk_start * tile_k, n_steps * tile_k)

    def chunk_scope(acc_ref, k_slice=k_slice, n_steps=n_steps, delay=delay):
      def step(_, a_smem, b_smem):
        # b_smem is (tile_n, tile_k): K-major, so wgmma reads it transposed.
        plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
        plgpu.wgmma_wait(delay)

      plgpu.emit_pipeline(
          step,
          grid=(n_steps,),
          in_specs=[
              plgpu.BlockSpec((tile_m, tile_k), lambda k: (0, k),
                              transforms=transforms, delay_release=delay),
              plgpu.BlockSpec((tile_n, tile_k), lambda k: (0, k),
                              transforms=transforms, delay_release=delay),
          ],
          max_concurrent_steps=config.max_concurrent_steps,
      )(a_gmem.at[m_slice, k_slice], b_gmem.at[n_slice, k_slice])
      plgpu.wgmma_wait(0)
      return acc_ref[...]

    acc = pl.run_scoped(chunk_scope, plgpu.ACC((tile_m, tile_n), jnp.int32))
    if int_out:  # one chunk only (checked by the wrapper): store it as is.
      total = acc
      continue
    part = acc.astype(jnp.float32)
    total = part if total is None else total + part

  if int_out:
    out_smem[...] = total
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_slice, n_slice])
    plgpu.wait_smem_to_gmem(0)
    return

  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column
  plgpu.barrier_wait(vec_barriers.at[0])
  plgpu.barrier_wait(vec_barriers.at[1])
  a_scale = plgpu.load(a_scale_smem, layout=row_layout)
  b_scale = plgpu.load(b_scale_smem, layout=col_layout)
  out = total * lax.broadcast_in_dim(a_scale, (tile_m, tile_n), [0])
  out = out * lax.broadcast_in_dim(b_scale, (tile_m, tile_n), [1])
  if has_bias:
    plgpu.barrier_wait(vec_barriers.at[2])
    bias = plgpu.load(bias_smem, layout=col_layout)
    out = out + lax.broadcast_in_dim(bias, (tile_m, tile_n), [1])
  out_smem[...] = out.astype(out_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_slice, n_slice])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "config", "interpret", "has_bias"))
def _int8_matmul_padded(a, b, a_scale, b_scale, bias, *, out_dtype, config,
                        interpret, has_bias):
  """Kernel launch on operands already padded to whole tiles."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  m, k = a.shape
  n = b.shape[0]
  grid = (m // config.tile_m, n // config.tile_n)
  kernel = plgpu.kernel(
      functools.partial(_int8_matmul_kernel, config=config,
                        k_iters=k // config.tile_k, has_bias=has_bias,
                        int_out=out_dtype == jnp.int32),
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_types=[
          plgpu.SMEM((config.tile_m,), jnp.float32),
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.SMEM((config.tile_n,), jnp.float32),
          plgpu.Barrier(num_barriers=3),
          plgpu.SMEM((config.tile_m, config.tile_n), out_dtype,
                     transforms=out_transforms(config.tile_n, out_dtype)),
      ],
      grid=grid,
      grid_names=("m", "n"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="int8_matmul",
  )
  return kernel(a, b, a_scale, b_scale, bias)


def int8_matmul(a, b, *, a_scale=None, b_scale=None, bias=None,
                out_dtype=jnp.float32, config: Int8MatmulConfig | None = None,
                interpret: bool = False):
  """Dequantized int8 GEMM ``(a @ b.T) * a_scale[:, None] * b_scale + bias``.

  Runs a Mosaic GPU (Hopper, sm_90a) kernel: TMA-pipelined int8 tiles in
  swizzled shared memory, ``wgmma`` with an int32 register accumulator, and a
  fused epilogue that converts, scales, adds the bias and casts before the
  single store. The int32 accumulator never goes to memory.

  Args:
    a: (M, K) int8, K-major (row-major).
    b: (N, K) int8, K-major -- the right-hand side *transposed*.
    a_scale: None (= 1), a scalar, or (M,) float -- per-row scale of ``a``.
    b_scale: None (= 1), a scalar, or (N,) float -- per-row scale of ``b``
      (per output column).
    bias: None, a scalar, or (N,) float, added after scaling.
    out_dtype: float32, bfloat16, or int32 (the raw exact accumulator;
      scales and bias must be None and K <= ``config.k_chunk``).
    config: tiling (:class:`Int8MatmulConfig`); ``select_config(M, N, K)``
      if None.
    interpret: run under ``plgpu.InterpretGPUParams()`` (CPU, bit-exact, slow;
      for tests).

  Returns:
    (M, N) array of ``out_dtype``, equal bit for bit to
    ``int8_matmul_reference(..., k_chunk=config.k_chunk)``.

  Any M, N, K are accepted: the wrapper zero-pads M, N, K up to whole tiles
  (zeros add nothing to the integer sums) and slices the result.

  Example (on a Hopper GPU; add ``interpret=True`` on CPU)::

    a = jnp.ones((256, 512), jnp.int8)
    b = jnp.ones((128, 512), jnp.int8)
    y = int8_matmul(a, b, a_scale=0.5, b_scale=jnp.full((128,), 2.0))
    # y == 512.0 everywhere
  """
  a_scale, b_scale, bias = check_matmul_args(a, b, a_scale, b_scale, bias, out_dtype)
  if config is None:
    config = select_config(a.shape[0], b.shape[0], a.shape[1])
  if not isinstance(config, Int8MatmulConfig):
    raise TypeError(f"config must be an Int8MatmulConfig, got {config!r}")
  out_dtype = jnp.dtype(out_dtype)
  check_int32_k(a.shape[1], config.k_chunk, out_dtype)
  check_smem(config, out_dtype, interpret)
  m, k = a.shape
  n = b.shape[0]
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  m_pad = round_up(m, config.tile_m)
  n_pad = round_up(n, config.tile_n)
  k_pad = round_up(max(k, 1), config.tile_k)
  has_bias = bias is not None
  ones_m = jnp.ones((m,), jnp.float32)
  ones_n = jnp.ones((n,), jnp.float32)
  out = _int8_matmul_padded(
      pad2d(a, m_pad, k_pad),
      pad2d(b, n_pad, k_pad),
      pad1d(ones_m if a_scale is None else a_scale, m_pad),
      pad1d(ones_n if b_scale is None else b_scale, n_pad),
      pad1d(jnp.zeros((n,), jnp.float32) if bias is None else bias, n_pad),
      out_dtype=out_dtype, config=config, interpret=bool(interpret),
      has_bias=has_bias)
  if (m_pad, n_pad) != (m, n):
    out = out[:m, :n]
  return out
