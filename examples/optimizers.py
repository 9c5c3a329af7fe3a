"""The optax side of a job: learning-rate schedule and optimizer chain from a :class:`Config`.

The base optimizer (SGD with momentum or AdamW, weight decay on kernels
only) is wrapped for the quantized modes by the mode itself
(:meth:`int8jax.modes.Mode.optimizer`: ``int8jax.optim.ui8`` with the mode's
clip learning and error-sensitive LR switches).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from int8jax import modes

__all__ = ["make_schedule", "make_optimizer", "create_optimizer", "OPTIMIZERS", "SCHEDULES"]

#: ``--optimizer`` values :func:`make_optimizer` builds.
OPTIMIZERS = ("sgd", "adamw")
#: ``--schedule`` values :func:`make_schedule` builds (after the warm-up).
SCHEDULES = ("cosine", "step", "constant")


def make_schedule(cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to 0, step decay, or constant."""
  warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
  rest = max(total_steps - warm, 1)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"--schedule {cfg.schedule!r}: choose from {', '.join(SCHEDULES)}")
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


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Base optimizer from the config, wrapped as ``cfg.mode`` says (``int8jax.modes``)."""
  if cfg.optimizer == "sgd":
    base = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif cfg.optimizer == "adamw":
    base = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"--optimizer {cfg.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
  if getattr(cfg, "clip_grad_norm", 0.0) > 0:
    # Before the mode's wrapper sees the update: int8jax.optim.ui8 scales
    # each quantized layer's (clipped) update by its phi afterwards.
    base = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), base)
  # (cfg.clip_method is the layers' QuantConfig.clip_method: examples.steps.quant_config.)
  return modes.get(cfg.mode).optimizer(base, clip_learning_rate=cfg.clip_lr, alpha=cfg.alpha,
                                       beta=cfg.beta, distance_kind=cfg.lr_deviation)


def create_optimizer(cfg, model, schedule: optax.Schedule):
  """``nnx.Optimizer`` of ``model`` updating what ``cfg.mode`` trains (``Mode.wrt``)."""
  return nnx.Optimizer(model, make_optimizer(cfg, schedule), wrt=modes.get(cfg.mode).wrt)
