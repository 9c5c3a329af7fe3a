"""Training-step time, one variant at a time, each result written as soon as it exists.

    python benchmarks/step_time.py --model resnet50 --batch 256 \
        --variants "bf16,ui8-bf16 never" --steps 30 --out step.md

For a GPU window where a compile or a kernel may eat the time: each variant
is built, compiled once (``jit(...).lower(...).compile()``; the compiled
executable is what is timed, so nothing compiles twice), warmed up, timed
and then printed and appended to ``--out`` before the next variant is even
built. Variants are ``benchmarks/train_step.py``'s ``STEP_SPECS`` labels
without a measuring step: the float modes and the ``"... never"`` UI8 steps
(``set_measure_mode(model, "never")``, the step a loop runs between
measurements). Instead of a measuring step (a second, periodic compile),
the stored ranges and clips are seeded (``--seed-act``, ``--seed-clip``):
the integer kernels' speed does not depend on the values, and the loss is
printed so a non-finite run is visible.

Timing: ``jax.block_until_ready`` on the whole step output (state and loss)
after every call; ``--warmup`` calls first, then the median (and min/max) of
``--steps`` calls. After the last variant, if both are present, the ratio in
benchmarks/RESULTS.md's words: ``UI8-bf16 (non-measuring step) vs bf16:
X.XXx.``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import int8jax  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402
from examples import models  # noqa: E402
from examples.config import BACKEND_CHOICES, backend_from_cli  # noqa: E402
from int8jax import modes  # noqa: E402
from int8jax.nn import quant_layers, set_measure_mode  # noqa: E402

#: Variants this script times: no measuring branch in the compiled step.
VARIANTS = tuple(k for k, (_, _, measure) in ts.STEP_SPECS.items() if measure in (None, "never"))


def seed_quant_state(model, act: float, clip: float) -> int:
  """Stores ``act`` as every quantized layer's activation range and ``clip``
  as its gradient clip (what a measuring step would leave), so a "never"
  step needs no measuring step before it. Returns the number of layers."""
  layers = quant_layers(model)
  for _, m in layers:
    m.act_range[...] = jnp.full_like(m.act_range[...], act)
    state = m.grad_quant.state.replace(
        clip=jnp.float32(clip), clip_ratio=jnp.float32(1.0),
        grad_absmax=jnp.float32(clip), measurements=jnp.float32(1.0))
    m.grad_quant[...] = state.pack()
  return len(layers)


def build(name: str, label: str, batch: int, act: float, clip: float):
  """(compiled step, state, x, y, memory stats, compile seconds) of one variant."""
  mode_name, period, measure = ts.STEP_SPECS[label]
  kw, side, classes = ts.MODELS[name]
  mode = modes.get(mode_name)
  model = models.create_model(name, num_classes=classes, dtype=mode.dtype, rngs=nnx.Rngs(0),
                              **kw)
  if mode.quantized:
    int8jax.nn.quantize_model(model, ts.qconfig(mode_name, period=period, measure_early=False,
                                                clip_warmup=False), rngs=nnx.Rngs(1))
    seed_quant_state(model, act, clip)
    set_measure_mode(model, measure)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, 3)).astype(mode.compute_dtype)
  y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
  import optax
  step, state, _ = ts._make_step(model, mode, optax.sgd(0.05, momentum=0.9))
  t = time.perf_counter()
  compiled = step.lower(state, x, y).compile()
  return compiled, state, x, y, compiled.memory_analysis(), time.perf_counter() - t


def time_steps(compiled, state, x, y, warmup: int, steps: int):
  """(median, min, max seconds, last loss) of ``steps`` synchronised calls."""
  for _ in range(warmup):
    state, loss = jax.block_until_ready(compiled(state, x, y))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, loss = jax.block_until_ready(compiled(state, x, y))
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times), max(times), float(loss)


def emit(line: str, out: str | None) -> None:
  print(line, flush=True)
  if out:
    with open(out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet50", choices=sorted(ts.MODELS))
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--variants", default="bf16,ui8-bf16 never",
                 help=f"comma list, timed in this order, of {', '.join(VARIANTS)}")
  p.add_argument("--steps", type=int, default=30, help="timed calls per variant (median)")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls after the compile")
  p.add_argument("--seed-act", type=float, default=4.0,
                 help="activation range stored in every quantized layer (max|x|)")
  p.add_argument("--seed-clip", type=float, default=1e-3,
                 help="gradient clip stored in every quantized layer")
  p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                 help="QuantConfig.backend of the UI8 variants (auto: Pallas on Hopper, else XLA)")
  p.add_argument("--out", default=None, help="markdown file to append each result to")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  bad = [v for v in variants if v not in VARIANTS]
  if bad or not variants:
    p.error(f"--variants: unknown or none {bad or variants}; choose from {list(VARIANTS)}")
  for opt in ("batch", "steps"):
    if getattr(args, opt) < 1:
      p.error(f"--{opt} must be >= 1, got {getattr(args, opt)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  for opt in ("seed_act", "seed_clip"):
    if not getattr(args, opt) > 0:
      p.error(f"--{opt.replace('_', '-')} must be > 0, got {getattr(args, opt)}")
  ts.BACKEND = backend_from_cli(args.backend)
  from int8jax.backends import pallas as pallas_backend
  emit(f"\n### {args.model} training step, batch {args.batch}, one variant at a time "
       f"({ts.machine()})\n\n{datetime.date.today().isoformat()}; {ts.versions()}; backend "
       f"{int8jax.backends.resolve(ts.BACKEND)}; implicit-GEMM convs "
       f"{'on' if all(pallas_backend.IMPLICIT_GEMM.values()) else 'OFF'} "
       f"(INT8JAX_IMPLICIT_GEMM={os.environ.get('INT8JAX_IMPLICIT_GEMM', 'unset')}); "
       f"direct-addressing convs {'ON' if any(pallas_backend.DIRECT_CONV.values()) else 'off'} "
       f"(INT8JAX_DIRECT_CONV={os.environ.get('INT8JAX_DIRECT_CONV', 'unset')}); median of "
       f"{args.steps} device-synchronised steps after {args.warmup} warm-up steps; stored "
       f"ranges/clips seeded (no measuring step compiled); "
       f"`python benchmarks/step_time.py {' '.join(argv if argv is not None else sys.argv[1:])}`."
       "\n\n| variant | ms / step (median) | min / max ms | compile s | step temporaries MiB "
       "| arguments MiB | last loss |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
       args.out)
  times, rc = {}, 0
  for label in variants:
    try:
      compiled, state, x, y, mem, t_compile = build(args.model, label, args.batch,
                                                    args.seed_act, args.seed_clip)
      med, lo, hi, loss = time_steps(compiled, state, x, y, args.warmup, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      rc = 1
      first = str(e).splitlines()[0][:200] if str(e) else ""
      emit(f"| {label} | failed: {type(e).__name__}: {first}"
           " | | | | | |", args.out)
      continue
    times[label] = med
    emit(f"| {label} | {med * 1e3:.1f} | {lo * 1e3:.1f} / {hi * 1e3:.1f} | {t_compile:.1f} "
         f"| {mem.temp_size_in_bytes / 2**20:.1f} | {mem.argument_size_in_bytes / 2**20:.1f} "
         f"| {loss:.4g} |", args.out)
  for fam, base in (("ui8-bf16", "bf16"), ("ui8", "float32")):
    if f"{fam} never" in times and base in times:
      emit(f"\n{fam.upper()} (non-measuring step, {args.model} batch {args.batch}) vs {base}: "
           f"{times[f'{fam} never'] / times[base]:.2f}x.", args.out)
  return rc


if __name__ == "__main__":
  sys.exit(main())
