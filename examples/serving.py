"""A trained model as an int8 inference program for plain JAX.

:func:`write_serving` loads a model checkpoint (:func:`examples.load_model`),
freezes it (:func:`int8jax.nn.freeze`: int8 weights, the activation ranges
measured in training) and writes to ``OUT/``:

* ``model.jaxexport`` -- ``jax.export.export(...)(...).serialize()`` of
  uint8 images -> the training code's normalisation -> the frozen forward
  pass, batch dimension symbolic (any batch size runs);
* ``signature.json`` -- input shape, dtype (uint8) and layout, the
  normalisation the program applies, the class count and the run it came from.

A process with only ``jax`` (and NumPy) installed runs it::

    import jax
    prog = jax.export.deserialize(open("OUT/model.jaxexport", "rb").read())
    logits = prog.call(images_uint8)                    # (N, H, W, C) uint8 -> (N, classes)

The normalisation is inside the program because numpy's and XLA's float32
division differ in the last bit on some pixels (42,442 of the 784,000 of the
1,000 held-out MNIST digits), which moved int8 codes of the first quantized
layer and the logits by up to 0.009 (the predictions stayed the same). Inside,
it is the same XLA code as in training, and the program's outputs are
bit-identical to the trained model's ``model.eval()`` outputs on the same
batch (tests/test_freeze.py).

Classification models output logits. Detection models (the RetinaNet of
``examples/detection``) output what its evaluation computes: the int8
backbone, FPN and heads, then -- in float, inside the program -- box
decoding, top-k and class-wise NMS with the run's thresholds, as fixed-size
``boxes`` / ``scores`` / ``classes`` / ``valid`` arrays.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from int8jax import modes
from int8jax.nn import export_serving, freeze
from int8jax.nn.freeze import FrozenConv, FrozenDense

from examples import checkpoint
from examples import data as data_lib
from examples import tasks as tasks_lib
from examples.classification import normalize, normalize_with

__all__ = ["write_serving", "SERVING_FORMAT", "PROGRAM", "SIGNATURE"]

#: ``format`` entry of ``signature.json``.
SERVING_FORMAT = "int8jax-serving/1"
PROGRAM = "model.jaxexport"
SIGNATURE = "signature.json"


def _load(path: str):
  """``(model, info)`` of a model checkpoint; a config that cannot be rebuilt
  is an error naming the checkpoint."""
  info = checkpoint.model_info(path)
  try:
    model = checkpoint.load_model(path)
  except (TypeError, KeyError, ValueError) as e:
    raise ValueError(f"{path!r}: the model cannot be rebuilt from its stored config "
                     f"(task {info.get('task')!r}): {e}") from e
  return model, info


def _classification_program(info: dict, dtype):
  """``(fn, None)``: uint8 images -> the training code's ``normalize`` -> logits."""
  dataset = info["config"]["dataset"]
  return (lambda model, images: model(normalize(images, dataset, dtype))), None


def _detection_program(task, info: dict, dtype):
  """``(fn, output signature)`` of a detection run: uint8 images -> the task's
  normalisation -> forward, then the evaluation's decoding and NMS (float)
  with the run's settings."""
  # pylint: disable=import-outside-toplevel
  from examples.detection import boxes as boxes_lib
  cfg = checkpoint._config(task, info["config"], {})  # pylint: disable=protected-access
  anchors = jnp.asarray(task.anchors(cfg))
  mean, std = info["model_meta"]["mean"], info["model_meta"]["std"]

  def fn(model, images):
    cls_logits, deltas = model(normalize_with(images, mean, std, dtype))
    return boxes_lib.postprocess(
        cls_logits, deltas, anchors, image_size=cfg.image_size,
        score_threshold=cfg.score_threshold, pre_nms_top_k=cfg.pre_nms_top_k,
        iou_threshold=cfg.nms_iou, max_detections=cfg.max_detections)

  d = cfg.max_detections
  out = {"boxes": {"shape": [None, d, 4], "dtype": "float32",
                   "meaning": "x0, y0, x1, y1 in input pixels"},
         "scores": {"shape": [None, d], "dtype": "float32", "meaning": "sigmoid score"},
         "classes": {"shape": [None, d], "dtype": "int32",
                     "meaning": "0-based index into the training set's categories"},
         "valid": {"shape": [None, d], "dtype": "bool",
                   "meaning": "row holds a detection (rows sorted by score, invalid last)"},
         "postprocess": {"score_threshold": cfg.score_threshold,
                         "pre_nms_top_k": cfg.pre_nms_top_k, "nms_iou": cfg.nms_iou,
                         "max_detections": d, "where": "inside the program (float)"}}
  return fn, out


