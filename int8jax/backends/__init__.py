"""GEMM backends of the quantized ops.

A backend is a module with ``conv_forward``, ``conv_dgrad``, ``conv_wgrad``
(channel-last :class:`int8jax.conv_spec.ConvSpec` form) and ``dense_forward``,
``dense_dgrad``, ``dense_wgrad`` (``(B, M, K) x (B, K, N)`` form), each taking
int8 operands plus a float32 dequantization scale and returning float32.

* ``"xla"``: :mod:`int8jax.backends.xla`, ``lax`` int8 ops; exact reference,
  default on CPU.
* ``"pallas"``: :mod:`int8jax.backends.pallas`, the Mosaic GPU kernels of
  :mod:`pallas_kernels` (Hopper only). Bit-identical to ``"xla"``.
* ``"pallas_interpret"``: the same backend with every kernel run under Mosaic
  GPU interpret mode — runs on CPU, slowly; for tests without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

_override = threading.local()


def pallas_available() -> bool:
  """True when the Pallas Mosaic GPU backend can run here (a Hopper GPU)."""
  try:
    import pallas_kernels
  except ImportError:
    return False
  available = getattr(pallas_kernels, "available", None)
  return bool(available()) if callable(available) else False


@contextlib.contextmanager
def assume_pallas_available():
  """Let ``backend="pallas"`` trace on a machine without a Hopper GPU.

  Only for lowering for CUDA from such a host
  (``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))``), which
  runs Mosaic GPU's checks on every kernel config the program uses. Executing
  the program here fails.
  """
  old = getattr(_override, "on", False)
  _override.on = True
  try:
    yield
  finally:
    _override.on = old


def resolve(name: str | None) -> str:
  """Backend name to use: ``None`` means Pallas where available, else XLA."""
  if name is None:
    return "pallas" if pallas_available() else "xla"
  return name


def get(name: str | None):
  """The backend module for ``name`` (see :func:`resolve`).

  Raises:
    ValueError: ``name="pallas"`` where the Pallas backend cannot run (no
      Hopper GPU, or Mosaic GPU missing). There is no silent fallback: ask for
      ``backend=None`` to get the best available, or ``"pallas_interpret"``
      to run the kernels in interpret mode on CPU.
  """
  name = resolve(name)
  if name == "xla":
    from int8jax.backends import xla
    return xla
  if name in ("pallas", "pallas_interpret"):
    if name == "pallas" and not (getattr(_override, "on", False) or pallas_available()):
      import jax
      raise ValueError(
          "backend='pallas' needs a Hopper GPU (compute capability 9.x) with "
          f"Mosaic GPU; this machine's jax backend is {jax.default_backend()!r}. "
          "Use backend='xla', backend=None (best available), or "
          "backend='pallas_interpret' (kernels in interpret mode on CPU, for tests)")
    try:
      pallas = importlib.import_module("int8jax.backends.pallas")
    except ImportError as e:
      raise ValueError(
          f"backend={name!r} is not available here ({e}); use backend='xla', or "
          "backend=None to pick the best available backend") from None
    return pallas if name == "pallas" else pallas.interpreted
  raise ValueError(f"unknown backend {name!r}; expected 'xla', 'pallas', "
                   "'pallas_interpret' or None")
