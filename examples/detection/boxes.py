"""Boxes, anchors, target assignment, losses and NMS of the RetinaNet example.

Conventions (everything here):

* a box is ``(x1, y1, x2, y2)`` in pixels of the network input (the resized,
  padded image), float32, ``x2 >= x1``; a box array has the 4 coordinates on
  its last axis;
* anchors are one ``(N, 4)`` float32 array over all pyramid levels, in the
  order the heads emit predictions: level by level (finest first), then
  row-major over the level's ``(H, W)`` cells, then the ``A`` anchor shapes
  of a cell (scales slowest, aspect ratios fastest);
* box regression targets are the R-CNN deltas ``(dx, dy, dw, dh)``
  (Girshick et al. 2014; RetinaNet keeps them with unit weights).

All functions are pure ``jax.numpy`` (jit / vmap / grad safe) except
:func:`make_anchors`, which runs once on the host (NumPy).

References:
  Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (RetinaNet).
  Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "AnchorConfig", "make_anchors", "anchors_per_cell", "level_sizes", "box_area", "box_iou",
    "box_giou", "encode_boxes", "decode_boxes", "match_anchors", "Targets", "focal_loss",
    "smooth_l1", "detection_loss", "nms", "postprocess", "BOX_LOSSES",
]

#: ``detection_loss``'s ``box_loss`` values.
BOX_LOSSES = ("smooth_l1", "giou")

#: Largest ``dw``/``dh`` fed to ``exp`` when decoding (detectron2's clamp).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


# ----------------------------------------------------------------- anchors


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Anchor shapes of a feature pyramid (RetinaNet §4).

  Attributes:
    levels: pyramid levels, e.g. ``(3, 4, 5)``; level ``l`` has stride ``2**l``.
    size: anchor size at level ``l`` is ``size * 2**l`` pixels (RetinaNet:
      4, i.e. 32 px at P3).
    scales_per_octave: ``S`` intermediate sizes ``2**(k/S)``, k < S (RetinaNet: 3).
    aspect_ratios: height / width ratios (RetinaNet: 0.5, 1, 2); the area of
      every ratio equals the square's.
  """

  levels: tuple[int, ...] = (3, 4, 5)
  size: float = 4.0
  scales_per_octave: int = 3
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

  def __post_init__(self):
    if not self.levels or list(self.levels) != sorted(set(self.levels)) or min(self.levels) < 0:
      raise ValueError(f"AnchorConfig.levels must be increasing non-negative ints, "
                       f"got {self.levels!r}")
    if not self.size > 0:
      raise ValueError(f"AnchorConfig.size must be > 0, got {self.size!r}")
    if not (isinstance(self.scales_per_octave, int) and self.scales_per_octave >= 1):
      raise ValueError(f"AnchorConfig.scales_per_octave must be an int >= 1, "
                       f"got {self.scales_per_octave!r}")
    if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
      raise ValueError(f"AnchorConfig.aspect_ratios must be positive, got {self.aspect_ratios!r}")


def anchors_per_cell(cfg: AnchorConfig) -> int:
  """``A``: anchor shapes at every cell of every level."""
  return cfg.scales_per_octave * len(cfg.aspect_ratios)


