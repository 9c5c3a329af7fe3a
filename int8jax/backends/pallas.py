"""Pallas backend: the three int8 GEMMs of a quantized conv / dense layer on
:func:`pallas_kernels.int8_matmul` (Mosaic GPU, Hopper).

Same functions, arguments and results as :mod:`int8jax.backends.xla` (the
exact reference): int8 operands, float32 ``exact_sum * scale`` out. Every
conv becomes explicit GEMMs over im2col patches (:func:`~int8jax.conv_geometry.patches`), with
both kernel operands K-major (geometry from :mod:`int8jax.conv_geometry`):

=======  ===========================  ============================  ==============
GEMM     a (M, K)                     b (N, K)                      result (M, N)
=======  ===========================  ============================  ==============
forward  patches (pixels, win*C/G)    w^T (O/G, win*C/G)            scale fused
dgrad    patches of the transposed    flipped, group-swapped w^T    scale fused
(s = 1)  conv of g (in pixels,        (C/G, win*O/G)
         win*O/G)
dgrad    g (out pixels, O/G)          w (win*C/G, O/G)              int32, col2im
(s > 1)
wgrad    patches^T (win*C/G, pixels)  g^T (O/G, pixels)             dw (win*C/G, O/G)
=======  ===========================  ============================  ==============

dgrad follows the split :func:`~int8jax.conv_geometry.dgrad_by_transposed_conv`
chooses for both backends (the transposed conv when unstrided, GEMM + int32
col2im when strided) with the GEMMs on the kernel, so both backends compute
the same integers.

Exactness (bit-identical to the XLA backend, checked in
``tests/test_pallas_backend.py``):

* A contraction of ``K <= min(chunk_k, INT32_SAFE_K)`` is one int32
  accumulator; the kernel epilogue computes ``float32(acc) * 1 * scale``, the
  same two roundings as XLA's ``acc.astype(float32) * scale``.
* Longer contractions (weight gradients: K = batch x output pixels) are split
  into chunks of ``min(chunk_k, INT32_SAFE_K)``; each chunk runs the kernel
  with ``out_dtype=int32`` (the raw exact accumulator) and the parts are
  combined with :func:`int8jax.exact.combine_int32_chunks`, as the XLA backend does
  (correctly rounded float32 of the exact sum, for <= 256 chunks). The
  kernel's own in-register float32 chunk sum is *not* used: it rounds once
  per chunk and would differ from XLA in the last bits.

Groups: ``feature_group_count == 1`` is one GEMM per product. Grouped convs
whose groups have at least :data:`MIN_GROUP_FEATURES` input and output
features run one kernel call per group (Python loop; ResNeXt-style). Narrower
groups (depthwise, G == C) would pad every group's tiny GEMM to a whole
64/128-wide tile: their forward and input gradient run as bf16 grouped
convolutions over the int8 values with float32 accumulation, exact by the
bound of :mod:`int8jax.backends.float_exact` (no int8 grouped ``lax`` conv —
those have a wrong-result bug in XLA:GPU/cuDNN), and their weight gradient
(a contraction over batch x pixels) on the XLA backend's exact int32
arithmetic (elementwise multiply-adds and int8 ``dot_general``s). These
routes, and the split-K one (:data:`SPLIT_K_MIN_K`), are declared in one
place, :data:`FALLBACKS` (the backend's ``fallbacks``, listed in the docs
table of :func:`int8jax.backends.table`); the functions below run only the
kernels' shapes.

Conv kernels: 2-D, ungrouped, undilated convs run on the implicit-GEMM conv
kernels of :mod:`pallas_kernels.int8_conv` instead of the im2col GEMMs above
(:data:`IMPLICIT_GEMM`, env ``INT8JAX_IMPLICIT_GEMM``, on by default). With
:data:`DIRECT_CONV` (env ``INT8JAX_DIRECT_CONV=1``, off by default; not yet run
on a GPU) the forward and the input gradient (any stride) of those convs run on
the direct-addressing kernels of :mod:`pallas_kernels.conv_direct` (per-tap TMA
boxes of the NHWC tensor, no shifted copies; the strided input gradient as one
launch per output phase, each storing into dx in place: no interleave), and
their weight gradient (any stride; plain and ``halves``) on
:mod:`pallas_kernels.conv_direct_wgrad` (per-tap boxes of channel-major x^T and
g^T, each transposed once in XLA) instead. Falls back, silently (both routes
are exact), to the route taken without the switch: a forward / input gradient
whose default config has ``tile_k != swizzle`` (none of
``select_conv_config``'s today); a weight gradient
:func:`pallas_kernels.conv_direct_wgrad.direct_wgrad_accepts` rejects
(N*Ho*Wo, or its row-padded steps, beyond 256 exact parts of INT32_SAFE_K
pixels -- where the implicit kernel raises too).

Dense ``(B, M, K) x (B, K, N)``: one kernel call per batch entry (B is 1 for
ordinary layers).

``interpret=True`` (backend name ``"pallas_interpret"``, :data:`INTERPRETED`)
runs the kernels under ``plgpu.InterpretGPUParams()`` on the CPU, for tests.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import conv_direct
from pallas_kernels import conv_direct_wgrad
from int8jax import conv_geometry as geom
from int8jax import exact
from int8jax.backends import float_exact, platform, xla
from int8jax.backends.base import CHUNK_K, FUNCTIONS, Backend, Fallback, WgradLayout, dequant
from int8jax.conv_spec import ConvSpec

# Grouped convs use the kernel per group only when every group has at least
# this many input and output features; narrower groups (depthwise) use
# batched XLA dot_generals (see the module doc).
MIN_GROUP_FEATURES = 64

# Split-K shapes go to XLA's int8 dot_general (cuBLAS int8 on the GPU) instead
# of the kernel: the kernel has no split-K yet, so a GEMM whose output grid
# has fewer (128 x 128) blocks than Hopper has multiprocessors (132) runs its
# whole contraction on a few of them. The weight gradient is that shape: M =
# window x C_in, N = C_out, K = batch x pixels. Measured on an H200
# (benchmarks/RESULTS.md, 2026-11-26): ResNet-50's 64x64x802,816 wgrad GEMM
# took 5.15 ms on the kernel, 0.13 ms through XLA int8. Still int8 x int8 with
# exact int32 accumulation (chunked like the XLA backend), bit-identical.
SPLIT_K_MIN_K = 16384
SPLIT_K_MAX_BLOCKS = 132

# Which conv GEMMs run on the implicit-GEMM kernels of pallas_kernels.int8_conv
# (no im2col matrix in memory: per-tap shifted windows of the padded int8
# input, no intermediate above ~1.2x the input; 3.6x the input's bytes read
# for a 3x3 conv instead of the patch matrix's 9x) when the conv is 2-D,
# ungrouped and undilated. The weight gradient's implicit kernel competes
# with cuBLAS int8 over a patch matrix (the split-K route above): it is on
# because it keeps the step's memory bounded; benchmarks/kernels.py times
# both on a GPU, and this table is where a measurement would switch it. Not
# yet measured on hardware (2026-12-01).
#
# The environment variable INT8JAX_IMPLICIT_GEMM, read once when this module
# is imported, sets all three entries: "1" (or unset) on, "0" off -- every
# conv then takes the im2col / int8_matmul route described above, as before
# 2026-12-01 (scripts/gpu_session.sh sets it when the smoke test of a kernel
# fails or hangs). Any other value is a ValueError. Code may still set single
# entries of the dict afterwards (tests do); implicit_gemm_from_env() re-reads
# a mapping without touching the dict.
IMPLICIT_GEMM_ENV = "INT8JAX_IMPLICIT_GEMM"


def implicit_gemm_from_env(environ=None) -> bool:
  """Whether ``environ`` (default ``os.environ``) switches the implicit-GEMM
  conv kernels on: :data:`IMPLICIT_GEMM_ENV` unset or ``"1"`` -> True,
  ``"0"`` -> False, anything else -> ValueError naming the variable."""
  value = (os.environ if environ is None else environ).get(IMPLICIT_GEMM_ENV, "1")
  if value not in ("0", "1"):
    raise ValueError(f"{IMPLICIT_GEMM_ENV} must be '0' (im2col/int8_matmul for every conv) "
                     f"or '1' (implicit-GEMM conv kernels, the default), got {value!r}")
  return value == "1"


IMPLICIT_GEMM = dict.fromkeys(("forward", "dgrad", "wgrad"), implicit_gemm_from_env())

# Which conv GEMMs run on the direct-addressing kernels of
# pallas_kernels.conv_direct (issue 24: each tap's operand a 4-D TMA box of the
# NHWC int8 tensor as produced -- no pad, no shifted copies -- and the result
# stored straight into NHWC; ~1x the input's bytes handed to the kernel instead
# of the implicit kernels' ~4x). "forward": the forward conv, any stride
# (strides > 1 through the phase split, one int8 XLA pass). "dgrad": the input
# gradient, any stride (strides > 1: one launch per output phase reading g
# itself, each storing its phase into one dx in place -- no padded g, no shifted
# copies, no interleave: 1.07x the int8 input's bytes handed at stride 2 for the
# issue's 3x3 64->64 conv, instead of the implicit kernel's 3.66x). "wgrad": the
# weight gradient, any stride, plain and halves (data-parallel per-shard), on
# pallas_kernels.conv_direct_wgrad (x and g transposed once to channel-major in
# XLA -- the pass a quantize fusion would write as a second output -- and read
# once per tap as boxes: ~2x the input's bytes handed instead of the implicit
# kernel's ~9x).
# Taken for the convs the implicit kernels would take (2-D, ungrouped,
# undilated; _implicit's contraction bound), whatever IMPLICIT_GEMM says, when
# the kernel's config has tile_k == swizzle (every select_conv_config config
# has; _direct) -- for the weight gradient, when direct_wgrad_accepts (its
# default config always has tile_k == swizzle; the exact parts' bound on its
# row-padded pixel steps; _direct_wgrad). Everything else -- any other config --
# runs as without the switch (IMPLICIT_GEMM's route); both routes are
# bit-exact, so the fallback is silent. Bit-exact in interpret mode and compiled
# by mosaic-offline, NOT yet run on a GPU (2026-12-03: the untiled-view box
# bytes, TMA's zero fill below 0 and the strided dgrad's 5-D box stores into dx
# chained in place are unverified on hardware), hence off by default.
#
# The environment variable INT8JAX_DIRECT_CONV, read once when this module is
# imported, sets all three entries: "0" (or unset) off, "1" on. Any other value is
# a ValueError. Tests set the entries of the dict (monkeypatch);
# direct_conv_from_env() re-reads a mapping without touching the dict.
DIRECT_CONV_ENV = "INT8JAX_DIRECT_CONV"


def direct_conv_from_env(environ=None) -> bool:
  """Whether ``environ`` (default ``os.environ``) switches the direct-addressing
  conv kernels on: :data:`DIRECT_CONV_ENV` unset or ``"0"`` -> False, ``"1"``
  -> True, anything else -> ValueError naming the variable."""
  value = (os.environ if environ is None else environ).get(DIRECT_CONV_ENV, "0")
  if value not in ("0", "1"):
    raise ValueError(f"{DIRECT_CONV_ENV} must be '0' (the implicit-GEMM / im2col conv "
                     "kernels, the default) or '1' (direct-addressing forward, "
                     f"input-gradient and weight-gradient kernels), got {value!r}")
  return value == "1"


DIRECT_CONV = dict.fromkeys(("forward", "dgrad", "wgrad"), direct_conv_from_env())


# ---------------------------------------------------------------------------
# GEMM helpers: a (M, K) int8, b (N, K) int8, both K-major.


def _chunk(chunk_k: int) -> int:
  return min(chunk_k, pk.INT32_SAFE_K)


def _split_k_shape(m: int, n: int, k: int) -> bool:
  """True for GEMMs the kernel runs on too few blocks (see SPLIT_K_*)."""
  blocks = -(-m // 128) * -(-n // 128)
  return k >= SPLIT_K_MIN_K and blocks < SPLIT_K_MAX_BLOCKS


def _int_gemm(a, b, *, chunk_k, interpret, halves=False):
  """``a @ b.T`` exactly: int32 if ``K`` fits one chunk, else the correctly
  rounded float32 of the exact sum (int32 chunk parts combined exactly); the
  :data:`int8jax.exact.Halves` of the exact sum with ``halves=True``."""
  k = a.shape[1]
  c = _chunk(chunk_k)
  mm = functools.partial(pk.int8_matmul, out_dtype=jnp.int32, interpret=interpret)
  parts = [mm(a[:, s:s + c], b[:, s:s + c]) for s in range(0, max(k, 1), c)]
  if halves:
    return exact.split_halves(jnp.stack(parts), axis=0)
  if len(parts) == 1:
    return parts[0]
  if k <= chunk_k:  # INT32_SAFE_K < K <= chunk_k <= MAX_EXACT_K: int32 is safe
    return sum(parts[1:], parts[0])
  return exact.combine_int32_chunks(jnp.stack(parts), axis=0)


_KERNEL_OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _gemm(a, b, scale, *, chunk_k, interpret, out_dtype=jnp.float32, halves=False):
  """``(a @ b.T) * scale`` in ``out_dtype``; ``scale`` scalar or (N,); the
  exact result's :data:`int8jax.exact.Halves` (no scale) with ``halves``."""
  if halves:
    if _split_k_shape(a.shape[0], b.shape[0], a.shape[1]):
      return exact.int8_dot(a, b, (1, 1), chunk_k=chunk_k, halves=True)
    return _int_gemm(a, b, chunk_k=chunk_k, interpret=interpret, halves=True)
  if _split_k_shape(a.shape[0], b.shape[0], a.shape[1]):
    return dequant(exact.int8_dot(a, b, (1, 1), chunk_k=chunk_k), scale, out_dtype)
  if a.shape[1] <= _chunk(chunk_k) and jnp.dtype(out_dtype) in _KERNEL_OUT_DTYPES:
    # Single int32 accumulator: dequantization (and the cast) fused in the
    # kernel epilogue, float32(acc) * scale like dequant.
    return pk.int8_matmul(a, b, b_scale=scale, out_dtype=out_dtype, interpret=interpret)
  return dequant(_int_gemm(a, b, chunk_k=chunk_k, interpret=interpret), scale, out_dtype)


