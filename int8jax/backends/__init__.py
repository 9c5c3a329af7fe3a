"""GEMM backends of the quantized ops: one registry, by name.

A backend is one :class:`~int8jax.backends.base.Backend` value (its name, a
one-line description, the six int8 products, where it may run, whether it
runs per batch shard, its per-shape fallbacks) registered here with
:func:`register`. Everything else derives from the registry:
:data:`int8jax.BACKEND_NAMES` (``None`` plus :func:`names`), the checks of
``QuantConfig.backend``, the examples' ``--backend`` choices, and the table
in docs/design.md (:func:`table`; a test checks the two agree). The ops
(:mod:`int8jax.ops`) name no backend: they call :func:`get` and read the
backend's ``per_shard`` and :meth:`~int8jax.backends.base.Backend.function`.

``None`` means the best available backend (:func:`resolve`): the available
one with the lowest ``auto_rank`` -- ``"pallas"`` on a Hopper GPU, else
``"xla"``. Print :func:`table` for the registered backends.

Adding a backend: write a module with a ``BACKEND = Backend(...)`` value
(the six functions with the signatures of :mod:`int8jax.backends.xla`) and
add it to the tuple at the end of this module (or call :func:`register` from
user code).
"""

from __future__ import annotations

from int8jax.backends import base, pallas, platform, xla
from int8jax.backends.base import CHUNK_K, Backend, Fallback, WgradLayout, dequant
from int8jax.backends.platform import (XLA_ON_GPU_MESSAGE, assume_pallas_available,
                                       pallas_available, target_platform)

__all__ = ["Backend", "Fallback", "WgradLayout", "CHUNK_K", "dequant", "BACKENDS", "register",
           "unregister", "names", "resolve", "get", "table", "target_platform", "pallas_available",
           "assume_pallas_available", "XLA_ON_GPU_MESSAGE", "platform"]

#: Every registered backend by name, in registration order (read-only use:
#: change it with :func:`register` / :func:`unregister`).
BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
  """Adds ``backend`` under ``backend.name``; a ``ValueError`` if the name is taken."""
  if not isinstance(backend, Backend):
    raise TypeError(f"backend must be an int8jax.backends.Backend, got "
                    f"{type(backend).__name__}")
  if backend.name in BACKENDS:
    raise ValueError(f"backend {backend.name!r} is already registered")
  BACKENDS[backend.name] = backend
  return backend


def unregister(name: str) -> Backend:
  """Removes the backend ``name`` (a ``ValueError`` if there is none) and returns it."""
  if name not in BACKENDS:
    raise ValueError(f"unknown backend {name!r}; registered: {names()}")
  return BACKENDS.pop(name)


def names() -> tuple[str, ...]:
  """The registered backend names, in registration order."""
  return tuple(BACKENDS)


def __getattr__(attr):
  if attr == "BACKEND_NAMES":  # live: follows register / unregister
    return (None, *names())
  raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def resolve(name: str | None) -> str:
  """Backend name to use: ``None`` means the available registered backend
  with the lowest ``auto_rank`` (Pallas on a Hopper GPU, else XLA)."""
  if name is not None:
    return name
  auto = sorted((b for b in BACKENDS.values() if b.auto_rank is not None),
                key=lambda b: b.auto_rank)
  for b in auto:
    if b.available():
      return b.name
  raise ValueError(f"backend=None: none of the automatic backends "
                   f"{[b.name for b in auto]} is available here")


def get(name: str | None) -> Backend:
  """The backend for ``name`` (see :func:`resolve`), checked for this platform
  (its ``check``).

  Raises:
    ValueError: an unknown name; ``"xla"`` when tracing for a GPU;
      ``"pallas"`` where the Pallas backend cannot run (no Hopper GPU, or
      Mosaic GPU missing) -- there is no silent fallback: ask for
      ``backend=None`` to get the best available, or ``"pallas_interpret"``
      to run the kernels in interpret mode on a CPU.
  """
  name = resolve(name)
  if name not in BACKENDS:
    raise ValueError(f"unknown backend {name!r}; expected one of {(None, *names())}")
  backend = BACKENDS[name]
  backend.check()
  return backend


def _functions(f: Fallback) -> str:
  if set(f.functions) == set(base.FUNCTIONS):
    return "every GEMM"
  return ", ".join(f"`{n}`" for n in f.functions)


def table() -> str:
  """The registered backends as markdown (the tables in docs/design.md; a test
  keeps them equal): one row per backend, then one row per fallback (backends
  with the same fallbacks share their rows)."""
  rows = ["| backend | what | `backend=None` | per shard (`data_axis`) | fallbacks |",
          "| --- | --- | --- | --- | --- |"]
  for b in BACKENDS.values():
    auto = "never" if b.auto_rank is None else f"rank {b.auto_rank}, where available"
    shard = "yes" if b.per_shard else "no (XLA partitions its lax ops)"
    rows.append(f"| `{b.name}` | {b.description} | {auto} | {shard} | "
                f"{len(b.fallbacks) or 'none'} |")
  groups: dict[tuple, list[str]] = {}
  for b in BACKENDS.values():
    if b.fallbacks:
      groups.setdefault(b.fallbacks, []).append(f"`{b.name}`")
  if groups:
    rows += ["", "| backend | product | on | runs instead |", "| --- | --- | --- | --- |"]
    for fallbacks, owners in groups.items():
      rows += [f"| {', '.join(owners)} | {_functions(f)} | {f.when} | {f.route} |"
               for f in fallbacks]
  return "\n".join(rows) + "\n"


# The registry: one entry per backend module.
for _b in (xla.BACKEND, pallas.BACKEND, pallas.INTERPRETED):
  register(_b)
del _b
