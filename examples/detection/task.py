"""The detection job as a :class:`examples.tasks.Task`: data, model, loss, evaluation.

:class:`DetectionTask` is what the shared training loop
(:func:`examples.train.train`) runs for ``python -m examples.detection.train``.
Its config is a :class:`DetectionConfig` (an :class:`examples.config.Config`
with detection's own fields); every field is a command-line flag.

Per batch (see :mod:`examples.detection.data` for the layout), inside jit:

* ``loss``: normalise the uint8 images on the device, run the detector,
  assign anchors (:func:`~examples.detection.boxes.match_anchors`) and return
  the focal + box loss normalised by the batch's positive anchors. ``sums``
  (the loop logs ``train/<k> = sum_k / count``, ``count`` = valid images):
  ``loss``, ``cls_loss``, ``box_loss`` (each the batch value times
  ``count``, so a window shows the image-weighted mean of batch losses) and
  ``positives`` (positive anchors per image).
* ``eval_step``: the detections of
  :func:`~examples.detection.boxes.postprocess` (NMS inside jit, fixed
  ``max_detections`` rows) and the same loss sums.
* ``evaluate`` (host): detections mapped back to original pixels, the COCO
  metric through pycocotools: ``eval_mAP`` (AP@[.5:.95]), ``eval_mAP50``,
  ``eval_mAP75``, ``eval_AR100``, and ``eval_loss``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import int8jax
from examples import steps as steps_lib
from examples.classification import normalize_with
from examples.config import Config
from examples.detection import boxes as boxes_lib
from examples.detection import data as det_data
from examples.detection.model import BACKBONES, RetinaNet, check_levels

log = logging.getLogger("int8jax.examples.detection")

__all__ = ["DetectionConfig", "DetectionTask", "init_key", "parse_floats", "parse_ints"]


def _f(default, help_: str, choices=None):
  return dataclasses.field(default=default,
                           metadata={"help": help_, "choices": choices, "datasets": None})


@dataclasses.dataclass
class DetectionConfig(Config):
  """Every option of a detection job (``--help`` shows each with its default).

  The shared loop's options (mode, optimizer, schedule, run) are
  :class:`examples.config.Config`'s, with detection's defaults where they
  differ; the rest are detection's own.
  """

  hidden_options: ClassVar[tuple[str, ...]] = ("small_input", "label_smoothing")
  same_job: ClassVar[tuple[str, ...]] = (
      "model", "mode", "dataset", "batch_size", "seed", "width", "backbone", "fpn_width",
      "head_convs", "levels", "image_size", "data_dir")

  # data (Config's fields, detection's meaning and defaults)
  dataset: str = _f("coco", "annotation layout of --data-dir: coco "
                    "(annotations/instances_<split>.json + <split>/) or voc (Annotations/, "
                    "JPEGImages/, ImageSets/Main/<split>.txt)", ("coco", "voc"))
  data_dir: str | None = _f(None, "dataset root (required)")
  image_size: int = _f(64, "network input side S: longer image side resized to S, padded square")
  train_split: str = _f("train", "training split name (COCO 2017: train2017)")
  val_split: str = _f("val", "evaluation split name (COCO 2017: val2017)")
  max_boxes: int = _f(16, "boxes per image kept as targets (padded; extra boxes dropped, warned)")
  max_eval_images: int | None = _f(None, "evaluate on the first N validation images only")
  # model
  model: str = _f("retinanet", "detector", ("retinanet",))
  backbone: str = _f("resnet18", "ResNet backbone", tuple(sorted(BACKBONES)))
  width: int = _f(16, "backbone stem width (64: the standard ResNet)")
  fpn_width: int = _f(32, "channels of the FPN levels and the heads (RetinaNet: 256)")
  head_convs: int = _f(2, "hidden 3x3 convs per subnet (RetinaNet: 4)")
  levels: str = _f("3,4,5", "pyramid levels, comma-separated (level l: stride 2**l; 6,7: "
                   "RetinaNet's extra levels)")
  anchor_size: float = _f(1.5, "anchor side at level l = ANCHOR_SIZE * 2**l px (RetinaNet: 4)")
  scales_per_octave: int = _f(3, "anchor sizes per level, 2**(k/S)")
  aspect_ratios: str = _f("0.5,1,2", "anchor height/width ratios, comma-separated")
  prior_prob: float = _f(0.01, "initial foreground probability (class-subnet bias)")
  # loss
  focal_alpha: float = _f(0.25, "focal loss alpha")
  focal_gamma: float = _f(2.0, "focal loss gamma")
  fg_iou: float = _f(0.5, "anchor IoU >= FG_IOU: positive")
  bg_iou: float = _f(0.4, "anchor IoU < BG_IOU: negative (in between: ignored)")
  box_loss: str = _f("smooth_l1", "box regression loss", boxes_lib.BOX_LOSSES)
  smooth_l1_beta: float = _f(0.11, "smooth-L1 beta (0: L1)")
  box_loss_weight: float = _f(1.0, "weight of the box loss")
  # inference
  score_threshold: float = _f(0.05, "detections below this score are dropped before NMS")
  pre_nms_top_k: int = _f(1000, "highest-scoring (anchor, class) pairs per image before NMS")
  nms_iou: float = _f(0.5, "class-wise NMS IoU threshold")
  max_detections: int = _f(100, "detections per image (COCO's maxDets)")
  # optimization and run: Config's, detection's defaults
  lr: float = _f(0.02, "peak learning rate")
  weight_decay: float = _f(1e-4, "weight decay (not on biases / BatchNorm)")
  warmup_epochs: float = _f(0.5, "linear warm-up, in epochs (may be fractional)")
  lr_steps: str = _f("0.67,0.89", "step schedule: fractions of training where LR *= LR_DECAY")
  batch_size: int = _f(32, "global batch size")
  workdir: str = _f("runs/detection", "checkpoints/, model/, tensorboard/, summary.json; "
                    "rerunning with the same workdir resumes (or re-reports a finished run)")
  log_every: int = _f(25, "log training metrics and quantization stats every N steps")
  eval_every_epochs: float = _f(0.0, "evaluate every N epochs (0: only at the end)")

  def __post_init__(self):
    super().__post_init__()
    for name in ("image_size", "max_boxes", "width", "fpn_width", "max_detections",
                 "pre_nms_top_k", "scales_per_octave"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"--{name.replace('_', '-')} {v!r}: must be an int >= 1")
    if self.head_convs < 0:
      raise ValueError(f"--head-convs {self.head_convs!r}: must be >= 0")
    if not 0 <= self.bg_iou <= self.fg_iou <= 1:
      raise ValueError(f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou!r}, "
                       f"fg_iou={self.fg_iou!r}")
    check_levels(self.anchor_config().levels)  # validates levels / anchors

  def anchor_config(self) -> boxes_lib.AnchorConfig:
    return boxes_lib.AnchorConfig(
        levels=tuple(parse_ints(self.levels, "levels")), size=self.anchor_size,
        scales_per_octave=self.scales_per_octave,
        aspect_ratios=tuple(parse_floats(self.aspect_ratios, "aspect_ratios")))


def parse_ints(s: str, name: str) -> list[int]:
  try:
    return [int(v) for v in s.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{name} must be comma-separated integers, got {s!r}") from None


def parse_floats(s: str, name: str) -> list[float]:
  try:
    return [float(v) for v in s.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{name} must be comma-separated numbers, got {s!r}") from None


def init_key(seed: int) -> jax.Array:
  """The parameter-initialisation key: ``jax.random.key(seed, impl="rbg")``.

  XLA's RngBitGenerator instead of the default threefry: on the 2-core
  development CPU (jax 0.12, ``jax_threefry_partitionable=True``) every
  distinct kernel shape's threefry initializer took ~10 s to compile (a
  ResNet-18 RetinaNet: ~70 s before the first step); with ``rbg`` the whole
  model builds in ~10 s. Deterministic for a given seed, jax version and
  backend (rbg streams are not promised to match across backends).
  """
  return jax.random.key(seed, impl="rbg")


class DetectionTask:
  """RetinaNet on a COCO-format (or VOC) dataset, for the shared loop
  (:class:`examples.tasks.Task`). Holds an anchor cache and the spec's
  normalisation constants (set by ``load_data`` / ``make_model``)."""

  name = "detection"
  #: make_model quantizes (with the fast-compiling rbg key, see init_key).
  quantizes_itself = True
  config_cls = DetectionConfig

  def __init__(self):
    self._anchors: dict = {}
    # (mean, std) of the spec: loss / eval_step receive (model, batch, cfg)
    # only, so the task keeps the spec's normalisation from load_data /
    # make_model (a gap of the Task protocol, see docs/detection.md).
    self._norm: tuple | None = None

  # ------------------------------------------------------------ protocol

  def load_data(self, cfg: DetectionConfig) -> det_data.DetectionSpec:
    if cfg.data_dir is None:
      raise ValueError("--data-dir is required: a COCO-format or VOC dataset root")
    load = det_data.coco if cfg.dataset == "coco" else det_data.voc
    spec = load(cfg.data_dir, image_size=cfg.image_size, max_boxes=cfg.max_boxes,
                train_split=cfg.train_split, val_split=cfg.val_split)
    if cfg.max_eval_images is not None:
      spec.test = det_data.DetectionSource(spec.test.records[:cfg.max_eval_images])
    self._norm = (spec.mean, spec.std)
    return spec

  def model_meta(self, spec) -> dict:
    """What make_model reads: classes, input shape, normalisation (for load_model)."""
    return {"num_classes": int(spec.num_classes), "image_shape": list(spec.image_shape),
            "mean": list(spec.mean), "std": list(spec.std)}

  def make_model(self, cfg: DetectionConfig, spec) -> nnx.Module:
    mode = int8jax.modes.get(cfg.mode)
    self._norm = (tuple(spec.mean), tuple(spec.std))
    model = RetinaNet(num_classes=spec.num_classes, anchors=cfg.anchor_config(),
                      backbone=cfg.backbone, width=cfg.width, in_channels=spec.image_shape[-1],
                      fpn_width=cfg.fpn_width, head_convs=cfg.head_convs,
                      prior_prob=cfg.prior_prob, dtype=mode.dtype,
                      rngs=nnx.Rngs(params=init_key(cfg.seed)))
    # The default stream only initialises kernels that quantize_model then
    # replaces by the float ones: the fast-compiling rbg key (init_key).
    return steps_lib.quantize(model, cfg, key=init_key(cfg.seed + 1))

  def loss(self, model, batch: dict, cfg: DetectionConfig):
    cls_logits, deltas = self._forward(model, batch, cfg)
    return self._loss(cls_logits, deltas, batch, cfg)

  def eval_step(self, model, batch: dict, cfg: DetectionConfig):
    cls_logits, deltas = self._forward(model, batch, cfg)
    _, sums = self._loss(cls_logits, deltas, batch, cfg)
    det = boxes_lib.postprocess(
        cls_logits, deltas, self.anchors(cfg), image_size=cfg.image_size,
        score_threshold=cfg.score_threshold, pre_nms_top_k=cfg.pre_nms_top_k,
        iou_threshold=cfg.nms_iou, max_detections=cfg.max_detections)
    return {"detections": det, "sums": sums}

  def evaluate(self, spec, results: list, cfg: DetectionConfig) -> dict[str, float]:
    dets, ids = det_data.predictions_to_coco(
        [(b, o["detections"]) for b, o in results], spec.categories)
    m = det_data.coco_evaluate(spec.test_gt, dets, ids)
    log.debug("COCO evaluation:\n%s", m["report"])
    tot = {k: float(sum(np.sum(o["sums"][k]) for _, o in results))
           for k in ("loss", "count")}
    return {"eval_mAP": m["mAP"], "eval_mAP50": m["mAP50"], "eval_mAP75": m["mAP75"],
            "eval_AR100": m["AR100"], "eval_loss": tot["loss"] / max(tot["count"], 1.0),
            "eval_images": float(len(ids)), "eval_detections": float(len(dets))}

  # ------------------------------------------------------------- helpers

  def anchors(self, cfg: DetectionConfig) -> np.ndarray:
    """``(N, 4)`` float32 anchors of ``cfg`` (cached; a jit constant)."""
    key = (cfg.anchor_config(), cfg.image_size)
    if key not in self._anchors:
      self._anchors[key] = boxes_lib.make_anchors(*key)
    return self._anchors[key]

  def _forward(self, model, batch, cfg):
    if self._norm is None:
      raise RuntimeError("DetectionTask: call load_data or make_model before loss / eval_step")
    dtype = int8jax.modes.get(cfg.mode).compute_dtype
    return model(normalize_with(batch["image"], *self._norm, dtype))

  def _loss(self, cls_logits, deltas, batch, cfg):
    anchors = jnp.asarray(self.anchors(cfg))
    targets = boxes_lib.match_anchors(anchors, batch["boxes"], batch["classes"],
                                      batch["box_valid"], fg_iou=cfg.fg_iou, bg_iou=cfg.bg_iou)
    loss, parts = boxes_lib.detection_loss(
        cls_logits, deltas, anchors, targets, batch["valid"], alpha=cfg.focal_alpha,
        gamma=cfg.focal_gamma, box_loss=cfg.box_loss, beta=cfg.smooth_l1_beta,
        box_weight=cfg.box_loss_weight)
    count = batch["valid"].astype(jnp.float32).sum()
    npos = jnp.maximum(parts["num_pos"], 1.0)
    sums = {"loss": loss * count, "cls_loss": parts["cls_sum"] / npos * count,
            "box_loss": parts["box_sum"] / npos * count, "positives": parts["num_pos"],
            "count": count}
    return loss, sums
