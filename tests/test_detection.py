"""The detection example: loader, boxes/anchors/losses/NMS, COCO metric, model, training."""

import json
import math
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import int8jax
from examples import data as data_lib
from examples.detection import boxes as B
from examples.detection import data as D
from examples.detection import make_dataset
from examples.detection import model as M
from examples.detection import train as T
from examples.detection.task import DetectionConfig, DetectionTask, init_key


# ------------------------------------------------------------------ fixtures


def _write_coco(root, split, images, anns, cats=((1, "a"), (2, "b"))):
  """images: [(id, w, h, array or None)], anns: [(image_id, cat, [x, y, w, h])]."""
  os.makedirs(os.path.join(root, split), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  ims = []
  for iid, w, h, arr in images:
    name = f"{iid}.png"
    if arr is not None:
      Image.fromarray(arr).save(os.path.join(root, split, name))
    ims.append({"id": iid, "file_name": name, "width": w, "height": h})
  gt = {"images": ims, "categories": [{"id": c, "name": n} for c, n in cats],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0} for k, (i, c, b) in enumerate(anns)]}
  with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
    json.dump(gt, f)


def _image_with_rects(w, h, rects):
  """Black RGB image with white filled rectangles at integer xyxy ``rects``."""
  a = np.zeros((h, w, 3), np.uint8)
  for x1, y1, x2, y2 in rects:
    a[y1:y2, x1:x2] = 255
  return a


@pytest.fixture(scope="module")
def hand_coco(tmp_path_factory):
  """Two hand-made images: 40x20 (landscape) and 20x40 (portrait), size 16 after resize."""
  root = str(tmp_path_factory.mktemp("hand_coco"))
  images = [(7, 40, 20, _image_with_rects(40, 20, [(0, 0, 10, 10)])),
            (9, 20, 40, _image_with_rects(20, 40, [(5, 20, 15, 40)]))]
  anns = [(7, 1, [0, 0, 10, 10]), (7, 2, [20, 5, 20, 10]), (9, 2, [5, 20, 10, 20])]
  for split in ("train", "val"):
    _write_coco(root, split, images, anns)
  return root


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  """A tiny generated dataset (32x32 canvases) in COCO and VOC layouts."""
  root = str(tmp_path_factory.mktemp("tiny_det"))
  make_dataset.main(["--out", root, "--train-images", "16", "--val-images", "8",
                     "--canvas", "32", "--min-size", "10", "--max-size", "20",
                     "--max-digits", "2", "--voc", "--seed", "3"])
  return root


TINY = dict(image_size=32, max_boxes=4, backbone="resnet10", width=8, fpn_width=16,
            head_convs=1, levels="3,4", anchor_size=1.5, batch_size=8, lr=0.01,
            warmup_epochs=0.0, period=1, log_every=1, progress=False, pre_nms_top_k=100,
            max_detections=20, score_threshold=0.001)  # untrained scores ~0.01: detections


def _cfg(tmp_path, root, name, **kw):
  return DetectionConfig(**{**TINY, "data_dir": root, "workdir": str(tmp_path / name), **kw})


@pytest.fixture(scope="module")
def ui8_run(tiny_dataset, tmp_path_factory):
  """One two-step UI8 training run (+ final evaluation), shared by several tests."""
  tmp = tmp_path_factory.mktemp("runs")
  cfg = _cfg(tmp, tiny_dataset, "ui8", mode="ui8", steps=2, checkpoint_every=1)
  return cfg, T.run(cfg)


# -------------------------------------------------------------------- loader


