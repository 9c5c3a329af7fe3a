"""One model's training step, float32 vs UI8, timed with the library found on ``sys.path``.

The A/B half of ``benchmarks/compare_commits.sh``: it uses only API that has
been stable since the first release (``examples.models``,
``int8jax.nn.quantize_model``, ``int8jax.optim.ui8``, ``TRAINABLE``,
``set_call_count``), so the same file times an older commit's library (put
that commit's tree first on ``PYTHONPATH``) against today's::

    python benchmarks/step_ab.py --model mobilenet_v2 --size 224 --batch 8
    PYTHONPATH=/tmp/old_tree python benchmarks/step_ab.py ...   # the old library

Prints one JSON line: the library's path, jax version, and the median ms of
``float32``, ``ui8 measure`` (a measuring step: ranges, distances, clip
learner) and ``ui8 non-measure`` steps, plus ``ui8 period 100`` amortised
over the library's default period. Variants are interleaved, median of
``--repeats`` timed steps after two warm-up steps, results blocked on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

# The repository root last: a tree named first on PYTHONPATH (an older
# commit's, see compare_commits.sh) is the one imported.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import int8jax
from int8jax.nn import TRAINABLE, quantize_model
from examples import models
# pylint: enable=wrong-import-position


def _step(model, tx, wrt):
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return graphdef, state, step


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="mobilenet_v2", choices=sorted(models.MODELS))
  p.add_argument("--size", type=int, default=224, help="input side")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=7)
  a = p.parse_args(argv)

  x = jax.random.normal(jax.random.key(0), (a.batch, a.size, a.size, 3), jnp.float32)
  y = jax.random.randint(jax.random.key(1), (a.batch,), 0, a.classes)
  base = lambda: optax.sgd(0.01, momentum=0.9)  # noqa: E731

  def build(quantized, period):
    model = models.create_model(a.model, num_classes=a.classes, rngs=nnx.Rngs(0))
    if quantized:
      # measure_early (since a38e6ef) and clip_warmup off where the tree has
      # them: "non-measure" (period 1e6) must measure on call 0 only and use
      # the cached clip after it
      fields = {f.name for f in dataclasses.fields(int8jax.QuantConfig)}
      early = {k: False for k in ("measure_early", "clip_warmup") if k in fields}
      quantize_model(model, int8jax.QuantConfig(period=period, **early),
                     rngs=nnx.Rngs(1, quant=2))
      return model, _step(model, int8jax.optim.ui8(base()), TRAINABLE)
    return model, _step(model, base(), nnx.Param)

  variants = {"float32": build(False, 1), "ui8 measure": build(True, 1),
              "ui8 non-measure": build(True, 10**6)}
  states = {k: v[1][1] for k, v in variants.items()}
  times = {k: [] for k in variants}
  for i in range(a.repeats + 2):
    for k, (_, (_, _, step)) in variants.items():
      # "ui8 non-measure" measures on its first call only (call 0): a warm-up.
      t = time.perf_counter()
      states[k], loss = step(states[k], x, y)
      jax.block_until_ready((states[k], loss))
      if i >= 2:
        times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  med["ui8 period 100"] = (99 * med["ui8 non-measure"] + med["ui8 measure"]) / 100
  print(json.dumps({"library": os.path.dirname(int8jax.__file__), "jax": jax.__version__,
                    "model": a.model, "size": a.size, "batch": a.batch,
                    "ms": {k: round(v, 1) for k, v in med.items()}}), flush=True)


if __name__ == "__main__":
  sys.exit(main())
