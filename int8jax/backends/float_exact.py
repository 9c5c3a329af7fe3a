"""Exact integer convolutions on float convolution hardware (the GPU's narrow groups).

Depthwise and other narrow-group convolutions would pad every group's tiny
GEMM to a whole 64/128-wide tile of the int8 kernel, and XLA:GPU's int8
convolutions cannot serve them (cuDNN runs int8 convs forward only, and
grouped int8 convs have a wrong-result bug). They run here instead as
**bfloat16 convolutions with float32 accumulation over int8-valued
operands**, which are exact integer convolutions (docs/design.md §3):

* int8 values are exact in bfloat16; a product of two is below ``2^14`` and
  exact in float32;
* a float32 sum of such products is exact while every partial sum stays
  below ``2^24``, whatever the summation order -- guaranteed when one output
  sums at most ``MAX_EXACT_WINDOW = 2^24 // 127^2 = 1,040`` products.

A conv whose window (kernel taps x input features per group) is larger is
split along its first spatial axis into sub-kernels of at most that many
products; each partial result is exact in float32 and converted to int32,
and the int32 partials are summed exactly.

Used by the Pallas backend for the forward and input-gradient GEMMs of
narrow groups (:func:`conv_forward`, :func:`conv_dgrad`, declared as
fallbacks of :data:`int8jax.backends.pallas.BACKEND`); their weight gradient
contracts over batch x pixels (millions of products), so it stays on exact
int32 arithmetic (:func:`int8jax.backends.xla.conv_wgrad`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from int8jax import conv_geometry as geom
from int8jax.backends.base import CHUNK_K, dequant
from int8jax.conv_spec import ConvSpec

__all__ = ["MAX_EXACT_WINDOW", "conv_exact", "conv_forward", "conv_dgrad"]

#: Products one float32 sum may hold and stay exact (``127^2 * n < 2^24``).
MAX_EXACT_WINDOW = (1 << 24) // (127 * 127)


def _bf16_conv(xq, wq, spec: ConvSpec, padding) -> jax.Array:
  return lax.conv_general_dilated(
      xq.astype(jnp.bfloat16), wq.astype(jnp.bfloat16), spec.window_strides, padding,
      spec.lhs_dilation, spec.rhs_dilation, spec.lax_dimension_numbers,
      spec.feature_group_count, preferred_element_type=jnp.float32)


def conv_exact(xq: jax.Array, wq: jax.Array, spec: ConvSpec) -> jax.Array:
  """The exact integer conv of int8 ``xq`` and ``wq`` (channel-last), as float32.

  float32 is exact for the result as long as ``|result| < 2^24``; larger
  results are the correctly rounded float32 of the exact int32 sum.
  """
  _, kw, cg, _ = spec.group_dims
  per_row = kw // spec.window[0] * cg  # products per output from one kernel row
  rows = max(1, MAX_EXACT_WINDOW // per_row)
  if kw * cg <= MAX_EXACT_WINDOW:
    return _bf16_conv(xq, wq, spec, spec.padding)
  if per_row > MAX_EXACT_WINDOW:
    raise ValueError(
        f"float_exact.conv_exact: one kernel row holds {per_row} products per output "
        f"(> {MAX_EXACT_WINDOW}, window {spec.window} x {cg} features per group); "
        "no exact split along the first spatial axis")
  # Kernel rows [r0, r1): out[i] sums x[i*s + k*d - lo] for k in [r0, r1), the
  # conv with the sliced kernel and padding lo - r0*d (hi adjusted so the
  # output keeps its size; negative padding crops, as in lax).
  (lo, hi), d = spec.padding[0], spec.rhs_dilation[0]
  k0 = spec.window[0]
  total = None
  for r0 in range(0, k0, rows):
    r1 = min(k0, r0 + rows)
    pad = ((lo - r0 * d, hi - (k0 - r1) * d),) + tuple(spec.padding[1:])
    part = _bf16_conv(xq, wq[r0:r1], spec, pad).astype(jnp.int32)
    total = part if total is None else total + part
  return total.astype(jnp.float32)


def conv_forward(xq: jax.Array, wq: jax.Array, scale, spec: ConvSpec, *,
                 chunk_k: int = CHUNK_K, out_dtype=jnp.float32) -> jax.Array:
  """``conv(xq, wq) * scale`` through :func:`conv_exact` (a backend's
  ``conv_forward``; ``chunk_k`` unused: the window bound splits instead)."""
  del chunk_k
  return dequant(conv_exact(xq, wq, spec), scale, out_dtype)


def conv_dgrad(gq: jax.Array, wq: jax.Array, scale, spec: ConvSpec, *,
               chunk_k: int = CHUNK_K, out_dtype=jnp.float32) -> jax.Array:
  """Input gradient: the transposed conv (JAX's transpose rule) through
  :func:`conv_exact`, times ``scale``."""
  del chunk_k
  t = geom.transpose_spec(spec)
  return dequant(conv_exact(gq, geom.transpose_kernel(wq, spec), t), scale, out_dtype)
