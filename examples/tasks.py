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
  ...]`` of a whole evaluation pass, in order -- each batch without its
  ``image`` entry, so that a large evaluation set's pixels are not held in
  memory -- and returns the final metrics, a dict with
  keys starting ``eval_`` (``eval_accuracy``/``eval_loss`` for
  classification, ``eval_mAP``/``eval_mAP50`` for detection); float values
  are also written to TensorBoard as ``eval/<name>``.
* ``model_meta(spec)`` returns what ``make_model`` reads from ``spec``, as a
  JSON-serialisable dict (e.g. ``num_classes``, ``image_shape``). It is
  stored with the checkpoints so that :func:`examples.load_model` can rebuild
  the model in a fresh process without the data: there ``make_model`` gets a
  ``types.SimpleNamespace(**model_meta)`` as ``spec``. A task without it
  trains normally, but no model-only checkpoint is written for it.
* The loop adds ``index`` (int32, (B,): the record's index in its source;
  -1 for eval padding) to every batch; corrupt records are warned about and
  counted once per record through it.
* The loop reads these config fields (a task's own config class needs them):
  the mode's (``mode``, ``period``, ``weight_granularity``, ``grad_rounding``,
  ``backend``, ``clip_lr``, ``alpha``, ``beta``), the optimizer's
  (:func:`examples.optimizers.make_optimizer`), ``seed``, ``batch_size``,
  ``epochs`` / ``steps``, ``workers`` and the run options of
  :class:`examples.config.Config` (``workdir`` ... ``tensorboard``);
  ``dataset``, ``model`` and ``histogram_every`` are optional.
* A task is rebuilt by :func:`examples.load_model` from its import path
  (``module:QualName``, see :func:`task_path`) with no arguments; a task
  whose options live in a :class:`examples.config.Config` subclass names it in
  a ``config_cls`` attribute.

:func:`build_model` is how the loop (and :func:`examples.load_model`) turns
a task's float model into the mode's model.
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Protocol

from flax import nnx

from examples import steps as steps_lib


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
    """Final ``eval_*`` metrics from ``[(batch, outputs), ...]`` (host; no ``image``)."""

  def model_meta(self, spec: Any) -> dict:
    """What ``make_model`` reads from ``spec`` (JSON); optional, see the module doc."""


def model_meta(task: Task, spec: Any) -> dict | None:
  """``task.model_meta(spec)``, or ``None`` for a task without it."""
  fn = getattr(task, "model_meta", None)
  return None if fn is None else dict(fn(spec))


def build_model(task: Task, cfg: Any, spec: Any) -> nnx.Module:
  """The task's float model, switched to ``cfg.mode`` (:func:`examples.steps.quantize`).

  ``spec`` is the task's data spec, or the stored ``model_meta`` dict (then
  passed as a namespace).
  """
  if isinstance(spec, dict):
    spec = types.SimpleNamespace(**spec)
  model = task.make_model(cfg, spec)
  if not getattr(task, "quantizes_itself", False):
    steps_lib.quantize(model, cfg)
  return model


def task_path(task: Task) -> str:
  """``"module:QualName"`` of the task's class (stored with checkpoints)."""
  return f"{type(task).__module__}:{type(task).__qualname__}"


def task_from_path(path: str) -> Task:
  """A new task from its :func:`task_path` (its class called without arguments)."""
  module, _, qualname = path.partition(":")
  try:
    obj = importlib.import_module(module)
    for name in qualname.split("."):
      obj = getattr(obj, name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"task {path!r} cannot be imported: {e}") from e
  return obj()
