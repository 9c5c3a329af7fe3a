"""Persistent, warp-specialised direct weight gradient (Hopper; issue 24, item 2).

The weight gradient of :mod:`pallas_kernels.conv_direct_wgrad` -- same arguments, same
operands (:class:`~pallas_kernels.conv_direct_wgrad.ChannelMajorOperands`: channel-major
x^T (C, H', W'*N') and g^T (O, Ho, Wo'*N')), same split of the pixels into parts
(its ``_plan``), same exact combination of the parts in XLA (its ``_join_parts``), same
bits as :func:`pallas_kernels.int8_conv.int8_conv_wgrad_reference` -- scheduled as
:mod:`pallas_kernels.int8_matmul_ws` is, to hide what the one-item-per-block kernel
serialises (one 128-thread CTA per SM with big SMEM: TMA latency, the epilogue's store and
the next block's prologue):

* **persistent**: the grid is ``config.num_ctas`` blocks (default: the GPU's SM count, 132
  without a GPU), never more than there are work items; a work item is one (tap x part,
  C tile, O tile) of the non-persistent kernel's grid, and block ``b`` walks items ``b,
  b + num_ctas, ...`` (``plgpu.nd_loop``) in the order (part, tap, C tile, O tile), the O
  tile fastest: blocks running at the same time work on the same pixel part, so they read
  the same g^T rows and x^T rows a tap's shift apart (at most KH rows), from L2;
* **warp-specialised**: one producer warpgroup (``setmaxnreg`` 40) issues each step's two
  TMA boxes -- x^T's ``(tile_m channels, tile_k pixels)`` box at the tap's shifted row and
  column, g^T's ``(tile_n, tile_k)`` box -- through the untiled, swizzled view of the ring
  slot (:func:`pallas_kernels.conv_direct.untiled_view`: a box may start at any element,
  and below 0, read as zeros); ``num_consumers`` (1 or 2) consumer warpgroups run int8
  ``wgmma`` on their ``(tile_m / 2, tile_n)`` (``wg_split="m"``) or ``(tile_m, tile_n /
  2)`` (``"n"``) part of the item's tile;
* **latency hidden**: the ring (:func:`pallas_kernels.int8_matmul_ws.ring_produce` /
  ``ring_consume`` / ``ring_drain``, shared with that kernel) is numbered over all of a
  block's (item, step) pairs, so the producer loads the next item's first steps while the
  consumers finish the current one; each consumer stores its int32 tile through its own SMEM
  slot by TMA into the (taps*parts, Cp, Op) output and goes on with the next item while the
  store drains (it waits for the slot to be read only before its next store).

Interpret mode (CPU): as :mod:`~pallas_kernels.conv_direct_wgrad`'s -- the boxes are copied
into the tiled slots (the interpreter reshapes no refs) and, at stride 1, x's low padding is
added in XLA (the interpreter reads no box starting below 0). The interpreter runs the
warpgroups and their barriers (``tests/test_conv_direct_wgrad_ws.py``).

Lowering: Mosaic GPU's "Lane" semantics (the untiled view), with ``num_threads`` =
consumers + 1 warpgroups.

**Not used by the library**: int8jax's Pallas backend calls
:func:`~pallas_kernels.conv_direct_wgrad.int8_conv_wgrad_channel_major`; this kernel has
never run on a GPU (checked bit-exact in the CPU interpreter and compiled to SASS offline:
``pallas_kernels/README.md``); its barriers on hardware (a hang), results and speed are
unchecked. ``benchmarks/gpu_smoke.py`` checks it (gate ``direct_ws_ok``) and
``benchmarks/kernels.py --direct-wgrad`` times it next to the non-persistent kernel in the
next GPU session.

Public API: :class:`DirectWgradWSConfig`, :data:`DIRECT_WGRAD_WS_CONFIGS`,
:func:`direct_wgrad_ws_config`, :func:`int8_conv_wgrad_channel_major_ws`,
:func:`int8_conv_wgrad_channel_major_ws_halves`, :func:`int8_conv_wgrad_direct_ws`,
:func:`int8_conv_wgrad_direct_ws_halves`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import check_smem
from pallas_kernels._common import check_tiling
from pallas_kernels._common import out_transforms
from pallas_kernels.conv_common import launcher_for
from pallas_kernels.conv_direct_wgrad import ChannelMajorOperands
from pallas_kernels.conv_direct_wgrad import _check_cm
from pallas_kernels.conv_direct_wgrad import _join_parts
from pallas_kernels.conv_direct_wgrad import _plan
from pallas_kernels.conv_direct_wgrad import channel_major_operands
from pallas_kernels.conv_direct_wgrad import direct_wgrad_config
from pallas_kernels.conv_direct_wgrad import step_issuer
from pallas_kernels.conv_wgrad import check_wgrad_args
from pallas_kernels.conv_wgrad import check_wgrad_epilogue
from pallas_kernels.conv_wgrad import check_wgrad_pixels
from pallas_kernels.conv_wgrad import wgrad_epilogue
from pallas_kernels.int8_matmul_ws import PRODUCER_REGISTERS
from pallas_kernels.int8_matmul_ws import check_warp_specialisation
from pallas_kernels.int8_matmul_ws import consumer_tile
from pallas_kernels.int8_matmul_ws import consumer_registers
from pallas_kernels.int8_matmul_ws import num_sms
from pallas_kernels.int8_matmul_ws import ring_consume
from pallas_kernels.int8_matmul_ws import ring_drain
from pallas_kernels.int8_matmul_ws import ring_produce

__all__ = ["DIRECT_WGRAD_WS_CONFIGS", "DirectWgradWSConfig", "direct_wgrad_ws_config",
           "int8_conv_wgrad_channel_major_ws", "int8_conv_wgrad_channel_major_ws_halves",
           "int8_conv_wgrad_direct_ws", "int8_conv_wgrad_direct_ws_halves"]


@dataclasses.dataclass(frozen=True)
class DirectWgradWSConfig:
  """Tiling and schedule of the persistent direct weight gradient (static, hashable).

  Attributes:
    tile_m: input channels of a work item's tile, a multiple of 64 (of ``64 *
      num_consumers`` with ``wg_split="m"``).
    tile_n: output channels of a work item's tile, a multiple of 8 in [8, 256].
    tile_k: pixels per step, equal to ``swizzle`` (one swizzle row per channel: each box is
      written through an untiled view).
    swizzle: 128, 64 or 32 bytes.
    max_concurrent_steps: ring slots (TMA loads in flight), >= 2.
    num_consumers: wgmma warpgroups, 1 or 2 (one producer warpgroup more).
    wg_split: ``"m"`` (each consumer ``tile_m / num_consumers`` channels) or ``"n"`` (each
      ``tile_n / num_consumers`` output channels).
    num_ctas: persistent blocks; None = one per SM (132 without a GPU); never more than
      there are work items.
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  swizzle: int = 128
  max_concurrent_steps: int = 4
  num_consumers: int = 2
  wg_split: str = "m"
  num_ctas: int | None = None

  def __post_init__(self):
    check_tiling(self, ("num_consumers",))
    if self.tile_k != self.swizzle:
      raise ValueError(f"tile_k={self.tile_k} must equal swizzle={self.swizzle}: each step "
                       "loads one swizzle row of pixels per channel through an untiled view")
    check_warp_specialisation(self, "channels", "output channels")

  @property
  def wg_tile(self) -> tuple[int, int]:
    """(channels, output channels) of one consumer's int32 accumulator."""
    return consumer_tile(self)

  def smem_bytes(self, out_dtype=jnp.int32) -> int:
    """Shared memory of a block: the ring and one int32 output slot per consumer (the
    output is int32 whatever ``out_dtype``: the epilogue runs in XLA)."""
    del out_dtype
    ring = (self.tile_m + self.tile_n) * self.tile_k * self.max_concurrent_steps
    return ring + self.tile_m * self.tile_n * 4 + 1024  # + barriers / alignment