def _implicit(spec: ConvSpec, which: str) -> bool:
  """Whether this conv GEMM runs on the implicit-GEMM kernel (see IMPLICIT_GEMM)."""
  return IMPLICIT_GEMM[which] and _conv_kernel_shape(spec, which)


def _conv_kernel_shape(spec: ConvSpec, which: str) -> bool:
  """Whether the conv kernels (implicit or direct) take this conv GEMM: 2-D,
  ungrouped, undilated, a per-row contraction within INT32_SAFE_K."""
  if spec.nspatial != 2 or spec.feature_group_count != 1:
    return False
  if any(d != 1 for d in spec.lhs_dilation + spec.rhs_dilation):
    return False
  _, kw, cg, og = spec.group_dims
  k = {"forward": kw * cg, "dgrad": kw * og, "wgrad": 0}[which]
  return k <= pk.INT32_SAFE_K


def _direct(spec: ConvSpec, which: str, k_channels: int, n_channels: int) -> bool:
  """Whether this conv GEMM runs on the direct-addressing kernel (see DIRECT_CONV):
  switched on, a conv the implicit kernels would take (geometry, contraction), and a
  default config (``select_conv_config(k_channels, n_channels)``) the direct kernel
  accepts (tile_k == swizzle)."""
  if not DIRECT_CONV.get(which, False) or not _conv_kernel_shape(spec, which):
    return False
  config = pk.select_conv_config(k_channels, n_channels)
  return config.tile_k == config.swizzle