def test_coco_loader_resizes_pads_and_maps_back(hand_coco):
  spec = D.coco(hand_coco, image_size=16, max_boxes=3)
  assert spec.num_classes == 2 and spec.categories == ((1, "a"), (2, "b"))
  out = spec.eval_transform(spec.test[0])
  assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.uint8
  # 40x20 -> 16x8 (scale 0.4): boxes xyxy [0,0,10,10] -> [0,0,4,4], [20,5,40,15] -> [8,2,16,6].
  np.testing.assert_allclose(out["boxes"], [[0, 0, 4, 4], [8, 2, 16, 6], [0, 0, 0, 0]], atol=1e-6)
  np.testing.assert_array_equal(out["classes"], [0, 1, 0])
  np.testing.assert_array_equal(out["box_valid"], [1, 1, 0])
  np.testing.assert_allclose(out["scale"], [0.4, 0.4])
  np.testing.assert_array_equal(out["orig_size"], [20, 40])
  assert out["image_id"] == 7 and out["valid"] == 1 and out["corrupt"] == 0
  # The white square moved with its box (interior white, 2 px away black; the resize
  # blurs its edge); the bottom half is padding (zeros).
  assert out["image"][:3, :3].min() > 200 and out["image"][:4, 6:].max() < 60
  assert out["image"][8:].max() == 0
  # Portrait image: 20x40 -> 8x16, padded on the right.
  out2 = spec.eval_transform(spec.test[1])
  np.testing.assert_allclose(out2["boxes"][0], [2, 8, 6, 16], atol=1e-6)
  assert out2["image"][:, 8:].max() == 0 and out2["image"][9:15, 3:5].min() > 200
  np.testing.assert_allclose(D.to_original(out2["boxes"][:1], out2["scale"], out2["orig_size"]),
                             [[5, 20, 15, 40]], atol=1e-5)


def test_flip_moves_boxes_with_pixels(hand_coco):
  spec = D.coco(hand_coco, image_size=16, max_boxes=3)
  flip = D.DetectionTransform(16, 3, train=True, flip_prob=1.0)
  keep = D.DetectionTransform(16, 3, train=True, flip_prob=0.0)
  rng = np.random.default_rng(0)
  f, k = flip(spec.train[0], rng), keep(spec.train[0], rng)
  np.testing.assert_array_equal(k["boxes"], spec.eval_transform(spec.train[0])["boxes"])
  # Flipped inside the resized 16-wide image: [0,0,4,4] -> [12,0,16,4]; [8,2,16,6] -> [0,2,8,6].
  np.testing.assert_allclose(f["boxes"][:2], [[12, 0, 16, 4], [0, 2, 8, 6]], atol=1e-6)
  assert f["image"][:3, 13:].min() > 200 and f["image"][:4, :10].max() < 60
  np.testing.assert_array_equal(f["image"][:8], k["image"][:8, ::-1])


def test_grain_batches_padding_and_corrupt_files(hand_coco, tmp_path, caplog):
  spec = D.coco(hand_coco, image_size=16, max_boxes=3)
  (b,) = list(data_lib.batches(spec, train=False, global_batch=3))
  assert b["image"].shape == (3, 16, 16, 3) and b["boxes"].shape == (3, 3, 4)
  np.testing.assert_array_equal(b["image_id"], [7, 9, -1])
  np.testing.assert_array_equal(b["valid"], [1, 1, 0])
  assert b["boxes"].dtype == np.float32 and b["classes"].dtype == np.int32
  # A corrupt file and a missing file: blank image, valid 0, corrupt 1, no crash.
  root = str(tmp_path / "bad")
  _write_coco(root, "val", [(1, 8, 8, _image_with_rects(8, 8, [])), (2, 8, 8, None)],
              [(1, 1, [1, 1, 4, 4])])
  _write_coco(root, "train", [(1, 8, 8, _image_with_rects(8, 8, []))], [])
  with open(os.path.join(root, "val", "1.png"), "wb") as f:
    f.write(b"not a png")
  bad = D.coco(root, image_size=8, max_boxes=2)
  (bb,) = list(data_lib.batches(bad, train=False, global_batch=2))
  np.testing.assert_array_equal(bb["corrupt"], [1, 1])
  np.testing.assert_array_equal(bb["valid"], [0, 0])
  np.testing.assert_array_equal(bb["image_id"], [1, 2])
  assert "skipping unreadable image" in caplog.text


