"""Detection data: COCO-format and PASCAL VOC loaders for ``examples.data.batches``,
and COCO evaluation through pycocotools.

A detection dataset is a :class:`DetectionSpec` (an
:class:`examples.data.DataSpec`), so the grain pipeline of the
classification examples (:func:`examples.data.batches`: deterministic per
(seed, epoch, position), resumable at a batch index, corrupt files never
crash) serves it unchanged. Each record is an :class:`ImageRecord`; the
transform :class:`DetectionTransform` decodes it and yields, per image:

  ==============  ========  ===============  =========================================
  key             dtype     shape            meaning
  ==============  ========  ===============  =========================================
  ``image``       uint8     (S, S, C)        resized (longer side = S, aspect kept),
                                             padded with zeros right / bottom
  ``boxes``       float32   (M, 4)           xyxy in ``image`` pixels, padded with 0
  ``classes``     int32     (M,)             contiguous label 0..K-1 (0 on padding)
  ``box_valid``   float32   (M,)             1 for a real box, 0 for padding
  ``image_id``    int32     ()               the dataset's image id (-1: eval padding)
  ``scale``       float32   (2,)             (sx, sy): ``image`` px per original px
  ``orig_size``   int32     (2,)             original (height, width)
  ``valid``       float32   ()               0 for corrupt images and eval padding
  ``corrupt``     int32     ()               1 where the file could not be decoded
  ==============  ========  ===============  =========================================

``S`` is ``image_size``, ``M`` is ``max_boxes``. A prediction ``b`` in input
pixels maps back to the original image as ``b / (sx, sy, sx, sy)``
(:func:`to_original`). Training adds a random horizontal flip (``p = 0.5``)
applied to image and boxes before padding.

Formats:
  * COCO: ``instances_<split>.json`` (``images``, ``annotations`` with
    ``bbox = [x, y, w, h]``, ``categories``) + an image folder. Category ids
    map to contiguous labels in increasing id order. ``iscrowd`` boxes are
    left out of the training targets (they are ignore regions for the COCO
    metric, which reads them from the JSON).
  * PASCAL VOC: ``Annotations/<name>.xml``, ``JPEGImages/``,
    ``ImageSets/Main/<split>.txt``; 1-based inclusive pixel boxes become
    ``[xmin - 1, ymin - 1, xmax, ymax]``; ``difficult`` objects are left out
    of training and become ``iscrowd = 1`` (ignored) for the COCO metric --
    the COCO metric, not VOC's 11-point / all-point AP.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from examples.data import DataSpec, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

__all__ = [
    "ImageRecord", "DetectionSource", "DetectionTransform", "DetectionSpec",
    "load_coco_split", "load_voc_split", "voc_class_names", "coco", "voc", "to_original",
    "predictions_to_coco", "coco_evaluate",
]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a detection dataset (host, picklable).

  Attributes:
    path: image file.
    image_id: the dataset's id (COCO ``images[i].id``; VOC: position + 1).
    width, height: original size as the annotation file states it.
    boxes: ``(n, 4)`` float32 xyxy in original pixels (training targets).
    classes: ``(n,)`` int32 contiguous labels.
  """

  path: str
  image_id: int
  width: int
  height: int
  boxes: np.ndarray
  classes: np.ndarray


class DetectionSource:
  """Random-access source of :class:`ImageRecord` (``examples.data`` protocol)."""

  def __init__(self, records: Sequence[ImageRecord]):
    self.records = list(records)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> ImageRecord:
    return self.records[i]

  def __repr__(self):
    n = sum(len(r.boxes) for r in self.records)
    return f"DetectionSource({len(self)} images, {n} boxes)"


# -------------------------------------------------------------- transform


def _empty(size: int, channels: int, max_boxes: int, image_id: int, valid: bool,
           corrupt: bool, scale=(1.0, 1.0), orig=(0, 0)) -> dict:
  return {
      "image": np.zeros((size, size, channels), np.uint8),
      "boxes": np.zeros((max_boxes, 4), np.float32),
      "classes": np.zeros((max_boxes,), np.int32),
      "box_valid": np.zeros((max_boxes,), np.float32),
      "image_id": np.int32(image_id),
      "scale": np.asarray(scale, np.float32),
      "orig_size": np.asarray(orig, np.int32),
      "valid": np.float32(valid),
      "corrupt": np.int32(corrupt),
  }


