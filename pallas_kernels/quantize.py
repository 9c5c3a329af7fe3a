"""Deprecated: the K-major quantize kernel is gone; these names remain one release.

``quantize_kmajor`` was a Mosaic GPU kernel (float (R, C) -> int8 (R, C) or
(C, R)). Nothing in the library called it: int8jax quantizes activations and
gradients in XLA, where the quantization fuses into the fusion that produces
the tensor (BatchNorm-apply + ReLU forward, the BN/ReLU backward), so the
int8 operand is written once and the float tensor is not read again; a
separate kernel adds that pass back. Its stochastic mode also differed from
its reference in 1 byte of 700,000 on an H200 (2026-11-26).

Both names now compute what ``quantize_kmajor_reference`` always computed
(XLA, jitted), with a ``DeprecationWarning``; ``interpret`` is ignored. For
nearest rounding that is the kernel's result bit for bit. Use
``int8jax.quant.quantize(x, scale, rounding=..., key=...)`` (``.T`` for
``transpose=True``) instead; its stochastic rounding draws its noise with
``int8jax.quant.uniform_noise``, not ``jax.random.uniform``, so stochastic
bits differ from these functions'.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["quantize_kmajor", "quantize_kmajor_reference", "QMAX"]

QMAX = 127
_ROUNDINGS = ("nearest", "stochastic")
_REPLACEMENT = ("use int8jax.quant.quantize(x, scale, rounding=..., key=...) (and .T for "
                "transpose=True): int8jax quantizes in XLA, fused into the op producing the "
                "tensor")


def _warn(name):
  warnings.warn(f"pallas_kernels.{name} is deprecated and will be removed in the next "
                f"release (the quantize kernel is gone; this computes the XLA reference); "
                f"{_REPLACEMENT}", DeprecationWarning, stacklevel=3)


def _check_args(x, scale, rounding, key):
  x_dtype = getattr(x, "dtype", None)
  if x_dtype is None or not jnp.issubdtype(x_dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array, got dtype {x_dtype}")
  if np.ndim(x) != 2:
    raise ValueError(f"x must be 2-D, got x.shape={tuple(np.shape(x))}")
  if np.shape(scale) != ():
    raise ValueError(
        f"scale must be a scalar (per-tensor), got shape {np.shape(scale)}")
  if rounding not in _ROUNDINGS:
    raise ValueError(f"{rounding=} must be one of {_ROUNDINGS}")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key, got key=None")


@functools.partial(jax.jit, static_argnames=("transpose",))
def _reference_impl(x, inv, u, *, transpose):
  y = x.astype(jnp.float32) * inv
  if u is None:
    y = jnp.round(y)
  else:
    y = jnp.floor(y + u)
  q = jnp.clip(y, -QMAX, QMAX).astype(jnp.int8)
  return q.T if transpose else q


def _quantize(x, scale, rounding, key, transpose):
  _check_args(x, scale, rounding, key)
  u = jax.random.uniform(key, x.shape, jnp.float32) if rounding == "stochastic" else None
  inv = jnp.float32(1.0) / jnp.asarray(scale, jnp.float32)
  return _reference_impl(x, inv, u, transpose=bool(transpose))


def quantize_kmajor_reference(x, scale, *, rounding: str = "nearest", key=None,
                              transpose: bool = False):
  """Deprecated (see the module docstring). ``clamp(round(x / scale))`` or
  ``clamp(floor(x / scale + u))`` with ``u = jax.random.uniform(key,
  x.shape)``, computed as ``x * (1 / scale)``; int8 (R, C), or (C, R) with
  ``transpose``."""
  _warn("quantize_kmajor_reference")
  return _quantize(x, scale, rounding, key, transpose)


def quantize_kmajor(x, scale, *, rounding: str = "nearest", key=None,
                    transpose: bool = False, interpret: bool = False):
  """Deprecated (see the module docstring): :func:`quantize_kmajor_reference`
  under the old kernel's name; ``interpret`` is ignored."""
  del interpret
  _warn("quantize_kmajor")
  return _quantize(x, scale, rounding, key, transpose)