def test_loader_errors_name_the_bad_input(hand_coco, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    D.coco(str(tmp_path / "nope"))
  root = str(tmp_path / "badcat")
  _write_coco(root, "train", [(1, 8, 8, _image_with_rects(8, 8, []))], [(1, 5, [1, 1, 2, 2])])
  with pytest.raises(ValueError, match="category_id=5"):
    D.load_coco_split(os.path.join(root, "annotations", "instances_train.json"),
                      os.path.join(root, "train"))
  with pytest.raises(ValueError, match="mode 'int9'"):
    DetectionConfig(data_dir=hand_coco, mode="int9")
  with pytest.raises(ValueError, match="levels"):
    DetectionConfig(data_dir=hand_coco, levels="3,x")
  with pytest.raises(ValueError, match="consecutive"):
    DetectionConfig(data_dir=hand_coco, levels="3,5")
  with pytest.raises(ValueError, match="start at"):
    DetectionConfig(data_dir=hand_coco, levels="6,7")
  with pytest.raises(SystemExit, match="--max-size"):
    make_dataset.main(["--out", str(tmp_path / "g"), "--min-size", "30", "--max-size", "20"])


def test_voc_copy_matches_coco(tiny_dataset):
  c = D.coco(tiny_dataset, image_size=32)
  v = D.voc(os.path.join(tiny_dataset, "voc"), image_size=32)
  assert [n for _, n in v.categories] == sorted({n for _, n in v.categories})
  names = {cid: n for cid, n in c.categories}
  vnames = [n for _, n in v.categories]
  for rc, rv in zip(c.test.records, v.test.records):
    np.testing.assert_allclose(rc.boxes, rv.boxes)
    assert [names[c.categories[k][0]] for k in rc.classes] == [vnames[k] for k in rv.classes]
    np.testing.assert_array_equal(np.asarray(Image.open(rc.path)), np.asarray(Image.open(rv.path)))


def test_make_dataset_is_deterministic(tiny_dataset, tmp_path):
  again = str(tmp_path / "again")
  make_dataset.main(["--out", again, "--train-images", "16", "--val-images", "8",
                     "--canvas", "32", "--min-size", "10", "--max-size", "20",
                     "--max-digits", "2", "--seed", "3"])
  for split in ("train", "val"):
    a = json.load(open(os.path.join(tiny_dataset, "annotations", f"instances_{split}.json")))
    b = json.load(open(os.path.join(again, "annotations", f"instances_{split}.json")))
    assert a["annotations"] == b["annotations"] and a["annotations"]
  a = np.asarray(Image.open(os.path.join(tiny_dataset, "train", "000005.png")))
  np.testing.assert_array_equal(a, np.asarray(Image.open(os.path.join(again, "train",
                                                                      "000005.png"))))
  # Boxes are the digits' ink: inside the canvas, positive size, digit classes 1..10.
  gt = json.load(open(os.path.join(again, "annotations", "instances_train.json")))
  for ann in gt["annotations"]:
    x, y, w, h = ann["bbox"]
    assert 0 <= x and 0 <= y and x + w <= 32 and y + h <= 32 and w > 0 and h > 0
    assert 1 <= ann["category_id"] <= 10


# ----------------------------------------------------- boxes, losses, NMS


def test_anchor_values_and_shapes():
  a = B.make_anchors(B.AnchorConfig(levels=(3,), size=2.0, scales_per_octave=1,
                                    aspect_ratios=(1.0,)), 16)
  np.testing.assert_allclose(a, [[-4, -4, 12, 12], [4, -4, 20, 12], [-4, 4, 12, 20],
                                 [4, 4, 20, 20]])
  cfg = B.AnchorConfig(levels=(3, 4, 5), size=4.0)
  a = B.make_anchors(cfg, 64)
  assert a.shape == ((8 * 8 + 4 * 4 + 2 * 2) * 9, 4) and a.dtype == np.float32
  # First cell of P3: sizes 32 * 2**(k/3), ratio h/w 0.5, 1, 2 with the square's area.
  w, h = a[:9, 2] - a[:9, 0], a[:9, 3] - a[:9, 1]
  np.testing.assert_allclose(w * h, np.repeat([32.0 * 2 ** (k / 3) for k in range(3)], 3) ** 2,
                             rtol=1e-5)
  np.testing.assert_allclose(h / w, [0.5, 1, 2] * 3, rtol=1e-5)
  np.testing.assert_allclose((a[:9, :2] + a[:9, 2:]) / 2, 4.0, atol=1e-5)  # centre of cell 0
  assert B.level_sizes(100, (3, 4, 5)) == [13, 7, 4]
  with pytest.raises(ValueError, match="levels"):
    B.AnchorConfig(levels=(4, 3))


def test_box_encoding_round_trip_and_hand_values():
  anchor = jnp.array([[0.0, 0, 10, 10]])
  box = jnp.array([[2.0, 4, 12, 24]])
  d = B.encode_boxes(box, anchor)
  np.testing.assert_allclose(d, [[0.2, 0.9, 0.0, math.log(2)]], rtol=1e-6)
  np.testing.assert_allclose(B.decode_boxes(d, anchor), box, rtol=1e-6)
  np.testing.assert_allclose(B.box_iou(jnp.array([[0.0, 0, 2, 2]]), jnp.array([[1.0, 1, 3, 3]])),
                             [[1 / 7]], rtol=1e-6)
  np.testing.assert_allclose(B.box_giou(jnp.array([0.0, 0, 2, 2]), jnp.array([1.0, 1, 3, 3])),
                             1 / 7 - 2 / 9, rtol=1e-6)
  np.testing.assert_allclose(B.smooth_l1(jnp.array([0.05, -1.0]), 0.11),
                             [0.5 * 0.05 ** 2 / 0.11, 1 - 0.055], rtol=1e-6)


def test_focal_loss_hand_values():
  fl = B.focal_loss(jnp.array([0.0, 0.0, math.log(3)]), jnp.array([1.0, 0.0, 1.0]))
  ln2 = math.log(2)
  np.testing.assert_allclose(fl, [0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2,
                                  0.25 * 0.0625 * -math.log(0.75)], rtol=1e-5)


def test_match_anchors_thresholds_and_low_quality():
  anchors = jnp.array([[0.0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 20], [50, 50, 60, 60]])
  gt = jnp.array([[[0.0, 0, 10, 10], [40, 40, 80, 80], [0, 0, 0, 0]]])
  t = B.match_anchors(anchors, gt, jnp.array([[3, 1, 0]]), jnp.array([[1, 1, 0]]))
  # IoUs with gt0: 1, 10/12, 0.5; anchor 3 vs gt1: 100/1600 -- below bg, but gt1's best: positive.
  np.testing.assert_array_equal(t.positive, [[True, True, True, True]])
  np.testing.assert_array_equal(t.classes, [[3, 3, 3, 1]])
  t = B.match_anchors(anchors, gt, jnp.array([[3, 1, 0]]), jnp.array([[1, 1, 0]]),
                      fg_iou=0.6, bg_iou=0.55, low_quality=False)
  np.testing.assert_array_equal(t.positive, [[True, True, False, False]])
  np.testing.assert_array_equal(t.negative, [[False, False, True, True]])


def test_detection_loss_normalises_by_positives_and_ignores_invalid_images():
  anchors = jnp.array([[0.0, 0, 10, 10], [20, 20, 30, 30]])
  gt = jnp.array([[[0.0, 0, 10, 10]], [[0.0, 0, 10, 10]]])
  t = B.match_anchors(anchors, gt, jnp.array([[1], [1]]), jnp.array([[1], [1]]))
  logits = jnp.zeros((2, 2, 2))
  deltas = jnp.zeros((2, 2, 4))
  loss, parts = B.detection_loss(logits, deltas, anchors, t, jnp.array([1.0, 0.0]))
  ln2 = math.log(2)
  # image 0: anchor 0 positive class 1 (2 class outputs), anchor 1 negative; image 1 ignored.
  np.testing.assert_allclose(parts["cls_sum"], 0.25 * 0.25 * ln2 + 3 * 0.75 * 0.25 * ln2,
                             rtol=1e-5)
  assert float(parts["num_pos"]) == 1 and float(parts["box_sum"]) == 0
  np.testing.assert_allclose(loss, parts["cls_sum"], rtol=1e-6)
  _, g = B.detection_loss(logits, deltas + 0.5, anchors, t, jnp.array([1.0, 0.0]),
                          box_loss="giou")
  assert float(g["box_sum"]) > 0


def test_nms_greedy_hand_case():
  boxes = jnp.array([[0.0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10],   # chain A-B-C
                     [0, 0, 10, 10],                                        # = A, other class
                     [1, 1, 11, 11]])                                       # = A, invalid
  scores = jnp.array([0.9, 0.8, 0.7, 0.6, 0.95])
  classes = jnp.array([0, 0, 0, 1, 0])
  valid = jnp.array([True, True, True, True, False])
  keep = jax.jit(lambda *a: B.nms(*a[:2], iou_threshold=0.3, classes=a[2], valid=a[3]))(
      boxes, scores, classes, valid)
  # A kept, B (IoU 1/3 with A) suppressed, C kept since only the suppressed B overlaps it.
  np.testing.assert_array_equal(keep, [True, False, True, True, False])
  keep = B.nms(boxes, scores, iou_threshold=0.3)  # class-agnostic, all valid: E (0.95) wins
  np.testing.assert_array_equal(keep, [False, False, True, False, True])


def test_postprocess_fixed_size_sorted_and_thresholded():
  anchors = jnp.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
  logits = jnp.array([[[3.0, -9], [2.0, -9], [-9, 1.0]]])   # p = .95, .88 (suppressed), .73
  det = B.postprocess(logits, jnp.zeros((1, 3, 4)), anchors, image_size=25,
                      score_threshold=0.5, pre_nms_top_k=6, max_detections=4)
  assert det["boxes"].shape == (1, 4, 4) and det["scores"].dtype == jnp.float32
  np.testing.assert_array_equal(det["valid"], [[True, True, False, False]])
  np.testing.assert_array_equal(det["classes"][0, :2], [0, 1])
  np.testing.assert_allclose(det["scores"][0, :2], jax.nn.sigmoid(jnp.array([3.0, 1.0])),
                             rtol=1e-6)
  np.testing.assert_allclose(det["boxes"][0, 1], [20, 20, 25, 25])  # clipped to the image


# ------------------------------------------------------------------ COCO metric


def test_coco_metric_perfect_and_shifted_predictions(hand_coco):
  spec = D.coco(hand_coco, image_size=16, max_boxes=3)
  results = []
  for b in data_lib.batches(spec, train=False, global_batch=2):
    det = {"boxes": b["boxes"], "scores": b["box_valid"], "classes": b["classes"],
           "valid": b["box_valid"] > 0}
    results.append((b, det))
  dets, ids = D.predictions_to_coco(results, spec.categories)
  assert sorted(ids) == [7, 9] and len(dets) == 3
  perfect = D.coco_evaluate(spec.test_gt, dets, ids)
  assert perfect["mAP"] == pytest.approx(1.0) and perfect["mAP50"] == pytest.approx(1.0)
  shifted = [dict(d, bbox=[d["bbox"][0] + 0.2 * d["bbox"][2], *d["bbox"][1:]]) for d in dets]
  s = D.coco_evaluate(spec.test_gt, shifted, ids)
  # IoU 0.8 / 1.2 = 0.667 with the truth: a match at the thresholds .5, .55, .6, .65 of 10.
  assert s["mAP50"] == pytest.approx(1.0) and s["mAP"] == pytest.approx(4 / 10)
  wrong = [dict(d, category_id=3 - d["category_id"]) for d in dets]
  assert D.coco_evaluate(spec.test_gt, wrong, ids)["mAP"] == 0.0
  assert D.coco_evaluate(spec.test_gt, [], ids)["mAP"] == 0.0


# ------------------------------------------------------------------- model


def test_packed_heads_equal_per_level_heads():
  head = M.Subnet(4, 2, 3, dtype=None, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(2, s, s, 4)), jnp.float32) for s in (8, 4, 2, 1)]
  layout = M.level_layout([f.shape[1:3] for f in feats])
  # Columns: P_a (8 wide) | gap | the rest stacked (4 + 1 + 2 + 1 + 1 = 9 rows).
  assert layout.canvas == (9, 13)
  assert layout.origins == ((0, 0), (0, 9), (5, 9), (8, 9))
  canvas, mask = M.pack_levels(feats, layout)
  for f, u in zip(feats, M.unpack_levels(canvas, layout)):
    np.testing.assert_array_equal(f, u)
  packed = M.unpack_levels(head(canvas, mask), layout)
  for f, p in zip(feats, packed):
    np.testing.assert_allclose(p, head(f), rtol=1e-5, atol=1e-6)
  # Without re-zeroing the gaps the levels would leak into each other.
  leaky = M.unpack_levels(head(canvas), layout)
  assert not all(np.allclose(p, head(f), atol=1e-6) for f, p in zip(feats, leaky))