def _direct_wgrad(spec: ConvSpec, interpret) -> bool:
  """Whether the weight gradient runs on the direct kernel (see DIRECT_CONV): switched
  on, a conv the implicit kernels would take, and one
  :func:`pallas_kernels.conv_direct_wgrad.direct_wgrad_accepts` with its default config
  (tile_k == swizzle by construction)."""
  if not DIRECT_CONV.get("wgrad", False) or not _conv_kernel_shape(spec, "wgrad"):
    return False
  return conv_direct_wgrad.direct_wgrad_accepts(
      spec.lhs_shape, spec.rhs_shape, window_strides=spec.window_strides,
      padding=spec.padding, interpret=interpret)


def _use_kernel(spec: ConvSpec) -> bool:
  """Whether the conv's GEMMs run on the kernel: ungrouped, or groups with at
  least :data:`MIN_GROUP_FEATURES` input and output features. Narrower groups
  (depthwise) run forward and input gradient as exact bf16 convolutions
  (:mod:`int8jax.backends.float_exact`) and the weight gradient on exact
  int32 arithmetic (:func:`int8jax.backends.xla.conv_wgrad`)."""
  g, _, cg, og = spec.group_dims
  return g == 1 or min(cg, og) >= MIN_GROUP_FEATURES


# ---------------------------------------------------------------------------
# Convolutions (channel-last ConvSpec form, see int8jax.conv_spec).