def signature(info: dict, model_path: str, exported: jax.export.Exported,
              output: dict | None = None) -> dict:
  """The ``signature.json`` contents (``output``: a detector's outputs)."""
  cfg, meta = info["config"], info["model_meta"]
  if "mean" in meta:  # detection: the dataset's statistics travel in model_meta
    mean, std = meta["mean"], meta["std"]
  else:
    mean, std = data_lib.normalization(cfg["dataset"])
  if output is None:
    out_aval = exported.out_avals[0]
    output = {"shape": [None, meta["num_classes"]], "dtype": jnp.dtype(out_aval.dtype).name,
              "meaning": "logits (argmax = predicted class)"}
  return {
      "format": SERVING_FORMAT,
      "program": PROGRAM,
      "input": {"shape": [None, *meta["image_shape"]], "dtype": "uint8",
                "layout": "NHWC", "batch": "any size (symbolic)"},
      "preprocess": {
          "where": "inside the program, by the training code's own normalisation",
          "formula": "(x - mean) / std per channel (float32), cast to compute_dtype",
          # The float32 constants the program uses (for reference).
          "mean": _float32_times_255(mean), "std": _float32_times_255(std),
          "compute_dtype": jnp.dtype(modes.get(cfg["mode"]).compute_dtype).name,
          "dataset": cfg.get("dataset")},
      "output": output,
      "num_classes": meta["num_classes"],
      "source": {"model_checkpoint": model_path, "step": info.get("step"),
                 "task": info["task"], "model": cfg.get("model"), "mode": cfg.get("mode"),
                 "summary": info.get("summary"), "config": cfg},
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
  }


def write_serving(path: str, out: str) -> dict:
  """Writes ``OUT/model.jaxexport`` and ``OUT/signature.json`` for the model
  checkpoint ``path`` (or a workdir holding one in ``model/``).

  Returns the signature (with the program's size and layer counts).

  Raises:
    FileNotFoundError: no model checkpoint at ``path``.
    ValueError: a config that cannot be rebuilt, a task other than
      classification or detection, a float model or a layer never measured
      (named).
  """
  model_path = checkpoint._model_path(path)  # pylint: disable=protected-access
  model, info = _load(model_path)
  meta = info.get("model_meta") or {}
  task = tasks_lib.task_from_path(info["task"])
  if "image_shape" not in meta or "num_classes" not in meta:
    raise ValueError(f"{model_path!r}: task {info.get('task')!r} has no image_shape / "
                     "num_classes in its model_meta; serving export covers image "
                     "classification and detection")
  dtype = modes.get(info["config"]["mode"]).compute_dtype
  fn, output = (_detection_program(task, info, dtype)
                if getattr(task, "name", None) == "detection"
                else _classification_program(info, dtype))
  frozen = freeze(model)
  exported = export_serving(frozen, meta["image_shape"], jnp.uint8, fn=fn)
  blob = exported.serialize()
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, PROGRAM), "wb") as f:
    f.write(blob)
  sig = signature(info, model_path, exported, output)
  layers = [m for _, m in nnx.iter_graph(frozen)]
  sig["program_bytes"] = len(blob)
  sig["int8_layers"] = sum(isinstance(m, (FrozenConv, FrozenDense)) for m in layers)
  sig["float_layers"] = sum(isinstance(m, (nnx.Conv, nnx.Linear))
                            and not isinstance(m, (FrozenConv, FrozenDense)) for m in layers)
  with open(os.path.join(out, SIGNATURE), "w") as f:
    json.dump(sig, f, indent=1, default=_json_default)
  return sig


def _float32_times_255(v) -> list[float]:
  return [float(np.float32(c) * np.float32(255.0)) for c in v]


def _json_default(v):
  if isinstance(v, (np.generic,)):
    return v.item()
  raise TypeError(f"signature.json: cannot write {type(v).__name__}")
