"""One invocation of a job: its set-up, where it stands, and what it stores.

:class:`RunState` builds a job's data spec, device mesh, model, optimizer and
schedule from its config and task, restores the latest training checkpoint
(refusing one written for another job or, unless asked, another device
layout), saves checkpoints and the model checkpoint, and finds the stored
summary of a finished run. The training loop (:mod:`examples.loop`) and the
evaluation (:mod:`examples.evaluation`) work on it; :func:`examples.train.train`
ties them together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np
from flax import nnx
from int8jax import modes
from jax.sharding import NamedSharding, PartitionSpec as P

from examples import checkpoint as ckpt_lib
from examples import data as data_lib
from examples import steps as steps_lib
from examples import tasks as tasks_lib
from examples.config import Config
from examples.optimizers import create_optimizer, make_schedule

log = logging.getLogger("examples.train")

__all__ = ["Position", "RunState"]

#: Config fields a resumed run must share with its checkpoint, unless the
#: config class names its own (``Config.same_job``).
_SAME_JOB = ("model", "mode", "dataset", "batch_size", "seed", "width")


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


class RunState:
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
    # Set by the training loop (examples.loop.train_loop): the jitted steps, the
    # histograms' loss function and the metric writer.
    self.train_step = self.eval_step = self.hist_loss = self.writer = None

  def model(self) -> nnx.Module:
    """The model of the current state (a view: no copy on the device)."""
    return nnx.merge(self.graphdef, self.state)[0]

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

  # ------------------------------------------------------------ saving

  def _meta(self) -> dict:
    return {"step": self.pos.step, "epoch": self.pos.epoch, "index": self.pos.index,
            "corrupt_ids": sorted(self.corrupt_ids), "train_metrics": self.last_train,
            "config": dataclasses.asdict(self.cfg), "task": tasks_lib.task_path(self.task),
            "model_meta": self.model_meta, "processes": jax.process_count(),
            "devices": self.mesh.size}

  def save(self):
    """A training checkpoint of the current step (every process takes part)."""
    self.corrupt_ids = _all_processes(self.corrupt_ids)
    self.ckpt.save(self.pos.step, self.state, self._meta())

  def save_model(self, summary: dict | None):
    """``<workdir>/model``: the model alone, for :func:`examples.load_model`."""
    if self.model_meta is None:
      log.warning("task %s has no model_meta: no model checkpoint written (the training "
                  "checkpoints in %s/checkpoints are kept)", self.task.name, self.cfg.workdir)
      return
    info = {k: v for k, v in self._meta().items() if k in ("config", "task", "model_meta")}
    ckpt_lib.save_model(os.path.join(self.cfg.workdir, ckpt_lib.MODEL_DIR), self.model(),
                        {**info, "step": self.pos.step, "summary": summary})

  def close(self):
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()
