"""The backend interface: what the quantized ops need from a GEMM backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Backend"]


class Backend(NamedTuple):
  """The six int8 products of a quantized conv / dense layer.

  Conv functions take channel-last :class:`int8jax.conv_spec.ConvSpec`
  operands, ``f(a, b, scale, spec, *, chunk_k)``; dense functions take
  ``(B, M, K) x (B, K, N)`` operands, ``f(a, b, scale, *, chunk_k)``. ``a`` and
  ``b`` are int8; ``scale`` is a float32 scalar or a vector along the
  result's last axis; the result is float32 ``exact_integer_result * scale``.

  ======================  ==========================  ======================
  function                operands                    result
  ======================  ==========================  ======================
  ``conv_forward``        x (N,*S,C), w (*win,C/G,O)  y (N,*S',O)
  ``conv_dgrad``          g (N,*S',O), w              dx (N,*S,C)
  ``conv_wgrad``          x, g                        dw (*win,C/G,O)
  ``dense_forward``       x (B,M,K), w (B,K,N)        y (B,M,N)
  ``dense_dgrad``         g (B,M,N), w                dx (B,M,K)
  ``dense_wgrad``         x, g                        dw (B,K,N)
  ======================  ==========================  ======================
  """

  name: str
  conv_forward: Callable
  conv_dgrad: Callable
  conv_wgrad: Callable
  dense_forward: Callable
  dense_dgrad: Callable
  dense_wgrad: Callable