def resize_boxes(boxes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
  """``(n, 4)`` xyxy times ``(sx, sy, sx, sy)``."""
  sx, sy = scale
  return (np.asarray(boxes, np.float32) * np.asarray([sx, sy, sx, sy], np.float32))


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
  """Horizontal flip of ``(n, 4)`` xyxy boxes in an image ``width`` wide."""
  b = np.asarray(boxes, np.float32)
  return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], -1)


def to_original(boxes: np.ndarray, scale: np.ndarray, orig_size: np.ndarray) -> np.ndarray:
  """Boxes ``(..., 4)`` xyxy in network-input pixels -> original image pixels,
  clipped to the original ``(height, width)``."""
  sx, sy = float(scale[0]), float(scale[1])
  h, w = float(orig_size[0]), float(orig_size[1])
  b = np.asarray(boxes, np.float32) / np.asarray([sx, sy, sx, sy], np.float32)
  return np.clip(b, 0, np.asarray([w, h, w, h], np.float32))


@dataclasses.dataclass(frozen=True)
class DetectionTransform:
  """Decode + resize (keep aspect, pad to ``size``) + optional flip of an
  :class:`ImageRecord` (picklable, a grain random map when ``train``).

  Boxes are scaled by the exact per-axis factors of the resize, flipped with
  the image, clipped to the resized image and dropped when narrower or
  shorter than ``min_box`` pixels afterwards; at most ``max_boxes`` are kept
  (the first ones; :func:`coco` warns at load time when an image has more).
  An unreadable file, or one whose decoded size differs from the annotation's,
  gives a blank image with ``valid = 0``, ``corrupt = 1`` (logged).
  """

  size: int
  max_boxes: int
  train: bool
  channels: int = 3
  flip_prob: float = 0.5
  min_box: float = 1.0

  def __post_init__(self):
    if self.size < 1 or self.max_boxes < 1:
      raise ValueError(f"size and max_boxes must be >= 1, got size={self.size!r}, "
                       f"max_boxes={self.max_boxes!r}")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")

  def __call__(self, record: ImageRecord | None, rng: np.random.Generator | None = None) -> dict:
    if record is None:
      return _empty(self.size, self.channels, self.max_boxes, -1, False, False)
    orig = (record.height, record.width)
    try:
      with Image.open(record.path) as img:
        img = img.convert("RGB" if self.channels == 3 else "L")
        w, h = img.size
        if (w, h) != (record.width, record.height):
          raise ValueError(f"decoded size {w}x{h} != annotated "
                           f"{record.width}x{record.height}")
        s = self.size / max(w, h)
        nw, nh = max(1, min(self.size, round(w * s))), max(1, min(self.size, round(h * s)))
        img = img.resize((nw, nh), Image.BILINEAR)
        arr = np.asarray(img, np.uint8).reshape(nh, nw, self.channels)
    except Exception as e:  # pylint: disable=broad-except
      log.warning("skipping unreadable image %s: %s: %s", record.path, type(e).__name__, e)
      return _empty(self.size, self.channels, self.max_boxes, record.image_id, False, True,
                    orig=orig)
    scale = (nw / w, nh / h)
    boxes = resize_boxes(record.boxes.reshape(-1, 4), scale)
    classes = np.asarray(record.classes, np.int32).reshape(-1)
    if self.train and rng is not None and rng.random() < self.flip_prob:
      arr = arr[:, ::-1]
      boxes = flip_boxes(boxes, nw)
    boxes = np.clip(boxes, 0, np.asarray([nw, nh, nw, nh], np.float32))
    keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box) & (
        (boxes[:, 3] - boxes[:, 1]) >= self.min_box)
    boxes, classes = boxes[keep][:self.max_boxes], classes[keep][:self.max_boxes]
    out = _empty(self.size, self.channels, self.max_boxes, record.image_id, True, False,
                 scale=scale, orig=orig)
    out["image"][:nh, :nw] = arr
    n = len(boxes)
    out["boxes"][:n] = boxes
    out["classes"][:n] = classes
    out["box_valid"][:n] = 1.0
    return out


# ----------------------------------------------------------------- spec


