"""The examples' training loop: runs (or resumes, or re-reports) one job of any :class:`Task`.

``train(cfg, task)`` is the whole job; the pieces live by concern:

=========================== ==============================================
``examples/config.py``      every option (:class:`~examples.config.Config`), the CLI
``examples/tasks.py``       what a job is to the loop (:class:`~examples.tasks.Task`)
``examples/classification`` the image-classification task (the default)
``examples/optimizers.py``  schedule and optax chain (the mode wraps it)
``examples/steps.py``       the jitted train / eval steps over the device mesh
``examples/checkpoint.py``  Orbax training checkpoints and the model checkpoint
``examples/metrics.py``     TensorBoard, tqdm, quantization statistics
=========================== ==============================================

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
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import numpy as np
from flax import nnx
import int8jax
from int8jax import modes
from jax.sharding import NamedSharding, PartitionSpec as P

from examples import checkpoint as ckpt_lib
from examples import data as data_lib
from examples import distributed
from examples import metrics as metrics_lib
from examples import steps as steps_lib
from examples import tasks as tasks_lib
from examples.classification import ClassificationTask
from examples.config import Config, parse_config
from examples.optimizers import create_optimizer, make_schedule
# pylint: enable=wrong-import-position

log = logging.getLogger("examples.train")

__all__ = ["train", "main", "Result", "EXIT_STOPPED", "setup_logging"]

#: Exit status of an entry point stopped by SIGTERM / SIGINT after saving
#: (sysexits ``EX_TEMPFAIL``): rerun the same command to resume.
EXIT_STOPPED = 75
_STOP_SIGNALS = ("SIGTERM", "SIGINT")
#: What a process votes each step (examples.distributed.AnyProcess): the largest wins.
_STOP_CODES = {None: 0, "SIGINT": 1, "SIGTERM": 2}
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
  """A handler writing to the current ``sys.stderr`` (tests and notebooks replace it)."""

  def __init__(self):
    super().__init__()
    self.setFormatter(logging.Formatter(_LOG_FORMAT))

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def setup_logging(level: int = logging.INFO) -> None:
  """Shows the examples' messages (INFO and up) and every warning on stderr, formatted.

  absl runs ``logging.basicConfig()`` when orbax logs at import time, which
  leaves the root logger a bare handler: then ``basicConfig`` here would do
  nothing and INFO messages would be dropped. That bare handler is replaced;
  handlers someone configured are kept. The ``examples`` logger's level is set
  unless it was set already.
  """
  root = logging.getLogger()
  for h in list(root.handlers):
    if (type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)
        and getattr(h.formatter, "_fmt", None) in (None, logging.BASIC_FORMAT)):
      root.removeHandler(h)
  if not root.handlers:
    root.addHandler(_StderrHandler())
  examples_log = logging.getLogger("examples")
  if examples_log.level == logging.NOTSET:
    examples_log.setLevel(level)


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


@dataclasses.dataclass
class Position:
  """Where a run stands: steps done and the next batch (epoch, index in the epoch)."""

  step: int = 0
  epoch: int = 0
  index: int = 0

  def advance(self, steps_per_epoch: int):
    self.step += 1
    self.index += 1
    if self.index >= steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0


class _StopSignals:
  """Notes SIGTERM / SIGINT; the loop stops at the next step boundary."""

  def __init__(self):
    self.received: str | None = None
    self._old = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: now
    self.received = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for name in _STOP_SIGNALS:
        sig = getattr(signal, name)
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _layout(d: dict) -> str:
  return f"{d.get('processes', '?')} process(es) with {d.get('devices', '?')} device(s) in all"


def _all_processes(ids: set[int]) -> set[int]:
  """Union of a set of record indices over all processes."""
  if jax.process_count() == 1:
    return ids
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = int(np.max(multihost_utils.process_allgather(np.int32(len(ids)))))
  buf = np.full(max(n, 1), -1, np.int32)
  buf[:len(ids)] = sorted(ids)
  return {int(i) for i in np.asarray(multihost_utils.process_allgather(buf)).ravel() if i >= 0}


_SAME_JOB = ("model", "mode", "dataset", "batch_size", "seed", "width")


class _Run:
  """One invocation of a job: state, position, checkpoints, metrics."""

  def __init__(self, cfg: Config, task):
    self.cfg, self.task = cfg, task
    self.is_main = jax.process_index() == 0
    os.makedirs(cfg.workdir, exist_ok=True)
    self.spec = task.load_data(cfg)
    self.spe = data_lib.steps_per_epoch(self.spec, cfg.batch_size)
    self.total_steps = (cfg.steps if cfg.steps is not None
                        else max(1, int(round(cfg.epochs * self.spe))))
    self.mesh = steps_lib.make_mesh(cfg.num_devices)
    for name in ("batch_size", "eval_batch_size"):
      size = getattr(cfg, name)
      if size is not None and size % self.mesh.size:
        raise ValueError(f"--{name.replace('_', '-')} {size}: must be a multiple of the "
                         f"{self.mesh.size} devices ({jax.process_count()} process(es) x "
                         f"{jax.local_device_count()} local device(s))")
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.state_sharding = NamedSharding(self.mesh, P())
    self.mode = modes.get(cfg.mode)
    self.model_meta = tasks_lib.model_meta(task, self.spec)
    model = tasks_lib.build_model(task, cfg, self.spec)
    steps_lib.shard_quantized_layers(model, self.mesh)
    self.schedule = make_schedule(cfg, self.total_steps, self.spe)
    self.graphdef, state = nnx.split((model, create_optimizer(cfg, model, self.schedule)))
    self.state = steps_lib.place(state, self.state_sharding)
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"),
                                      cfg.keep_checkpoints)
    self.pos, self.corrupt_ids, self.last_train = Position(), set(), {}
    self.steps_this_run, self.images_timed, self.t_first = 0, 0, None
    self.t_start = time.time()
    self.writer = None

  # ------------------------------------------------------------ resumption

  def restore(self) -> bool:
    """Restores the latest checkpoint, if any; True when there was one."""
    latest = self.ckpt.latest_step()
    if latest is None:
      return False
    # The config first: another model (width, layers) is another state structure,
    # and restoring it into this one would fail deep inside Orbax.
    meta = self.ckpt.meta(latest)
    stored = meta.get("config", {})
    for k in getattr(self.cfg, "same_job", _SAME_JOB):
      if k in stored and stored[k] != getattr(self.cfg, k):
        raise ValueError(f"checkpoint in {self.cfg.workdir} was written with {k}="
                         f"{stored[k]!r}, this run has {k}={getattr(self.cfg, k)!r}; "
                         "use another --workdir")
    layout = {"processes": jax.process_count(), "devices": self.mesh.size}
    written = {k: meta[k] for k in layout if k in meta}
    if written and written != {k: layout[k] for k in written}:
      if not self.cfg.resume_other_layout:
        raise ValueError(
            f"checkpoint {latest} in {self.cfg.workdir} was written by {_layout(written)}, "
            f"this run has {_layout(layout)}: rerun with the same layout to resume exactly, "
            "or pass --resume-other-layout to restore onto this one (same global batches; "
            "float rounding then differs from an uninterrupted run)")
      log.warning("resuming checkpoint %d of %s on %s (written by %s)", latest,
                  self.cfg.workdir, _layout(layout), _layout(written))
    state, meta = self.ckpt.restore(latest, self.state)
    self.state = steps_lib.place(state, self.state_sharding)
    self.pos = Position(meta["step"], meta["epoch"], meta["index"])
    self.corrupt_ids = set(meta.get("corrupt_ids", ()))
    self.last_train = meta.get("train_metrics", {})
    return True

  def stored_summary(self) -> dict | None:
    """The summary of this finished run, as first reported (model/ or summary.json)."""
    model_dir = os.path.join(self.cfg.workdir, ckpt_lib.MODEL_DIR)
    if os.path.isdir(model_dir):
      info = ckpt_lib.model_info(model_dir)
      if info.get("step") == self.pos.step and info.get("summary"):
        return info["summary"]
    path = os.path.join(self.cfg.workdir, "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        summary = json.load(f)
      if summary.get("steps") == self.pos.step:
        return summary
    return None

  def _meta(self) -> dict:
    return {"step": self.pos.step, "epoch": self.pos.epoch, "index": self.pos.index,
            "corrupt_ids": sorted(self.corrupt_ids), "train_metrics": self.last_train,
            "config": dataclasses.asdict(self.cfg), "task": tasks_lib.task_path(self.task),
            "model_meta": self.model_meta, "processes": jax.process_count(),
            "devices": self.mesh.size}

  def save(self):
    self.corrupt_ids = _all_processes(self.corrupt_ids)
    self.ckpt.save(self.pos.step, self.state, self._meta())

  # ------------------------------------------------------------ training

  def train(self, stop: _StopSignals) -> str | None:
    """Trains to the last step; returns why it stopped before (None: it did not)."""
    cfg = self.cfg
    self.train_step, self.eval_step = steps_lib.make_steps(
        self.task, cfg, self.graphdef, self.state_sharding, self.data_sharding)
    self.hist_loss = lambda model, batch: self.task.loss(model, batch, cfg)[0]
    self.writer = metrics_lib.MetricWriter(
        cfg.workdir, total_steps=self.total_steps, initial_step=self.pos.step,
        is_main=self.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress)
    window = metrics_lib.TrainWindow()
    agree = distributed.AnyProcess(self.mesh)
    log.info("%s: training steps %d..%d of %s (%s)", cfg.workdir, self.pos.step + 1,
             self.total_steps, self.task.name, cfg.mode)
    while self.pos.step < self.total_steps:
      for batch in data_lib.batches(
          self.spec, train=True, global_batch=cfg.batch_size, seed=cfg.seed,
          epoch=self.pos.epoch, start=self.pos.index, num_workers=cfg.workers,
          process_index=jax.process_index(), process_count=jax.process_count()):
        self.corrupt_ids.update(int(i) for i in batch["index"][batch["corrupt"] > 0])
        self.state, out = self.train_step(self.state, steps_lib.to_global(batch,
                                                                          self.data_sharding))
        self.pos.advance(self.spe)
        self.steps_this_run += 1
        window.add(self.pos.step, out, cfg.batch_size)
        if self.t_first is None:
          jax.block_until_ready(out)
          self.t_first = time.time()  # exclude compilation from img/s
        else:
          self.images_timed += cfg.batch_size
        self._after_step(window, batch)
        if cfg.stop_after_steps is not None and self.steps_this_run >= cfg.stop_after_steps:
          window.fetch()
          return "stop_after_steps"
        # Every process stops at the same step (one step after any got a signal).
        code = agree.vote(_STOP_CODES[stop.received])
        if code:
          window.fetch()
          self.save()
          return next(k for k, v in _STOP_CODES.items() if v == code)
        if self.pos.step >= self.total_steps:
          break
    window.fetch()
    return None

  def _after_step(self, window: metrics_lib.TrainWindow, batch: dict):
    cfg, step = self.cfg, self.pos.step
    if step % cfg.log_every == 0 or step == self.total_steps:
      self._log(window)
    self.writer.progress(1, {})
    every = getattr(cfg, "histogram_every", 0)
    if every and step % every == 0 and self.is_main and self.mode.quantized:
      # Process 0 alone, on its own rows of the batch: with several processes on
      # a host copy of the (replicated) state, so that no other process has to
      # run this computation with it.
      state = self.state if jax.process_count() == 1 else jax.device_get(self.state)
      self.writer.histograms(step, metrics_lib.layer_tensors(
          nnx.merge(self.graphdef, state)[0], self.hist_loss, batch))
    eval_every = (max(1, int(round(cfg.eval_every_epochs * self.spe)))
                  if cfg.eval_every_epochs else 0)
    if eval_every and step % eval_every == 0 and step < self.total_steps:
      self._write_eval(self.evaluate())
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
      self.save()

  def _log(self, window: metrics_lib.TrainWindow):
    step = self.pos.step
    window.fetch()
    means = window.means()
    lr = float(self.schedule(step - 1))
    vals = {**{f"train/{k}": v for k, v in means.items()}, "train/lr": lr,
            "train/images_per_s": window.images_per_s()}
    if self.mode.quantized:  # every process computes, process 0 writes
      vals.update(metrics_lib.quant_scalars(nnx.merge(self.graphdef, self.state)[0],
                                            self.cfg.alpha, self.cfg.beta,
                                            getattr(self.cfg, "lr_deviation", None)))
    self.writer.scalars(step, vals)
    self.writer.progress(0, {**{k: f"{v:.4f}" for k, v in means.items()}, "lr": f"{lr:.3g}",
                             "img/s": f"{vals['train/images_per_s']:.0f}"})
    window.reset()
    self.last_train = {f"train_{k}": v for k, v in means.items()}

  def evaluate(self) -> dict:
    cfg = self.cfg
    batches = data_lib.batches(
        self.spec, train=False, global_batch=cfg.eval_batch_size or cfg.batch_size,
        num_workers=cfg.workers, process_index=jax.process_index(),
        process_count=jax.process_count())
    # Host copies without the pixels: what evaluate() reads is labels, ids, boxes
    # -- of the whole global batch (every process's rows), as the outputs are.
    results = [(distributed.gather_host({k: v for k, v in b.items() if k != "image"}),
                jax.device_get(self.eval_step(self.state, steps_lib.to_global(
                    b, self.data_sharding)))) for b in batches]
    # The metric is computed once, by process 0, and shared.
    return distributed.broadcast_json(self.task.evaluate(self.spec, results, cfg)
                                      if self.is_main else None)

  def _write_eval(self, ev: dict):
    self.writer.scalars(self.pos.step, {"eval/" + k[len("eval_"):]: v for k, v in ev.items()
                                        if k.startswith("eval_") and isinstance(v, float)})

  # ------------------------------------------------------------ the end

  def finish(self) -> dict:
    """Final checkpoint, evaluation, model checkpoint and summary."""
    cfg = self.cfg
    jax.block_until_ready(self.state)
    train_time = time.time() - (self.t_first or time.time())
    self.save()
    final_eval = self.evaluate()
    self._write_eval(final_eval)
    summary = {
        "dataset": getattr(cfg, "dataset", None), "model": getattr(cfg, "model", None),
        "mode": cfg.mode, "seed": cfg.seed, "steps": self.pos.step,
        "epochs": self.pos.step / self.spe, "batch_size": cfg.batch_size,
        "devices": self.mesh.size, "processes": jax.process_count(),
        **self.last_train, **final_eval,
        "images_per_s": (self.images_timed / train_time
                         if train_time > 0 and self.images_timed else None),
        "wall_s": time.time() - self.t_start,
        "corrupt_images_skipped": len(self.corrupt_ids),
        "corrupt_files_skipped": self.spec.skipped_files,
        "steps_this_run": self.steps_this_run, "workdir": os.path.abspath(cfg.workdir),
        "jax": jax.__version__, "platform": jax.default_backend(),
        # Per quantized layer: cosine distance, clip ratio, phi, measurements.
        "quant_layers": (int8jax.diagnostics.layer_stats(nnx.merge(self.graphdef, self.state)[0],
                                                         cfg.alpha, cfg.beta,
                                                         getattr(cfg, "lr_deviation", None))
                         if self.mode.quantized else {}),
    }
    self.save_model(summary)
    if self.is_main:
      with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary

  def save_model(self, summary: dict | None):
    if self.model_meta is None:
      log.warning("task %s has no model_meta: no model checkpoint written (the training "
                  "checkpoints in %s/checkpoints are kept)", self.task.name, self.cfg.workdir)
      return
    info = {k: v for k, v in self._meta().items() if k in ("config", "task", "model_meta")}
    ckpt_lib.save_model(os.path.join(self.cfg.workdir, ckpt_lib.MODEL_DIR),
                        nnx.merge(self.graphdef, self.state)[0],
                        {**info, "step": self.pos.step, "summary": summary})

  def close(self):
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()


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
  run = _Run(cfg, task)
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
    with _StopSignals() as stop:
      stopped = run.train(stop)
    if stopped is not None:
      log.info("stopping at step %d (%s)%s", run.pos.step, stopped,
               "" if stopped == "stop_after_steps" else "; checkpoint saved, rerun to resume")
      return Result({"stopped": stopped, "step": run.pos.step}, jax.device_get(run.state),
                    run.graphdef)
    summary = run.finish()
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


def stopped_by_signal(summary: dict) -> bool:
  """Whether a run was stopped by SIGTERM / SIGINT (its entry point exits 75)."""
  return summary.get("stopped") in _STOP_SIGNALS


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
