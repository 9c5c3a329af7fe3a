"""The backend interface: what the quantized ops need from a GEMM backend.

A backend is one :class:`Backend` value: its name, a one-line description,
the six int8 products, where it may run (:attr:`Backend.check`,
:attr:`Backend.available`), whether ``backend=None`` may pick it
(:attr:`Backend.auto_rank`), whether it runs per batch shard under
``jax.shard_map`` (:attr:`Backend.per_shard`) and the shapes on which it runs
another exact route instead of its own (:attr:`Backend.fallbacks`). The
registry (:mod:`int8jax.backends`) holds them by name; :mod:`int8jax.ops`
names none.

Also here, shared by every backend and the ops: :func:`dequant`, the
epilogue ``float32(exact) * scale``, and :data:`CHUNK_K`, the default
longest contraction accumulated in one int32 sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["Backend", "Fallback", "WgradLayout", "CHUNK_K", "FUNCTIONS", "dequant"]

#: Longest contraction accumulated in one int32 sum (``127 * 127 * CHUNK_K <
#: 2**31``, see :data:`int8jax.MAX_EXACT_K`); longer ones are split into
#: chunks combined exactly (:mod:`int8jax.exact`). The ops use this; the
#: backend functions take ``chunk_k=`` (tests pass small values to check the
#: chunked sums).
CHUNK_K = 131072

#: The six products a backend provides, in :class:`Backend` field order.
FUNCTIONS = ("conv_forward", "conv_dgrad", "conv_wgrad",
             "dense_forward", "dense_dgrad", "dense_wgrad")


def dequant(exact: jax.Array, scale, out_dtype=jnp.float32) -> jax.Array:
  """``float32(exact) * scale`` cast to ``out_dtype``: the epilogue every
  backend applies, in this order (the Pallas kernel fuses the same two
  roundings)."""
  return (exact.astype(jnp.float32) * scale).astype(out_dtype)


def _runs_anywhere() -> None:
  return None


def _always() -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class Fallback:
  """A shape on which a backend runs another exact route instead of its own.

  Attributes:
    functions: the :data:`FUNCTIONS` it applies to.
    when: the shapes, in words (for the docs table).
    route: what runs instead, in words.
    applies: ``applies(spec) -> bool`` on the conv's
      :class:`~int8jax.conv_spec.ConvSpec`; with :attr:`run` the backend
      dispatches on it (:meth:`Backend.function`). ``None``: the choice is
      made per GEMM inside the backend (the entry documents it).
    run: the replacement, with the backend function's signature (without
      backend-only keywords such as ``interpret``).
  """
  functions: tuple[str, ...]
  when: str
  route: str
  applies: Callable | None = None
  run: Callable | None = None

  def __post_init__(self):
    bad = [f for f in self.functions if f not in FUNCTIONS]
    if bad:
      raise ValueError(f"Fallback.functions: unknown {bad}; expected names from {FUNCTIONS}")
    if self.run is not None and not all(f.startswith("conv_") for f in self.functions):
      raise ValueError(f"Fallback: a dispatched fallback (run=...) decides on the conv's "
                       f"ConvSpec, so only conv functions may have one, got {self.functions}")
    if (self.applies is None) != (self.run is None):
      raise ValueError("Fallback: give both applies and run (dispatched), or neither "
                       f"(documented only), got applies={self.applies!r}, run={self.run!r}")


@dataclasses.dataclass(frozen=True)
class WgradLayout:
  """The operand layout a backend's conv weight gradient reads, for one conv
  (:attr:`Backend.conv_wgrad_layout`).

  The ops trace :attr:`x` in the fusion that quantizes x (the forward pass)
  and :attr:`g` in the one that quantizes g (the backward pass) -- a second
  output of each, written while the float tensor is read anyway -- keep
  ``x(xq)`` as the residual instead of ``xq``, and call :attr:`run` instead
  of ``conv_wgrad``, so the backend gets its layout without a pass of its
  own over the int8 tensors.

  Attributes:
    key: hashable and comparable; equal keys mean the same layout (the
      value is static data of the traced program).
    x: int8 (N, *S, C) -> the layout's x.
    g: int8 (N, *S', O) -> the layout's g.
    run: ``run(x_laid, g_laid, scale, spec, *, out_dtype, halves=False)``:
      what ``conv_wgrad`` returns, on the laid-out operands.
  """
  key: object
  x: Callable = dataclasses.field(compare=False)
  g: Callable = dataclasses.field(compare=False)
  run: Callable = dataclasses.field(compare=False)


@dataclasses.dataclass(frozen=True)
class Backend:
  """The six int8 products of a quantized conv / dense layer, and where they run.

  Conv functions take channel-last :class:`int8jax.conv_spec.ConvSpec`
  operands, ``f(a, b, scale, spec, *, out_dtype, chunk_k=CHUNK_K)``; dense
  functions take ``(B, M, K) x (B, K, N)`` operands,
  ``f(a, b, scale, *, out_dtype, chunk_k=CHUNK_K)``; the weight-gradient
  functions also take ``halves=True`` (the exact integer result as
  :data:`int8jax.exact.Halves`, no scale) when :attr:`per_shard` is set. ``a``
  and ``b`` are int8; ``scale`` is a float32 scalar or a vector along the
  result's last axis; the result is ``exact_integer_result * scale``
  (:func:`dequant`).

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

  Attributes:
    name: what ``QuantConfig(backend=...)`` and ``--backend`` take.
    description: one line for the docs table (:func:`int8jax.backends.table`).
    check: raises ``ValueError`` (a message naming the backend and what to
      use instead) when the backend must not run for the platform being
      traced for; called on every trace of an op.
    available: whether ``backend=None`` may pick it here.
    auto_rank: ``backend=None`` picks the available backend with the lowest
      rank; ``None``: never picked automatically.
    per_shard: with ``QuantConfig.data_axis`` the op runs its products per
      batch shard under ``jax.shard_map`` (forward and input gradient on each
      shard, the weight gradient as exact integer halves summed across
      devices); ``False``: the ops are ``lax`` ops XLA partitions itself.
    fallbacks: the shapes on which another exact route runs instead.
    conv_wgrad_layout: ``conv_wgrad_layout(spec) -> WgradLayout | None``: the
      layout its conv weight gradient wants x and g in, for this conv (None:
      int8 NHWC, as ``conv_wgrad`` takes them). Use it through
      :meth:`wgrad_layout`, which leaves dispatched fallbacks NHWC.
  """
  name: str
  description: str
  conv_forward: Callable
  conv_dgrad: Callable
  conv_wgrad: Callable
  dense_forward: Callable
  dense_dgrad: Callable
  dense_wgrad: Callable
  check: Callable[[], None] = _runs_anywhere
  available: Callable[[], bool] = _always
  auto_rank: int | None = None
  per_shard: bool = False
  fallbacks: tuple[Fallback, ...] = ()
  conv_wgrad_layout: Callable | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ValueError(f"Backend.name must be an identifier-like string, got {self.name!r}")
    if not isinstance(self.description, str) or "\n" in self.description:
      raise ValueError(f"Backend.description must be one line, got {self.description!r}")
    for f in FUNCTIONS:
      if not callable(getattr(self, f)):
        raise TypeError(f"Backend {self.name!r}: {f} must be callable, "
                        f"got {getattr(self, f)!r}")
    if self.conv_wgrad_layout is not None and not callable(self.conv_wgrad_layout):
      raise TypeError(f"Backend {self.name!r}: conv_wgrad_layout must be callable or None, "
                      f"got {self.conv_wgrad_layout!r}")
    object.__setattr__(self, "fallbacks", tuple(self.fallbacks))

  def function(self, which: str) -> Callable:
    """The product ``which`` (one of :data:`FUNCTIONS`) with this backend's
    dispatched :attr:`fallbacks` applied: the first fallback whose
    ``applies(spec)`` holds runs instead of the backend's own function."""
    if which not in FUNCTIONS:
      raise ValueError(f"which must be one of {FUNCTIONS}, got {which!r}")
    own = getattr(self, which)
    routes = [(f.applies, f.run) for f in self.fallbacks
              if which in f.functions and f.run is not None]
    if not routes:
      return own

    def dispatch(a, b, scale, spec, **kw):
      for applies, run in routes:
        if applies(spec):
          return run(a, b, scale, spec, **kw)
      return own(a, b, scale, spec, **kw)

    return dispatch

  def wgrad_layout(self, spec) -> WgradLayout | None:
    """:attr:`conv_wgrad_layout` for this conv, or None where the backend
    has none or a dispatched fallback runs its weight gradient (fallbacks
    take NHWC operands)."""
    if self.conv_wgrad_layout is None:
      return None
    if any(f.applies(spec) for f in self.fallbacks
           if "conv_wgrad" in f.functions and f.run is not None):
      return None
    return self.conv_wgrad_layout(spec)

  def replace(self, **changes) -> "Backend":
    return dataclasses.replace(self, **changes)