@dataclasses.dataclass
class DetectionSpec(DataSpec):
  """A detection dataset (:class:`examples.data.DataSpec` plus what evaluation needs).

  Attributes (beyond ``DataSpec``'s):
    categories: ``(dataset category id, name)`` per contiguous label.
    test_gt: the evaluation split's ground truth as a COCO-format dict
      (what pycocotools reads).
    max_boxes: the ``M`` of the padded box arrays.
  """

  categories: tuple[tuple[int, str], ...] = ()
  test_gt: dict | None = None
  max_boxes: int = 0


def _require(d: dict, key: str, where: str):
  if key not in d:
    raise ValueError(f"{where}: missing key {key!r}")
  return d[key]


def load_coco_split(ann_file: str, image_dir: str, categories: Sequence[int] | None = None
                    ) -> tuple[DetectionSource, dict, list[tuple[int, str]]]:
  """Reads one COCO-format split.

  Args:
    ann_file: ``instances_<split>.json``.
    image_dir: folder holding ``images[i].file_name``.
    categories: category ids defining the label order (default: this file's,
      sorted by id) -- pass the training split's to the evaluation split.

  Returns:
    ``(source, gt_dict, [(id, name), ...])``. Boxes with ``w <= 0`` or
    ``h <= 0`` are dropped (warned); ``iscrowd`` boxes are not training targets.
  """
  if not os.path.isfile(ann_file):
    raise FileNotFoundError(f"COCO annotation file {ann_file!r} does not exist")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"image folder {image_dir!r} does not exist")
  with open(ann_file) as f:
    try:
      gt = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{ann_file}: not valid JSON: {e}") from None
  images = _require(gt, "images", ann_file)
  anns = _require(gt, "annotations", ann_file)
  cats = _require(gt, "categories", ann_file)
  names = {int(_require(c, "id", f"{ann_file} categories")): str(c.get("name", c["id"]))
           for c in cats}
  if categories is None:
    categories = sorted(names)
  label = {cid: i for i, cid in enumerate(categories)}
  per_image: dict[int, list] = {}
  dropped = 0
  for a in anns:
    where = f"{ann_file} annotation {a.get('id')}"
    iid, cid = int(_require(a, "image_id", where)), int(_require(a, "category_id", where))
    if cid not in label:
      raise ValueError(f"{where}: category_id={cid} is not among the categories "
                       f"{list(categories)}")
    x, y, w, h = (float(v) for v in _require(a, "bbox", where))
    if w <= 0 or h <= 0:
      dropped += 1
      continue
    if a.get("iscrowd", 0):
      continue
    per_image.setdefault(iid, []).append((x, y, x + w, y + h, label[cid]))
  if dropped:
    log.warning("%s: %d boxes with non-positive width or height dropped", ann_file, dropped)
  ids = set()
  records = []
  for im in images:
    where = f"{ann_file} image {im.get('id')}"
    iid = int(_require(im, "id", where))
    ids.add(iid)
    objs = per_image.get(iid, [])
    b = np.asarray([o[:4] for o in objs], np.float32).reshape(-1, 4)
    c = np.asarray([o[4] for o in objs], np.int32)
    records.append(ImageRecord(os.path.join(image_dir, _require(im, "file_name", where)), iid,
                               int(_require(im, "width", where)),
                               int(_require(im, "height", where)), b, c))
  unknown = set(per_image) - ids
  if unknown:
    raise ValueError(f"{ann_file}: annotations refer to image ids not in 'images': "
                     f"{sorted(unknown)[:5]}")
  return DetectionSource(records), gt, [(cid, names.get(cid, str(cid))) for cid in categories]


def _check_max_boxes(source: DetectionSource, max_boxes: int, name: str):
  most = max((len(r.boxes) for r in source.records), default=0)
  if most > max_boxes:
    n = sum(len(r.boxes) > max_boxes for r in source.records)
    log.warning("%s: %d images have more than max_boxes=%d boxes (up to %d); the extra "
                "boxes are dropped from the targets -- raise --max-boxes", name, n,
                max_boxes, most)


