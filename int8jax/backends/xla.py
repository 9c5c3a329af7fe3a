"""XLA backend: the three int8 GEMMs of a quantized conv / dense layer in ``lax``.

Every function takes int8 operands in the channel-last form of
:mod:`int8jax.conv_spec` (or the ``(B, M, K) x (B, K, N)`` form of a dense
layer), accumulates int8 x int8 products in int32
(``preferred_element_type=jnp.int32``) and returns float32
``exact_sum * scale``. It is the exact integer reference of the library and
the CPU backend (what ``backend=None`` picks there). Written for XLA:CPU:
compiled by XLA:GPU its convs gave wrong input gradients (see
``int8jax.backends.XLA_ON_GPU_MESSAGE``), so it is refused on GPUs.

Speed on XLA:CPU: only some int8 ops get XLA's int8 GEMM kernel. Measured on
the 2-core development machine (see benchmarks/): an int8 ``dot_general``
whose ``lhs`` contracts over its *last* axis (``(M, K) @ (K, N)`` or
``(M, K) @ (N, K)^T``) runs 1.4-4x faster than float32, while contracting
over ``lhs`` axis 0 falls onto a generic path ~10x slower; int8 convs with
fewer than 32 input features (ResNet-20's first stage) run ~12x slower than
float32, and transposed / dilated int8 convs are slow too (docs/design.md §3).
So every product here is an im2col GEMM in the fast layout:

* forward: ``patches(x) (M, prod(window)*C) @ w (prod(window)*C, O)``;
* input gradient: the transposed convolution (JAX's own transpose rule:
  flipped, group-swapped kernel, ``lhs_dilation`` = forward stride) run as a
  forward im2col GEMM — no col2im scatter;
* weight gradient: ``patches(x)^T (prod(window)*C, M) @ g (M, O)``, the patch
  matrix built already transposed so the GEMM contracts over its last axis;
* depthwise convs (one input feature per group) skip GEMMs: fused
  elementwise multiply-adds over the window offsets in int32.

Memory and scheduling (see docs/performance.md): the op
(:mod:`int8jax.ops`) hands these functions int8 tensors that were
materialised once, behind ``lax.optimization_barrier``, and ties the forward
residual ``xq`` to the output-gradient ``gq`` before the weight gradient, so
XLA builds each layer's patch matrix when that layer's backward runs (left
free, it hoisted all of them to the start of the backward pass: 192 MB alive
at once in a ResNet-20 step). XLA:CPU allocates a step's temporaries afresh
on every call, so every byte of scratch also costs page faults.

Overflow: a contraction longer than ``chunk_k`` (weight gradients contract over
batch x height x width) is split into chunks of at most ``chunk_k`` int32
products, combined exactly (:mod:`int8jax.exact`). The patch and transposed
conv geometry is :mod:`int8jax.conv_geometry`, shared with the Pallas backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from int8jax.backends import platform
from int8jax.backends.base import CHUNK_K, Backend, dequant
from int8jax.conv_geometry import (col2im, dgrad_by_transposed_conv, patch_slices, patches,
                                   transpose_kernel, transpose_spec)
from int8jax.conv_spec import ConvSpec
from int8jax.exact import int8_dot, int32_sum


# ---------------------------------------------------------------------------
# Convolutions (channel-last ConvSpec form).


def _depthwise(xq, wq, spec: ConvSpec) -> jax.Array:
  """Conv with one input feature per group: int32 multiply-adds per window offset."""
  g, kw, _, og = spec.group_dims
  w = wq.reshape(kw, g, og).astype(jnp.int32)
  acc = None
  for i, sl in enumerate(patch_slices(xq, spec)):
    term = sl.astype(jnp.int32)[..., None] * w[i]
    acc = term if acc is None else acc + term
  return acc.reshape(spec.out_shape).astype(jnp.float32)


def _direct_conv_ok(spec: ConvSpec, chunk_k: int) -> bool:
  g, kw, cg, _ = spec.group_dims
  return (g == 1 and cg >= _DIRECT_MIN_FEATURES and kw * cg <= chunk_k
          and all(d == 1 for d in spec.lhs_dilation))


def conv_exact(xq: jax.Array, wq: jax.Array, spec: ConvSpec, *, chunk_k: int) -> jax.Array:
  """The exact integer convolution of int8 ``xq`` and ``wq`` as float32.

  Ungrouped convs with at least 8 input features and no input dilation run
  as XLA's int8 conv (exact int32 accumulation); with fewer than 32 input
  and output features the kernel gets zero output features up to 32, which
  keeps XLA:CPU on its int8 kernel (16->16 features: 98 ms unpadded, 7.5 ms
  padded, 10 ms float32 on the development CPU). Other convs: im2col GEMM;
  depthwise: multiply-adds.
  """
  g, kw, cg, og = spec.group_dims
  if cg == 1 and kw <= chunk_k:
    return _depthwise(xq, wq, spec)
  if _direct_conv_ok(spec, chunk_k):
    o = spec.out_features
    if max(cg, o) < _DIRECT_FAST_FEATURES:
      wq = jnp.pad(wq, [(0, 0)] * (wq.ndim - 1) + [(0, _DIRECT_FAST_FEATURES - o)])
    y = lax.conv_general_dilated(xq, wq, spec.window_strides, spec.padding, None,
                                 spec.rhs_dilation, spec.lax_dimension_numbers,
                                 preferred_element_type=jnp.int32)
    return y[..., :o].astype(jnp.float32)
  p = patches(xq, spec)
  m = math.prod(spec.out_shape[:-1])
  if g == 1:
    y = int8_dot(p.reshape(m, kw * cg), wq.reshape(kw * cg, og), (1, 0), chunk_k=chunk_k)
    return y.reshape(spec.out_shape)
  p = p.reshape(m, kw, g, cg).transpose(2, 0, 1, 3).reshape(g, m, kw * cg)
  w = wq.reshape(kw, cg, g, og).transpose(2, 0, 1, 3).reshape(g, kw * cg, og)
  y = int8_dot(p, w, (2, 1), ((0,), (0,)), chunk_k=chunk_k)  # (G, m, og)
  return y.transpose(1, 0, 2).reshape(spec.out_shape)


# XLA:CPU runs an int8 conv on its int8 kernel when it has >= 8 input features
# and >= 32 input or output features (measured, jax 0.12, benchmarks/).
_DIRECT_MIN_FEATURES = 8
_DIRECT_FAST_FEATURES = 32


def conv_forward(xq: jax.Array, wq: jax.Array, scale: jax.Array, spec: ConvSpec,
                 *, chunk_k: int = CHUNK_K, out_dtype=jnp.float32) -> jax.Array:
  """``conv(xq, wq) * scale`` (``scale`` scalar or per output feature ``(O,)``)."""
  return dequant(conv_exact(xq, wq, spec, chunk_k=chunk_k), scale, out_dtype)


def conv_dgrad(gq: jax.Array, wq: jax.Array, scale: jax.Array, spec: ConvSpec,
               *, chunk_k: int = CHUNK_K, out_dtype=jnp.float32) -> jax.Array:
  """Input gradient ``(N, *spatial, C)``, exact.

  Unstrided convs: the transposed conv (JAX's transpose rule: input dilation
  becomes stride, kernel flipped with its feature axes swapped per group) run
  as a forward im2col GEMM. Strided convs: that transposed conv would
  convolve a zero-dilated ``g`` (XLA:CPU builds those patches slowly), so
  instead ``g @ w^T`` to patch space in int32, then :func:`col2im`.
  """
  g, kw, cg, og = spec.group_dims
  if dgrad_by_transposed_conv(spec, chunk_k):
    t = transpose_spec(spec)
    return dequant(conv_exact(gq, transpose_kernel(wq, spec), t, chunk_k=chunk_k), scale,
                    out_dtype)
  m = math.prod(gq.shape[:-1])
  gm = gq.reshape(m, g, og)
  w = wq.reshape(kw, cg, g, og)
  if cg == 1:  # depthwise: dp[m, k, G] = sum_j g[m, G, j] w[k, G, j], elementwise
    dp = jnp.sum(gm.astype(jnp.int32)[:, None] * w.reshape(kw, g, og).astype(jnp.int32),
                 axis=-1, dtype=jnp.int32)
  elif g == 1:
    dp = lax.dot_general(gm.reshape(m, og), w.reshape(kw * cg, og), (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.int32)  # (m, kw*cg)
  else:
    dp = lax.dot_general(gm.transpose(1, 0, 2), w.transpose(2, 0, 1, 3).reshape(g, kw * cg, og),
                         (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.int32)
    dp = dp.reshape(g, m, kw, cg).transpose(1, 2, 0, 3)  # (m, kw, G, cg)
  dp = dp.reshape(*gq.shape[:-1], kw, g * cg)
  return dequant(col2im(dp, spec).astype(jnp.float32), scale, out_dtype)


def conv_wgrad(xq: jax.Array, gq: jax.Array, scale: jax.Array, spec: ConvSpec,
               *, chunk_k: int = CHUNK_K, out_dtype=jnp.float32, halves: bool = False):
  """Kernel gradient ``(*window, C // G, O)``: ``patches^T @ g`` per group.

  The patch matrix is built transposed, ``(prod(window) * C//G, M)`` with
  ``M`` = batch x output pixels, so the GEMM contracts over its last axis
  (chunked over ``M``, see the module doc). ``halves=True``: the exact
  integer result as :data:`int8jax.exact.Halves` (no scale), for sums
  combined across devices.
  """
  g, kw, cg, og = spec.group_dims
  m = math.prod(gq.shape[:-1])
  slices = patch_slices(xq, spec)
  if cg == 1:  # depthwise: one reduction per window offset
    g32 = gq.reshape(m, g, og).astype(jnp.int32)
    per_tap = [int32_sum(sl.reshape(m, g, 1).astype(jnp.int32) * g32, 0, chunk_k=chunk_k,
                         halves=halves) for sl in slices]  # (G, og) each
    dw = jax.tree.map(lambda *t: jnp.stack(t).reshape(*spec.window, 1, g * og), *per_tap)
  else:
    pt = jnp.stack(slices).reshape(kw, m, g, cg)
    gm = gq.reshape(m, g, og)
    if g == 1:
      pt = pt.reshape(kw, m, cg).transpose(0, 2, 1).reshape(kw * cg, m)
      dw = int8_dot(pt, gm.reshape(m, og), (1, 0), chunk_k=chunk_k, halves=halves)
      dw = jax.tree.map(lambda t: t.reshape(*spec.window, cg, og), dw)
    else:
      pt = pt.transpose(2, 0, 3, 1).reshape(g, kw * cg, m)
      dw = int8_dot(pt, gm.transpose(1, 0, 2), (2, 1), ((0,), (0,)), chunk_k=chunk_k,
                    halves=halves)
      dw = jax.tree.map(lambda t: t.reshape(g, kw, cg, og).transpose(1, 2, 0, 3).reshape(
          *spec.window, cg, g * og), dw)
  return dw if halves else dequant(dw, scale, out_dtype)


# ---------------------------------------------------------------------------
# Dense: lhs (B, M, K), rhs (B, K, N), out (B, M, N).


def dense_forward(xq, wq, scale, *, chunk_k=CHUNK_K, out_dtype=jnp.float32):
  return dequant(int8_dot(xq, wq, (2, 1), ((0,), (0,)), chunk_k=chunk_k), scale, out_dtype)


def dense_dgrad(gq, wq, scale, *, chunk_k=CHUNK_K, out_dtype=jnp.float32):
  # dx[b, m, k] = sum_n g[b, m, n] w[b, k, n]
  return dequant(int8_dot(gq, wq, (2, 2), ((0,), (0,)), chunk_k=chunk_k), scale, out_dtype)


def dense_wgrad(xq, gq, scale, *, chunk_k=CHUNK_K, out_dtype=jnp.float32, halves: bool = False):
  # dw[b, k, n] = sum_m x[b, m, k] g[b, m, n]; x transposed so the GEMM
  # contracts over its last axis (XLA:CPU's int8 kernel; see the module doc).
  dw = int8_dot(jnp.swapaxes(xq, 1, 2), gq, (2, 1), ((0,), (0,)), chunk_k=chunk_k,
                halves=halves)
  return dw if halves else dequant(dw, scale, out_dtype)


def _check() -> None:
  platform.check_xla_allowed("backend='xla'")


BACKEND = Backend(
    "xla", "lax int8 ops with exact int32 accumulation: the exact reference and the CPU "
    "backend; refused when tracing for a GPU (XLA:GPU gave wrong input gradients)",
    conv_forward, conv_dgrad, conv_wgrad, dense_forward, dense_dgrad, dense_wgrad,
    check=_check, auto_rank=1)
