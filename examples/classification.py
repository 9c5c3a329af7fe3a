"""Image classification (MNIST subset, CIFAR-10, ImageNet) as a :class:`~examples.tasks.Task`.

Data: :func:`examples.data.load_dataset`; batches ``image`` (uint8 NHWC),
``label``, ``valid``. Model: :func:`examples.models.create_model` (``--model``,
``--width``, ``--small-input``) in the mode's dtype. Loss: softmax
cross-entropy (``--label-smoothing``) weighted by ``valid``; logged as
``train/loss`` and ``train/accuracy``. Evaluation: held-out loss and top-1
accuracy (``eval_loss``, ``eval_accuracy``, ``eval_examples``).

Inference with a trained model (see :func:`examples.load_model`)::

    model = examples.load_model("runs/mnist")            # eval mode
    cfg = examples.model_info("runs/mnist")["config"]
    logits = model(normalize(images_uint8, cfg["dataset"]))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from int8jax import modes

from examples import data as data_lib
from examples import models as models_lib

__all__ = ["ClassificationTask", "normalize", "normalize_with"]


def normalize(images, dataset: str, dtype=jnp.float32) -> jax.Array:
  """uint8 images -> ``(x / 255 - mean) / std`` of ``dataset``, cast to ``dtype``."""
  return normalize_with(images, *data_lib.normalization(dataset), dtype)


def normalize_with(images, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 images -> ``(x / 255 - mean) / std`` (per-channel ``mean``, ``std``) in ``dtype``.

  Computed as ``(x - 255 mean) / (255 std)`` in float32 (on the device inside
  jit); the classification and detection tasks and the int8 serving program
  all normalise through it.
  """
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  return ((jnp.asarray(images).astype(jnp.float32) - mean) / std).astype(dtype)


def _sums(logits, labels, valid, smoothing: float):
  """Cross-entropy and correct predictions, summed over the valid examples."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
  correct = ((jnp.argmax(logits, -1) == labels) * valid).sum()
  return {"loss": (ce * valid).sum(), "accuracy": correct, "count": valid.sum()}


class ClassificationTask:
  """Softmax classification of ``image`` into ``label`` (the examples' default task)."""

  name = "classification"
  quantizes_itself = False

  def load_data(self, cfg) -> data_lib.DataSpec:
    return data_lib.load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)

  def model_meta(self, spec) -> dict:
    return {"num_classes": spec.num_classes, "image_shape": list(spec.image_shape)}

  def make_model(self, cfg, spec) -> nnx.Module:
    return models_lib.create_model(
        cfg.model, num_classes=spec.num_classes, in_channels=spec.image_shape[-1],
        width=cfg.width, small_input=cfg.small_input, dtype=modes.get(cfg.mode).dtype,
        rngs=nnx.Rngs(params=cfg.seed))

  def _logits(self, model, batch, cfg):
    return model(normalize(batch["image"], cfg.dataset, modes.get(cfg.mode).compute_dtype))

  def loss(self, model, batch, cfg):
    sums = _sums(self._logits(model, batch, cfg), batch["label"], batch["valid"],
                 cfg.label_smoothing)
    return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

  def eval_step(self, model, batch, cfg):
    return _sums(self._logits(model, batch, cfg), batch["label"], batch["valid"], 0.0)

  def evaluate(self, spec, results, cfg) -> dict:
    totals = {"loss": 0.0, "accuracy": 0.0, "count": 0.0}
    for _, out in results:
      for k in totals:
        totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    return {"eval_loss": totals["loss"] / n, "eval_accuracy": totals["accuracy"] / n,
            "eval_examples": int(totals["count"])}