def _conv(xq, wq, scale, spec: ConvSpec, *, chunk_k, interpret, out_dtype):
  """Exact conv as im2col GEMMs on the kernel, one per group; scale fused."""
  g, kw, cg, og = spec.group_dims
  p = geom.patches(xq, spec)
  m = math.prod(p.shape[:-2])
  p = p.reshape(m, kw, g, cg)
  w = wq.reshape(kw, cg, g, og)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (spec.out_features,))
  outs = []
  for i in range(g):
    a = p[:, :, i, :].reshape(m, kw * cg)                  # (pixels, win*C/G)
    b = jnp.transpose(w[:, :, i, :].reshape(kw * cg, og))  # (O/G, win*C/G)
    outs.append(_gemm(a, b, scale[i * og:(i + 1) * og], chunk_k=chunk_k,
                      interpret=interpret, out_dtype=out_dtype))
  y = outs[0] if g == 1 else jnp.concatenate(outs, axis=-1)
  return y.reshape(spec.out_shape)


def conv_forward(xq: jax.Array, wq: jax.Array, scale: jax.Array, spec: ConvSpec,
                 *, chunk_k: int = CHUNK_K, interpret: bool = False,
                 out_dtype=jnp.float32) -> jax.Array:
  """``conv(xq, wq) * scale`` as an im2col GEMM; ``scale`` scalar or (O,)."""
  if _direct(spec, "forward", spec.lhs_shape[-1], spec.out_features):
    return _implicit_call(conv_direct.int8_conv_direct, xq, wq, scale, out_dtype, interpret,
                          window_strides=spec.window_strides, padding=spec.padding)
  if _implicit(spec, "forward"):
    return _implicit_call(pk.int8_conv, xq, wq, scale, out_dtype, interpret,
                          window_strides=spec.window_strides, padding=spec.padding)
  return _conv(xq, wq, scale, spec, chunk_k=chunk_k, interpret=interpret,
               out_dtype=out_dtype)