def level_sizes(image_size: int, levels: Sequence[int]) -> list[int]:
  """Side of each level's feature map for a square ``image_size`` input.

  Stride-2 convs and pools with SAME-style padding round up: ``ceil(s / 2)``
  per halving (64 -> 8, 4, 2 at levels 3, 4, 5; 100 -> 13, 7, 4).
  """
  out = []
  for l in levels:
    s = image_size
    for _ in range(l):
      s = -(-s // 2)
    out.append(s)
  return out


def make_anchors(cfg: AnchorConfig, image_size: int) -> np.ndarray:
  """All anchors of a square ``image_size`` input, ``(N, 4)`` float32 xyxy.

  Anchor centres sit at cell centres, ``((x + 0.5) * stride, (y + 0.5) * stride)``.
  ``N = sum_l H_l * W_l * A`` (see the module doc for the order).
  """
  out = []
  for l, n in zip(cfg.levels, level_sizes(image_size, cfg.levels)):
    stride = 2.0 ** l
    shapes = []
    for k in range(cfg.scales_per_octave):
      side = cfg.size * stride * 2.0 ** (k / cfg.scales_per_octave)
      for r in cfg.aspect_ratios:
        w, h = side / math.sqrt(r), side * math.sqrt(r)
        shapes.append((-w / 2, -h / 2, w / 2, h / 2))
    shapes = np.asarray(shapes, np.float64)                        # (A, 4)
    c = (np.arange(n, dtype=np.float64) + 0.5) * stride
    cy, cx = np.meshgrid(c, c, indexing="ij")
    centres = np.stack([cx, cy, cx, cy], -1).reshape(-1, 1, 4)    # (H*W, 1, 4)
    out.append((centres + shapes[None]).reshape(-1, 4))
  return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------ box geometry


def box_area(b: jax.Array) -> jax.Array:
  """Area of ``(..., 4)`` xyxy boxes (0 for degenerate ones)."""
  return jnp.maximum(b[..., 2] - b[..., 0], 0) * jnp.maximum(b[..., 3] - b[..., 1], 0)


def _inter_union(a, b):
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
  return inter, union


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise IoU: ``(..., N, 4)``, ``(..., M, 4)`` -> ``(..., N, M)`` (0 if union is 0)."""
  inter, union = _inter_union(a, b)
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def box_giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Element-wise generalized IoU of ``(..., 4)`` box arrays, in ``[-1, 1]``.

  ``GIoU = IoU - (|C| - |A u B|) / |C|``, ``C`` the smallest enclosing box.
  """
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  iou = inter / jnp.maximum(union, 1e-9)
  c = box_area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                jnp.maximum(a[..., 2:], b[..., 2:])], -1))
  return iou - (c - union) / jnp.maximum(c, 1e-9)


def _centre_size(b):
  w = b[..., 2] - b[..., 0]
  h = b[..., 3] - b[..., 1]
  return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode_boxes(boxes: jax.Array, anchors: jax.Array) -> jax.Array:
  """R-CNN deltas of ``boxes`` relative to ``anchors`` (both ``(..., 4)`` xyxy).

  ``dx = (x - xa) / wa``, ``dy = (y - ya) / ha``, ``dw = log(w / wa)``,
  ``dh = log(h / ha)`` with ``(x, y, w, h)`` centre and size. Boxes must
  have positive width and height (padding boxes are masked by the caller;
  their deltas are finite garbage: sizes are floored at 1e-6).
  """
  x, y, w, h = _centre_size(boxes)
  xa, ya, wa, ha = _centre_size(anchors)
  w, h = jnp.maximum(w, 1e-6), jnp.maximum(h, 1e-6)
  return jnp.stack([(x - xa) / wa, (y - ya) / ha, jnp.log(w / wa), jnp.log(h / ha)], -1)


def decode_boxes(deltas: jax.Array, anchors: jax.Array) -> jax.Array:
  """Inverse of :func:`encode_boxes` (``dw``, ``dh`` clamped at ``log(1000/16)``)."""
  xa, ya, wa, ha = _centre_size(anchors)
  dx, dy, dw, dh = (deltas[..., i] for i in range(4))
  x, y = xa + dx * wa, ya + dy * ha
  w = wa * jnp.exp(jnp.minimum(dw, BBOX_XFORM_CLIP))
  h = ha * jnp.exp(jnp.minimum(dh, BBOX_XFORM_CLIP))
  return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], -1)


# -------------------------------------------------------- target assignment


@dataclasses.dataclass(frozen=True)
class Targets:
  """Per-anchor training targets of a batch (a pytree).

  Attributes:
    positive: ``(B, N)`` bool, anchor matched to an object.
    negative: ``(B, N)`` bool, background anchor (not positive, not ignored).
    classes: ``(B, N)`` int32, class of the matched object (0 where not positive).
    boxes: ``(B, N, 4)`` float32, the matched object's box (garbage where not positive).
  """

  positive: jax.Array
  negative: jax.Array
  classes: jax.Array
  boxes: jax.Array


jax.tree_util.register_dataclass(Targets, data_fields=["positive", "negative", "classes", "boxes"],
                                 meta_fields=[])


