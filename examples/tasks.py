"""What a training job is, to the shared loop: the :class:`Task` protocol.

The loop (config, mesh, modes, optimizer, checkpoints, metrics, resumption)
is the same for every job; a task supplies the data, the float model and the
loss / evaluation. Classification (MNIST, CIFAR-10, ImageNet) and detection
(``examples/detection``) are two tasks of the one loop.

Contract:

* ``load_data(cfg)`` returns an :class:`examples.data.DataSpec` whose sources
  and transforms feed :func:`examples.data.batches` (records ->
  ``transform(record, rng) -> dict of NumPy arrays``; a ``None`` record is
  eval padding and must come out with ``valid = 0``). Every batch dict has
  ``valid`` (float32, (B,)) and ``corrupt`` (int32, (B,)); the rest is the
  task's own (``image``/``label`` for classification; images, padded boxes,
  classes and image ids for detection). Images stay uint8 on the host and
  are normalised inside ``loss`` / ``eval_step`` (on the device).
* ``make_model(cfg, spec)`` returns the *float* ``nnx.Module`` built with
  ``dtype=mode.dtype``; the loop quantizes it with
  :func:`int8jax.nn.quantize_model` when the mode is quantized (or the task
  does it itself in ``make_model`` and says so with ``quantizes_itself``).
* ``loss(model, batch, cfg)`` runs inside the jitted train step and returns
  ``(scalar loss, sums)``: ``sums`` is a dict of scalars summed over the
  batch's valid examples with a ``"count"`` entry; the loop logs
  ``train/<k> = sum_k / count`` for every other key.
* ``eval_step(model, batch, cfg)`` runs inside the jitted eval step (model in
  eval mode) and returns a pytree of arrays (per-example outputs or sums);
  ``evaluate(spec, results, cfg)`` gets the host copies ``[(batch, outputs),
  ...]`` of a whole evaluation pass and returns the final metrics, a dict of
  floats with keys starting ``eval_`` (``eval_accuracy``/``eval_loss`` for
  classification, ``eval_mAP``/``eval_mAP50`` for detection).
"""

from __future__ import annotations

from typing import Any, Protocol

from flax import nnx


class Task(Protocol):
  """A training job's data, model and objective (see the module doc)."""

  name: str
  #: ``True`` when ``make_model`` applies quantization itself.
  quantizes_itself: bool

  def load_data(self, cfg: Any) -> Any:
    """The :class:`examples.data.DataSpec` of this job."""

  def make_model(self, cfg: Any, spec: Any) -> nnx.Module:
    """The float model, computation dtype ``cfg``'s mode dtype."""

  def loss(self, model: nnx.Module, batch: dict, cfg: Any) -> tuple[Any, dict]:
    """``(loss, sums)`` for one training batch (inside jit)."""

  def eval_step(self, model: nnx.Module, batch: dict, cfg: Any) -> Any:
    """Per-batch evaluation outputs (inside jit, eval mode)."""

  def evaluate(self, spec: Any, results: list, cfg: Any) -> dict[str, float]:
    """Final ``eval_*`` metrics from ``[(batch, outputs), ...]`` (host)."""
