"""Size and CPU inference throughput of the int8 serving program (int8jax.nn.freeze).

    python benchmarks/serving.py --models resnet20 resnet50 --batches 1 128 --out serving.md

Per model, three forward passes on the same input, in one process:

* ``int8 program`` -- the frozen model exported with ``jax.export``
  (:func:`int8jax.nn.export_serving`), serialized, deserialized and run with
  ``jax.jit(exported.call)``: weights are int8 constants of the program;
* ``float32 (jit)`` -- the same architecture as a plain float32 Flax model,
  ``jax.jit`` with the parameters as arguments;
* ``UI8 eval (jit)`` -- the UI8-trained model in ``model.eval()`` mode
  (what :func:`examples.load_model` returns), ``jax.jit`` with its state as
  an argument (it quantizes its float weights on every call).

The quantized model's activation ranges come from one training-mode forward
pass on random data (speed and size do not depend on their values); the first
conv and the classifier stay float, as in training (Zhu et al.). Sizes: the
serialized program's bytes against the float32 model's parameter bytes
(``nnx.Param``; BatchNorm statistics listed apart). Timing: ``--warmup``
calls, then the median (min, max) of ``--repeats`` calls, each ended by
``jax.block_until_ready``, the variants taking turns call by call; images/s =
batch / median. Runs on the backend
JAX picks (``--backend`` sets the quantized layers' backend; on a GPU use
``pallas``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import int8jax  # noqa: E402
from examples import models  # noqa: E402
from int8jax.nn import export_serving, freeze, quantize_model  # noqa: E402

#: model -> (input shape of one example, classes).
SHAPES = {"resnet20": ((32, 32, 3), 10), "resnet56": ((32, 32, 3), 10),
          "resnet18": ((224, 224, 3), 1000), "resnet50": ((224, 224, 3), 1000),
          "mobilenet_v2": ((224, 224, 3), 1000), "simple_cnn": ((28, 28, 1), 10)}


def _bytes(tree) -> int:
  return sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in jax.tree.leaves(tree))


def build(name: str, backend: str | None):
  """``(variants, sizes)``: the three forward functions and the byte counts."""
  shape, classes = SHAPES[name]
  make = lambda: models.create_model(name, num_classes=classes, in_channels=shape[-1],
                                     rngs=nnx.Rngs(0))
  float_model, trained = make(), make()
  quantize_model(trained, int8jax.QuantConfig(backend=backend), rngs=nnx.Rngs(1, quant=2))
  x = jax.random.normal(jax.random.key(0), (2, *shape))
  nnx.jit(lambda m, x: m(x))(trained, x)  # training mode: measures the ranges
  trained.eval()
  float_model.eval()
  t = time.perf_counter()
  blob = export_serving(freeze(trained), shape).serialize()
  export_s = time.perf_counter() - t
  program = jax.export.deserialize(blob)
  variants = {"int8 program": jax.jit(program.call),
              "float32 (jit)": _jitted(float_model), "UI8 eval (jit)": _jitted(trained)}
  sizes = {"float32 params": _bytes(nnx.state(float_model, nnx.Param)),
           "BatchNorm stats": _bytes(nnx.state(float_model, nnx.BatchStat)),
           "program": len(blob), "export_s": export_s}
  return variants, sizes, shape


def _jitted(model):
  """``x -> model(x)`` as ``jax.jit`` with the state as an argument (not
  ``nnx.jit``, whose per-call graph traversal costs ~20 ms on ResNet-20)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  return lambda x: fn(state, x)


def time_variants(fns: dict, x, warmup: int, repeats: int) -> dict:
  """``{name: (median, min, max)}`` seconds. The variants take turns call by
  call, so a change of load on a shared machine hits them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(x))
  ts = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(x))
      ts[k].append(time.perf_counter() - t)
  return {k: (statistics.median(v), min(v), max(v)) for k, v in ts.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=["resnet20", "resnet50"], choices=sorted(SHAPES))
  p.add_argument("--batches", nargs="+", type=int, default=[1, 128])
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--sizes-only", action="store_true", help="sizes, no timing")
  p.add_argument("--backend", default=None, help="quantized layers' backend (default: auto)")
  p.add_argument("--out", default=None, help="append the markdown tables to this file")
  args = p.parse_args(argv)
  head = (f"{datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {os.cpu_count()} CPUs visible, "
          f"affinity {len(os.sched_getaffinity(0))} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start, jax {jax.__version__}, "
          f"warm-up {args.warmup}, median of {args.repeats}")
  lines = [f"\n### Serving: {', '.join(args.models)} ({head})\n",
           "| model | float32 params bytes | BatchNorm stats bytes | int8 program bytes | "
           "program / params | export s |", "|---|---:|---:|---:|---:|---:|"]
  timing = ["", "| model | batch | variant | median ms | min ms | max ms | images/s | "
            "vs float32 |", "|---|---:|---|---:|---:|---:|---:|---:|"]
  for name in args.models:
    variants, sizes, shape = build(name, args.backend)
    lines.append(f"| {name} | {sizes['float32 params']:,} | {sizes['BatchNorm stats']:,} | "
                 f"{sizes['program']:,} | {sizes['program'] / sizes['float32 params']:.3f}x | "
                 f"{sizes['export_s']:.1f} |")
    print(lines[-1], flush=True)
    if args.sizes_only:
      continue
    for batch in args.batches:
      x = jax.random.normal(jax.random.key(1), (batch, *shape))
      res = time_variants(variants, x, args.warmup, args.repeats)
      for k, (med, lo, hi) in res.items():
        timing.append(f"| {name} | {batch} | {k} | {med * 1e3:.2f} | {lo * 1e3:.2f} | "
                      f"{hi * 1e3:.2f} | {batch / med:.1f} | "
                      f"{res['float32 (jit)'][0] / med:.2f}x |")
        print(timing[-1], flush=True)
  text = "\n".join(lines + ([] if args.sizes_only else timing)) + "\n"
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text)


if __name__ == "__main__":
  main()
