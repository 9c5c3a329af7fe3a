"""Orbax checkpoints: the training state for resumption, and the trained model for inference.

Two kinds, both Orbax directories (written to a temporary directory and
renamed when complete):

* **Training checkpoints**, ``<workdir>/checkpoints/<step>/`` (an Orbax
  ``CheckpointManager``, :class:`Checkpointer`): the whole NNX state of model
  and optimizer -- parameters, BatchNorm statistics, optimizer state,
  quantization state (ranges, clip values, counters) and RNG streams -- plus
  JSON metadata: step, data position (epoch, index of the next batch), the
  config, the task and what the model is built from. Rerunning the same
  command resumes from the latest one. A state whose parameters are not
  finite is not written (a warning says so).
* **The model**, ``<workdir>/model/`` (:func:`save_model`): the model's state
  alone (weights, BatchNorm statistics, quantization state) plus JSON
  (``format``, ``task``, ``config``, ``model_meta``, ``step``, ``summary``).
  The loop writes it at the end of training; :func:`export_model` writes one
  from any training checkpoint of a workdir (``python -m examples.export_model
  WORKDIR``). :func:`load_model` rebuilds the model from the JSON alone (no
  data needed) and restores the state, in any process::

      import examples
      model = examples.load_model("runs/mnist")   # a workdir or its model/ directory
      logits = model(x)                           # eval mode: BatchNorm running stats,
                                                  # stored quantization ranges
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import optimizers
from examples import tasks as tasks_lib
from examples.config import Config

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "state_to_pure", "pure_to_state", "save_model", "load_model",
           "model_info", "export_model", "MODEL_DIR", "MODEL_FORMAT"]

#: Sub-directory of a workdir holding the model-only checkpoint.
MODEL_DIR = "model"
#: ``format`` entry of a model checkpoint's JSON.
MODEL_FORMAT = "int8jax-examples-model/1"


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


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
  # On host copies: an eager jnp.isfinite compiles once per leaf shape (5.6 s of
  # a 20 s MNIST run on the 2-core CPU), and the checkpoint fetches them anyway.
  leaves = [x for x in jax.tree.leaves(tree) if not _is_key(x)
            and jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(all(np.isfinite(np.asarray(x, np.float32)).all() for x in leaves))


def _finite_params(state, what: str) -> bool:
  params = nnx.filter_state(state, nnx.Param) if isinstance(state, nnx.State) else state
  if _all_finite(params):
    return True
  log.warning("%s: non-finite parameters; checkpoint NOT saved", what)
  return False


def _abstract(pure):
  return jax.tree.map(_ocp().utils.to_shape_dtype_struct, pure)


class Checkpointer:
  """Orbax ``CheckpointManager`` for the training state plus JSON metadata."""

  def __init__(self, directory: str, keep: int):
    ocp = self.ocp = _ocp()
    self.mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: nnx.State, meta: dict) -> bool:
    """Saves unless a parameter is non-finite (then warns and returns False)."""
    if not _finite_params(state, f"step {step}"):
      return False
    if step in self.mngr.all_steps():
      return True
    self.mngr.save(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave(state_to_pure(state)),
        meta=self.ocp.args.JsonSave(meta)))
    return True

  def meta(self, step: int) -> dict:
    """The JSON metadata of checkpoint ``step`` (the state is not read)."""
    return self.mngr.restore(step, args=self.ocp.args.Composite(
        meta=self.ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, state: nnx.State) -> tuple[nnx.State, dict]:
    """Checkpoint ``step`` into ``state``'s structure; returns it and the metadata."""
    r = self.mngr.restore(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore(_abstract(state_to_pure(state))),
        meta=self.ocp.args.JsonRestore()))
    return pure_to_state(state, r["state"]), r["meta"]

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


# ------------------------------------------------------------ model only


def _model_checkpointer():
  ocp = _ocp()
  return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(path: str, model: nnx.Module, info: dict) -> bool:
  """Writes ``model``'s state and ``info`` (JSON) as an Orbax checkpoint at ``path``.

  ``info`` must hold ``task``, ``config`` and ``model_meta`` (what
  :func:`load_model` rebuilds the model from). An existing checkpoint at
  ``path`` is replaced. Non-finite parameters: not written, returns False.
  """
  state = nnx.state(model)
  if not _finite_params(state, f"model {path}"):
    return False
  missing = {"task", "config", "model_meta"} - set(info)
  if missing:
    raise ValueError(f"save_model: info lacks {sorted(missing)}")
  ocp, ckptr = _model_checkpointer()
  ckptr.save(os.path.abspath(path), ocp.args.Composite(
      state=ocp.args.StandardSave(state_to_pure(state)),
      meta=ocp.args.JsonSave({"format": MODEL_FORMAT, **info})), force=True)
  ckptr.close()
  return True


