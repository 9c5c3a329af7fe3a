"""The UI8 optimizer update alone (no forward/backward), with the library on ``sys.path``.

Diagnoses the MobileNetV2 CPU step regression against 0a9280c (docs: the
"MobileNetV2 A/B" in benchmarks/RESULTS.md): the forward+backward is as fast
as before, the optimizer update is not. Prints the compiled update's HLO
size (lines, loop fusions, conditionals) and its median time::

    python benchmarks/optimizer_update.py                      # this tree
    PYTHONPATH=/tmp/old_tree python benchmarks/optimizer_update.py   # an older commit

(``git worktree add --detach /tmp/old_tree 0a9280c`` makes the older tree.)
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import optax
from flax import nnx

import int8jax
from int8jax.nn import TRAINABLE, quantize_model
from examples import models
# pylint: enable=wrong-import-position


def main():
  x = jax.random.normal(jax.random.key(0), (8, 96, 96, 3))
  y = jax.random.randint(jax.random.key(1), (8,), 0, 1000)
  model = models.create_model("mobilenet_v2", num_classes=1000, rngs=nnx.Rngs(0))
  quantize_model(model, int8jax.QuantConfig(period=10**6), rngs=nnx.Rngs(1, quant=2))
  opt = nnx.Optimizer(model, int8jax.optim.ui8(optax.sgd(0.01, momentum=0.9)), wrt=TRAINABLE)
  graphdef, state = nnx.split((model, opt))

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  def update(state, g):
    model, opt = nnx.merge(graphdef, state)
    opt.update(model, g)
    return nnx.state((model, opt))

  m, _ = nnx.merge(graphdef, state)
  g = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(m)
  f = jax.jit(update)
  txt = f.lower(state, g).compile().as_text()
  entry = txt[txt.index("ENTRY"):]
  ops = collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", entry))
  jax.block_until_ready(f(state, g))
  t = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(state, g))
    t.append(time.perf_counter() - t0)
  print({"library": os.path.dirname(int8jax.__file__), "hlo_lines": len(txt.splitlines()),
         "fusions": ops.get("fusion", 0), "conditionals": ops.get("conditional", 0),
         "update_ms": round(statistics.median(t) * 1e3, 1)}, flush=True)


if __name__ == "__main__":
  main()