def _implicit_call(fn, a, b, scale, out_dtype, interpret, **geometry):
  """An implicit-GEMM conv kernel with the epilogue ``float32(acc) * scale``
  (cast in the kernel when it can write ``out_dtype``), as dequant."""
  if jnp.dtype(out_dtype) in _KERNEL_OUT_DTYPES:
    return fn(a, b, scale=scale, out_dtype=out_dtype, interpret=interpret, **geometry)
  return dequant(fn(a, b, scale=scale, interpret=interpret, **geometry), 1.0, out_dtype)


def conv_dgrad(gq: jax.Array, wq: jax.Array, scale: jax.Array, spec: ConvSpec,
               *, chunk_k: int = CHUNK_K, interpret: bool = False,
               out_dtype=jnp.float32) -> jax.Array:
  """Input gradient ``(N, *spatial, C)``, split like the XLA backend's.

  Unstrided: the transposed conv (:func:`~int8jax.conv_geometry.transpose_spec`,
  :func:`~int8jax.conv_geometry.transpose_kernel` — JAX's transpose rule) as a forward im2col
  GEMM on the kernel, scale fused. Strided: the transposed conv would run on
  a zero-dilated ``g`` (``prod(strides)`` times the work), so instead
  ``g (pixels, O/G) @ w^T`` to patch space with ``out_dtype=int32`` and
  :func:`~int8jax.conv_geometry.col2im` summing exact integers.
  """
  if _direct(spec, "dgrad", spec.out_features, spec.lhs_shape[-1]):
    return _implicit_call(conv_direct.int8_conv_direct_dgrad, gq, wq, scale, out_dtype,
                          interpret, input_shape=spec.lhs_shape,
                          window_strides=spec.window_strides, padding=spec.padding)
  if _implicit(spec, "dgrad"):
    return _implicit_call(pk.int8_conv_dgrad, gq, wq, scale, out_dtype, interpret,
                          input_shape=spec.lhs_shape, window_strides=spec.window_strides,
                          padding=spec.padding)
  g, kw, cg, og = spec.group_dims
  if geom.dgrad_by_transposed_conv(spec, chunk_k):
    return _conv(gq, geom.transpose_kernel(wq, spec), scale, geom.transpose_spec(spec),
                 chunk_k=chunk_k, interpret=interpret, out_dtype=out_dtype)
  m = math.prod(gq.shape[:-1])
  gm = gq.reshape(m, g, og)
  w = wq.reshape(kw, cg, g, og)
  parts = []
  for i in range(g):
    # (pixels, O/G) x (win*C/G, O/G): both K-major over O/G; K <= chunk_k.
    dp = _int_gemm(gm[:, i, :], w[:, :, i, :].reshape(kw * cg, og), chunk_k=chunk_k,
                   interpret=interpret)
    parts.append(dp.reshape(m, kw, 1, cg))
  dp = parts[0] if g == 1 else jnp.concatenate(parts, axis=2)  # (m, kw, G, cg)
  dp = dp.reshape(*gq.shape[:-1], kw, g * cg)
  return dequant(geom.col2im(dp, spec), scale, out_dtype)


