"""Capture real output gradients of quantized layers, for the clip-learner tests.

    .venv/bin/python benchmarks/capture_gradients.py   # writes tests/data/captured_gradients.npz

Trains the stress setting of docs/results.md (small MobileNetV2 on the bundled
MNIST subset, batch 32, SGD lr 0.5 with momentum, UI8 with library
defaults) for ``--steps`` steps, then records, for one training batch, the
gradient of the loss w.r.t. the output of three quantized layers
(``int8jax.diagnostics.capture_tensors``): a 1x1 expansion conv, a 3x3
depthwise conv and a 1x1 projection conv. The first 8 images of the batch
are kept (float32). Deterministic for a given seed on one machine.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import int8jax  # noqa: E402
from examples import data as data_lib  # noqa: E402
from examples import models  # noqa: E402

LAYERS = ("blocks/1/pw", "blocks/1/dw", "blocks/3/pl")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                               "captured_gradients.npz"))
  args = p.parse_args(argv)
  spec = data_lib.mnist_subset()
  x_all = (spec.train.images.astype(np.float32) / 255.0 - spec.mean[0]) / spec.std[0]
  y_all = spec.train.labels
  c = 8
  model = models.MobileNetV2(config=((1, c, 1, 1), (4, c * 3 // 2, 2, 2), (4, 2 * c, 2, 2)),
                             width_mult=1.0, divisor=4, last_channels=4 * c, in_channels=1,
                             num_classes=10, rngs=nnx.Rngs(params=args.seed))
  mode = int8jax.modes.get("ui8")
  int8jax.nn.quantize_model(model, mode.quant_config(),
                            rngs=nnx.Rngs(args.seed + 1, quant=args.seed + 2))
  opt = nnx.Optimizer(model, mode.optimizer(optax.sgd(0.5, momentum=0.9)), wrt=mode.wrt)

  def loss_fn(m, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(m, o, x, y):
    loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, mode.wrt))(m, x, y)
    o.update(m, g)
    return loss

  rng = np.random.default_rng(args.seed)
  for i in range(args.steps):
    idx = rng.choice(len(x_all), 32, replace=False)
    loss = step(model, opt, jnp.asarray(x_all[idx]), jnp.asarray(y_all[idx]))
  idx = rng.choice(len(x_all), 32, replace=False)
  tensors = int8jax.diagnostics.capture_tensors(model, loss_fn, jnp.asarray(x_all[idx]),
                                                jnp.asarray(y_all[idx]))
  out = {}
  for path in LAYERS:
    t = tensors[path]
    out[path.replace("/", "_")] = t.g[:8].astype(np.float32)
    print(f"{path}: {t.kind}, g {t.g[:8].shape}, max|g| {np.abs(t.g[:8]).max():.3g}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **out, steps=args.steps, seed=args.seed, loss=float(loss))
  print(f"wrote {os.path.abspath(args.out)} (after {args.steps} steps, loss {float(loss):.3f})")


if __name__ == "__main__":
  main()
