"""Exact integer accumulation of int8 x int8 products (shared by the backends).

``127 * 127 * K`` overflows int32 once ``K > MAX_EXACT_K`` (133,144), and a
weight gradient contracts over batch x output pixels (millions). So every
contraction runs in int32 over chunks of at most ``chunk_k`` products, and the
chunk sums are combined *exactly*: each int32 part is split into a signed high
half (``>> 16``) and an unsigned low half (``& 0xffff``), the halves are
summed in int32 (no overflow for up to 256 parts) and put together in
float32 with a single rounding. The result is the correctly rounded float32
of the exact integer sum, whatever the chunking -- which is why two backends
that chunk differently still agree bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels

__all__ = ["Halves", "split_halves", "join_halves", "combine_int32_chunks", "int8_dot",
           "int32_sum"]

#: An exact integer result as two int32 arrays ``(hi, lo)``: the sums of the
#: signed high halves (``part >> 16``) and of the unsigned low halves
#: (``part & 0xffff``) of int32 partial sums; the integer is
#: ``hi * 65536 + lo``. Halves of different partitions of one sum add up
#: exactly (int32, no overflow while at most 256 parts are combined), which is
#: how sums computed on different devices combine bit-exactly.
Halves = tuple


# One definition of the halves arithmetic for both layers: the Pallas
# kernels' wgrad combines its int32 parts with the same functions, so the two
# routes round the same integer identically.
split_halves = pallas_kernels.split_halves
join_halves = pallas_kernels.join_halves
combine_int32_chunks = pallas_kernels.combine_int32_chunks


def _result(parts: list, halves: bool):
  """One int32 part (float32 of it), or many (combined exactly); as
  :data:`Halves` with ``halves=True``."""
  if halves:
    return split_halves(jnp.stack(parts), axis=0)
  if len(parts) == 1:
    return parts[0].astype(jnp.float32)
  return combine_int32_chunks(jnp.stack(parts), axis=0)


def int8_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int],
             batch: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
             *, chunk_k: int, halves: bool = False):
  """``lax.dot_general`` of int8 ``a`` and ``b`` over one contracting axis each.

  Returns the float32 of the exact integer result (or its :data:`Halves`), in
  ``dot_general``'s output order: batch dims, ``a``'s free dims, ``b``'s free
  dims. Long contractions run as one dot per chunk of ``chunk_k`` (slices, so
  each keeps the operands' layout and XLA's int8 GEMM kernel).
  """
  ca, cb = contract
  k = a.shape[ca]
  dims = (((ca,), (cb,)), batch)
  parts = []
  for s in range(0, max(k, 1), chunk_k):
    e = min(k, s + chunk_k)
    parts.append(lax.dot_general(lax.slice_in_dim(a, s, e, axis=ca),
                                 lax.slice_in_dim(b, s, e, axis=cb), dims,
                                 preferred_element_type=jnp.int32))
  return _result(parts, halves)


def int32_sum(x: jax.Array, axis: int, *, chunk_k: int, halves: bool = False):
  """Exact float32 sum (or :data:`Halves`) of int8 x int8 products ``x``
  (int32) along ``axis``."""
  k = x.shape[axis]
  if k <= chunk_k:
    return _result([jnp.sum(x, axis=axis, dtype=jnp.int32)], halves)
  n = -(-k // chunk_k)
  x = jnp.moveaxis(x, axis, 0)
  x = jnp.pad(x, [(0, n * chunk_k - k)] + [(0, 0)] * (x.ndim - 1))
  x = x.reshape(n, chunk_k, *x.shape[1:])
  parts = jnp.sum(x, axis=1, dtype=jnp.int32)
  return split_halves(parts, axis=0) if halves else combine_int32_chunks(parts, axis=0)
