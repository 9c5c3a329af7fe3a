"""Training and evaluation steps, the mode's quantization, and the device mesh they run on.

* :func:`update_step` -- the one NNX + optax update every example and
  benchmark uses: merge ``(model, optimizer)``, ``nnx.value_and_grad`` with
  respect to the mode's ``wrt`` filter (weights; plus the gradient-quantization
  state ``int8jax.nn.GradQuant`` for the quantized modes, whose "gradient" is
  the backward pass's measurement), ``optimizer.update``, split again. A pure
  function of ``(state, *args)``, ready for ``jax.jit``.
* :func:`quantize` -- switches a float model to the config's mode
  (:mod:`int8jax.modes`): ``int8jax.nn.quantize_model`` with the mode's
  ``QuantConfig`` (first conv and classifier stay float); float modes leave it.
* :func:`make_steps` -- a :class:`~examples.tasks.Task`'s loss and eval step
  compiled over a 1-D ``data`` mesh (batch sharded, state replicated), traced
  with that mesh in context; :func:`shard_quantized_layers` tells the
  quantized layers that the batch is sharded over its ``data`` axis, so the
  Pallas kernels run per device shard (XLA cannot partition a custom call:
  without it every device would gather the whole batch).
* :func:`make_mesh`, :func:`place`, :func:`to_global` -- the mesh over every
  process's devices, replicated state and global batches built from each
  process's own data (multi-process jobs: :mod:`examples.distributed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
import int8jax
from int8jax import modes
from int8jax.nn.convert import quantize_model
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from examples.config import Config, backend_from_cli

log = logging.getLogger(__name__)

__all__ = ["update_step", "quant_config", "quantize", "make_steps", "make_mesh",
           "shard_quantized_layers", "place", "to_global"]


def update_step(graphdef: nnx.GraphDef, loss_fn: Callable[..., Any], wrt, *,
                has_aux: bool = False) -> Callable:
  """``step(state, *args) -> (state, loss_fn's output)``: one optimizer update.

  Args:
    graphdef: of the ``(model, optimizer)`` pair (``nnx.split((model, opt))``).
    loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), differentiated with respect to ``wrt``.
    wrt: the filter of what the optimizer updates (``int8jax.modes.Mode.wrt``:
      ``nnx.Param`` for float modes, ``int8jax.nn.TRAINABLE`` for quantized ones).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A pure function of the state pytree ``nnx.state((model, optimizer))``; the
    caller jits it (with donation and shardings as it needs).
  """

  def step(state, *args):
    model, optimizer = nnx.merge(graphdef, state)
    out, grads = nnx.value_and_grad(lambda m: loss_fn(m, *args), has_aux=has_aux,
                                    argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), out

  return step


def quant_config(cfg: Config):
  """The ``int8jax.QuantConfig`` of ``cfg.mode`` with the config's switches (``None``: float).

  ``cfg.backend`` may use the command line's spelling (``"auto"`` for ``None``).
  """
  return modes.get(cfg.mode).quant_config(
      weight_granularity=cfg.weight_granularity, grad_rounding=cfg.grad_rounding,
      period=cfg.period, measure_early=cfg.measure_early, clip_warmup=cfg.clip_warmup,
      clip_noise_weight=cfg.clip_noise_weight, clip_method=cfg.clip_method,
      backend=backend_from_cli(cfg.backend))


def quantize(model: nnx.Module, cfg: Config, *, key=None) -> nnx.Module:
  """``model`` (float, built with ``dtype=mode.dtype``) switched to ``cfg.mode`` in place.

  The quantized layers' stochastic-rounding stream is seeded by
  ``cfg.seed + 2``, their other state by ``key`` (a seed or a JAX key;
  default ``cfg.seed + 1``).
  """
  qc = quant_config(cfg)
  if qc is not None:
    default = cfg.seed + 1 if key is None else key
    quantize_model(model, qc, rngs=nnx.Rngs(default, quant=cfg.seed + 2))
  return model


def make_steps(task, cfg: Config, graphdef: nnx.GraphDef, state_sharding, data_sharding):
  """``(train_step, eval_step)`` of ``task``, jit-compiled over the mesh.

  ``train_step(state, batch) -> (state, {"loss": scalar, "sums": task sums})``
  donates its state; ``eval_step(state, batch) -> task.eval_step(...)`` runs
  the model in eval mode. Outputs are replicated.
  """
  wrt = modes.get(cfg.mode).wrt
  update = update_step(graphdef, lambda model, batch: task.loss(model, batch, cfg), wrt,
                       has_aux=True)

  def train_step(state, batch):
    state, (loss, sums) = update(state, batch)
    return state, {"loss": loss, "sums": sums}

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return task.eval_step(model, batch, cfg)

  mesh = data_sharding.mesh
  repl = NamedSharding(mesh, P())
  train = jax.jit(train_step, in_shardings=(state_sharding, data_sharding),
                  out_shardings=(state_sharding, repl), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(state_sharding, data_sharding),
                     out_shardings=repl)
  if mesh.size == 1:
    return train, evaluate
  # Traced (and called) with the mesh in context: the quantized layers' data
  # axis (shard_quantized_layers) refers to it.
  return _InMesh(mesh, train), _InMesh(mesh, evaluate)


class _InMesh:
  """A jitted function called (and lowered) with ``mesh`` in context."""

  def __init__(self, mesh: Mesh, fn):
    self.mesh, self.fn = mesh, fn

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args)


def shard_quantized_layers(model: nnx.Module, mesh: Mesh, axis: str = "data") -> int:
  """Sets ``QuantConfig.data_axis`` of every quantized layer of ``model`` (in place).

  With more than one device on ``mesh``: the layers' Pallas kernels then run
  per batch shard under ``jax.shard_map`` (``int8jax.QuantConfig.data_axis``),
  and the steps must be traced with ``mesh`` in context (:func:`make_steps`
  does). The XLA backend ignores the setting (XLA partitions its ops itself).
  One device: nothing changes. Returns how many layers were changed.
  """
  if mesh.size == 1:
    return 0
  if axis not in mesh.axis_names:
    raise ValueError(f"shard_quantized_layers: axis {axis!r} is not an axis of {mesh}")
  n = 0
  for _, m in model.iter_modules():
    qc = getattr(m, "config", None)
    if isinstance(qc, int8jax.QuantConfig) and qc.data_axis != axis:
      m.config = qc.replace(data_axis=axis)
      n += 1
  return n


def make_mesh(num_devices: int | None) -> Mesh:
  """1-D ``data`` mesh over every process's devices (or the first ``num_devices`` of a
  single process's)."""
  devices = jax.devices()
  if num_devices is not None:
    if jax.process_count() > 1:
      raise ValueError("--num-devices is for single-process runs")
    if num_devices > len(devices):
      raise ValueError(f"--num-devices {num_devices}: only {len(devices)} devices: {devices}")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


def place(state, sharding):
  """Copy of ``state`` as global arrays on ``sharding``, one buffer per leaf.

  Works in multi-process jobs: every process passes the same values (host
  copies or process-local arrays; a global array is fetched only where it is
  fully addressable) and each puts its own devices' shards. Leaves may share
  a buffer (e.g. equal initial constants of several layers); the train step
  donates its state, and XLA refuses to donate a buffer twice.
  """

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding == sharding:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # a fresh buffer
      raise ValueError(f"place: a global array on {x.sharding}, expected {sharding}")
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, state)


def to_global(batch: dict, sharding) -> dict:
  """Process-local host batch -> global arrays sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
