"""Train and evaluate the RetinaNet example: float32 / bf16 / UI8 and the ablations.

    python -m examples.detection.make_dataset --out data/mnist_det
    python -m examples.detection.train --data-dir data/mnist_det --mode ui8 \\
        --workdir runs/det_ui8
    python -m examples.detection.train --help      # every option

Prints progress (tqdm), a ``SUMMARY ...`` line at the end and writes
``<workdir>/summary.json`` (COCO ``eval_mAP`` = AP@[.5:.95], ``eval_mAP50``,
per-layer cosine distances of the quantized layers), TensorBoard events in
``<workdir>/tensorboard`` and Orbax checkpoints in ``<workdir>/checkpoints``
(rerunning the same command resumes and sees the same batches).

:func:`run` is a **temporary, thin runner** of a :class:`examples.tasks.Task`
until the shared loop (being split out of ``examples/train.py``) exists. It
reuses that file's pieces -- ``make_mesh``, ``make_schedule``,
``make_optimizer`` (the base optimizer), ``Checkpointer``, ``Metrics``,
``quant_scalars`` -- and takes everything else from the task and from
:mod:`int8jax.modes` (the layer config, the optimizer wrapper, ``wrt``).
Swapping it for the shared loop should need only the ``main`` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import int8jax
from int8jax.nn.convert import quantize_model
from examples import data as data_lib
from examples import train as train_lib
from examples.detection.task import DetectionConfig, DetectionTask, init_key

log = logging.getLogger("int8jax.examples.detection")

__all__ = ["run", "build_parser", "parse_config", "main"]

_to_global = train_lib._to_global  # pylint: disable=protected-access

#: Config keys a resumed run must share with its checkpoint.
_RESUME_KEYS = ("mode", "backbone", "width", "fpn_width", "head_convs", "levels", "image_size",
                "batch_size", "seed", "data_dir")


def build_parser(config_cls=DetectionConfig) -> argparse.ArgumentParser:
  """One ``--flag`` per field of the config dataclass (help and choices from
  the field metadata)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for f in dataclasses.fields(config_cls):
    flag = "--" + f.name.replace("_", "-")
    kw = {"default": f.default, "help": f.metadata.get("help", "")}
    base = str(f.type).split(" |")[0]
    if base == "bool":
      p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
      continue
    p.add_argument(flag, type={"int": int, "float": float}.get(base, str),
                   choices=f.metadata.get("choices"), **kw)
  return p


def parse_config(argv=None) -> DetectionConfig:
  return DetectionConfig(**vars(build_parser().parse_args(argv)))


def _optimizer(cfg, schedule) -> optax.GradientTransformation:
  """examples.train's base optimizer (+ optional global-norm clip), wrapped by the mode."""
  base = train_lib.make_optimizer(dataclasses.replace(cfg, mode="float32"), schedule)
  if cfg.clip_grad_norm > 0:
    base = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), base)
  return int8jax.modes.get(cfg.mode).optimizer(
      base, clip_learning_rate=cfg.clip_lr, alpha=cfg.alpha, beta=cfg.beta)


def _check_resume_config(ckpt: train_lib.Checkpointer, step: int, cfg) -> None:
  """``ValueError`` when the checkpoint's config differs in a key of ``_RESUME_KEYS``."""
  ocp = ckpt.ocp
  meta = ckpt.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  for k in _RESUME_KEYS:
    old = meta.get("config", {}).get(k)
    if old is not None and old != getattr(cfg, k):
      raise ValueError(f"checkpoint in {cfg.workdir} was written with {k}={old!r}, this "
                       f"run has {k}={getattr(cfg, k)!r}; use another --workdir")


class _Window:
  """Device-side ``sums`` of the steps since the last log, fetched in one go.

  ``flush()`` returns ``train/<k> = sum_k / count`` (the Task protocol's
  rule) and ``train/steps_per_s`` (wall time of the window minus ``pause``).
  """

  def __init__(self):
    self.pending: list = []
    self.t, self.paused = time.time(), 0.0

  def add(self, sums: dict) -> None:
    self.pending.append(sums)

  def pause(self, seconds: float) -> None:
    self.paused += seconds

  def flush(self) -> dict[str, float]:
    tot: dict[str, float] = {}
    for m in jax.device_get(self.pending):
      for k, v in m.items():
        tot[k] = tot.get(k, 0.0) + float(v)
    n = max(tot.pop("count", 0.0), 1.0)
    vals = {f"train/{k}": v / n for k, v in tot.items() if k != "corrupt"}
    vals["train/corrupt"] = tot.get("corrupt", 0.0)
    vals["train/steps_per_s"] = len(self.pending) / max(time.time() - self.t - self.paused, 1e-9)
    self.pending, self.t, self.paused = [], time.time(), 0.0
    return vals


