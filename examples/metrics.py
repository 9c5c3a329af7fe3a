"""What a run reports: TensorBoard scalars and histograms, the tqdm bar, the summary line.

* :class:`MetricWriter` -- tensorboardX event files in ``<workdir>/tensorboard``
  and a tqdm bar (process 0 only).
* :class:`TrainWindow` -- the training outputs between two log points; the
  device values are fetched once per window, not once per step.
* :func:`quant_scalars` -- per quantized layer, the latest gradient
  measurement as ``quant/<layer>/<name>`` scalars
  (:func:`int8jax.diagnostics.layer_stats`: cosine distance, clip, max|g|,
  clip ratio, clipped fraction, phi, ...).
* :func:`layer_tensors` -- per quantized layer, g, x and w of one batch
  (:func:`int8jax.diagnostics.capture_tensors`) for ``hist/<layer>/{g,x,w}``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from int8jax import diagnostics

log = logging.getLogger(__name__)

__all__ = ["MetricWriter", "TrainWindow", "quant_scalars", "layer_tensors", "format_summary",
           "format_layer_table", "read_scalars", "event_tags"]


class MetricWriter:
  """tqdm bar and TensorBoard (tensorboardX) scalars / histograms, on process 0."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int, is_main: bool,
               tensorboard: bool = True, progress: bool = True):
    self.writer = None
    if is_main and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = None
    if is_main and progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                      dynamic_ncols=True, file=sys.stderr)

  def scalars(self, step: int, values: dict[str, float]):
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)

  def histograms(self, step: int, tensors: dict):
    """``{path: int8jax.diagnostics.LayerTensors}`` -> ``hist/<path>/{g,x,w}``."""
    if self.writer is not None:
      for path, t in tensors.items():
        for name in ("g", "x", "w"):
          self.writer.add_histogram(f"hist/{path}/{name}", getattr(t, name), step)

  def progress(self, n: int, postfix: dict):
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


class TrainWindow:
  """Training-step outputs ``{"loss", "sums"}`` between two log points.

  ``sums`` are the task's per-batch sums with a ``count`` entry; the window's
  value of each other key is ``sum / count`` over its steps.
  """

  def __init__(self):
    self.pending: list = []
    self.reset()

  def reset(self):
    self.sums: dict[str, float] = {}
    self.images = 0
    self.t = time.time()

  def add(self, step: int, out, images: int):
    self.pending.append((step, out))
    self.images += images

  def fetch(self):
    """Folds the pending device outputs into the sums; warns on a non-finite loss."""
    for step, m in jax.device_get(self.pending):
      for k, v in m["sums"].items():
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
      if not math.isfinite(float(m["loss"])):
        log.warning("step %d: non-finite loss %s", step, float(m["loss"]))
    self.pending.clear()

  def means(self) -> dict[str, float]:
    """``sum / count`` per key: ``loss`` first, then the others by name."""
    n = max(self.sums.get("count", 0.0), 1.0)
    keys = sorted(k for k in self.sums if k != "count")
    keys.sort(key=lambda k: k != "loss")
    return {k: self.sums[k] / n for k in keys}

  def images_per_s(self) -> float:
    return self.images / max(time.time() - self.t, 1e-9)


def quant_scalars(model: nnx.Module, alpha: float, beta: float,
                  lr_deviation: str | None = None) -> dict[str, float]:
  """``quant/<layer>/<stat>`` of :func:`int8jax.diagnostics.layer_stats`."""
  return {f"quant/{path}/{k}": v
          for path, stats in diagnostics.layer_stats(model, alpha, beta, lr_deviation).items()
          for k, v in stats.items()}


def layer_tensors(model: nnx.Module, loss_fn: Callable, batch: dict) -> dict:
  """Per quantized layer: g, x, w of ``loss_fn(model, batch)`` (training mode).

  Pass the same ``loss_fn`` object every time: the capture pass is compiled
  once per function (:func:`int8jax.diagnostics.capture_tensors`).
  """
  return diagnostics.capture_tensors(model, loss_fn, {k: jnp.asarray(v) for k, v in batch.items()})


def format_summary(summary: dict) -> str:
  """The ``SUMMARY k=v ...`` line a run prints."""
  return "SUMMARY " + " ".join(
      f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
      if not isinstance(v, dict))  # quant_layers: summary.json and the layer table


def format_layer_table(layers: dict[str, dict[str, float]]) -> str:
  """Markdown table of each quantized layer's latest measurement (a summary's ``quant_layers``)."""
  rows = ["| quantized layer | d (global) | d (channel mean / max) | clip / max\\|g\\| "
          "| clipped fraction | phi | measurements |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for path, s in layers.items():
    rows.append(f"| `{path}` | {s['global_cosine_distance']:.4f} | {s['cosine_distance']:.4f} / "
                f"{s['channel_cosine_distance_max']:.3f} | {s['clip_ratio']:.3f} | "
                f"{s['clipped_fraction']:.2e} | {s['phi']:.3f} | {s['measurements']:.0f} |")
  return "\n".join(rows)


def _accumulator(logdir: str):
  from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=g-import-not-at-top
  acc = ea.EventAccumulator(os.fspath(logdir),
                            size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
  acc.Reload()
  return acc


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` (sorted by step) of the event files in ``logdir``.

  Read with TensorBoard's own ``EventAccumulator`` (no TensorFlow needed):
  what ``tensorboard --logdir`` shows.
  """
  acc = _accumulator(logdir)
  return {tag: sorted((int(e.step), float(e.value)) for e in acc.Scalars(tag))
          for tag in acc.Tags()["scalars"]}


def event_tags(logdir: str) -> set[str]:
  """Every scalar and histogram tag of the event files in ``logdir``."""
  tags = _accumulator(logdir).Tags()
  return set(tags["scalars"]) | set(tags["histograms"])
