"""GEMM backends of the quantized ops.

A backend is a module with ``conv_forward``, ``conv_dgrad``, ``conv_wgrad``
(channel-last :class:`int8jax.conv_spec.ConvSpec` form) and ``dense_forward``,
``dense_dgrad``, ``dense_wgrad`` (``(B, M, K) x (B, K, N)`` form), each taking
int8 operands plus a float32 dequantization scale and returning float32.

* ``"xla"``: :mod:`int8jax.backends.xla`, ``lax`` int8 ops; exact reference,
  default on CPU.
* ``"pallas"``: Mosaic GPU kernels from :mod:`pallas_kernels` (Hopper).
"""

from __future__ import annotations

import importlib


def pallas_available() -> bool:
  """True when the Pallas Mosaic GPU backend can run here (a Hopper GPU)."""
  try:
    import pallas_kernels
  except ImportError:
    return False
  available = getattr(pallas_kernels, "available", None)
  return bool(available()) if callable(available) else False


def resolve(name: str | None) -> str:
  """Backend name to use: ``None`` means Pallas where available, else XLA."""
  if name is None:
    return "pallas" if pallas_available() else "xla"
  return name


def get(name: str | None):
  """The backend module for ``name`` (see :func:`resolve`).

  Raises:
    ValueError: ``name="pallas"`` where the Pallas backend cannot run. There
      is no silent fallback: ask for ``backend=None`` to get the best available.
  """
  name = resolve(name)
  if name == "xla":
    from int8jax.backends import xla
    return xla
  if name == "pallas":
    try:
      return importlib.import_module("int8jax.backends.pallas")
    except ImportError as e:
      raise ValueError(
          f"backend='pallas' is not available here ({e}); use backend='xla', or "
          "backend=None to pick the best available backend") from None
  raise ValueError(f"unknown backend {name!r}; expected 'xla', 'pallas' or None")