def test_quantize_model_converts_all_but_the_stem():
  cfg = B.AnchorConfig(levels=(3, 4, 5, 6))
  model = M.RetinaNet(num_classes=5, anchors=cfg, backbone="resnet10", width=8, fpn_width=8,
                      head_convs=1, rngs=nnx.Rngs(params=init_key(0)))
  convs = [p for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
  # stem, ResNet-10 (4 blocks x 2 + 3 projections), FPN (P3-P5 x 2 + P6), 2 heads x 2
  assert len(convs) == 1 + 11 + 7 + 4
  np.testing.assert_allclose(model.cls_head.out.bias[...], -math.log(99), rtol=1e-6)
  assert model.cls_head.out.kernel.shape == (3, 3, 8, 9 * 5)
  int8jax.nn.quantize_model(model, int8jax.QuantConfig(period=1),
                            rngs=nnx.Rngs(init_key(1), quant=2))
  quant = [p for p, _ in int8jax.nn.layers.quant_layers(model)]
  assert set(convs) - set(quant) == {("backbone", "stem")}
  assert ("fpn", "extra", 0) in quant and ("cls_head", "out") in quant


def test_bf16_mode_uses_bf16_compute():
  task = DetectionTask()
  cfg = DetectionConfig(data_dir="unused", mode="bf16", **{k: v for k, v in TINY.items()})
  spec = D.DetectionSpec("x", None, None, 3, (32, 32, 3), None, None, (0.5,) * 3, (0.25,) * 3)
  model = task.make_model(cfg, spec)
  batch = {"image": jnp.zeros((1, 32, 32, 3), jnp.uint8)}
  cls_logits, deltas = nnx.eval_shape(
      lambda m: task._forward(m, batch, cfg), model)  # pylint: disable=protected-access
  assert cls_logits.dtype == jnp.bfloat16 and deltas.dtype == jnp.bfloat16
  assert cls_logits.shape == (1, len(task.anchors(cfg)), 3)
  assert model.fpn.lateral[0].kernel[...].dtype == jnp.float32


# --------------------------------------------------------------- training


def test_two_step_ui8_run_evaluation_and_resumption(ui8_run, tiny_dataset, tmp_path):
  cfg, res = ui8_run
  s = json.load(open(os.path.join(cfg.workdir, "summary.json")))
  assert s["steps"] == 2 and s["mode"] == "ui8" and s["eval_images"] == 8
  for k in ("eval_mAP", "eval_mAP50", "eval_AR100"):
    assert 0.0 <= s[k] <= 1.0
  assert np.isfinite(s["train_loss"]) and np.isfinite(s["eval_loss"]) and s["train_positives"] > 0
  assert s["eval_detections"] > 0  # the full path: NMS, mapping back, pycocotools loadRes
  layers = s["quant_layers"]
  assert "backbone/stem" not in layers and "cls_head/out" in layers and "fpn/lateral/0" in layers
  # period 1: every step measures, except where the gradient is all zero (the residual
  # branches of the ResNet at step 1: their last BatchNorm scale starts at 0).
  assert all(v["measurements"] >= 1 for v in layers.values())
  assert all(v["measurements"] == 2 for k, v in layers.items() if not k.startswith("backbone"))
  assert all(0.0 <= v["cosine_distance"] < 1.0 for v in layers.values())
  assert res.summary["eval_mAP"] == s["eval_mAP"]
  # Shared heads run once per step on the packed levels: 2 training steps, 2 calls.
  model, _ = nnx.merge(res.graphdef, res.state)
  for path, layer in int8jax.nn.layers.quant_layers(model):
    assert int(layer.call_count[...]) == 2, path
  from tensorboard_reader import scalar_tags  # noqa: E402
  tags = scalar_tags(os.path.join(cfg.workdir, "tensorboard"))
  for t in ("train/loss", "train/cls_loss", "train/box_loss", "train/lr", "eval/mAP",
            "eval/mAP50", "quant/cls_head/out/cosine_distance"):
    assert t in tags, t
  assert sorted(os.listdir(os.path.join(cfg.workdir, "checkpoints"))) == ["1", "2"]
  # The trained detector comes back in a fresh build from model/ alone.
  import examples  # pylint: disable=g-import-not-at-top
  loaded = examples.load_model(cfg.workdir)
  assert isinstance(loaded, M.RetinaNet)
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
  chex.assert_trees_all_equal(want, got, strict=True)
  # (One test with the resumption below: under pytest-xdist a second test using
  # the module fixture could run in the other worker and pay its compile again.)
  _check_serving_program_is_the_eval_detector(cfg, loaded, tmp_path)
  _check_interrupted_run_resumes_to_the_same_state(cfg, res, tiny_dataset, tmp_path)


def _check_serving_program_is_the_eval_detector(cfg, loaded, tmp_path):
  """The int8 serving program of the run (examples/serving.py): backbone, FPN and
  heads int8 (all but the stem), decoding and NMS in float inside the program;
  its detections equal the loaded model's, bit for bit, at two batch sizes."""
  import examples  # pylint: disable=g-import-not-at-top
  from examples import serving  # pylint: disable=g-import-not-at-top
  from examples.classification import normalize_with  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "serving")
  sig = serving.write_serving(cfg.workdir, out)
  assert sig["float_layers"] == 1 and sig["int8_layers"] > 10  # the stem stays float
  assert sig["output"]["boxes"]["shape"] == [None, cfg.max_detections, 4]
  assert sig["input"]["shape"] == [None, 32, 32, 3] and sig["input"]["dtype"] == "uint8"
  prog = jax.export.deserialize(open(os.path.join(out, "model.jaxexport"), "rb").read())
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  meta = examples.model_info(cfg.workdir)["model_meta"]
  norm = lambda im: normalize_with(im, meta["mean"], meta["std"], jnp.float32)
  anchors = jnp.asarray(DetectionTask().anchors(cfg))
  detect = nnx.jit(lambda m, x: B.postprocess(
      *m(x), anchors, image_size=cfg.image_size, score_threshold=cfg.score_threshold,
      pre_nms_top_k=cfg.pre_nms_top_k, iou_threshold=cfg.nms_iou,
      max_detections=cfg.max_detections))
  for im in (images[:1], images):  # the program normalises uint8 images itself
    got = prog.call(im)
    chex.assert_trees_all_equal(got, detect(loaded, norm(im)))
  assert int(np.sum(got["valid"])) > 0  # score threshold 0.001: there are detections