def conv_wgrad(xq: jax.Array, gq: jax.Array, scale: jax.Array, spec: ConvSpec,
               *, chunk_k: int = CHUNK_K, interpret: bool = False,
               out_dtype=jnp.float32, halves: bool = False):
  """Kernel gradient ``(*window, C // G, O)``: a GEMM over transposed patches,
  contracting over batch x output pixels (chunked, exact); ``scale`` scalar
  or (O,). ``halves=True``: the exact integer result as
  :data:`int8jax.exact.Halves` (no scale; see the XLA backend)."""
  geometry = dict(kernel_shape=spec.rhs_shape, window_strides=spec.window_strides,
                  padding=spec.padding)
  if _direct_wgrad(spec, interpret):
    if halves:
      return conv_direct_wgrad.int8_conv_wgrad_direct_halves(xq, gq, interpret=interpret,
                                                             **geometry)
    return _implicit_call(conv_direct_wgrad.int8_conv_wgrad_direct, xq, gq, scale, out_dtype,
                          interpret, **geometry)
  if _implicit(spec, "wgrad"):
    if halves:
      return pk.int8_conv_wgrad_halves(xq, gq, interpret=interpret, **geometry)
    return _implicit_call(pk.int8_conv_wgrad, xq, gq, scale, out_dtype, interpret, **geometry)
  g, kw, cg, og = spec.group_dims
  p = geom.patches(xq, spec)
  m = math.prod(p.shape[:-2])
  p = p.reshape(m, kw, g, cg)
  gm = gq.reshape(m, g, og)
  scale = jnp.broadcast_to(jnp.asarray(1.0 if halves else scale, jnp.float32),
                           (spec.out_features,))
  outs = []
  for i in range(g):
    a = jnp.transpose(p[:, :, i, :].reshape(m, kw * cg))  # (win*C/G, pixels)
    b = jnp.transpose(gm[:, i, :])                          # (O/G, pixels)
    outs.append(jax.tree.map(lambda t: t.reshape(kw, cg, og), _gemm(
        a, b, scale[i * og:(i + 1) * og], chunk_k=chunk_k, interpret=interpret,
        out_dtype=out_dtype, halves=halves)))
  cat = lambda *t: (t[0] if g == 1 else jnp.concatenate(t, axis=-1)).reshape(  # noqa: E731
      *spec.window, cg, g * og)
  return jax.tree.map(cat, *outs)