# The four tile shapes of select_wgrad_config (C tile x O tile), 128-pixel steps; the
# default config of a conv is one of these with the swizzle direct_wgrad_config picks.
# Two consumers where each still runs a 64x64 or wider wgmma, one on 64x64 tiles.
DW_WS_64x64 = DirectWgradWSConfig(tile_m=64, tile_n=64, num_consumers=1)
DW_WS_64x128 = DirectWgradWSConfig(tile_m=64, tile_n=128, wg_split="n")
DW_WS_128x64 = DirectWgradWSConfig(tile_m=128, tile_n=64)
DW_WS_128x128 = DirectWgradWSConfig(tile_m=128, tile_n=128)
DIRECT_WGRAD_WS_CONFIGS = (DW_WS_64x64, DW_WS_64x128, DW_WS_128x64, DW_WS_128x128)


def direct_wgrad_ws_config(c: int, o: int, row_len: int) -> DirectWgradWSConfig:
  """The default config: :func:`~pallas_kernels.conv_direct_wgrad.direct_wgrad_config`'s
  tile, swizzle and ring depth, with the consumers of the
  :data:`DIRECT_WGRAD_WS_CONFIGS` entry of that tile."""
  base = direct_wgrad_config(c, o, row_len)
  entry = next(e for e in DIRECT_WGRAD_WS_CONFIGS
               if (e.tile_m, e.tile_n) == (base.tile_m, base.tile_n))
  return dataclasses.replace(entry, tile_k=base.tile_k, swizzle=base.swizzle,
                             max_concurrent_steps=base.max_concurrent_steps)