def _check_interrupted_run_resumes_to_the_same_state(cfg, full, tiny_dataset, tmp_path):
  # A run killed after step 1's checkpoint (its checkpoint is full's: the runs
  # are deterministic, and this saves a compile): step 2 is redone on resumption
  # from the parameters, AdamW/SGD state, BatchNorm statistics, quantization
  # state (ranges, clips, counters) and RNG streams of the checkpoint.
  os.makedirs(tmp_path / "cut" / "checkpoints")
  shutil.copytree(os.path.join(cfg.workdir, "checkpoints", "1"),
                  tmp_path / "cut" / "checkpoints" / "1")
  kw = dict(mode="ui8", steps=2, checkpoint_every=1)
  resumed = T.run(_cfg(tmp_path, tiny_dataset, "cut", **kw))
  assert resumed.summary["steps_this_run"] == 1 and resumed.summary["steps"] == 2
  from examples.checkpoint import state_to_pure  # pylint: disable=g-import-not-at-top
  a, b = state_to_pure(full.state), state_to_pure(resumed.state)
  chex.assert_trees_all_equal(a, b, strict=True)  # structure, dtypes and bits
  assert resumed.summary["eval_mAP"] == full.summary["eval_mAP"]
  # ... training moved the parameters, and a changed model is refused before
  # restoring (here one hidden head conv fewer: another state structure).
  init = DetectionTask().make_model(cfg, D.coco(tiny_dataset, image_size=32))
  p0 = nnx.to_pure_dict(nnx.state(init, nnx.Param))
  p1 = nnx.to_pure_dict(nnx.state(nnx.merge(full.graphdef, full.state)[0], nnx.Param))
  assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))) > 0
  with pytest.raises(ValueError, match="head_convs=1"):
    T.run(_cfg(tmp_path, tiny_dataset, "cut", **{**kw, "head_convs": 0}))


def test_report_tables_every_run_and_the_mode_means():
  from examples.detection import report  # pylint: disable=g-import-not-at-top
  layer = {"cosine_distance": 0.01, "clip_ratio": 0.8, "phi": 0.82}
  runs = [dict(mode=m, seed=s, eval_mAP=0.3 + 0.01 * s, eval_mAP50=0.6, eval_mAP75=0.3,
               eval_AR100=0.5, train_loss=0.3, eval_loss=0.4, steps=10, batch_size=32,
               images_per_s=64.0, wall_s=60.0, quant_layers={"fpn/out": layer} if m == "ui8"
               else {}) for m in ("float32", "ui8") for s in (0, 1)]
  md = report.markdown(runs)
  for m in ("float32", "ui8"):  # every run
    assert f"| {m} | 0 |" in md and f"| {m} | 1 |" in md
  assert "| ui8 | 2 | 30.50 ± 0.71 |" in md  # mean ± std (ddof 1) over the seeds
  assert "| 0.500 |" in md  # s/step = batch / images_per_s
  assert "`fpn/out`" in md
