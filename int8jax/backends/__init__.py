"""GEMM backends of the quantized ops.

A backend is a module with ``conv_forward``, ``conv_dgrad``, ``conv_wgrad``
(channel-last :class:`int8jax.conv_spec.ConvSpec` form) and ``dense_forward``,
``dense_dgrad``, ``dense_wgrad`` (``(B, M, K) x (B, K, N)`` form), each taking
int8 operands plus a float32 dequantization scale and returning float32.

* ``"xla"``: :mod:`int8jax.backends.xla`, ``lax`` int8 ops; exact reference,
  what ``None`` picks on a CPU; refused when tracing for a GPU (see
  ``XLA_ON_GPU_MESSAGE``).
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


def target_platform() -> str:
  """Platform the ops are being traced for: the ``jax.default_device`` in
  effect if one is set, else ``jax.default_backend()``."""
  import jax
  dev = jax.config.jax_default_device
  if dev is not None:
    return dev if isinstance(dev, str) else dev.platform
  return jax.default_backend()


# Seen on an NVIDIA H200 (jax 0.11.2, 2026-11-26, tests/test_pallas_backend.py
# ::test_conv_op_gpu_equals_cpu_reference): the XLA backend's convolutions,
# compiled by XLA:GPU, returned input gradients exactly twice the exact
# integer result (5 of 7 cases; one case did not compile), and its
# forward int8 conv is UNIMPLEMENTED there when run op by op. Not understood
# yet, so it is refused on GPUs rather than risk a wrong gradient.
XLA_ON_GPU_MESSAGE = (
    "backend='xla' is int8jax's CPU backend: on a GPU (XLA:GPU, seen on an "
    "H200 with jax 0.11.2) its quantized convolutions gave wrong input "
    "gradients (2x), so it is refused there. On a Hopper GPU use "
    "backend='pallas' or backend=None; other GPUs have no int8 backend yet.")


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
    if target_platform() == "gpu":
      raise ValueError(XLA_ON_GPU_MESSAGE + f" (got backend={name!r})")
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