def _spec(name, root, train, test, test_gt, categories, image_size, max_boxes, channels, mean,
          std) -> DetectionSpec:
  """The spec of ``(source, split)`` pairs ``train`` / ``test`` (max-boxes checked)."""
  for src, split in (train, test):
    _check_max_boxes(src, max_boxes, f"{root} {split}")
  return DetectionSpec(
      name, train[0], test[0], len(categories), (image_size, image_size, channels),
      DetectionTransform(image_size, max_boxes, True, channels),
      DetectionTransform(image_size, max_boxes, False, channels), tuple(mean), tuple(std),
      categories=categories, test_gt=test_gt, max_boxes=max_boxes)


def coco(root: str, *, image_size: int = 64, max_boxes: int = 16, train_split: str = "train",
         val_split: str = "val", channels: int = 3, ann_dir: str = "annotations",
         mean=IMAGENET_MEAN, std=IMAGENET_STD) -> DetectionSpec:
  """A COCO-format dataset: ``root/<ann_dir>/instances_<split>.json`` + ``root/<split>/``.

  The COCO 2017 layout works with ``train_split="train2017", val_split="val2017"``.
  Labels follow the training file's categories.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"dataset root {root!r} does not exist")
  ann = lambda s: os.path.join(root, ann_dir, f"instances_{s}.json")  # noqa: E731
  train, _, cats = load_coco_split(ann(train_split), os.path.join(root, train_split))
  test, test_gt, _ = load_coco_split(ann(val_split), os.path.join(root, val_split),
                                     categories=[c for c, _ in cats])
  return _spec("coco", root, (train, train_split), (test, val_split), test_gt, tuple(cats),
               image_size, max_boxes, channels, mean, std)


def _voc_int(node, tag, where):
  el = node.find(tag)
  if el is None or el.text is None:
    raise ValueError(f"{where}: missing <{tag}>")
  return float(el.text)


def _parse_voc_split(root: str, split: str) -> list:
  """``[(name, file_name, width, height, [(class, xyxy, difficult), ...])]`` of a split."""
  list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"VOC split list {list_file!r} does not exist")
  with open(list_file) as f:
    names = [l.strip().split()[0] for l in f if l.strip()]
  parsed = []
  for name in names:
    xml = os.path.join(root, "Annotations", f"{name}.xml")
    try:
      tree = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as e:
      raise ValueError(f"VOC annotation {xml!r} cannot be read: {e}") from None
    fname = tree.findtext("filename") or f"{name}.jpg"
    size = tree.find("size")
    if size is None:
      raise ValueError(f"{xml}: missing <size>")
    w, h = int(_voc_int(size, "width", xml)), int(_voc_int(size, "height", xml))
    objs = []
    for o in tree.findall("object"):
      bb = o.find("bndbox")
      if bb is None:
        raise ValueError(f"{xml}: object without <bndbox>")
      box = (_voc_int(bb, "xmin", xml) - 1, _voc_int(bb, "ymin", xml) - 1,
             _voc_int(bb, "xmax", xml), _voc_int(bb, "ymax", xml))
      objs.append((o.findtext("name", "").strip(), box, int(o.findtext("difficult", "0") or 0)))
    parsed.append((name, fname, w, h, objs))
  return parsed


def voc_class_names(root: str, splits: Sequence[str]) -> list[str]:
  """Sorted class names found in the XML files of ``splits``."""
  return sorted({n for s in splits for *_, objs in _parse_voc_split(root, s)
                 for n, _, _ in objs})


def load_voc_split(root: str, split: str, classes: Sequence[str] | None = None,
                   first_id: int = 1) -> tuple[DetectionSource, dict, list[str]]:
  """One PASCAL VOC split as records and a COCO-format ground-truth dict.

  Classes are the sorted names found in the split's XML files unless
  ``classes`` is given (an unknown name is then an error). Image ids are
  ``first_id + position`` in ``ImageSets/Main/<split>.txt``.
  """
  parsed = _parse_voc_split(root, split)
  if classes is None:
    classes = sorted({n for *_, objs in parsed for n, _, _ in objs})
  label = {c: i for i, c in enumerate(classes)}
  records, images, anns = [], [], []
  for k, (name, fname, w, h, objs) in enumerate(parsed):
    iid = first_id + k
    images.append({"id": iid, "file_name": fname, "width": w, "height": h})
    boxes, labels = [], []
    for cname, (x1, y1, x2, y2), difficult in objs:
      if cname not in label:
        raise ValueError(f"VOC image {name!r}: class {cname!r} not in {list(classes)}")
      anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": label[cname] + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                   "iscrowd": int(difficult)})
      if not difficult and x2 > x1 and y2 > y1:
        boxes.append((x1, y1, x2, y2))
        labels.append(label[cname])
    records.append(ImageRecord(os.path.join(root, "JPEGImages", fname), iid, w, h,
                               np.asarray(boxes, np.float32).reshape(-1, 4),
                               np.asarray(labels, np.int32)))
  gt = {"images": images, "annotations": anns,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
  return DetectionSource(records), gt, list(classes)


def voc(root: str, *, image_size: int = 64, max_boxes: int = 16, train_split: str = "train",
        val_split: str = "val", channels: int = 3, mean=IMAGENET_MEAN,
        std=IMAGENET_STD) -> DetectionSpec:
  """A PASCAL VOC folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``).

  Labels: the sorted class names of both splits' XML files.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"dataset root {root!r} does not exist")
  classes = voc_class_names(root, (train_split, val_split))
  train, _, _ = load_voc_split(root, train_split, classes=classes)
  test, test_gt, _ = load_voc_split(root, val_split, classes=classes)
  return _spec("voc", root, (train, train_split), (test, val_split), test_gt,
               tuple((i + 1, c) for i, c in enumerate(classes)), image_size, max_boxes,
               channels, mean, std)


