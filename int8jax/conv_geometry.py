"""Convolution geometry shared by the backends: im2col, col2im, the transposed conv.

Pure index work in ``lax`` (slices, pads, stacks) on channel-last
:class:`~int8jax.conv_spec.ConvSpec` operands of any dtype; no arithmetic
beyond sums of integer tensors, so results stay exact. Both GEMM backends
(:mod:`int8jax.backends.xla`, :mod:`int8jax.backends.pallas`) build their
GEMM operands with these functions, which is what makes them compute the
same integers:

* :func:`patches` / :func:`patch_slices` -- im2col from strided slices of the
  padded input (no conv, no gather);
* :func:`col2im` -- its transpose, summing each window offset's slice back;
* :func:`transpose_spec` / :func:`transpose_kernel` -- the convolution that
  computes the input gradient (JAX's transpose rule: input dilation becomes
  stride, the kernel is flipped with its feature axes swapped per group);
* :func:`dgrad_by_transposed_conv` -- the one place that picks how the input
  gradient is computed.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

from int8jax.conv_spec import ConvSpec, make_conv_spec

__all__ = ["pad_input", "patch_slices", "patches", "col2im", "transpose_spec",
           "transpose_kernel", "dgrad_by_transposed_conv"]


def pad_input(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """Apply the conv's input dilation and (lo, hi) padding explicitly."""
  cfg = [(0, 0, 0)]
  cfg += [(lo, hi, d - 1) for (lo, hi), d in zip(spec.padding, spec.lhs_dilation)]
  cfg += [(0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _offsets(spec: ConvSpec):
  return itertools.product(*[range(k) for k in spec.window])


def patch_slices(x: jax.Array, spec: ConvSpec) -> list[jax.Array]:
  """One ``(N, *out_spatial, C)`` strided slice of the padded input per window offset."""
  xp = pad_input(x, spec)
  n, c = x.shape[0], x.shape[-1]
  out_sp = spec.out_spatial
  cols = []
  for offs in _offsets(spec):
    start = [0] + [o * d for o, d in zip(offs, spec.rhs_dilation)] + [0]
    limit = [n] + [st + (m - 1) * s + 1 if m > 0 else st
                   for st, m, s in zip(start[1:], out_sp, spec.window_strides)] + [c]
    cols.append(lax.slice(xp, start, limit, (1, *spec.window_strides, 1)))
  return cols


def patches(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """im2col: ``(N, *spatial, C)`` -> ``(N, *out_spatial, prod(window), C)``."""
  return jnp.stack(patch_slices(x, spec), axis=-2)


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
  for i, offs in enumerate(_offsets(spec)):
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


def _dilate(shape, dilation):
  return [0 if d == 0 else 1 + r * (d - 1) for d, r in zip(shape, dilation)]


def transpose_spec(spec: ConvSpec) -> ConvSpec:
  """The convolution computing the input gradient (JAX's transpose rule).

  Its input is the output gradient ``(N, *out_spatial, O)``, its kernel is
  :func:`transpose_kernel`, its output has the forward input's shape.
  """
  g, _, cg, og = spec.group_dims
  lhs_d = _dilate(spec.lhs_shape[1:-1], spec.lhs_dilation)
  rhs_d = _dilate(spec.window, spec.rhs_dilation)
  out_d = _dilate(spec.out_spatial, spec.window_strides)
  before = [r - lo - 1 for r, (lo, _) in zip(rhs_d, spec.padding)]
  after = [l + r - 1 - o - b for l, r, o, b in zip(lhs_d, rhs_d, out_d, before)]
  t = make_conv_spec(spec.out_shape, (*spec.window, og, g * cg), spec.lhs_dilation,
                     list(zip(before, after)), spec.window_strides, spec.rhs_dilation,
                     spec.lax_dimension_numbers, g)
  assert t.out_shape == spec.lhs_shape, (t.out_shape, spec.lhs_shape)
  return t


def transpose_kernel(wq: jax.Array, spec: ConvSpec) -> jax.Array:
  """``(*window, C//G, O)`` -> flipped ``(*window, O//G, C)`` kernel of the dgrad conv."""
  g, _, cg, og = spec.group_dims
  n = spec.nspatial
  w = wq.reshape(*spec.window, cg, g, og)
  w = jnp.moveaxis(w, (n, n + 1, n + 2), (n + 2, n + 1, n))  # (*window, og, G, cg)
  return jnp.flip(w.reshape(*spec.window, og, g * cg), axis=tuple(range(n)))


def dgrad_by_transposed_conv(spec: ConvSpec, chunk_k: int) -> bool:
  """How the input gradient is computed (both backends follow this choice).

  ``True``: as the transposed convolution (:func:`transpose_spec`) -- for
  unstrided convs, and for strided ones whose per-group ``g @ w^T``
  contraction would exceed one exact int32 chunk. ``False``: ``g @ w^T`` to
  patch space, then :func:`col2im` -- for strided convs, where the
  transposed conv would convolve a zero-dilated ``g`` (``prod(strides)``
  times the work, and XLA:CPU builds those patches slowly).
  """
  _, kw, _, og = spec.group_dims
  return all(s == 1 for s in spec.window_strides) or kw * og > chunk_k