def _model_path(path: str) -> str:
  path = os.fspath(path)
  if os.path.isdir(os.path.join(path, MODEL_DIR)):
    path = os.path.join(path, MODEL_DIR)
  if not os.path.isdir(os.path.join(path, "meta")):
    raise FileNotFoundError(
        f"{path!r} is not a model checkpoint (or a workdir with one in {MODEL_DIR}/); a "
        "finished run writes it, `python -m examples.export_model WORKDIR` writes one from "
        "a run's training checkpoints")
  return os.path.abspath(path)


def model_info(path: str) -> dict:
  """The JSON of a model checkpoint (``path``: the checkpoint or a workdir)."""
  ocp, ckptr = _model_checkpointer()
  info = ckptr.restore(_model_path(path), ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  ckptr.close()
  if info.get("format") != MODEL_FORMAT:
    raise ValueError(f"{path!r}: model checkpoint format {info.get('format')!r}, this code "
                     f"reads {MODEL_FORMAT!r}")
  return info


def _config(task, config: dict, changes: dict):
  cls = getattr(task, "config_cls", Config)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(changes) - names)
  if unknown:
    raise ValueError(f"load_model: unknown config fields {unknown}")
  return cls.from_dict({**config, **changes})


def load_model(path: str, **config_changes: Any) -> nnx.Module:
  """The trained model of a model checkpoint, in eval mode, ready for inference.

  Args:
    path: a model checkpoint (:func:`save_model`) or a workdir holding one in
      ``model/``.
    **config_changes: config fields to override when rebuilding, e.g.
      ``backend="pallas"`` to run a model trained on a CPU on a Hopper GPU.

  Returns:
    The task's model with the stored weights, BatchNorm statistics and
    quantization state, after ``model.eval()`` (``model.train()`` to train on).
  """
  path = _model_path(path)
  info = model_info(path)
  task = tasks_lib.task_from_path(info["task"])
  cfg = _config(task, info["config"], config_changes)
  model = tasks_lib.build_model(task, cfg, info["model_meta"])
  state = nnx.state(model)
  ocp, ckptr = _model_checkpointer()
  restored = ckptr.restore(path, ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state_to_pure(state)))))["state"]
  ckptr.close()
  nnx.update(model, pure_to_state(state, restored))
  model.eval()
  return model


def train_state(task, cfg, model_meta) -> tuple[nnx.GraphDef, nnx.State]:
  """``nnx.split((model, optimizer))`` of a job, for restoring its checkpoints.

  The learning-rate schedule does not change the optimizer state's structure;
  a constant one stands in for the job's.
  """
  model = tasks_lib.build_model(task, cfg, model_meta)
  optimizer = optimizers.create_optimizer(cfg, model, optax.constant_schedule(cfg.lr))
  return nnx.split((model, optimizer))


def export_model(workdir: str, step: int | None = None, path: str | None = None) -> str:
  """Writes the model of a training checkpoint of ``workdir`` as a model checkpoint.

  Args:
    workdir: a run's directory (with ``checkpoints/``).
    step: which checkpoint (default: the latest).
    path: where to write (default ``<workdir>/model``).

  Returns:
    The path written.
  """
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=10**9)
  steps = ckpt.mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no training checkpoints in {os.path.join(workdir, 'checkpoints')!r}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"--step {step}: {workdir!r} has checkpoints at steps {sorted(steps)}")
  meta = ckpt.meta(step)
  if "task" not in meta or meta.get("model_meta") is None:
    raise ValueError(f"checkpoint {step} of {workdir!r} does not say how to rebuild its model "
                     "(written before model export existed, or by a task without model_meta)")
  task = tasks_lib.task_from_path(meta["task"])
  cfg = _config(task, meta["config"], {})
  graphdef, state = train_state(task, cfg, meta["model_meta"])
  state, _ = ckpt.restore(step, state)
  ckpt.close()
  model, _ = nnx.merge(graphdef, state)
  path = path or os.path.join(workdir, MODEL_DIR)
  if not save_model(path, model, {k: meta[k] for k in ("task", "config", "model_meta")}
                    | {"step": step, "summary": None}):
    raise ValueError(f"checkpoint {step} of {workdir!r} has non-finite parameters")
  return path
