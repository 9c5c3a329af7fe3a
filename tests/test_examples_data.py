"""examples/data.py on tiny datasets written to disk in each format."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from examples import data


def _write_image_folder(root, n_per_class=3, size=12, classes=("cat", "dog")):
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c in classes:
      os.makedirs(root / split / c, exist_ok=True)
      for i in range(n_per_class):
        arr = rng.integers(0, 255, (size, size + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / split / c / f"{i}.JPEG", quality=90)
  (root / "train" / classes[0] / "corrupt.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
  (root / "train" / classes[1] / "notes.txt").write_text("ignored")
  return root


@pytest.fixture
def image_folder(tmp_path):
  return _write_image_folder(tmp_path / "imagenet")


def _write_cifar(root, n=6, corrupt_batch=None):
  d = root / "cifar-10-batches-py"
  os.makedirs(d)
  rng = np.random.default_rng(0)
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  for k, name in enumerate(names):
    if name == corrupt_batch:
      (d / name).write_bytes(b"garbage")
      continue
    batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
             b"labels": [int(x) for x in (np.arange(n) + k) % 10],
             b"batch_label": name.encode()}
    with open(d / name, "wb") as f:
      pickle.dump(batch, f)
  return root


def test_image_folder_listing_ignores_other_files(image_folder):
  src = data.ImageFolderSource(image_folder / "train")
  assert src.classes == ["cat", "dog"]
  assert len(src) == 7  # 6 JPEGs + the corrupt one; notes.txt ignored
  assert {label for _, label in src.samples} == {0, 1}


def test_imagenet_pipeline_skips_and_counts_corrupt_images(image_folder, caplog):
  spec = data.imagenet(image_folder, image_size=8)
  assert spec.num_classes == 2
  batches = list(data.batches(spec, train=True, global_batch=7, seed=0, epoch=0))
  assert len(batches) == 1
  b = batches[0]
  assert b["image"].shape == (7, 8, 8, 3) and b["image"].dtype == np.uint8
  assert int(b["corrupt"].sum()) == 1
  assert float(b["valid"].sum()) == 6
  bad = np.flatnonzero(b["corrupt"])[0]
  assert not b["image"][bad].any()
  assert "corrupt.JPEG" in caplog.text


def test_imagenet_eval_is_deterministic_and_padded(image_folder):
  spec = data.imagenet(image_folder, image_size=8)
  e1 = list(data.batches(spec, train=False, global_batch=4))
  e2 = list(data.batches(spec, train=False, global_batch=4))
  assert len(e1) == 2  # 6 val images -> padded to 8
  assert float(sum(b["valid"].sum() for b in e1)) == 6
  for a, b in zip(e1, e2):
    np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in e1])[:6], [0, 0, 0, 1, 1, 1])


def test_train_augmentation_depends_on_epoch_but_is_reproducible(image_folder):
  spec = data.imagenet(image_folder, image_size=8)
  get = lambda epoch: next(data.batches(spec, train=True, global_batch=6, seed=3, epoch=epoch))
  np.testing.assert_array_equal(get(0)["image"], get(0)["image"])
  assert not np.array_equal(get(0)["image"], get(1)["image"])


def test_cifar10_pickles_and_augmentation(tmp_path):
  spec = data.cifar10(_write_cifar(tmp_path))
  assert len(spec.train) == 30 and len(spec.test) == 6 and spec.skipped_files == 0
  img, label = spec.train[0]
  assert img.shape == (32, 32, 3) and 0 <= label < 10
  with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
    raw = pickle.load(f, encoding="bytes")[b"data"][0]
  np.testing.assert_array_equal(img[..., 0].reshape(-1), raw[:1024])  # R plane first
  b = next(data.batches(spec, train=True, global_batch=8, seed=0))
  assert b["image"].shape == (8, 32, 32, 3) and b["valid"].all()
  e = list(data.batches(spec, train=False, global_batch=4))
  np.testing.assert_array_equal(np.concatenate([x["image"] for x in e])[:6], spec.test.images)


def test_cifar10_unreadable_batch_is_skipped_and_counted(tmp_path, caplog):
  spec = data.cifar10(_write_cifar(tmp_path, corrupt_batch="data_batch_3") / "cifar-10-batches-py")
  assert spec.skipped_files == 1 and len(spec.train) == 24
  assert "data_batch_3" in caplog.text


def test_mnist_subset_fixed_disjoint_split():
  a, b = data.mnist_subset(), data.mnist_subset()
  assert (len(a.train), len(a.test)) == (4000, 1000)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  assert a.train.images.dtype == np.uint8 and a.train.images.shape[1:] == (28, 28, 1)
  assert a.train.images.max() > 200  # real digits in [0, 255]
  train_rows = {x.tobytes() for x in a.train.images[:500]}
  assert not train_rows & {x.tobytes() for x in a.test.images}
  assert len(np.unique(a.test.labels)) == 10


def test_resume_position_reproduces_the_same_batches():
  spec = data.mnist_subset()
  full = list(data.batches(spec, train=True, global_batch=500, seed=1, epoch=2))
  tail = list(data.batches(spec, train=True, global_batch=500, seed=1, epoch=2, start=5))
  assert len(full) == 8 and len(tail) == 3
  for a, b in zip(full[5:], tail):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = next(data.batches(spec, train=True, global_batch=500, seed=1, epoch=3))
  assert not np.array_equal(full[0]["label"], other["label"])


def test_process_slices_make_up_the_global_batch(image_folder):
  spec = data.imagenet(image_folder, image_size=8)
  whole = next(data.batches(spec, train=True, global_batch=6, seed=0))
  parts = [next(data.batches(spec, train=True, global_batch=6, seed=0, process_index=p,
                             process_count=2)) for p in range(2)]
  for k in ("image", "label", "valid"):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_worker_processes_give_identical_batches():
  spec = data.mnist_subset()
  serial = list(data.batches(spec, train=True, global_batch=1000, seed=0, epoch=0))
  parallel = list(data.batches(spec, train=True, global_batch=1000, seed=0, epoch=0,
                               num_workers=1))
  assert len(serial) == len(parallel) == 4
  for a, b in zip(serial, parallel):
    np.testing.assert_array_equal(a["image"], b["image"])
