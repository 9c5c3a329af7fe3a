"""Evaluation of a run and its end: the held-out metrics, the summary, the model.

* :func:`evaluate` -- one pass over the evaluation split with the jitted
  eval step; the task's ``evaluate`` turns the gathered outputs into
  ``eval_*`` metrics once, on process 0, and every process gets them.
* :func:`write_eval` -- their float values as TensorBoard ``eval/<name>``.
* :func:`finish` -- after the last step: the final checkpoint and
  evaluation, the summary (also ``<workdir>/summary.json``, with per
  quantized layer statistics) and the model checkpoint ``<workdir>/model``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import int8jax

from examples import data as data_lib
from examples import distributed
from examples import steps as steps_lib
from examples.run_state import RunState

__all__ = ["evaluate", "write_eval", "finish"]


def evaluate(run: RunState) -> dict:
  """The task's ``eval_*`` metrics of the current state (the same on every process)."""
  cfg = run.cfg
  batches = data_lib.batches(
      run.spec, train=False, global_batch=cfg.eval_batch_size or cfg.batch_size,
      num_workers=cfg.workers, process_index=jax.process_index(),
      process_count=jax.process_count())
  # Host copies without the pixels: what evaluate() reads is labels, ids, boxes
  # -- of the whole global batch (every process's rows), as the outputs are.
  results = [(distributed.gather_host({k: v for k, v in b.items() if k != "image"}),
              jax.device_get(run.eval_step(run.state, steps_lib.to_global(
                  b, run.data_sharding)))) for b in batches]
  # The metric is computed once, by process 0, and shared.
  return distributed.broadcast_json(run.task.evaluate(run.spec, results, cfg)
                                    if run.is_main else None)


def write_eval(run: RunState, ev: dict):
  """The float ``eval_<name>`` values of ``ev`` as TensorBoard ``eval/<name>``."""
  run.writer.scalars(run.pos.step, {"eval/" + k[len("eval_"):]: v for k, v in ev.items()
                                    if k.startswith("eval_") and isinstance(v, float)})


def finish(run: RunState) -> dict:
  """Final checkpoint, evaluation, model checkpoint and summary."""
  cfg = run.cfg
  jax.block_until_ready(run.state)
  train_time = time.time() - (run.t_first or time.time())
  run.save()
  final_eval = evaluate(run)
  write_eval(run, final_eval)
  summary = {
      "dataset": getattr(cfg, "dataset", None), "model": getattr(cfg, "model", None),
      "mode": cfg.mode, "seed": cfg.seed, "steps": run.pos.step,
      "epochs": run.pos.step / run.spe, "batch_size": cfg.batch_size,
      "devices": run.mesh.size, "processes": jax.process_count(),
      **run.last_train, **final_eval,
      "images_per_s": (run.images_timed / train_time
                       if train_time > 0 and run.images_timed else None),
      "wall_s": time.time() - run.t_start,
      "corrupt_images_skipped": len(run.corrupt_ids),
      "corrupt_files_skipped": run.spec.skipped_files,
      "steps_this_run": run.steps_this_run, "workdir": os.path.abspath(cfg.workdir),
      "jax": jax.__version__, "platform": jax.default_backend(),
      # Per quantized layer: cosine distance, clip ratio, phi, measurements.
      "quant_layers": (int8jax.diagnostics.layer_stats(run.model(), cfg.alpha, cfg.beta,
                                                       getattr(cfg, "lr_deviation", None))
                       if run.mode.quantized else {}),
  }
  run.save_model(summary)
  if run.is_main:
    with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
