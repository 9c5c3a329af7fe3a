"""The examples' training loop: runs (or resumes, or re-reports) one job of any :class:`Task`.

``train(cfg, task)`` is the whole job; the pieces live by concern:

============================ ==============================================
``examples/config.py``       every option (:class:`~examples.config.Config`), the CLI
``examples/tasks.py``        what a job is to the loop (:class:`~examples.tasks.Task`)
``examples/classification``  the image-classification task (the default)
``examples/run_state.py``    one invocation: set-up, position, resumption, saving
``examples/loop.py``         the training loop and what happens between steps
``examples/evaluation.py``   evaluation, the summary and the model at the end
``examples/runtime.py``      logging set-up, stop signals, the exit status
``examples/optimizers.py``   schedule and optax chain (the mode wraps it)
``examples/steps.py``        the jitted train / eval steps over the device mesh
``examples/checkpoint.py``   Orbax training checkpoints and the model checkpoint
``examples/metrics.py``      TensorBoard, tqdm, quantization statistics
============================ ==============================================

Modes (``--mode``) are :data:`int8jax.modes.MODES`: the one table of what is
quantized, the float dtype, the gradient clip and the LR scaling.

A run writes ``<workdir>/checkpoints/`` (training state; rerunning the same
command resumes and sees the same batches, so an interrupted run ends with
the same parameters as an uninterrupted one), ``<workdir>/model/`` (the
trained model, :func:`examples.load_model`), ``<workdir>/tensorboard/`` and
``<workdir>/summary.json``. Rerunning a finished run re-reports its stored
summary without training.

SIGTERM or SIGINT (Ctrl-C) stops at the next step boundary with a checkpoint;
the entry points then exit with status :data:`EXIT_STOPPED` (75,
``EX_TEMPFAIL``: "temporary failure, run again"), which a scheduler can
requeue on (rerunning resumes). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.train [ARGS]")

# pylint: disable=wrong-import-position
import jax
import numpy as np
from flax import nnx

from examples import checkpoint as ckpt_lib
from examples import distributed
from examples import evaluation
from examples import metrics as metrics_lib
from examples.classification import ClassificationTask
from examples.config import Config, parse_config
from examples.loop import train_loop
from examples.run_state import RunState
from examples.runtime import EXIT_STOPPED, StopSignals, setup_logging, stopped_by_signal
# pylint: enable=wrong-import-position

log = logging.getLogger("examples.train")

__all__ = ["train", "main", "Result", "EXIT_STOPPED", "setup_logging", "stopped_by_signal"]


@dataclasses.dataclass
class Result:
  """What ``train`` returns: the summary and the final (host) NNX state."""

  summary: dict
  state: Any
  graphdef: Any

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state)[0]

  def params(self) -> dict:
    """Final parameters as a pure dict of NumPy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(self.model(), nnx.Param)))


def train(cfg: Config, task=None) -> Result:
  """Runs, resumes or re-reports the job ``cfg`` of ``task``.

  Args:
    cfg: the options (:class:`examples.config.Config`).
    task: an :class:`examples.tasks.Task` (default: image classification).

  Returns:
    The summary (also ``<workdir>/summary.json`` and a printed ``SUMMARY``
    line) and the final state. A run stopped early returns
    ``{"stopped": reason, "step": step}`` (reason ``"SIGTERM"``, ``"SIGINT"``
    or ``"stop_after_steps"``).
  """
  task = ClassificationTask() if task is None else task
  setup_logging()
  distributed.initialize(cfg)
  run = RunState(cfg, task)
  try:
    if run.restore():
      summary = run.stored_summary() if run.pos.step >= run.total_steps else None
      if summary is not None:
        log.info("%s: finished at step %d; reporting its stored results", cfg.workdir,
                 run.pos.step)
        if not os.path.isdir(os.path.join(cfg.workdir, ckpt_lib.MODEL_DIR)):
          run.save_model(summary)
        return _report(Result(summary, jax.device_get(run.state), run.graphdef), run.is_main)
      pos = run.pos
      log.info("resumed from step %d (epoch %d, batch %d)", pos.step, pos.epoch, pos.index)
    with StopSignals() as stop:
      stopped = train_loop(run, stop)
    if stopped is not None:
      log.info("stopping at step %d (%s)%s", run.pos.step, stopped,
               "" if stopped == "stop_after_steps" else "; checkpoint saved, rerun to resume")
      return Result({"stopped": stopped, "step": run.pos.step}, jax.device_get(run.state),
                    run.graphdef)
    summary = evaluation.finish(run)
  finally:
    run.close()
  return _report(Result(summary, jax.device_get(run.state), run.graphdef), run.is_main)


def _report(result: Result, is_main: bool) -> Result:
  if is_main:
    print(metrics_lib.format_summary(result.summary), flush=True)
    if result.summary.get("quant_layers"):
      log.info("quantized layers at the end of training:\n%s",
               metrics_lib.format_layer_table(result.summary["quant_layers"]))
  return result


def main(argv=None, defaults=None, description=None) -> dict:
  """Entry point of the example scripts: parse flags, train, return the summary.

  Exits with :data:`EXIT_STOPPED` when a signal stopped the run.
  """
  setup_logging()
  cfg = parse_config(argv, defaults, description)
  summary = train(cfg).summary
  if stopped_by_signal(summary):
    raise SystemExit(EXIT_STOPPED)
  return summary


if __name__ == "__main__":
  main()
