"""The detection job as a :class:`examples.tasks.Task`: data, model, loss, evaluation.

:class:`DetectionTask` is what the shared training loop runs (today:
:func:`examples.detection.train.run`, a thin temporary runner). Its config is
a :class:`DetectionConfig`; every field is a command-line flag of
``python -m examples.detection.train``.

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
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import int8jax
from examples.detection import boxes as boxes_lib
from examples.detection import data as det_data
from examples.detection.model import BACKBONES, RetinaNet, check_levels

log = logging.getLogger("int8jax.examples.detection")

__all__ = ["DetectionConfig", "DetectionTask", "init_key", "parse_floats", "parse_ints"]


def _f(default, help_: str, choices=None):
  return dataclasses.field(default=default, metadata={"help": help_, "choices": choices})


@dataclasses.dataclass
class DetectionConfig:
  """Every option of a detection job (``--help`` shows each with its default)."""

  # data
  data_dir: str | None = _f(None, "dataset root (required): COCO layout "
                            "annotations/instances_<split>.json + <split>/, or a VOC folder")
  data_format: str = _f("coco", "coco | voc", ("coco", "voc"))
  train_split: str = _f("train", "training split name (COCO 2017: train2017)")
  val_split: str = _f("val", "evaluation split name (COCO 2017: val2017)")
  image_size: int = _f(64, "network input side S: longer image side resized to S, padded square")
  max_boxes: int = _f(16, "boxes per image kept as targets (padded; extra boxes dropped, warned)")
  max_eval_images: int | None = _f(None, "evaluate on the first N validation images only")
  workers: int = _f(0, "grain worker processes decoding images (0: in the main process)")
  # model
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
  box_loss: str = _f("smooth_l1", "box regression loss", ("smooth_l1", "giou"))
  smooth_l1_beta: float = _f(0.11, "smooth-L1 beta (0: L1)")
  box_loss_weight: float = _f(1.0, "weight of the box loss")
  # inference
  score_threshold: float = _f(0.05, "detections below this score are dropped before NMS")
  pre_nms_top_k: int = _f(1000, "highest-scoring (anchor, class) pairs per image before NMS")
  nms_iou: float = _f(0.5, "class-wise NMS IoU threshold")
  max_detections: int = _f(100, "detections per image (COCO's maxDets)")
  # mode (int8jax.modes)
  mode: str = _f("float32", "training mode: " + " | ".join(int8jax.modes.MODE_NAMES),
                 int8jax.modes.MODE_NAMES)
  period: int = _f(100, "quantized layers re-measure every PERIOD steps (paper 4.3)")
  weight_granularity: str = _f("tensor", "weight quantization scale", ("tensor", "channel"))
  grad_rounding: str = _f("stochastic", "gradient rounding", ("stochastic", "nearest"))
  backend: str = _f("auto", "int8 GEMM backend (auto: best available)", ("auto", "xla", "pallas"))
  clip_lr: float = _f(0.5, "learning rate of the clip learner on log(clip)")
  alpha: float = _f(20.0, "error-sensitive LR: phi = max(exp(-alpha d), beta)")
  beta: float = _f(0.1, "error-sensitive LR lower bound")
  # optimization
  optimizer: str = _f("sgd", "base optimizer", ("sgd", "adamw"))
  lr: float = _f(0.02, "peak learning rate")
  momentum: float = _f(0.9, "SGD momentum")
  nesterov: bool = _f(False, "Nesterov momentum for SGD")
  weight_decay: float = _f(1e-4, "weight decay (not on biases / BatchNorm)")
  clip_grad_norm: float = _f(0.0, "clip the weight gradient's global norm (0: off)")
  schedule: str = _f("cosine", "LR schedule after warm-up", ("cosine", "step", "constant"))
  warmup_epochs: float = _f(0.5, "linear warm-up, in epochs (may be fractional)")
  lr_steps: str = _f("0.67,0.89", "step schedule: fractions of training where LR *= LR_DECAY")
  lr_decay: float = _f(0.1, "step schedule multiplier")
  batch_size: int = _f(32, "global batch size")
  epochs: float = _f(10.0, "training length in epochs (ignored with --steps)")
  steps: int | None = _f(None, "training length in optimizer steps")
  # run
  seed: int = _f(0, "seed of initialisation, data order, augmentation, stochastic rounding")
  workdir: str = _f("runs/detection", "checkpoints/, tensorboard/, summary.json; "
                    "rerunning with the same workdir resumes")
  num_devices: int | None = _f(None, "use the first N local devices (default: all)")
  checkpoint_every: int = _f(500, "checkpoint every N steps (and at the end; 0: end only)")
  keep_checkpoints: int = _f(2, "checkpoints to keep")
  log_every: int = _f(25, "log training metrics and quantization stats every N steps")
  eval_every_epochs: float = _f(0.0, "evaluate every N epochs (0: only at the end)")
  eval_batch_size: int | None = _f(None, "evaluation batch size (default: --batch-size)")
  stop_after_steps: int | None = _f(None, "testing aid: exit after N steps of this "
                                    "invocation without a final checkpoint (as if killed)")
  progress: bool = _f(True, "tqdm progress bar")
  tensorboard: bool = _f(True, "write TensorBoard event files (tensorboardX)")

  def __post_init__(self):
    for name in ("image_size", "max_boxes", "width", "fpn_width", "batch_size",
                 "max_detections", "pre_nms_top_k", "period", "scales_per_octave"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if self.head_convs < 0:
      raise ValueError(f"head_convs must be >= 0, got {self.head_convs!r}")
    if not 0 <= self.bg_iou <= self.fg_iou <= 1:
      raise ValueError(f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou!r}, "
                       f"fg_iou={self.fg_iou!r}")
    for name, choices in (("data_format", ("coco", "voc")), ("box_loss", ("smooth_l1", "giou")),
                          ("backbone", tuple(BACKBONES))):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
    int8jax.modes.get(self.mode)  # ValueError naming the choices
    check_levels(self.anchor_config().levels)  # validates levels / anchors

  def anchor_config(self) -> boxes_lib.AnchorConfig:
    return boxes_lib.AnchorConfig(
        levels=tuple(parse_ints(self.levels, "levels")), size=self.anchor_size,
        scales_per_octave=self.scales_per_octave,
        aspect_ratios=tuple(parse_floats(self.aspect_ratios, "aspect_ratios")))

  def quant_config(self) -> int8jax.QuantConfig | None:
    return int8jax.modes.get(self.mode).quant_config(
        period=self.period, weight_granularity=self.weight_granularity,
        grad_rounding=self.grad_rounding,
        backend=None if self.backend == "auto" else self.backend)


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


def _normalize(images, mean, std, dtype):
  """uint8 NHWC -> ``(x - 255 mean) / (255 std)`` in ``dtype`` (on the device)."""
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


class DetectionTask:
  """RetinaNet on a COCO-format (or VOC) dataset, for the shared loop
  (:class:`examples.tasks.Task`). Holds an anchor cache and the spec's
  normalisation constants (set by ``load_data`` / ``make_model``)."""

  name = "detection"
  quantizes_itself = False

  def __init__(self):
    self._anchors: dict = {}
    # (mean, std) of the spec: loss / eval_step receive (model, batch, cfg)
    # only, so the task keeps the spec's normalisation from load_data /
    # make_model (a gap of the Task protocol, see docs/detection.md).
    self._norm: tuple | None = None

  # ------------------------------------------------------------ protocol

  def load_data(self, cfg: DetectionConfig) -> det_data.DetectionSpec:
    if cfg.data_dir is None:
      raise ValueError("data_dir is required (--data-dir): a COCO-format or VOC dataset root")
    load = det_data.coco if cfg.data_format == "coco" else det_data.voc
    spec = load(cfg.data_dir, image_size=cfg.image_size, max_boxes=cfg.max_boxes,
                train_split=cfg.train_split, val_split=cfg.val_split)
    if cfg.max_eval_images is not None:
      spec.test = det_data.DetectionSource(spec.test.records[:cfg.max_eval_images])
    self._norm = (spec.mean, spec.std)
    return spec

  def make_model(self, cfg: DetectionConfig, spec) -> nnx.Module:
    mode = int8jax.modes.get(cfg.mode)
    self._norm = (spec.mean, spec.std)
    return RetinaNet(num_classes=spec.num_classes, anchors=cfg.anchor_config(),
                     backbone=cfg.backbone, width=cfg.width, in_channels=spec.image_shape[-1],
                     fpn_width=cfg.fpn_width, head_convs=cfg.head_convs,
                     prior_prob=cfg.prior_prob, dtype=mode.dtype,
                     rngs=nnx.Rngs(params=init_key(cfg.seed)))

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
    return model(_normalize(batch["image"], *self._norm, dtype))

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
