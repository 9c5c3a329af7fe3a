"""Where the ops are traced for, and which backends may run there.

* :func:`target_platform` -- the platform being traced for;
* :func:`pallas_available` / :func:`assume_pallas_available` -- whether the
  Mosaic GPU kernels can run (a Hopper GPU), and an override for lowering
  for CUDA from a host without one;
* :func:`check_xla_allowed` -- the refusal of the XLA backend on GPUs.
"""

from __future__ import annotations

import contextlib
import threading

import jax

__all__ = ["target_platform", "pallas_available", "assume_pallas_available",
           "pallas_allowed", "check_xla_allowed", "XLA_ON_GPU_MESSAGE"]

_override = threading.local()


def pallas_available() -> bool:
  """True when the Pallas Mosaic GPU backend can run here (a Hopper GPU)."""
  try:
    import pallas_kernels  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(pallas_kernels.available())


@contextlib.contextmanager
def assume_pallas_available():
  """Let ``backend="pallas"`` trace on a machine without a Hopper GPU.

  Only for lowering for CUDA from such a host
  (``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))``), which
  runs Mosaic GPU's checks on every kernel config the program uses.
  Executing the program here fails.
  """
  old = getattr(_override, "on", False)
  _override.on = True
  try:
    yield
  finally:
    _override.on = old


def pallas_allowed() -> bool:
  """:func:`pallas_available`, or inside :func:`assume_pallas_available`."""
  return getattr(_override, "on", False) or pallas_available()


def target_platform() -> str:
  """Platform the ops are being traced for: the ``jax.default_device`` in
  effect if one is set, else ``jax.default_backend()``."""
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


def check_xla_allowed(what: str = "backend='xla'") -> None:
  """``ValueError`` when tracing for a GPU (see ``XLA_ON_GPU_MESSAGE``)."""
  if target_platform() == "gpu":
    raise ValueError(f"{XLA_ON_GPU_MESSAGE} (got {what})")
