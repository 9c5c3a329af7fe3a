"""GEMM backends of the quantized ops, registered in one place.

A backend is a :class:`~int8jax.backends.base.Backend`: a named tuple of six
functions (conv forward / input gradient / weight gradient in the
channel-last :class:`int8jax.conv_spec.ConvSpec` form, and the same three for
``(B, M, K) x (B, K, N)`` dense layers), each taking int8 operands plus a
float32 dequantization scale and returning float32.

==================== ===================================================
name                 backend
==================== ===================================================
``"xla"``            :data:`int8jax.backends.xla.BACKEND`: ``lax`` int8 ops;
                     the exact reference and the CPU backend; refused when
                     tracing for a GPU (``platform.XLA_ON_GPU_MESSAGE``)
``"pallas"``         :data:`int8jax.backends.pallas.BACKEND`: the Mosaic
                     GPU kernels of :mod:`pallas_kernels` (Hopper only);
                     bit-identical to ``"xla"``
``"pallas_interpret"`` the same with every kernel in Mosaic GPU interpret
                     mode -- runs on a CPU, slowly; for tests
``None``             the best available: ``"pallas"`` on a Hopper GPU,
                     else ``"xla"``
==================== ===================================================

The names a user may pass are :data:`int8jax.BACKEND_NAMES`.
"""

from __future__ import annotations

from int8jax.backends import pallas, platform, xla
from int8jax.backends.base import Backend
from int8jax.backends.platform import (XLA_ON_GPU_MESSAGE, assume_pallas_available,
                                       pallas_available, target_platform)
from int8jax.config import BACKEND_NAMES

__all__ = ["Backend", "BACKENDS", "resolve", "get", "target_platform", "pallas_available",
           "assume_pallas_available", "XLA_ON_GPU_MESSAGE"]

#: Every backend by name.
BACKENDS: dict[str, Backend] = {
    b.name: b for b in (xla.BACKEND, pallas.BACKEND, pallas.INTERPRETED)}
assert set(BACKENDS) | {None} == set(BACKEND_NAMES), (BACKENDS, BACKEND_NAMES)


def resolve(name: str | None) -> str:
  """Backend name to use: ``None`` means Pallas where available, else XLA."""
  if name is None:
    return "pallas" if pallas_available() else "xla"
  return name


def get(name: str | None) -> Backend:
  """The backend for ``name`` (see :func:`resolve`), checked for this platform.

  Raises:
    ValueError: ``"xla"`` when tracing for a GPU; ``"pallas"`` where the
      Pallas backend cannot run (no Hopper GPU, or Mosaic GPU missing) --
      there is no silent fallback: ask for ``backend=None`` to get the best
      available, or ``"pallas_interpret"`` to run the kernels in interpret
      mode on a CPU; an unknown name.
  """
  name = resolve(name)
  if name not in BACKENDS:
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
  if name == "xla":
    platform.check_xla_allowed(f"backend={name!r}")
  elif name == "pallas" and not platform.pallas_allowed():
    import jax  # pylint: disable=g-import-not-at-top
    raise ValueError(
        "backend='pallas' needs a Hopper GPU (compute capability 9.x) with "
        f"Mosaic GPU; this machine's jax backend is {jax.default_backend()!r}. "
        "Use backend='xla', backend=None (best available), or "
        "backend='pallas_interpret' (kernels in interpret mode on CPU, for tests)")
  return BACKENDS[name]
