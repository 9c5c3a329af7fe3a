"""Speed of UI8 against float: QuantConv forward+backward and a ResNet-20 step.

    .venv/bin/python benchmarks/train_step.py            # full run, writes RESULTS.md
    .venv/bin/python benchmarks/train_step.py --quick    # fewer repeats, prints only

Per-op: for each distinct ResNet-20 conv (batch 128, CIFAR shapes), one jitted
forward + backward (gradients w.r.t. input and kernel) of ``nnx.Conv`` and of
``int8jax.nn.QuantConv`` (XLA backend; a non-measure step and a measure step).

Training step: ResNet-20 (examples/models.py; first conv and classifier float,
as in the paper) at batch 128, 32x32x3, SGD with momentum: float32, UI8 with
period 1 (measures every step), UI8 on a non-measure step, and naive INT8
(clip at max|g| every step, no LR scaling). The amortised UI8 time for a
period P is ``((P - 1) * t_non_measure + t_measure) / P``.

Timing: ``jax.block_until_ready`` after each call, after compilation and
warm-up; the median of ``--repeats`` calls. All variants run in the same
process, interleaved round by round, so they see the same machine load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import int8jax  # noqa: E402
from examples import models  # noqa: E402
from int8jax.nn import TRAINABLE, QuantConv  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BEGIN, END = "<!-- train_step.py: begin -->", "<!-- train_step.py: end -->"

# (name, H=W, C_in, C_out, stride) of ResNet-20's distinct 3x3 convs.
RESNET20_CONVS = [
    ("stage1 3x3 16->16", 32, 16, 16, 1),
    ("stage2 3x3 16->32 /2", 32, 16, 32, 2),
    ("stage2 3x3 32->32", 16, 32, 32, 1),
    ("stage3 3x3 32->64 /2", 16, 32, 64, 2),
    ("stage3 3x3 64->64", 8, 64, 64, 1),
]


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.*)", f.read())
      cpu = m.group(1) if m else cpu
  except OSError:
    pass
  dev = jax.devices()[0]
  where = f"{dev.device_kind}" if dev.platform != "cpu" else f"CPU: {cpu}, {os.cpu_count()} cores"
  return where


def timed_rounds(fns: dict, repeats: int) -> dict:
  """Median seconds per call; variants interleaved round by round."""
  for f in fns.values():  # compile + warm-up
    jax.block_until_ready(f())
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def bench_ops(repeats: int, batch: int) -> list[dict]:
  rows = []
  for name, hw, cin, cout, stride in RESNET20_CONVS:
    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
    fl = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=nnx.Rngs(0))
    gy = jax.random.normal(jax.random.key(1), fl(x).shape)

    def quant_conv(period):
      qc = QuantConv(cin, cout, (3, 3), strides=stride, use_bias=False,
                     quant=int8jax.QuantConfig(period=period), rngs=nnx.Rngs(0))
      qc(x)  # first call measures; with a huge period later calls do not
      return qc

    def fwd_bwd(module, wrt):
      @nnx.jit
      def f(module, x):
        return nnx.grad(lambda m, x: jnp.vdot(m(x), gy), argnums=(nnx.DiffState(0, wrt), 1))(
            module, x)
      return lambda: f(module, x)

    t = timed_rounds({"float32": fwd_bwd(fl, nnx.Param),
                      "ui8": fwd_bwd(quant_conv(10**9), TRAINABLE),
                      "ui8 measure": fwd_bwd(quant_conv(1), TRAINABLE)}, repeats)
    rows.append(dict(name=name, shape=f"{batch}x{hw}x{hw}x{cin}", **t))
  return rows


def _make_step(model, tx, wrt):
  opt = nnx.Optimizer(model, tx, wrt=wrt)
  graph, state = nnx.split((model, opt))

  @jax.jit
  def step(state, x, y):
    model, opt = nnx.merge(graph, state)

    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    opt.update(model, grads)
    return loss, nnx.state((model, opt))

  return step, state


def bench_train(repeats: int, batch: int) -> dict:
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  sgd = optax.sgd(0.05, momentum=0.9)

  memory = {}

  def variant(name, config, tx):
    model = models.resnet20(num_classes=10, rngs=nnx.Rngs(0))
    wrt = nnx.Param
    if config is not None:
      int8jax.nn.quantize_model(model, config, rngs=nnx.Rngs(1))
      wrt = TRAINABLE
    step, state = _make_step(model, tx, wrt)
    stats = step.lower(state, x, y).compile().memory_analysis()
    memory[name] = (stats.temp_size_in_bytes, stats.argument_size_in_bytes)
    _, state = step(state, x, y)  # one step: caches ranges, learns a clip
    holder = {"state": state}

    def run():
      loss, holder["state"] = step(holder["state"], x, y)
      return loss
    return run

  fns = {
      "float32": variant("float32", None, sgd),
      "ui8 period 1": variant("ui8 period 1", int8jax.QuantConfig(period=1),
                              int8jax.optim.ui8(sgd)),
      "ui8 non-measure": variant("ui8 non-measure", int8jax.QuantConfig(period=1_000_000),
                                 int8jax.optim.ui8(sgd)),
      "naive int8": variant("naive int8", int8jax.QuantConfig(grad_clip="max", period=1_000_000),
                            int8jax.optim.ui8(sgd, scale_lr=False, learn_clip=False)),
  }
  return timed_rounds(fns, repeats), memory


def versions() -> str:
  import flax
  import jaxlib
  return (f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
          f"optax {optax.__version__}, Python {platform.python_version()}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=15, help="timed calls per variant")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--quick", action="store_true", help="5 repeats; print, do not write RESULTS.md")
  args = p.parse_args(argv)
  repeats = 5 if args.quick else args.repeats

  load_before = os.getloadavg()[0]
  ops = bench_ops(repeats, args.batch)
  train, memory = bench_train(repeats, args.batch)
  period = int8jax.QuantConfig().period
  amort = ((period - 1) * train["ui8 non-measure"] + train["ui8 period 1"]) / period
  f32 = train["float32"]

  lines = [f"### UI8 vs float32 on {machine()}", "",
           f"{datetime.date.today().isoformat()}; {versions()}; median of {repeats} timed calls "
           "after warm-up, variants interleaved; 1-min load average "
           f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
           "(other work on the machine inflates absolute times, less the ratios); "
           "`python benchmarks/train_step.py`.", "",
           f"QuantConv forward + backward (batch {args.batch}), XLA backend:", "",
           "| layer | input | float32 ms | UI8 ms | UI8 / f32 | UI8 measure step ms |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for r in ops:
    lines.append(f"| {r['name']} | {r['shape']} | {r['float32'] * 1e3:.1f} | {r['ui8'] * 1e3:.1f} "
                 f"| {r['ui8'] / r['float32']:.2f}x | {r['ui8 measure'] * 1e3:.1f} |")
  lines += ["", f"ResNet-20 training step (batch {args.batch}, 32x32x3, SGD momentum):", "",
            "| variant | ms / step | vs float32 | step temporaries MiB | arguments MiB |",
            "| --- | ---: | ---: | ---: | ---: |"]
  mib = lambda b: b / 2**20
  for k in ("float32", "ui8 non-measure", "ui8 period 1", "naive int8"):
    tmp, arg = memory[k]
    lines.append(f"| {k} | {train[k] * 1e3:.0f} | {train[k] / f32:.2f}x | {mib(tmp):.1f} "
                 f"| {mib(arg):.1f} |")
  lines.append(f"| ui8 period {period} (amortised) | {amort * 1e3:.0f} | {amort / f32:.2f}x | | |")
  lines += ["", "Memory: XLA's buffer assignment for the compiled step "
            "(`compiled.memory_analysis()`): temporaries are activations kept for the "
            "backward pass plus scratch; arguments are parameters, optimizer and "
            "quantization state and the batch."]
  table = "\n".join(lines)
  print(table)
  if not args.quick:
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text:
      text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
      text = text.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
      f.write(text)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
  main()
