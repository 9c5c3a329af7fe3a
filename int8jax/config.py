"""Quantization configuration of one layer (static under ``jax.jit``)."""

from __future__ import annotations

import dataclasses

from int8jax.dsgc import CLIP_METHODS

_GRANULARITIES = ("tensor", "channel")
_GRAD_GRANULARITIES = ("auto", "tensor", "group")
_ROUNDINGS = ("stochastic", "nearest")
_GRAD_CLIPS = ("learned", "max")
#: The backend names a user may pass (``QuantConfig.backend``, ``--backend``):
#: ``None`` picks the best available one (see :mod:`int8jax.backends`).
BACKEND_NAMES = (None, "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How one quantized layer runs its three GEMMs (UI8, Zhu et al. 2020, §3–4).

  A frozen, hashable dataclass: it is a static argument of the quantized ops,
  so two layers with equal configs share compiled code.

  Attributes:
    enabled: ``False`` makes the layer an exact float layer (identical to
      ``nnx.Conv`` / ``nnx.Linear``); quantization state is still created so a
      model can be switched without changing its state tree.
    weight_granularity: ``"tensor"`` (one scale for the kernel) or
      ``"channel"`` (one scale per output feature). With ``"channel"`` the
      input-gradient GEMM re-quantizes the weight per tensor, since its
      contraction runs over output features.
    grad_granularity: scales of the output gradient ``g``: ``"tensor"`` (one
      scale), ``"group"`` (one per feature group: per channel in a depthwise
      conv) or ``"auto"`` (the default: ``"group"`` for grouped and
      depthwise convs, ``"tensor"`` for ordinary convs and dense layers). A
      group's input- and weight-gradient GEMMs are independent of the other
      groups', so a scale per group multiplies exact int32 results; finer
      scales inside a group would sit on a contraction axis. Why per group:
      in depthwise convs a few channels' gradients are hundreds of times
      larger than the rest, and one scale rounds the others to noise
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
    backend: ``None`` (the default: Pallas on a Hopper GPU, else XLA),
      ``"xla"`` (``lax`` int8 ops, exact; the CPU backend — refused with a
      ``ValueError`` when tracing for a GPU, where XLA:GPU gave wrong input
      gradients, see :mod:`int8jax.backends`), ``"pallas"`` (Mosaic GPU
      kernels of :mod:`pallas_kernels`, Hopper only; bit-identical to
      ``"xla"``; a ``ValueError`` at trace time elsewhere) or
      ``"pallas_interpret"`` (the same kernels in Mosaic GPU interpret mode on
      any machine; slow, for tests).
    data_axis: the mesh axis the batch is sharded over (data parallelism), or
      ``None``. With the Pallas backend the kernels then run per shard under
      ``jax.shard_map`` over the mesh in context (``jax.set_mesh(mesh)`` /
      ``jax.sharding.use_mesh``): forward and input gradient on each device's
      batch shard, the weight gradient as per-device exact integer halves
      summed across devices in int32 -- bit-identical to one device. (The
      XLA backend needs nothing: XLA partitions its ``lax`` ops itself.)
    chunk_k: largest contraction length accumulated in one int32 sum;
      longer contractions are split and the partial sums combined exactly.
      ``127 * 127 * chunk_k`` must stay below ``2**31``.
  """

  enabled: bool = True
  weight_granularity: str = "tensor"
  grad_granularity: str = "auto"
  grad_rounding: str = "stochastic"
  grad_clip: str = "learned"
  clip_method: str = "search"
  clip_noise_weight: float = 1.0
  period: int = 100
  measure_early: bool = True
  clip_warmup: bool = True
  backend: str | None = None
  data_axis: str | None = None
  chunk_k: int = 131072

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise TypeError(f"QuantConfig.enabled must be a bool, got {self.enabled!r}")
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
    if self.backend not in BACKEND_NAMES:
      raise ValueError(f"QuantConfig.backend must be one of {BACKEND_NAMES}, "
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
    if (not isinstance(self.chunk_k, int) or isinstance(self.chunk_k, bool)
        or not 1 <= self.chunk_k <= MAX_EXACT_K):
      raise ValueError(
          f"QuantConfig.chunk_k must be an int in [1, {MAX_EXACT_K}], got {self.chunk_k!r}")

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