# ------------------------------------------------------------- evaluation


def predictions_to_coco(results: Sequence[tuple[dict, dict]],
                        categories: Sequence[tuple[int, str]]) -> tuple[list[dict], list[int]]:
  """Host copies ``[(batch, detections), ...]`` -> COCO result dicts and image ids.

  ``batch`` holds ``image_id``, ``scale``, ``orig_size`` (rows with
  ``image_id < 0`` are padding); ``detections`` holds ``boxes (B, D, 4)``
  (input pixels), ``scores``, ``classes``, ``valid`` (see
  :func:`examples.detection.boxes.postprocess`). Boxes go back to original
  pixels (:func:`to_original`) as ``[x, y, w, h]``.
  """
  out, ids = [], []
  for batch, det in results:
    for b, iid in enumerate(np.asarray(batch["image_id"]).tolist()):
      if iid < 0:
        continue
      ids.append(int(iid))
      ok = np.asarray(det["valid"][b]).astype(bool)
      if not ok.any():
        continue
      boxes = to_original(np.asarray(det["boxes"][b])[ok], batch["scale"][b],
                          batch["orig_size"][b])
      for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), np.asarray(det["scores"][b])[ok].tolist(),
                                        np.asarray(det["classes"][b])[ok].tolist()):
        out.append({"image_id": int(iid), "category_id": int(categories[int(c)][0]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
  return out, ids


#: ``COCOeval.stats`` entries reported, by position.
COCO_STATS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def coco_evaluate(gt: dict, detections: list[dict], image_ids: Sequence[int] | None = None,
                  ) -> dict[str, float]:
  """The standard COCO box metric (pycocotools ``COCOeval``, ``iouType="bbox"``).

  Args:
    gt: COCO-format ground truth dict (``images``, ``annotations``, ``categories``).
    detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.
    image_ids: restrict to these images (default: all of ``gt``).

  Returns:
    ``{"mAP": AP@[.5:.95], "mAP50": AP@.5, "mAP75", "mAP_small", ...,
    "AR100", ...}`` (see :data:`COCO_STATS`; -1 where COCO has no object of
    an area range), plus ``"report"``: pycocotools' printed table. No
    detections: every AP is 0.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.dataset.setdefault("info", {})
    for a in coco_gt.dataset["annotations"]:
      a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
      a.setdefault("iscrowd", 0)
    coco_gt.createIndex()
    if not detections:
      return {**{k: 0.0 for k in COCO_STATS}, "report": "no detections"}
    coco_dt = coco_gt.loadRes(copy.deepcopy(list(detections)))
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
      ev.params.imgIds = sorted(set(int(i) for i in image_ids))
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  out: dict[str, Any] = {k: float(v) for k, v in zip(COCO_STATS, ev.stats)}
  out["report"] = buf.getvalue()
  return out
