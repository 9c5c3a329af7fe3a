"""XLA backend: the three int8 GEMMs of a quantized conv / dense layer in ``lax``.

Every function takes int8 operands in the channel-last form of
:mod:`int8jax.conv_spec` (or the ``(B, M, K) x (B, K, N)`` form of a dense
layer), accumulates int8 x int8 products in int32
(``preferred_element_type=jnp.int32``) and returns float32
``exact_sum * scale``. It is the exact integer reference of the library and
the default on CPU.

Speed on XLA:CPU (DESIGN.md §3): the forward conv stays a conv (XLA runs int8
convs at GEMM speed); the two gradient products are written as GEMMs over
explicitly built patches, because transposed / dilated int8 convs fall onto a
generic int32 path 10–30x slower.

Overflow: a contraction longer than ``chunk_k`` (weight gradients contract over
batch x height x width) is split into chunks of at most ``chunk_k`` int32
products; chunk sums are combined exactly (16-bit halves summed in int32,
then one float32 rounding), so the result is the correctly rounded float32 of
the exact integer sum for up to ``256 * chunk_k`` terms.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from int8jax.conv_spec import ConvSpec

name = "xla"


# ---------------------------------------------------------------------------
# Exact int32 accumulation over bounded chunks.


def combine_int32_chunks(parts: jax.Array, axis: int = 0) -> jax.Array:
  """Sum int32 partial sums along ``axis`` into float32 with one rounding.

  Each part is split into a signed high half (``>> 16``) and an unsigned low
  half (``& 0xffff``); the halves are summed in int32 and put together in
  float32. Exact (correctly rounded) for up to 256 parts.
  """
  hi = jnp.sum(jnp.right_shift(parts, 16), axis=axis, dtype=jnp.int32)
  lo = jnp.sum(jnp.bitwise_and(parts, 0xFFFF), axis=axis, dtype=jnp.int32)
  return hi.astype(jnp.float32) * 65536.0 + lo.astype(jnp.float32)


def int8_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int],
             batch: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
             *, chunk_k: int) -> jax.Array:
  """``lax.dot_general`` of int8 ``a`` and ``b`` over one contracting axis each.

  Returns the float32 of the exact integer result (see the module doc), in
  ``dot_general``'s output order: batch dims, ``a``'s free dims, ``b``'s free
  dims.
  """
  ca, cb = contract
  k = a.shape[ca]
  dims = (((ca,), (cb,)), batch)
  if k <= chunk_k:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
  n = -(-k // chunk_k)
  pad = n * chunk_k - k

  def split(x, axis):
    x = jnp.moveaxis(x, axis, -1)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], n, chunk_k)

  # Move the contracting axis last, split it into (n, chunk) and make n a
  # leading batch dimension of the dot.
  ba, bb = batch
  a2, b2 = split(a, ca), split(b, cb)

  def remap(axes, moved):
    return tuple(ax - (ax > moved) for ax in axes)

  ba2, bb2 = remap(ba, ca), remap(bb, cb)
  parts = lax.dot_general(
      a2, b2, (((a2.ndim - 1,), (b2.ndim - 1,)),
               ((a2.ndim - 2, *ba2), (b2.ndim - 2, *bb2))),
      preferred_element_type=jnp.int32)
  return combine_int32_chunks(parts, axis=0)


# ---------------------------------------------------------------------------
# Convolutions (channel-last ConvSpec form).


def pad_input(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """Apply the conv's input dilation and (lo, hi) padding explicitly."""
  cfg = [(0, 0, 0)]
  cfg += [(lo, hi, d - 1) for (lo, hi), d in zip(spec.padding, spec.lhs_dilation)]
  cfg += [(0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def patches(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """im2col: ``(N, *spatial, C)`` -> ``(N, *out_spatial, prod(window), C)``.

  Built from strided slices of the padded input (no conv, no gather); its
  transpose is :func:`col2im`.
  """
  xp = pad_input(x, spec)
  n, c = x.shape[0], x.shape[-1]
  out_sp = spec.out_spatial
  cols = []
  for offs in itertools.product(*[range(k) for k in spec.window]):
    start = [0] + [o * d for o, d in zip(offs, spec.rhs_dilation)] + [0]
    limit = [n] + [st + (m - 1) * s + 1 if m > 0 else st
                   for st, m, s in zip(start[1:], out_sp, spec.window_strides)] + [c]
    cols.append(lax.slice(xp, start, limit, (1, *spec.window_strides, 1)))
  return jnp.stack(cols, axis=-2)


def conv_forward(xq: jax.Array, wq: jax.Array, scale: jax.Array, spec: ConvSpec,
                 *, chunk_k: int) -> jax.Array:
  """``conv(xq, wq) * scale``: int8 conv, int32 accumulation, float32 out.

  ``scale`` is a scalar or per-output-feature ``(O,)``. Kernels whose
  contraction ``prod(window) * C // G`` exceeds ``chunk_k`` are split over
  input features and the chunks combined exactly.
  """
  g = spec.feature_group_count
  kwin = math.prod(spec.window)
  cg = spec.rhs_shape[-2]

  def conv(x, w):
    return lax.conv_general_dilated(
        x, w, spec.window_strides, spec.padding, spec.lhs_dilation, spec.rhs_dilation,
        spec.lax_dimension_numbers, g, preferred_element_type=jnp.int32)

  if kwin * cg <= chunk_k:
    return conv(xq, wq).astype(jnp.float32) * scale
  step = max(1, chunk_k // kwin)
  xg = xq.reshape(*xq.shape[:-1], g, cg)
  parts = []
  for s in range(0, cg, step):
    e = min(cg, s + step)
    x_c = xg[..., s:e].reshape(*xq.shape[:-1], g * (e - s))
    parts.append(conv(x_c, wq[..., s:e, :]))
  return combine_int32_chunks(jnp.stack(parts), axis=0) * scale


def conv_wgrad(xq: jax.Array, gq: jax.Array, scale: jax.Array, spec: ConvSpec,
               *, chunk_k: int) -> jax.Array:
  """Kernel gradient ``(*window, C // G, O)``: a GEMM over patches.

  ``dw[k, c, o] = sum_m patches[m, k, c] * g[m, o]`` per group, contracting
  over ``m`` = batch x output pixels (chunked, see the module doc).
  """
  g = spec.feature_group_count
  kw = math.prod(spec.window)
  cg, og = spec.rhs_shape[-2], spec.out_features // g
  p = patches(xq, spec)
  m = math.prod(p.shape[:-2])
  p = p.reshape(m, kw, g, cg)
  gm = gq.reshape(m, g, og)
  # (G, kw, cg, og): batch over groups, contract over m.
  dw = int8_dot(p, gm, (0, 0), ((2,), (1,)), chunk_k=chunk_k)
  dw = jnp.transpose(dw, (1, 2, 0, 3)).reshape(*spec.window, cg, g * og)
  return dw * scale


def col2im(dp: jax.Array, spec: ConvSpec) -> jax.Array:
  """Transpose of :func:`patches`: ``(N, *out_spatial, prod(window), C)`` -> input shape.

  Each window offset's slice is scattered back with ``lax.pad`` (interior
  padding undoes the stride) and summed; then the input padding and dilation
  are undone. Works for integer and float dtypes (integer sums stay exact).
  """
  zero = jnp.zeros((), dp.dtype)
  padded = spec.padded_spatial
  out_sp = spec.out_spatial
  total = None
  for i, offs in enumerate(itertools.product(*[range(k) for k in spec.window])):
    cfg = [(0, 0, 0)]
    for o, d, m, s, p in zip(offs, spec.rhs_dilation, out_sp, spec.window_strides, padded):
      start = o * d
      used = (m - 1) * s + 1 if m > 0 else 0
      cfg.append((start, p - start - used, s - 1 if m > 0 else 0))
    cfg.append((0, 0, 0))
    part = lax.pad(dp[..., i, :], zero, cfg)
    total = part if total is None else total + part
  # Undo pad_input: negative padding crops what positive padding added, then
  # take every lhs_dilation-th element.
  cfg = [(0, 0, 0)] + [(-lo, -hi, 0) for lo, hi in spec.padding] + [(0, 0, 0)]
  total = lax.pad(total, zero, cfg)
  strides = (1, *spec.lhs_dilation, 1)
  return lax.slice(total, (0,) * total.ndim, total.shape, strides)


def conv_dgrad(gq: jax.Array, wq: jax.Array, scale: jax.Array, spec: ConvSpec,
               *, chunk_k: int) -> jax.Array:
  """Input gradient ``(N, *spatial, C)``: a GEMM to patch space, then col2im.

  ``dpatches[m, k, c] = sum_o g[m, o] * w[k, c, o]`` per group; :func:`col2im`
  sums the window positions back (strides, padding, both dilations and groups
  included). While the whole contraction ``prod(window) * O // G`` fits
  ``chunk_k``, col2im runs on the int32 products, so the result is exact;
  beyond that it sums float32 values.
  """
  g = spec.feature_group_count
  kw = math.prod(spec.window)
  cg, og = spec.rhs_shape[-2], spec.out_features // g
  m = math.prod(gq.shape[:-1])
  gm = gq.reshape(m, g, og)
  w = wq.reshape(kw, cg, g, og)
  dims = (((2,), (3,)), ((1,), (2,)))
  if kw * og <= chunk_k:
    dp = lax.dot_general(gm, w, dims, preferred_element_type=jnp.int32)
  else:
    dp = int8_dot(gm, w, (2, 3), ((1,), (2,)), chunk_k=chunk_k)
  dp = jnp.transpose(dp, (1, 2, 0, 3))  # (m, kw, G, cg)
  dp = dp.reshape(*gq.shape[:-1], kw, g * cg)
  return col2im(dp, spec).astype(jnp.float32) * scale


# ---------------------------------------------------------------------------
# Dense: lhs (B, M, K), rhs (B, K, N), out (B, M, N).


def dense_forward(xq, wq, scale, *, chunk_k):
  return int8_dot(xq, wq, (2, 1), ((0,), (0,)), chunk_k=chunk_k) * scale


def dense_dgrad(gq, wq, scale, *, chunk_k):
  # dx[b, m, k] = sum_n g[b, m, n] w[b, k, n]
  return int8_dot(gq, wq, (2, 2), ((0,), (0,)), chunk_k=chunk_k) * scale


def dense_wgrad(xq, gq, scale, *, chunk_k):
  # dw[b, k, n] = sum_m x[b, m, k] g[b, m, n]
  return int8_dot(xq, gq, (1, 1), ((0,), (0,)), chunk_k=chunk_k) * scale