def _evaluate(task, eval_step, state, spec, cfg, data_sharding) -> dict:
  results = []
  for batch in data_lib.batches(spec, train=False,
                                global_batch=cfg.eval_batch_size or cfg.batch_size,
                                num_workers=cfg.workers):
    out = eval_step(state, _to_global(batch, data_sharding))
    results.append((batch, jax.device_get(out)))
  return task.evaluate(spec, results, cfg)


def run(task, cfg) -> train_lib.Result:
  """Trains (or resumes) ``task`` under ``cfg``; returns the summary and final state.

  ``cfg`` needs the fields of :class:`DetectionConfig` that are not
  detection-specific (mode, optimizer, schedule, run options).
  """
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if jax.process_count() > 1:
    raise NotImplementedError("the temporary detection runner is single-process")
  os.makedirs(cfg.workdir, exist_ok=True)
  mode = int8jax.modes.get(cfg.mode)
  spec = task.load_data(cfg)
  spe = data_lib.steps_per_epoch(spec, cfg.batch_size)
  total_steps = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * spe)))
  mesh = train_lib.make_mesh(cfg.num_devices)
  if cfg.batch_size % mesh.size:
    raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {mesh.size} devices")
  data_sharding, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  model = task.make_model(cfg, spec)
  if mode.quantized and not task.quantizes_itself:
    # 'default' only re-initialises kernels that quantize_model then replaces by
    # the float ones: the fast-compiling rbg key (see task.init_key).
    quantize_model(model, cfg.quant_config(),
                   rngs=nnx.Rngs(init_key(cfg.seed + 1), quant=cfg.seed + 2))
  schedule = train_lib.make_schedule(cfg, total_steps, spe)
  optimizer = nnx.Optimizer(model, _optimizer(cfg, schedule), wrt=mode.wrt)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  state = train_lib._place(state, repl)  # pylint: disable=protected-access

  ckpt = train_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.keep_checkpoints)
  step, epoch, index, corrupt_seen = 0, 0, 0, 0
  latest = ckpt.latest_step()
  if latest is not None:
    _check_resume_config(ckpt, latest, cfg)  # before the state: a new width changes shapes
    state, meta = ckpt.restore(latest, state)
    state = train_lib._place(state, repl)  # pylint: disable=protected-access
    step, epoch, index = meta["step"], meta["epoch"], meta["index"]
    corrupt_seen = meta.get("corrupt_seen", 0)
    log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, index)

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    (_, sums), grads = nnx.value_and_grad(
        lambda m: task.loss(m, batch, cfg), has_aux=True,
        argnums=nnx.DiffState(0, mode.wrt))(model)
    optimizer.update(model, grads)
    sums = dict(sums, corrupt=batch["corrupt"].sum())
    return nnx.state((model, optimizer)), sums

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return task.eval_step(model, batch, cfg)

  train_step = jax.jit(train_step, in_shardings=(repl, data_sharding),
                       out_shardings=(repl, repl), donate_argnums=0)
  eval_step = jax.jit(eval_step, in_shardings=(repl, data_sharding), out_shardings=repl)
  metrics = train_lib.Metrics(cfg, total_steps, step, True)
  eval_every = max(1, int(round(cfg.eval_every_epochs * spe))) if cfg.eval_every_epochs else 0

  def meta():
    return {"step": step, "epoch": epoch, "index": index, "corrupt_seen": corrupt_seen,
            "config": dataclasses.asdict(cfg)}

  stop = []
  old_handler = None
  if train_lib.threading_main():
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
  window = _Window()
  last_train: dict = {}
  t_start, t_first, steps_this_run, eval_s = time.time(), None, 0, 0.0

  def log_window():
    nonlocal corrupt_seen
    vals = window.flush()
    corrupt_seen += int(vals.pop("train/corrupt", 0))
    vals["train/lr"] = float(schedule(step - 1))
    if not math.isfinite(vals.get("train/loss", 0.0)):
      log.warning("step %d: non-finite training loss %s", step, vals["train/loss"])
    if mode.quantized:
      vals.update(train_lib.quant_scalars(nnx.merge(graphdef, state)[0], cfg.alpha, cfg.beta))
    metrics.scalars(step, vals)
    if not cfg.progress:
      print(f"step {step}/{total_steps} " + " ".join(
          f"{k[6:]}={v:.4g}" for k, v in vals.items() if k.startswith("train/")), flush=True)
    metrics.progress(0, {"loss": f"{vals.get('train/loss', float('nan')):.4f}",
                         "lr": f"{vals['train/lr']:.3g}"})
    return {k.replace("/", "_"): v for k, v in vals.items() if not k.startswith("quant/")}

  try:
    while step < total_steps:
      for batch in data_lib.batches(spec, train=True, global_batch=cfg.batch_size,
                                    seed=cfg.seed, epoch=epoch, start=index,
                                    num_workers=cfg.workers):
        state, sums = train_step(state, _to_global(batch, data_sharding))
        window.add(sums)
        step, index, steps_this_run = step + 1, index + 1, steps_this_run + 1
        if index >= spe:
          epoch, index = epoch + 1, 0
        if t_first is None:
          jax.block_until_ready(sums)
          t_first = time.time()  # compilation excluded from the step time
        if step % cfg.log_every == 0 or step == total_steps:
          last_train = log_window()
        metrics.progress(1, {})
        if eval_every and step % eval_every == 0 and step < total_steps:
          jax.block_until_ready(state)  # queued steps are training time, not evaluation
          t = time.time()
          ev = _evaluate(task, eval_step, state, spec, cfg, data_sharding)
          eval_s += time.time() - t
          window.pause(time.time() - t)
          metrics.scalars(step, {f"eval/{k[5:]}": v for k, v in ev.items()})
          print(f"step {step}/{total_steps} " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()),
                flush=True)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
          ckpt.save(step, state, meta())
        if cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps:
          stop.append("stop_after_steps")
        if stop:
          if stop[0] == "SIGTERM":
            ckpt.save(step, state, meta())
          log.info("stopping at step %d (%s)", step, stop[0])
          ckpt.close()
          metrics.close()
          return train_lib.Result({"stopped": stop[0], "step": step}, jax.device_get(state),
                                  graphdef)
        if step >= total_steps:
          break
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)

  jax.block_until_ready(state)
  # Steps after the first (whose time is mostly compilation), evaluations excluded.
  train_time = time.time() - (t_first or time.time()) - eval_s
  ckpt.save(step, state, meta())
  t = time.time()
  final = _evaluate(task, eval_step, state, spec, cfg, data_sharding)
  eval_s += time.time() - t
  metrics.scalars(step, {f"eval/{k[5:]}": v for k, v in final.items()})
  ckpt.close()
  metrics.close()
  model = nnx.merge(graphdef, state)[0]
  layers = int8jax.diagnostics.layer_stats(model, cfg.alpha, cfg.beta) if mode.quantized else {}
  summary = {
      "task": task.name, "dataset": cfg.data_dir, "mode": cfg.mode, "backbone": cfg.backbone,
      "steps": step, "epochs": step / spe, "batch_size": cfg.batch_size, "seed": cfg.seed,
      "devices": mesh.size, **last_train, **final,
      "train_s_per_step": (train_time / (steps_this_run - 1)) if steps_this_run > 1 else None,
      "eval_s": eval_s, "wall_s": time.time() - t_start, "steps_this_run": steps_this_run,
      "corrupt_images_skipped": corrupt_seen, "workdir": os.path.abspath(cfg.workdir),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "quant_layers": layers,
  }
  with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print("SUMMARY " + " ".join(f"{k}={_fmt(v)}" for k, v in summary.items()
                              if k != "quant_layers"), flush=True)
  if layers:
    print(format_layer_table(layers), flush=True)
  return train_lib.Result(summary, jax.device_get(state), graphdef)


def format_layer_table(layers: dict[str, dict[str, float]]) -> str:
  """Markdown table of per-layer cosine distance / clip ratio / phi."""
  rows = ["| quantized layer | cosine distance d | clip / max\\|g\\| | clipped fraction | phi |",
          "| --- | ---: | ---: | ---: | ---: |"]
  for path, s in layers.items():
    rows.append(f"| `{path}` | {s['cosine_distance']:.4f} | {s['clip_ratio']:.3f} | "
                f"{s['clipped_fraction']:.2e} | {s['phi']:.3f} |")
  return "\n".join(rows)


def _fmt(v: Any) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv=None) -> dict:
  """Parse flags, run the detection task, return the summary."""
  return run(DetectionTask(), parse_config(argv)).summary


if __name__ == "__main__":
  main()