def _wgrad_channel_major(xt, gt, scale, spec: ConvSpec, *, operands, interpret,
                         out_dtype=jnp.float32, halves: bool = False):
  """:func:`conv_wgrad` on the direct kernel's channel-major operands (WgradLayout.run)."""
  if halves:
    return conv_direct_wgrad.int8_conv_wgrad_channel_major_halves(
        xt, gt, operands=operands, interpret=interpret)
  return _implicit_call(functools.partial(conv_direct_wgrad.int8_conv_wgrad_channel_major,
                                          operands=operands),
                        xt, gt, scale, out_dtype, interpret)


def conv_wgrad_layout(spec: ConvSpec, *, interpret: bool = False) -> WgradLayout | None:
  """Where the weight gradient runs on the direct kernel (:func:`_direct_wgrad`): the
  channel-major layout it reads (:class:`pallas_kernels.conv_direct_wgrad.ChannelMajorOperands`),
  so that the ops have the fusions quantizing x and g write it as a second output (no
  transposing pass of their own). Otherwise None (NHWC)."""
  if not _direct_wgrad(spec, interpret):
    return None
  operands = conv_direct_wgrad.channel_major_operands(
      spec.lhs_shape, spec.rhs_shape, window_strides=spec.window_strides,
      padding=spec.padding, interpret=interpret)
  return WgradLayout(key=("pallas.channel_major", operands, bool(interpret)),
                     x=operands.x, g=operands.g,
                     run=functools.partial(_wgrad_channel_major, operands=operands,
                                           interpret=interpret))


# ---------------------------------------------------------------------------
# Dense: lhs (B, M, K), rhs (B, K, N), out (B, M, N); one kernel call per b.


def _per_batch(fn, *arrays):
  return jnp.stack([fn(*(x[i] for x in arrays)) for i in range(arrays[0].shape[0])])


def dense_forward(xq, wq, scale, *, chunk_k=CHUNK_K, interpret=False, out_dtype=jnp.float32):
  """``y[b] = x[b] @ w[b] * scale``; scale scalar or per output feature (N,)."""
  return _per_batch(lambda x, w: _gemm(x, w.T, scale, chunk_k=chunk_k, interpret=interpret,
                                       out_dtype=out_dtype), xq, wq)