def match_anchors(anchors: jax.Array, gt_boxes: jax.Array, gt_classes: jax.Array,
                  gt_valid: jax.Array, *, fg_iou: float = 0.5, bg_iou: float = 0.4,
                  low_quality: bool = True) -> Targets:
  """RetinaNet's IoU assignment of objects to anchors.

  An anchor is positive when its best IoU with a valid object is
  ``>= fg_iou``, negative when it is ``< bg_iou``, ignored in between. With
  ``low_quality`` (torchvision's ``allow_low_quality_matches``), every
  object's highest-IoU anchors (ties included, IoU > 0) are positive too, so
  no object goes without an anchor; such an anchor keeps its own best object.

  Args:
    anchors: ``(N, 4)`` float32.
    gt_boxes: ``(B, M, 4)`` float32, padded.
    gt_classes: ``(B, M)`` int32.
    gt_valid: ``(B, M)`` bool or float (1 = real object, 0 = padding).

  Returns:
    :class:`Targets`.
  """
  valid = gt_valid.astype(bool)
  iou = box_iou(jnp.asarray(anchors, jnp.float32)[None], gt_boxes)                      # (B, N, M)
  iou = jnp.where(valid[:, None, :], iou, -1.0)
  best = iou.max(-1)
  best_gt = iou.argmax(-1)
  positive = best >= fg_iou
  if low_quality:
    per_gt = iou.max(1, keepdims=True)                         # (B, 1, M)
    lq = (iou == per_gt) & (per_gt > 0) & valid[:, None, :]
    positive = positive | lq.any(-1)
  negative = (best < bg_iou) & ~positive
  classes = jnp.take_along_axis(gt_classes, best_gt, axis=1)
  boxes = jnp.take_along_axis(gt_boxes, best_gt[..., None], axis=1)
  return Targets(positive=positive, negative=negative,
                 classes=jnp.where(positive, classes, 0).astype(jnp.int32), boxes=boxes)


# ------------------------------------------------------------------ losses


