"""Quantization configuration of one layer (static under ``jax.jit``)."""

from __future__ import annotations

import dataclasses
import warnings

from int8jax.dsgc import CLIP_METHODS

_GRANULARITIES = ("tensor", "channel")
_GRAD_GRANULARITIES = ("tensor", "group")
_ROUNDINGS = ("stochastic", "nearest")
_GRAD_CLIPS = ("learned", "max")


def __getattr__(attr):
  # BACKEND_NAMES (the names a user may pass: QuantConfig.backend, --backend)
  # comes from the backend registry, int8jax.backends.
  if attr == "BACKEND_NAMES":
    from int8jax import backends  # pylint: disable=g-import-not-at-top
    return backends.BACKEND_NAMES
  raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How one quantized layer runs its three GEMMs (UI8, Zhu et al. 2020, §3–4).

  A frozen, hashable dataclass: it is a static argument of the quantized ops,
  so two layers with equal configs share compiled code.

  A float layer is ``config=None`` (layers and ops). The former fields
  ``enabled`` and ``chunk_k`` are gone: ``enabled=False`` is a ``ValueError``
  pointing at ``config=None``; ``enabled=True`` and ``chunk_k=`` (results are
  exact whatever the chunking; the ops use :data:`int8jax.backends.CHUNK_K`)
  warn and are ignored.

  Attributes:
    weight_granularity: ``"tensor"`` (one scale for the kernel) or
      ``"channel"`` (one scale per output feature). With ``"channel"`` the
      input-gradient GEMM re-quantizes the weight per tensor, since its
      contraction runs over output features.
    grad_granularity: scales of the output gradient ``g``: ``"tensor"`` (one
      scale) or ``"group"`` (the default: one per feature group -- per
      channel in a depthwise conv; one per tensor for ordinary convs and
      dense layers, which have one group). ``"auto"``, its former name, is a
      deprecated alias of ``"group"``. A group's input- and weight-gradient
      GEMMs are independent of the other groups', so a scale per group
      multiplies exact int32 results; finer scales inside a group would sit
      on a contraction axis. Why per group: in depthwise convs a few
      channels' gradients are hundreds of times larger than the rest, and
      one scale rounds the others to noise
      (docs/results.md). With per-group scales each group is clipped at
      ``clip_ratio`` times its own ``max|g|`` on every step (one reduction
      over ``g``); the ratio is learned once per layer.
    grad_rounding: rounding of the output gradient ``g``: ``"stochastic"``
      (unbiased, the paper's choice) or ``"nearest"``.
    grad_clip: ``"learned"`` — direction-sensitive gradient clipping: the clip
      value is a learned state updated by :func:`int8jax.optim.direction_sensitive_clip`;
      ``"max"`` — naive INT8: clip at ``max|g|`` of every step.
    clip_method: how a learned clip (``grad_clip="learned"``) is learned:
      ``"search"`` (the default: the backward pass scores candidate clips and
      the learner moves to the best, :func:`int8jax.dsgc.search_objective`)
      or ``"gradient"`` (the paper's descent on ``log c``; the backward pass
      then runs no search). The clip learner's step size is
      ``ui8(clip_learning_rate=)``.
    clip_noise_weight: how the clip search (``grad_clip="learned"``) weighs
      stochastic rounding's noise against the clipping bias, in ``(0, 1]``
      (:func:`int8jax.dsgc.search_objective`): 1 scores a clip by the cosine
      distance of one step's quantization (the paper's objective); smaller
      values count that noise averages out over steps while the bias of a
      clip repeats every step, so the search clips less.
    period: measure ranges, the cosine distance and the clip gradient every
      ``period`` calls of the layer (the paper's periodic update, §4.3).
      Calls in between reuse the cached activation range and clip value.
    measure_early: also measure on calls 1, 2, 4, 8, ... below ``period``
      (``log2(period)`` extra measurements per layer): ranges and gradient
      statistics change fastest at the start of training, and a short run
      measured only at call 0 uses that call's ranges throughout. Default on:
      on a 93-step MNIST MobileNet (period 100, 8 seeds) UI8 went from
      -1.49 +- 0.56 to +0.01 +- 0.82 pp of float32 (docs/results.md).
    clip_warmup: during the first ``period`` calls, clip the output gradient
      at the learned ratio of each step's own ``max|g|`` (one reduction over
      ``g`` per step, as on measure steps) instead of the clip cached at the
      last measurement. Gradients change fastest at the start: a residual
      branch whose last BatchNorm scale starts at zero has no gradient at
      call 0 and a growing one after, so a clip cached at call 32 saturates
      its gradients until call 64. Later calls use the cached clip (the
      paper's periodic update). Default on: on an MNIST ResNet (375 steps,
      period 100, 8 seeds) UI8 went from -1.16 +- 0.53 to -0.60 +- 0.52 pp
      of float32 (16 seeds: -0.28 +- 0.32; docs/results.md). Only layers with one learned gradient
      clip per tensor are affected (per-group scales and
      ``grad_clip="max"`` use each step's maximum anyway).
    backend: a registered backend name (:data:`int8jax.BACKEND_NAMES`; the
      table: :func:`int8jax.backends.table`) or ``None`` (the default: the
      best available, Pallas on a Hopper GPU, else XLA): ``"xla"`` (``lax``
      int8 ops, exact; the CPU backend -- refused with a ``ValueError`` when
      tracing for a GPU), ``"pallas"`` (Mosaic GPU kernels, Hopper only;
      bit-identical to ``"xla"``; a ``ValueError`` at trace time elsewhere)
      or ``"pallas_interpret"`` (the same kernels in interpret mode on any
      machine; slow, for tests).
    data_axis: the mesh axis the batch is sharded over (data parallelism), or
      ``None``. With the Pallas backend the kernels then run per shard under
      ``jax.shard_map`` over the mesh in context (``jax.set_mesh(mesh)`` /
      ``jax.sharding.use_mesh``): forward and input gradient on each device's
      batch shard, the weight gradient as per-device exact integer halves
      summed across devices in int32 -- bit-identical to one device. (A
      backend without ``per_shard``, such as XLA, needs nothing: XLA
      partitions its ``lax`` ops itself.)
  """

  weight_granularity: str = "tensor"
  grad_granularity: str = "group"
  grad_rounding: str = "stochastic"
  grad_clip: str = "learned"
  clip_method: str = "search"
  clip_noise_weight: float = 1.0
  period: int = 100
  measure_early: bool = True
  clip_warmup: bool = True
  backend: str | None = None
  data_axis: str | None = None
  # Removed fields, accepted for one release (see the class doc).
  enabled: dataclasses.InitVar[bool | None] = None
  chunk_k: dataclasses.InitVar[int | None] = None

  def __post_init__(self, enabled, chunk_k):
    if enabled is not None and not enabled:
      raise ValueError(
          "QuantConfig(enabled=False) was removed: config=None is the exact float layer "
          "or op (a quantized layer keeps its quantization state with layer.config = None, "
          "so a model switches to float without changing its state tree)")
    if enabled is not None:
      warnings.warn(f"QuantConfig(enabled={enabled!r}) is deprecated and ignored: a "
                    "QuantConfig always quantizes; config=None is the float layer",
                    DeprecationWarning, stacklevel=3)
    if chunk_k is not None:
      warnings.warn(f"QuantConfig(chunk_k={chunk_k!r}) is deprecated and ignored: results are "
                    "exact whatever the chunking; the ops use int8jax.backends.CHUNK_K",
                    DeprecationWarning, stacklevel=3)
    if self.grad_granularity == "auto":
      warnings.warn("QuantConfig(grad_granularity='auto') is deprecated: use 'group' (the "
                    "default; the same scales)", DeprecationWarning, stacklevel=3)
      object.__setattr__(self, "grad_granularity", "group")
    if self.weight_granularity not in _GRANULARITIES:
      raise ValueError(
          f"QuantConfig.weight_granularity must be one of {_GRANULARITIES}, "
          f"got {self.weight_granularity!r}")
    if self.grad_granularity not in _GRAD_GRANULARITIES:
      raise ValueError(
          f"QuantConfig.grad_granularity must be one of {_GRAD_GRANULARITIES}, "
          f"got {self.grad_granularity!r}")
    if self.grad_rounding not in _ROUNDINGS:
      raise ValueError(f"QuantConfig.grad_rounding must be one of {_ROUNDINGS}, "
                       f"got {self.grad_rounding!r}")
    if self.grad_clip not in _GRAD_CLIPS:
      raise ValueError(f"QuantConfig.grad_clip must be one of {_GRAD_CLIPS}, "
                       f"got {self.grad_clip!r}")
    if self.clip_method not in CLIP_METHODS:
      raise ValueError(f"QuantConfig.clip_method must be one of {CLIP_METHODS}, "
                       f"got {self.clip_method!r}")
    w = self.clip_noise_weight
    if (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < float(w) <= 1.0):
      raise ValueError(f"QuantConfig.clip_noise_weight must be a number in (0, 1], got {w!r}")
    from int8jax import backends  # pylint: disable=g-import-not-at-top
    if self.backend not in backends.BACKEND_NAMES:
      raise ValueError(f"QuantConfig.backend must be one of {backends.BACKEND_NAMES}, "
                       f"got {self.backend!r}")
    if (not isinstance(self.period, int) or isinstance(self.period, bool)
        or self.period < 1):
      raise ValueError(f"QuantConfig.period must be an int >= 1, got {self.period!r}")
    if not isinstance(self.measure_early, bool):
      raise TypeError(f"QuantConfig.measure_early must be a bool, got {self.measure_early!r}")
    if not isinstance(self.clip_warmup, bool):
      raise TypeError(f"QuantConfig.clip_warmup must be a bool, got {self.clip_warmup!r}")
    if self.data_axis is not None and not isinstance(self.data_axis, str):
      raise TypeError(f"QuantConfig.data_axis must be a mesh axis name or None, "
                      f"got {self.data_axis!r}")

  def replace(self, **changes) -> "QuantConfig":
    return dataclasses.replace(self, **changes)



# Largest K for which K products of two int8 values in [-127, 127] fit in int32.
MAX_EXACT_K = (2**31 - 1) // (127 * 127)  # 133,144

#: The values ``QuantConfig`` accepts for its choice fields (public, for
#: command lines and other front ends: ``examples/config.py`` offers these).
WEIGHT_GRANULARITIES = _GRANULARITIES
GRAD_GRANULARITIES = _GRAD_GRANULARITIES
GRAD_ROUNDINGS = _ROUNDINGS
GRAD_CLIPS = _GRAD_CLIPS