def dense_dgrad(gq, wq, scale, *, chunk_k=CHUNK_K, interpret=False, out_dtype=jnp.float32):
  """``dx[b] = g[b] @ w[b].T * scale`` (both operands already K-major)."""
  return _per_batch(lambda g, w: _gemm(g, w, scale, chunk_k=chunk_k, interpret=interpret,
                                       out_dtype=out_dtype), gq, wq)


def dense_wgrad(xq, gq, scale, *, chunk_k=CHUNK_K, interpret=False, out_dtype=jnp.float32,
                halves=False):
  """``dw[b] = x[b].T @ g[b] * scale``, contracting over M (the exact
  result's halves, no scale, with ``halves=True``)."""
  outs = [_gemm(xq[i].T, gq[i].T, scale, chunk_k=chunk_k, interpret=interpret,
                out_dtype=out_dtype, halves=halves) for i in range(xq.shape[0])]
  return jax.tree.map(lambda *t: jnp.stack(t), *outs)


# ---------------------------------------------------------------------------
# The backend: where it runs, and the shapes it hands to other exact routes.


def _narrow_groups(spec: ConvSpec) -> bool:
  return not _use_kernel(spec)


_NARROW = (f"groups narrower than {MIN_GROUP_FEATURES} input or output features "
           "(depthwise)")

#: The shapes on which this backend runs another exact route. The first three
#: are dispatched by :meth:`~int8jax.backends.base.Backend.function` before
#: the functions above run; the split-K route is chosen per GEMM in
#: :func:`_gemm`. All give the kernels' bits (and ``"xla"``'s).
FALLBACKS = (
    Fallback(("conv_forward",), _NARROW, "exact bf16 grouped conv (float_exact.conv_forward)",
             applies=_narrow_groups, run=float_exact.conv_forward),
    Fallback(("conv_dgrad",), _NARROW, "exact bf16 transposed conv (float_exact.conv_dgrad)",
             applies=_narrow_groups, run=float_exact.conv_dgrad),
    Fallback(("conv_wgrad",), _NARROW, "int32 multiply-adds / int8 dot_general "
             "(xla.conv_wgrad)", applies=_narrow_groups, run=xla.conv_wgrad),
    Fallback(FUNCTIONS,
             f"a GEMM with K >= {SPLIT_K_MIN_K} and under {SPLIT_K_MAX_BLOCKS} 128x128 "
             "output blocks (split-K shapes: weight gradients)",
             "XLA int8 dot_general, chunked (exact.int8_dot)"),
)


def _check() -> None:
  if not platform.pallas_allowed():
    raise ValueError(
        "backend='pallas' needs a Hopper GPU (compute capability 9.x) with "
        f"Mosaic GPU; this machine's jax backend is {jax.default_backend()!r}. "
        "Use backend='xla', backend=None (best available), or "
        "backend='pallas_interpret' (kernels in interpret mode on CPU, for tests)")


BACKEND = Backend(
    "pallas", "Mosaic GPU int8 kernels of pallas_kernels (Hopper only); bit-identical to "
    "'xla'", conv_forward, conv_dgrad, conv_wgrad, dense_forward, dense_dgrad, dense_wgrad,
    check=_check, available=platform.pallas_available, auto_rank=0, per_shard=True,
    fallbacks=FALLBACKS, conv_wgrad_layout=conv_wgrad_layout)

# The same backend with every kernel under Mosaic GPU interpret mode (CPU;
# bit-exact, slow): ``QuantConfig(backend="pallas_interpret")``. For tests.
INTERPRETED = BACKEND.replace(
    name="pallas_interpret",
    description="the 'pallas' kernels in Mosaic GPU interpret mode: runs on a CPU, slowly; "
    "for tests", check=Backend.check, available=Backend.available, auto_rank=None,
    conv_wgrad_layout=functools.partial(conv_wgrad_layout, interpret=True),
    **{f: functools.partial(getattr(BACKEND, f), interpret=True) for f in FUNCTIONS})