# ----------------------------------------------------------------------------
# Mosaic GPU kernel.
# ----------------------------------------------------------------------------


def _ws_kernel(xt_gmem, gt_gmem, out_gmem, *, taps, n_img: int, row_chunks: int,
               parts: int, part_steps: int, m_iters: int, n_iters: int,
               config: DirectWgradWSConfig, tiled_copies: bool):
  """The persistent kernel body, run by every warpgroup of every block.

  GMEM: xT (C, H', W'*N') int8, gT (O, Ho, Wo*N') int8, out (taps*parts, Cp, Op) int32.
  Warpgroups 0 .. num_consumers-1 compute, the last one loads. Work item ``lin`` (in
  0 .. parts*taps*m_iters*n_iters) is (part, tap, C tile, O tile), the O tile fastest; its
  steps are ring steps ``local_item * part_steps + i``. ``taps``: per tap its (row,
  column) offset into xT's image. ``tiled_copies``: load into the tiled slots (interpret
  mode) instead of through the untiled views.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  wg_m, wg_n = config.wg_tile
  consumers, slots = config.num_consumers, config.max_concurrent_steps
  ntaps = len(taps)
  items = parts * ntaps * m_iters * n_iters
  transforms = (plgpu.TilingTransform((8, config.swizzle)),
                plgpu.SwizzleTransform(config.swizzle))

  def item_index(lin):
    """(tap, part, C tile, O tile) of work item ``lin``."""
    outer, mn = lax.div(lin, m_iters * n_iters), lax.rem(lin, m_iters * n_iters)
    part, tap = lax.div(outer, ntaps), lax.rem(outer, ntaps)
    return tap, part, lax.div(mn, n_iters), lax.rem(mn, n_iters)

  item_loop = functools.partial(plgpu.nd_loop, (items,), collective_axes="sm")

  def local_items():
    sm, num_ctas = lax.axis_index("sm"), lax.axis_size("sm")
    return (items - sm + num_ctas - 1) // num_ctas

  @functools.partial(
      pl.run_scoped,
      a_ring=plgpu.SMEM((slots, tile_m, tile_k), jnp.int8, transforms=transforms),
      b_ring=plgpu.SMEM((slots, tile_n, tile_k), jnp.int8, transforms=transforms),
      produced=plgpu.Barrier(num_arrivals=2, num_barriers=slots),
      consumed=plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
      out_smem=plgpu.SMEM((consumers, wg_m, wg_n), jnp.int32,
                          transforms=out_transforms(wg_n, jnp.int32)),
      collective_axes="wg",
  )
  def _scope(a_ring, b_ring, produced, consumed, out_smem):
    wg = lax.axis_index("wg")

    def producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      @item_loop()
      def _item(info):
        (lin,) = info.index
        tap, part, m_idx, n_idx = item_index(lin)
        issue = step_issuer(
            xt_gmem, gt_gmem, a_ring, b_ring, produced, tap=tap, part=part,
            c_rows=pl.ds(m_idx * tile_m, tile_m), o_rows=pl.ds(n_idx * tile_n, tile_n),
            taps=taps, n_img=n_img, row_chunks=row_chunks, part_steps=part_steps,
            tile_k=tile_k, tiled_copies=tiled_copies)

        ring_produce(issue, consumed, info.local_index * part_steps, part_steps, slots)

      ring_drain(consumed, local_items() * part_steps, slots)

    if config.wg_split == "m":
      wg_a, wg_b = pl.ds(wg * wg_m, wg_m), slice(None)
    else:
      wg_a, wg_b = slice(None), pl.ds(wg * wg_n, wg_n)

    def consumer():
      plgpu.set_max_registers(consumer_registers(consumers), action="increase")

      @item_loop()
      def _item(info):
        (lin,) = info.index
        tap, part, m_idx, n_idx = item_index(lin)
        row0, col0 = m_idx * tile_m, n_idx * tile_n
        if config.wg_split == "m":
          row0 = row0 + wg * wg_m
        else:
          col0 = col0 + wg * wg_n

        def scope(acc_ref):
          ring_consume(acc_ref, a_ring, b_ring, produced, consumed,
                       info.local_index * part_steps, part_steps, slots, wg_a, wg_b)
          return acc_ref[...]

        acc = pl.run_scoped(scope, plgpu.ACC((wg_m, wg_n), jnp.int32))
        # This consumer's previous store must have read its slot (it had this item's
        # main loop to do so).
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[wg] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            out_smem.at[wg],
            out_gmem.at[tap * parts + part, pl.ds(row0, wg_m), pl.ds(col0, wg_n)])

      plgpu.wait_smem_to_gmem(0)  # every store done before the block exits

    lax.cond(wg == consumers, producer, consumer)


@functools.partial(jax.jit, static_argnames=("operands", "out_dtype", "config", "launcher",
                                             "halves"))
def _wgrad_ws_impl(xt, gt, scale, *, operands: ChannelMajorOperands, out_dtype, config,
                   launcher, halves):
  import jax.experimental.pallas.mosaic_gpu as plgpu

  interpret = launcher != "mosaic_gpu"
  _, _, taps, _ = operands._geometry()  # pylint: disable=protected-access
  n_img = operands.layout.n_img
  row_chunks, _, parts, part_steps, cp, op = _plan(operands.g_shape, operands.kernel_shape,
                                                   config, n_img)
  m_iters, n_iters = cp // config.tile_m, op // config.tile_n
  items = len(taps) * parts * m_iters * n_iters
  num_ctas = min(config.num_ctas or num_sms(), items)
  kernel = plgpu.kernel(
      functools.partial(_ws_kernel, taps=taps, n_img=n_img, row_chunks=row_chunks,
                        parts=parts, part_steps=part_steps, m_iters=m_iters,
                        n_iters=n_iters, config=config, tiled_copies=interpret),
      out_type=jax.ShapeDtypeStruct((len(taps) * parts, cp, op), jnp.int32),
      grid=(num_ctas,),
      grid_names=("sm",),
      num_threads=config.num_consumers + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=launcher if interpret else None,
      kernel_name="int8_conv_wgrad_direct_ws",
  )
  return _join_parts(kernel(xt, gt), scale, operands=operands, parts=parts,
                     out_dtype=out_dtype, halves=halves)


@functools.partial(jax.jit, static_argnames=("operands", "out_dtype", "config", "launcher",
                                             "halves"))
def _direct_ws_impl(x, g, scale, *, operands, out_dtype, config, launcher, halves):
  # The two channel-major tensors, one XLA pass each (the library's fusions write them).
  return _wgrad_ws_impl(operands.x(x), operands.g(g), scale, operands=operands,
                        out_dtype=out_dtype, config=config, launcher=launcher, halves=halves)


def _config_for(operands: ChannelMajorOperands, config, interpret):
  launcher = launcher_for(interpret)
  check_wgrad_pixels(int(np.prod(operands.g_shape[:3])))
  if config is None:
    _, _, wo, _ = operands.g_shape
    config = direct_wgrad_ws_config(operands.kernel_shape[2], operands.kernel_shape[3],
                                    wo * operands.layout.n_img)
  if not isinstance(config, DirectWgradWSConfig):
    raise TypeError(f"config must be a DirectWgradWSConfig, got {config!r}")
  check_smem(config, jnp.int32, launcher != "mosaic_gpu")
  return config, launcher


def _empty(operands):
  return min(operands.g_shape) == 0 or min(operands.kernel_shape) == 0


def int8_conv_wgrad_channel_major_ws(xt, gt, *, operands: ChannelMajorOperands, scale=None,
                                     out_dtype=jnp.float32,
                                     config: DirectWgradWSConfig | None = None,
                                     interpret=False):
  """:func:`pallas_kernels.conv_direct_wgrad.int8_conv_wgrad_channel_major` on the
  persistent, warp-specialised kernel: same arguments (``config`` a
  :class:`DirectWgradWSConfig`, :func:`direct_wgrad_ws_config` if None), same bits."""
  _check_cm(xt, gt, operands)
  config, launcher = _config_for(operands, config, interpret)
  scale, out_dtype = check_wgrad_epilogue(scale, out_dtype, operands.kernel_shape[3])
  if _empty(operands):
    return wgrad_epilogue(jnp.zeros(operands.kernel_shape, jnp.float32), scale, out_dtype)
  return _wgrad_ws_impl(xt, gt, scale, operands=operands, out_dtype=out_dtype, config=config,
                        launcher=launcher, halves=False)


def int8_conv_wgrad_channel_major_ws_halves(xt, gt, *, operands: ChannelMajorOperands,
                                            config: DirectWgradWSConfig | None = None,
                                            interpret=False):
  """The exact integer result of :func:`int8_conv_wgrad_channel_major_ws` as (hi, lo) int32
  (KH, KW, C, O) halves, ``hi * 65536 + lo`` (as
  :func:`~pallas_kernels.conv_direct_wgrad.int8_conv_wgrad_channel_major_halves`)."""
  _check_cm(xt, gt, operands)
  config, launcher = _config_for(operands, config, interpret)
  if _empty(operands):
    zero = jnp.zeros(operands.kernel_shape, jnp.int32)
    return zero, zero
  return _wgrad_ws_impl(xt, gt, None, operands=operands, out_dtype=jnp.float32,
                        config=config, launcher=launcher, halves=True)


def _setup(x, g, kernel_shape, window_strides, padding, config, interpret, low_pad_in_xla):
  kernel_shape, strides, pads = check_wgrad_args(x, g, kernel_shape, window_strides, padding)
  operands = channel_major_operands(x.shape, kernel_shape, window_strides=strides,
                                    padding=pads, low_pad_in_xla=low_pad_in_xla,
                                    interpret=interpret)
  config, launcher = _config_for(operands, config, interpret)
  return operands, config, launcher


def int8_conv_wgrad_direct_ws(x, g, *, kernel_shape, window_strides=(1, 1), padding="VALID",
                              scale=None, out_dtype=jnp.float32,
                              config: DirectWgradWSConfig | None = None,
                              low_pad_in_xla: bool | None = None, interpret=False):
  """:func:`pallas_kernels.conv_direct_wgrad.int8_conv_wgrad_direct` (NHWC x and g; the
  channel-major tensors made here, one XLA pass each) on the persistent, warp-specialised
  kernel: same arguments (``config`` a :class:`DirectWgradWSConfig`), same bits."""
  operands, config, launcher = _setup(x, g, kernel_shape, window_strides, padding, config,
                                      interpret, low_pad_in_xla)
  scale, out_dtype = check_wgrad_epilogue(scale, out_dtype, operands.kernel_shape[3])
  if _empty(operands):
    return wgrad_epilogue(jnp.zeros(operands.kernel_shape, jnp.float32), scale, out_dtype)
  return _direct_ws_impl(x, g, scale, operands=operands, out_dtype=out_dtype, config=config,
                         launcher=launcher, halves=False)


def int8_conv_wgrad_direct_ws_halves(x, g, *, kernel_shape, window_strides=(1, 1),
                                     padding="VALID", config: DirectWgradWSConfig | None = None,
                                     low_pad_in_xla: bool | None = None, interpret=False):
  """:func:`int8_conv_wgrad_direct_ws`'s exact integer result as (hi, lo) int32 halves."""
  operands, config, launcher = _setup(x, g, kernel_shape, window_strides, padding, config,
                                      interpret, low_pad_in_xla)
  if _empty(operands):
    zero = jnp.zeros(operands.kernel_shape, jnp.int32)
    return zero, zero
  return _direct_ws_impl(x, g, None, operands=operands, out_dtype=jnp.float32, config=config,
                         launcher=launcher, halves=True)
