"""The training loop proper: steps over the batches, with what happens between steps.

:func:`train_loop` compiles the task's steps (:func:`examples.steps.make_steps`),
feeds the batches of :func:`examples.data.batches` from the run's position
(so a resumed run sees the same batches) and after each step: logs the
window's training metrics and the quantized layers' statistics every
``--log-every`` steps, writes histograms every ``--histogram-every`` steps,
evaluates every ``--eval-every-epochs`` and checkpoints every
``--checkpoint-every``. Every process stops at the same step, one step after
any of them got SIGTERM / SIGINT.
"""

from __future__ import annotations

import logging
import time

import jax
from flax import nnx

from examples import data as data_lib
from examples import distributed
from examples import evaluation
from examples import metrics as metrics_lib
from examples import steps as steps_lib
from examples.run_state import RunState
from examples.runtime import STOP_CODES, StopSignals

log = logging.getLogger("examples.train")

__all__ = ["train_loop"]


def train_loop(run: RunState, stop: StopSignals) -> str | None:
  """Trains ``run`` to its last step; returns why it stopped before (None: it did not)."""
  cfg = run.cfg
  run.train_step, run.eval_step = steps_lib.make_steps(
      run.task, cfg, run.graphdef, run.state_sharding, run.data_sharding)
  # One function object for every histogram capture: it is compiled once per object.
  run.hist_loss = lambda model, batch: run.task.loss(model, batch, cfg)[0]
  run.writer = metrics_lib.MetricWriter(
      cfg.workdir, total_steps=run.total_steps, initial_step=run.pos.step,
      is_main=run.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress)
  window = metrics_lib.TrainWindow()
  agree = distributed.AnyProcess(run.mesh)
  log.info("%s: training steps %d..%d of %s (%s)", cfg.workdir, run.pos.step + 1,
           run.total_steps, run.task.name, cfg.mode)
  while run.pos.step < run.total_steps:
    for batch in data_lib.batches(
        run.spec, train=True, global_batch=cfg.batch_size, seed=cfg.seed,
        epoch=run.pos.epoch, start=run.pos.index, num_workers=cfg.workers,
        process_index=jax.process_index(), process_count=jax.process_count()):
      run.corrupt_ids.update(int(i) for i in batch["index"][batch["corrupt"] > 0])
      run.state, out = run.train_step(run.state, steps_lib.to_global(batch,
                                                                     run.data_sharding))
      run.pos.advance(run.spe)
      run.steps_this_run += 1
      window.add(run.pos.step, out, cfg.batch_size)
      if run.t_first is None:
        jax.block_until_ready(out)
        run.t_first = time.time()  # exclude compilation from img/s
      else:
        run.images_timed += cfg.batch_size
      _after_step(run, window, batch)
      if cfg.stop_after_steps is not None and run.steps_this_run >= cfg.stop_after_steps:
        window.fetch()
        return "stop_after_steps"
      # Every process stops at the same step (one step after any got a signal).
      code = agree.vote(STOP_CODES[stop.received])
      if code:
        window.fetch()
        run.save()
        return next(k for k, v in STOP_CODES.items() if v == code)
      if run.pos.step >= run.total_steps:
        break
  window.fetch()
  return None


def _after_step(run: RunState, window: metrics_lib.TrainWindow, batch: dict):
  cfg, step = run.cfg, run.pos.step
  if step % cfg.log_every == 0 or step == run.total_steps:
    _log(run, window)
  run.writer.progress(1, {})
  every = getattr(cfg, "histogram_every", 0)
  if every and step % every == 0 and run.is_main and run.mode.quantized:
    # Process 0 alone, on its own rows of the batch: with several processes on
    # a host copy of the (replicated) state, so that no other process has to
    # run this computation with it.
    state = run.state if jax.process_count() == 1 else jax.device_get(run.state)
    run.writer.histograms(step, metrics_lib.layer_tensors(
        nnx.merge(run.graphdef, state)[0], run.hist_loss, batch))
  eval_every = (max(1, int(round(cfg.eval_every_epochs * run.spe)))
                if cfg.eval_every_epochs else 0)
  if eval_every and step % eval_every == 0 and step < run.total_steps:
    evaluation.write_eval(run, evaluation.evaluate(run))
  if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
    run.save()


def _log(run: RunState, window: metrics_lib.TrainWindow):
  step = run.pos.step
  window.fetch()
  means = window.means()
  lr = float(run.schedule(step - 1))
  vals = {**{f"train/{k}": v for k, v in means.items()}, "train/lr": lr,
          "train/images_per_s": window.images_per_s()}
  if run.mode.quantized:  # every process computes, process 0 writes
    vals.update(metrics_lib.quant_scalars(run.model(), run.cfg.alpha, run.cfg.beta,
                                          getattr(run.cfg, "lr_deviation", None)))
  run.writer.scalars(step, vals)
  run.writer.progress(0, {**{k: f"{v:.4f}" for k, v in means.items()}, "lr": f"{lr:.3g}",
                          "img/s": f"{vals['train/images_per_s']:.0f}"})
  window.reset()
  run.last_train = {f"train_{k}": v for k, v in means.items()}