def focal_loss(logits: jax.Array, targets: jax.Array, *, alpha: float = 0.25,
               gamma: float = 2.0) -> jax.Array:
  """Sigmoid focal loss per element (``optax.sigmoid_focal_loss``), float32.

  ``FL = -alpha_t (1 - p_t)**gamma log(p_t)``; ``targets`` in {0, 1}, shape of
  ``logits``.
  """
  return optax.sigmoid_focal_loss(logits.astype(jnp.float32), targets.astype(jnp.float32),
                                  alpha=alpha, gamma=gamma)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Huber-style smooth L1 per element: ``0.5 x**2 / beta`` if ``|x| < beta`` else
  ``|x| - 0.5 beta`` (``beta = 0``: L1)."""
  a = jnp.abs(x)
  if beta <= 0:
    return a
  return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def detection_loss(cls_logits: jax.Array, box_deltas: jax.Array, anchors: jax.Array,
                   targets: Targets, image_valid: jax.Array, *, alpha: float = 0.25,
                   gamma: float = 2.0, box_loss: str = "smooth_l1", beta: float = 0.11,
                   box_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """RetinaNet loss of a batch: focal loss + box loss, normalised by positives.

  Args:
    cls_logits: ``(B, N, C)`` class logits (any float dtype; computed in float32).
    box_deltas: ``(B, N, 4)`` predicted deltas.
    anchors: ``(N, 4)``.
    targets: from :func:`match_anchors`.
    image_valid: ``(B,)`` float, 0 for corrupt images and padding (no loss).
    box_loss: ``"smooth_l1"`` on the deltas (``beta``; RetinaNet) or
      ``"giou"`` (``1 - GIoU`` of the decoded box).

  Returns:
    ``(loss, parts)``: ``loss = (sum focal + box_weight * sum box) /
    max(1, positives)`` over the batch, and float32 scalars ``cls_sum``,
    ``box_sum`` (un-normalised sums) and ``num_pos``.
  """
  if box_loss not in BOX_LOSSES:
    raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got {box_loss!r}")
  anchors = jnp.asarray(anchors, jnp.float32)
  iv = image_valid.astype(jnp.float32)[:, None]
  pos = targets.positive.astype(jnp.float32) * iv
  care = (targets.positive | targets.negative).astype(jnp.float32) * iv
  num_classes = cls_logits.shape[-1]
  onehot = jax.nn.one_hot(targets.classes, num_classes, dtype=jnp.float32) * pos[..., None]
  fl = focal_loss(cls_logits, onehot, alpha=alpha, gamma=gamma)
  cls_sum = jnp.sum(fl * care[..., None])
  deltas = box_deltas.astype(jnp.float32)
  if box_loss == "smooth_l1":
    per = smooth_l1(deltas - encode_boxes(targets.boxes, anchors[None]), beta).sum(-1)
  else:
    per = 1.0 - box_giou(decode_boxes(deltas, anchors[None]), targets.boxes)
  box_sum = jnp.sum(per * pos)
  num_pos = pos.sum()
  loss = (cls_sum + box_weight * box_sum) / jnp.maximum(num_pos, 1.0)
  return loss, {"cls_sum": cls_sum, "box_sum": box_sum, "num_pos": num_pos}


# --------------------------------------------------------------- inference


def nms(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float,
        classes: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
  """Greedy non-maximum suppression inside jit, fixed size: a keep mask.

  Boxes are visited in decreasing score order (ties: lower index first); a
  box is kept unless a kept, higher-ranked box of the same class (any class
  if ``classes`` is None) overlaps it with IoU ``> iou_threshold``. Cost
  ``O(K**2)`` memory and a ``K``-step ``lax.fori_loop``.

  Args:
    boxes: ``(K, 4)``; scores: ``(K,)``; classes: ``(K,)`` int or None;
    valid: ``(K,)`` bool, candidates (others are never kept nor suppress).

  Returns:
    ``(K,)`` bool, in the input order.
  """
  k = boxes.shape[0]
  order = jnp.argsort(-scores, stable=True)
  b = boxes[order]
  v = jnp.ones((k,), bool) if valid is None else valid[order].astype(bool)
  over = box_iou(b, b) > iou_threshold
  if classes is not None:
    c = classes[order]
    over = over & (c[:, None] == c[None, :])
  later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]
  over = over & later

  def body(i, keep):
    return keep & ~(keep[i] & over[i])

  keep_sorted = lax.fori_loop(0, k, body, v)
  return jnp.zeros((k,), bool).at[order].set(keep_sorted)


def postprocess(cls_logits: jax.Array, box_deltas: jax.Array, anchors: jax.Array, *,
                image_size: int, score_threshold: float = 0.05, pre_nms_top_k: int = 1000,
                iou_threshold: float = 0.5, max_detections: int = 100) -> dict:
  """Detections of a batch, fixed size (inside jit): top-k, decode, class-wise NMS.

  Per image: the ``pre_nms_top_k`` highest (anchor, class) sigmoid scores over
  all levels, those above ``score_threshold`` decoded and clipped to the
  ``image_size`` square, class-aware NMS, then the ``max_detections``
  highest kept.

  Args:
    cls_logits: ``(B, N, C)``; box_deltas: ``(B, N, 4)``; anchors: ``(N, 4)``.

  Returns:
    dict of ``boxes`` ``(B, D, 4)`` float32 xyxy in input pixels, ``scores``
    ``(B, D)`` float32, ``classes`` ``(B, D)`` int32 (0-based), ``valid``
    ``(B, D)`` bool, ``D = max_detections``; rows are in decreasing score
    order, invalid rows last (score 0).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  n, c = cls_logits.shape[1:]
  k = min(pre_nms_top_k, n * c)
  d = min(max_detections, k)

  def one(logits, deltas):
    s = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(-1)
    top_s, top_i = lax.top_k(s, k)
    a_idx, cls = top_i // c, (top_i % c).astype(jnp.int32)
    boxes = decode_boxes(deltas.astype(jnp.float32)[a_idx], anchors[a_idx])
    boxes = jnp.clip(boxes, 0.0, float(image_size))
    cand = (top_s > score_threshold) & (box_area(boxes) > 0)
    keep = nms(boxes, top_s, iou_threshold=iou_threshold, classes=cls, valid=cand)
    ranked = jnp.where(keep, top_s, -1.0)
    sel_s, sel = lax.top_k(ranked, d)
    ok = sel_s > -1.0
    pad = max_detections - d
    out = (jnp.where(ok[:, None], boxes[sel], 0.0), jnp.where(ok, sel_s, 0.0),
           jnp.where(ok, cls[sel], 0), ok)
    if pad:
      out = tuple(jnp.pad(o, [(0, pad)] + [(0, 0)] * (o.ndim - 1)) for o in out)
    return out

  boxes, scores, classes, ok = jax.vmap(one)(cls_logits, box_deltas)
  return {"boxes": boxes, "scores": scores, "classes": classes, "valid": ok}
