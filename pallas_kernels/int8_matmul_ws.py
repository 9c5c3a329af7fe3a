"""Persistent, warp-specialised INT8 x INT8 -> INT32 GEMM (Hopper).

The same product, argument contract and bits as
:func:`pallas_kernels.int8_matmul.int8_matmul` --
``(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias[None, :])`` with
a: (M, K) int8, b: (N, K) int8 (both K-major), exact int32 accumulation over
K chunks of at most ``config.k_chunk`` summed in float32, or the raw int32
sum with ``out_dtype=jnp.int32`` -- but scheduled as jax's own Hopper matmul
(``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py``) is, to hide the
latencies the one-tile-per-block kernel exposes (issue 24):

* **persistent**: the grid is one thread block per SM (``config.num_ctas``,
  default the GPU's SM count, 132 on an H100/H200 when no GPU is present);
  each block loops over output tiles (``plgpu.nd_loop``, tiles dealt
  round-robin) in a grouped "planar snake" order (``plgpu.planar_snake``:
  ``grid_tile_width`` rows (or columns) of tiles at a time, reversing
  direction each group), so blocks running at the same time share operand
  rows and columns in L2;
* **warp-specialised**: ``num_consumers`` (1 or 2) consumer warpgroups run
  int8 ``wgmma`` (m64nNk32, int32 accumulators in registers), each on its own
  (``tile_m / num_consumers``, ``tile_n``) or (``tile_m``,
  ``tile_n / num_consumers``) part of the block's tile (``wg_split``), and
  one producer warpgroup issues every TMA load into a ring of
  ``max_concurrent_steps`` shared-memory slots (``setmaxnreg``: the producer
  keeps 40 registers a thread, the consumers share the rest, as in jax's
  ``emit_pipeline_warp_specialized``). The ring, its barriers and the loops
  are written out here rather than taken from
  ``emit_pipeline_warp_specialized``: that runs one pipeline per tile, whose
  producer waits for the tile's last slot before loading the next tile (no
  prefetch across tiles: with K = 64, one step a tile, no prefetch at all)
  and whose slots cannot be released one step late without racing the next
  tile's loads;
* **latency hidden**: the ring's steps are numbered over all of a block's
  (tile, K step) pairs, so the producer loads the next tile's first steps
  while the consumers finish the current one; a consumer keeps one ``wgmma``
  in flight (``wgmma_wait(1)``) and releases a slot a step late; the
  epilogue's TMA stores (``epi_tile_n`` columns at a time, 2 SMEM slots)
  drain during the next tile's main loop.

K > ``k_chunk``: a fresh int32 accumulator (``plgpu.ACC``) per chunk, chunks
summed in float32 in chunk order in registers (the reference's bits).

What it does not do (yet): both consumers finish a tile together, so the
tensor cores idle during the epilogue's register work (a "ping-pong"
schedule, consumers on alternate tiles, would hide it); no clusters / TMA
multicast; no split-K (a GEMM with few output tiles uses few SMs).

**Not used by the library yet**: int8jax's backends call
:func:`~pallas_kernels.int8_matmul.int8_matmul` and the conv kernels. This
kernel has been checked bit-exact against the integer reference in the CPU
interpreter and compiled to SASS offline (mosaic-offline: registers, spills,
wgmma shapes; ``pallas_kernels/README.md``), but has never run on a GPU: its
barriers (a hang), results on hardware and speed are unchecked.
``benchmarks/gpu_smoke.py`` and ``benchmarks/kernels.py`` check and time it
in the next GPU session.

Public API: :class:`Int8MatmulWSConfig`, :data:`WS_CONFIGS`,
:func:`select_ws_config`, :func:`int8_matmul_ws`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import INT32_SAFE_K
from pallas_kernels._common import check_smem
from pallas_kernels._common import check_tiling
from pallas_kernels._common import out_transforms
from pallas_kernels._common import pad1d
from pallas_kernels._common import pad2d
from pallas_kernels._common import round_up
from pallas_kernels.int8_matmul import check_int32_k
from pallas_kernels.int8_matmul import check_matmul_args

__all__ = [
    "H100_NUM_SMS",
    "Int8MatmulWSConfig",
    "WS_CONFIGS",
    "WS_DEFAULT_CONFIG",
    "WS_DEFAULT_K64_CONFIG",
    "WS_NARROW_CONFIG",
    "WS_SHORT_CONFIG",
    "int8_matmul_ws",
    "select_ws_config",
]

# SMs of an H100 / H200 SXM: the persistent grid when no GPU is attached
# (lowering for CUDA on a CPU host).
H100_NUM_SMS = 132

# Registers per thread the producer warpgroup keeps (setmaxnreg), as jax's
# Hopper matmul does; the consumers share the rest of the register file.
PRODUCER_REGISTERS = 40


def consumer_tile(config) -> tuple[int, int]:
  """(rows, columns) of one consumer warpgroup's accumulator: the tile split along
  ``wg_split`` among ``num_consumers``."""
  if config.wg_split == "m":
    return config.tile_m // config.num_consumers, config.tile_n
  return config.tile_m, config.tile_n // config.num_consumers


def check_warp_specialisation(config, m_unit: str, n_unit: str) -> None:
  """The checks every warp-specialised config shares (errors name the field and value):
  a ring of >= 2 slots, 1 or 2 consumer warpgroups splitting the tile along ``wg_split``
  ("m": 64 ``m_unit`` per consumer, "n": 8 ``n_unit``), ``num_ctas`` None or >= 1."""
  if config.max_concurrent_steps < 2:
    raise ValueError(f"max_concurrent_steps={config.max_concurrent_steps} must be >= 2 "
                     "(the producer loads one slot while a consumer reads another)")
  num_consumers, wg_split = config.num_consumers, config.wg_split
  if num_consumers not in (1, 2):
    raise ValueError(f"{num_consumers=} must be 1 or 2")
  if wg_split not in ("m", "n"):
    raise ValueError(f"{wg_split=} must be 'm' or 'n'")
  if wg_split == "m" and config.tile_m % (64 * num_consumers):
    raise ValueError(f"tile_m={config.tile_m} must be a multiple of {64 * num_consumers} "
                     f"(64 {m_unit} per consumer) with {wg_split=}")
  if wg_split == "n" and config.tile_n % (8 * num_consumers):
    raise ValueError(f"tile_n={config.tile_n} must be a multiple of {8 * num_consumers} "
                     f"(8 {n_unit} per consumer) with {wg_split=}")
  num_ctas = config.num_ctas
  if num_ctas is not None and (not isinstance(num_ctas, (int, np.integer))
                               or isinstance(num_ctas, bool) or num_ctas < 1):
    raise ValueError(f"num_ctas={num_ctas!r} must be None or an int >= 1")


@dataclasses.dataclass(frozen=True)
class Int8MatmulWSConfig:
  """Tiling and schedule of :func:`int8_matmul_ws` (static, hashable).

  Attributes:
    tile_m: rows of the block's output tile; a multiple of 64 (of
      ``64 * num_consumers`` when ``wg_split="m"``).
    tile_n: columns of the block's output tile, a multiple of 8 in [8, 256]
      (one TMA box); with ``wg_split="n"`` each consumer's share
      ``tile_n / num_consumers`` must be a multiple of 8.
    tile_k: K elements per pipeline step; a multiple of ``swizzle`` and a
      divisor of ``k_chunk``.
    swizzle: shared-memory swizzle of both operands in bytes: 128, 64 or 32.
    max_concurrent_steps: pipeline slots (TMA loads in flight), >= 2.
    k_chunk: K elements one int32 accumulator sums (<= INT32_SAFE_K), a
      multiple of ``tile_k``; longer K is summed chunk by chunk in float32.
    num_consumers: consumer (``wgmma``) warpgroups per block, 1 or 2; one
      producer warpgroup more issues the loads.
    wg_split: how the consumers share the block's tile: ``"m"`` (each
      ``tile_m / num_consumers`` rows) or ``"n"`` (each
      ``tile_n / num_consumers`` columns).
    epi_tile_n: columns per epilogue store (two SMEM slots per consumer, so a
      store drains while the next is written); None = the consumer's whole
      part (one slot). A multiple of 16 dividing the consumer's columns.
    grid_minor: ``"m"`` or ``"n"``: the tile dimension the snake walks first.
    grid_tile_width: tiles of the other dimension per snake band, >= 1.
    num_ctas: persistent blocks; None = one per SM of the GPU (132 without a
      GPU). Never more than there are tiles.
  """

  tile_m: int = 128
  tile_n: int = 256
  tile_k: int = 128
  swizzle: int = 128
  max_concurrent_steps: int = 3
  k_chunk: int = INT32_SAFE_K
  num_consumers: int = 2
  wg_split: str = "m"
  epi_tile_n: int | None = 64
  grid_minor: str = "n"
  grid_tile_width: int = 8
  num_ctas: int | None = None

  def __post_init__(self):
    check_tiling(self, ("k_chunk", "num_consumers", "grid_tile_width"))
    tile_k, k_chunk = self.tile_k, self.k_chunk
    if not 0 < k_chunk <= INT32_SAFE_K:
      raise ValueError(
          f"{k_chunk=} must be in [1, {INT32_SAFE_K}] (int32 overflow bound)")
    if k_chunk % tile_k:
      raise ValueError(f"{k_chunk=} must be a multiple of {tile_k=}")
    check_warp_specialisation(self, "rows", "columns")
    epi = self.epi_tile_n
    if epi is not None and (not isinstance(epi, (int, np.integer)) or isinstance(epi, bool)
                            or epi < 16 or epi % 16 or self.wg_tile[1] % epi):
      raise ValueError(f"epi_tile_n={epi!r} must be None or a multiple of 16 dividing the "
                       f"{self.wg_tile[1]} columns of a consumer's part")
    if self.grid_minor not in ("m", "n"):
      raise ValueError(f"grid_minor={self.grid_minor!r} must be 'm' or 'n'")
    if self.grid_tile_width < 1:
      raise ValueError(f"grid_tile_width={self.grid_tile_width} must be >= 1")

  @property
  def wg_tile(self) -> tuple[int, int]:
    """(rows, columns) of one consumer warpgroup's accumulator."""
    return consumer_tile(self)

  def smem_bytes(self, out_dtype=jnp.float32) -> int:
    """Shared memory the kernel allocates with this config, in bytes."""
    operands = (self.tile_m + self.tile_n) * self.tile_k * self.max_concurrent_steps
    wg_m, wg_n = self.wg_tile
    epi_n = self.epi_tile_n or wg_n
    out_tile = (self.num_consumers * min(2, wg_n // epi_n) * wg_m * epi_n
                * jnp.dtype(out_dtype).itemsize)
    vectors = self.num_consumers * (wg_m + 2 * wg_n) * 4
    return operands + out_tile + vectors + 1024  # + barriers / alignment


# 128x256 block tile, two consumers of 64x256 (m64n256k32 wgmma), 128-wide
# K steps (48 KiB a step, 3 slots) and a float32 epilogue in 64-column
# stores (2 slots per consumer): 214 KiB of the 227.
WS_DEFAULT_CONFIG = Int8MatmulWSConfig()
# The same tile with 64-wide K steps (swizzle 64, 6 slots: the same SMEM), for
# K that 128-wide steps would pad by 64 (K = 64: 1x1 convs on 64 channels;
# K = 576: 3x3 convs on 64 channels).
WS_DEFAULT_K64_CONFIG = Int8MatmulWSConfig(tile_k=64, swizzle=64,
                                           max_concurrent_steps=6)
# N <= 64 (conv GEMMs with 64 channels, K = 64 or 576): 256x64 tiles, two
# consumers of 128x64, 64-wide K steps (no padding of K = 64 or 576), 6 slots.
WS_NARROW_CONFIG = Int8MatmulWSConfig(tile_m=256, tile_n=64, tile_k=64,
                                      swizzle=64, max_concurrent_steps=6,
                                      epi_tile_n=None)
# M <= 64 (a conv's weight gradient as one GEMM: M = output channels, N =
# KH*KW*C, long K): 64x192 tiles, two consumers of 64x96 side by side.
WS_SHORT_CONFIG = Int8MatmulWSConfig(tile_m=64, tile_n=192, tile_k=128,
                                     max_concurrent_steps=4, wg_split="n",
                                     epi_tile_n=None)
# Every config select_ws_config picks; the tests lower and run each.
WS_CONFIGS = (WS_DEFAULT_CONFIG, WS_DEFAULT_K64_CONFIG, WS_NARROW_CONFIG,
              WS_SHORT_CONFIG)


def select_ws_config(m: int, n: int, k: int) -> Int8MatmulWSConfig:
  """The config :func:`int8_matmul_ws` uses for an (M, N, K) problem by
  default: :data:`WS_NARROW_CONFIG` for N <= 64, :data:`WS_SHORT_CONFIG` for
  M <= 64, else :data:`WS_DEFAULT_CONFIG`, or :data:`WS_DEFAULT_K64_CONFIG`
  where 128-wide K steps would pad K by 64 (K % 128 in [1, 64])."""
  if n <= 64:
    return WS_NARROW_CONFIG
  if m <= 64:
    return WS_SHORT_CONFIG
  return WS_DEFAULT_K64_CONFIG if 0 < k % 128 <= 64 else WS_DEFAULT_CONFIG


def num_sms() -> int:
  """SMs of the default GPU, or :data:`H100_NUM_SMS` without one."""
  try:
    device = jax.devices()[0]
    if device.platform == "gpu":
      return int(device.core_count)
  except Exception:  # pylint: disable=broad-except
    pass
  return H100_NUM_SMS


# ----------------------------------------------------------------------------
# Mosaic GPU kernel.
# ----------------------------------------------------------------------------


def consumer_registers(num_consumers: int) -> int:
  """setmaxnreg of a consumer: the register file (64 Ki, 512 a thread of one
  warpgroup) less the producer's share, split evenly, at most 256 (as
  jax's ``emit_pipeline_warp_specialized`` computes it)."""
  return int(min(256, (512 - PRODUCER_REGISTERS) / num_consumers) // 8 * 8)


# The ring, shared with pallas_kernels.conv_direct_wgrad_ws: ``slots`` SMEM slots
# serve ring steps 0, 1, 2, ... (slot ``step % slots``), numbered by producer and
# consumers alike across all of a block's work items. Per slot a "produced" barrier
# (the producer's TMA arrivals with their byte counts) and a "consumed" barrier (one
# arrival per consumer warpgroup).


def ring_produce(issue, consumed, step0, n_steps, slots):
  """Producer: ring steps ``step0 .. step0 + n_steps - 1``; ``issue(i, slot)`` starts
  the TMA loads of the i-th of them into ``slot`` (arriving on its "produced"
  barrier), once the consumers have released the slot's previous step."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  @pl.loop(0, n_steps)
  def _k(i):
    step = step0 + i
    slot = lax.rem(step, slots)

    @pl.when(step >= slots)  # the slot's previous step is consumed
    def _():
      plgpu.barrier_wait(consumed.at[slot])

    issue(i, slot)


def ring_drain(consumed, total_steps, slots):
  """Producer, after its last step: wait for the consumers' releases of the last (up
  to) ``slots`` of the ``total_steps`` ring steps, so no arrival is left unawaited."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  @pl.loop(lax.max(total_steps - slots, 0), total_steps)
  def _drain(step):
    plgpu.barrier_wait(consumed.at[lax.rem(step, slots)])


def ring_consume(acc_ref, a_ring, b_ring, produced, consumed, step0, n_steps, slots,
                 wg_a, wg_b):
  """Consumer: ``acc_ref += sum a_ring[slot][wg_a] @ b_ring[slot][wg_b].T`` over ring
  steps ``step0 .. step0 + n_steps - 1`` (int8 ``wgmma``; b K-major). Keeps one
  ``wgmma`` in flight and releases each slot a step late (the last once its ``wgmma``
  is done); returns when every step is done and released."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  @pl.loop(0, n_steps)
  def _k(i):
    step = step0 + i
    slot = lax.rem(step, slots)
    plgpu.barrier_wait(produced.at[slot])
    # b is (tile_n, tile_k), K-major: wgmma reads it transposed.
    plgpu.wgmma(acc_ref, a_ring.at[slot].at[wg_a],
                b_ring.at[slot].at[wg_b].transpose((1, 0)))
    plgpu.wgmma_wait(1)  # the previous step's wgmma is done: release it

    @pl.when(i > 0)
    def _():
      plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, slots)])

  plgpu.wgmma_wait(0)
  plgpu.barrier_arrive(consumed.at[lax.rem(step0 + n_steps - 1, slots)])


def _ws_kernel(a_gmem, b_gmem, a_scale_gmem, b_scale_gmem, bias_gmem, out_gmem,
               *, config: Int8MatmulWSConfig, m_iters: int, n_iters: int,
               k_iters: int, has_bias: bool, int_out: bool):
  """The persistent kernel body, run by every warpgroup of every block.

  Refs (GMEM): a (M_pad, K_pad) int8, b (N_pad, K_pad) int8, a_scale
  (M_pad,) f32, b_scale (N_pad,) f32, bias (N_pad,) f32, out (M_pad, N_pad).
  Warpgroups 0 .. num_consumers-1 compute, the last one loads.

  One ring of ``max_concurrent_steps`` slots serves all of this block's
  (tile, K step) pairs, numbered ``step = local_tile * k_iters + k`` by
  producer and consumers alike (slot ``step % max_concurrent_steps``): the
  producer runs ahead across tile boundaries, so the next tile's first K
  steps load while the consumers finish and store the current one. Each slot
  has a "produced" barrier (two TMA arrivals with their byte counts) and a
  "consumed" barrier (one arrival per consumer). A consumer keeps one
  ``wgmma`` in flight and releases a slot one step late, and each K chunk's
  last slot once its ``wgmma`` is done; a fresh int32 accumulator
  (``plgpu.ACC``) per K chunk of each tile.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  wg_m, wg_n = config.wg_tile
  epi_n = config.epi_tile_n or wg_n
  epi_slots = min(2, wg_n // epi_n)
  consumers = config.num_consumers
  slots = config.max_concurrent_steps
  out_dtype = out_gmem.dtype
  transforms = (plgpu.TilingTransform((8, config.swizzle)),
                plgpu.SwizzleTransform(config.swizzle))
  chunk_iters = config.k_chunk // tile_k
  full_chunks, last_chunk = divmod(k_iters, chunk_iters)
  n_vec = 0 if int_out else (3 if has_bias else 2)

  def tile_index(lin):
    """(m, n) tile indices of linear tile ``lin`` (planar snake order)."""
    return plgpu.planar_snake(lin, (m_iters, n_iters),
                              0 if config.grid_minor == "m" else 1,
                              config.grid_tile_width)

  tile_loop = functools.partial(plgpu.nd_loop, (m_iters * n_iters,),
                                collective_axes="sm")

  @functools.partial(
      pl.run_scoped,
      a_ring=plgpu.SMEM((slots, tile_m, tile_k), jnp.int8, transforms=transforms),
      b_ring=plgpu.SMEM((slots, tile_n, tile_k), jnp.int8, transforms=transforms),
      produced=plgpu.Barrier(num_arrivals=2, num_barriers=slots),
      consumed=plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
      out_smem=plgpu.SMEM((consumers, epi_slots, wg_m, epi_n), out_dtype,
                          transforms=out_transforms(epi_n, out_dtype)),
      vec_smem=(plgpu.SMEM((consumers, wg_m), jnp.float32),
                plgpu.SMEM((consumers, wg_n), jnp.float32),
                plgpu.SMEM((consumers, wg_n), jnp.float32)),
      vec_barriers=plgpu.Barrier(num_barriers=consumers * max(n_vec, 1)),
      collective_axes="wg",
  )
  def _scope(a_ring, b_ring, produced, consumed, out_smem, vec_smem,
             vec_barriers):
    wg = lax.axis_index("wg")

    def producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      @tile_loop()
      def _tile(info):
        (lin,) = info.index
        m_idx, n_idx = tile_index(lin)

        def issue(k, slot):
          k_slice = pl.ds(k * tile_k, tile_k)
          plgpu.copy_gmem_to_smem(a_gmem.at[pl.ds(m_idx * tile_m, tile_m), k_slice],
                                  a_ring.at[slot], produced.at[slot])
          plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(n_idx * tile_n, tile_n), k_slice],
                                  b_ring.at[slot], produced.at[slot])

        ring_produce(issue, consumed, info.local_index * k_iters, k_iters, slots)

      # Leave no arrival unawaited: the consumers' releases of the last
      # (up to) `slots` steps.
      ring_drain(consumed, local_tiles() * k_iters, slots)

    def local_tiles():
      sm, num_ctas = lax.axis_index("sm"), lax.axis_size("sm")
      total = m_iters * n_iters
      return (total - sm + num_ctas - 1) // num_ctas

    if config.wg_split == "m":
      wg_a, wg_b = pl.ds(wg * wg_m, wg_m), slice(None)
    else:
      wg_a, wg_b = slice(None), pl.ds(wg * wg_n, wg_n)

    def chunk_sum(step0, k0, n_steps):
      """The exact int32 sum of K steps k0 .. k0+n_steps-1 (one chunk; ring
      steps from step0)."""
      def scope(acc_ref):
        ring_consume(acc_ref, a_ring, b_ring, produced, consumed, step0 + k0, n_steps,
                     slots, wg_a, wg_b)
        return acc_ref[...]

      return pl.run_scoped(scope, plgpu.ACC((wg_m, wg_n), jnp.int32))

    def consumer():
      plgpu.set_max_registers(consumer_registers(consumers), action="increase")

      @tile_loop()
      def _tile(info):
        (lin,) = info.index
        m_idx, n_idx = tile_index(lin)
        step0 = info.local_index * k_iters
        row0, col0 = m_idx * tile_m, n_idx * tile_n
        if config.wg_split == "m":
          row0 = row0 + wg * wg_m
        else:
          col0 = col0 + wg * wg_n
        # The epilogue vectors of this consumer's part travel during the
        # main loop.
        srcs = (a_scale_gmem.at[pl.ds(row0, wg_m)], b_scale_gmem.at[pl.ds(col0, wg_n)],
                bias_gmem.at[pl.ds(col0, wg_n)])[:n_vec]
        for i, (src, dst) in enumerate(zip(srcs, vec_smem)):
          plgpu.copy_gmem_to_smem(src, dst.at[wg], vec_barriers.at[wg * n_vec + i])

        if k_iters <= chunk_iters:
          acc = chunk_sum(step0, 0, k_iters)
          out = acc if int_out else acc.astype(jnp.float32)
        else:  # int32 per chunk, chunks summed in float32 in chunk order
          def add_chunk(c, total, n_steps=chunk_iters):
            part = chunk_sum(step0, c * chunk_iters, n_steps)
            return total + part.astype(jnp.float32)

          out = chunk_sum(step0, 0, chunk_iters).astype(jnp.float32)
          out = lax.fori_loop(1, full_chunks, add_chunk, out)
          if last_chunk:  # the ragged last chunk: fewer steps
            out = add_chunk(full_chunks, out, last_chunk)
        if not int_out:
          row_layout = plgpu.Layout.WGMMA.reduce(1)
          col_layout = plgpu.Layout.WGMMA.reduce(0)
          a_scale_smem, b_scale_smem, bias_smem = vec_smem
          plgpu.barrier_wait(vec_barriers.at[wg * n_vec])
          plgpu.barrier_wait(vec_barriers.at[wg * n_vec + 1])
          a_scale = plgpu.load(a_scale_smem.at[wg], layout=row_layout)
          b_scale = plgpu.load(b_scale_smem.at[wg], layout=col_layout)
          out = out * lax.broadcast_in_dim(a_scale, (wg_m, wg_n), [0])
          out = out * lax.broadcast_in_dim(b_scale, (wg_m, wg_n), [1])
          if has_bias:
            plgpu.barrier_wait(vec_barriers.at[wg * n_vec + 2])
            bias = plgpu.load(bias_smem.at[wg], layout=col_layout)
            out = out + lax.broadcast_in_dim(bias, (wg_m, wg_n), [1])
          out = out.astype(out_dtype)
        for j in range(wg_n // epi_n):
          slot = j % epi_slots
          # The store that last used this slot must have read it (the
          # previous tile's stores had this tile's main loop to do so).
          plgpu.wait_smem_to_gmem(epi_slots - 1, wait_read_only=True)
          out_smem[wg, slot] = out if epi_n == wg_n else out[:, j * epi_n:(j + 1) * epi_n]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg, slot],
              out_gmem.at[pl.ds(row0, wg_m), pl.ds(col0 + j * epi_n, epi_n)])

      plgpu.wait_smem_to_gmem(0)  # every store done before the block exits

    lax.cond(wg == consumers, producer, consumer)


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "config", "interpret", "has_bias"))
def _int8_matmul_ws_padded(a, b, a_scale, b_scale, bias, *, out_dtype, config,
                           interpret, has_bias):
  """Kernel launch on operands already padded to whole tiles."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  m, k = a.shape
  n = b.shape[0]
  m_iters, n_iters = m // config.tile_m, n // config.tile_n
  num_ctas = min(config.num_ctas or num_sms(), m_iters * n_iters)
  kernel = plgpu.kernel(
      functools.partial(_ws_kernel, config=config, m_iters=m_iters,
                        n_iters=n_iters, k_iters=k // config.tile_k,
                        has_bias=has_bias, int_out=out_dtype == jnp.int32),
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_ctas,),
      grid_names=("sm",),
      num_threads=config.num_consumers + 1,
      thread_name="wg",
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="int8_matmul_ws",
  )
  return kernel(a, b, a_scale, b_scale, bias)


def int8_matmul_ws(a, b, *, a_scale=None, b_scale=None, bias=None,
                   out_dtype=jnp.float32,
                   config: Int8MatmulWSConfig | None = None,
                   interpret: bool = False):
  """:func:`~pallas_kernels.int8_matmul.int8_matmul` on the persistent,
  warp-specialised kernel: ``(a @ b.T) * a_scale[:, None] * b_scale + bias``.

  Args:
    a: (M, K) int8, K-major (row-major).
    b: (N, K) int8, K-major -- the right-hand side *transposed*.
    a_scale: None (= 1), a scalar, or (M,) float -- per-row scale of ``a``.
    b_scale: None (= 1), a scalar, or (N,) float -- per-row scale of ``b``.
    bias: None, a scalar, or (N,) float, added after scaling.
    out_dtype: float32, bfloat16, or int32 (the raw exact accumulator;
      scales and bias must be None and K <= ``config.k_chunk``).
    config: :class:`Int8MatmulWSConfig`; ``select_ws_config(M, N, K)`` if
      None.
    interpret: run under ``plgpu.InterpretGPUParams()`` (CPU, bit-exact,
      slow; for tests).

  Returns:
    (M, N) array of ``out_dtype``, equal bit for bit to
    ``int8_matmul_reference(..., k_chunk=config.k_chunk)`` (in the
    interpreter; on a GPU the float epilogue may differ by an ulp from XLA's,
    as int8_matmul's does).

  Any M, N, K: the operands are zero-padded to whole tiles (zeros add
  nothing to the integer sums) and the result sliced. Same argument checks
  and errors as ``int8_matmul``.
  """
  a_scale, b_scale, bias = check_matmul_args(a, b, a_scale, b_scale, bias,
                                             out_dtype)
  if config is None:
    config = select_ws_config(a.shape[0], b.shape[0], a.shape[1])
  if not isinstance(config, Int8MatmulWSConfig):
    raise TypeError(f"config must be an Int8MatmulWSConfig, got {config!r}")
  out_dtype = jnp.dtype(out_dtype)
  check_int32_k(a.shape[1], config.k_chunk, out_dtype)
  check_smem(config, out_dtype, interpret)
  store_bytes = (config.epi_tile_n or config.wg_tile[1]) * out_dtype.itemsize
  if store_bytes % 32:
    raise ValueError(
        f"{config=} stores rows of {store_bytes} bytes of {out_dtype.name} "
        "(epi_tile_n, or a consumer's columns); TMA stores need a multiple of "
        "32 bytes: widen epi_tile_n or tile_n")
  m, k = a.shape
  n = b.shape[0]
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  m_pad = round_up(m, config.tile_m)
  n_pad = round_up(n, config.tile_n)
  k_pad = round_up(max(k, 1), config.tile_k)
  ones_m = jnp.ones((m,), jnp.float32)
  ones_n = jnp.ones((n,), jnp.float32)
  out = _int8_matmul_ws_padded(
      pad2d(a, m_pad, k_pad),
      pad2d(b, n_pad, k_pad),
      pad1d(ones_m if a_scale is None else a_scale, m_pad),
      pad1d(ones_n if b_scale is None else b_scale, n_pad),
      pad1d(jnp.zeros((n,), jnp.float32) if bias is None else bias, n_pad),
      out_dtype=out_dtype, config=config, interpret=bool(interpret),
      has_bias=bias is not None)
  if (m_pad, n_pad) != (m, n):
    out = out[:m, :n]
  return out
