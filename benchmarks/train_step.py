"""Speed and memory of UI8 training against float: per conv layer and per step.

    .venv/bin/python benchmarks/train_step.py            # full run, writes RESULTS.md
    .venv/bin/python benchmarks/train_step.py --quick    # fewer repeats, prints only
    .venv/bin/python benchmarks/train_step.py --models resnet20 --ops resnet20

Per layer (``--ops``): for each distinct quantized conv of ResNet-20 (CIFAR
shapes) and ResNet-50 (ImageNet 224x224, v1.5: stride on the 3x3), a jitted
forward and a jitted forward + backward (gradients w.r.t. input and kernel) of
``flax.nnx.Conv`` (float32; bfloat16 too on a GPU) and of
``int8jax.nn.QuantConv`` (default backend: XLA on CPU, Pallas on a Hopper
GPU) on a non-measuring step and on a measuring step. Forward, backward (the
VJP alone, on residuals computed beforehand) and forward + backward are
separate jitted programs whose arrays are all arguments (a closed-over
batch-256 gradient was constant-folded by XLA, 55.8 s, 2026-11-26).

Per training step (``--models``): ResNet-20 (batch 128, 32x32x3) and
ResNet-50 (224x224x3; batch 256 on a GPU, 16 on a CPU) with SGD + momentum:
float32, bfloat16 compute (GPU only unless ``--bf16``), UI8 with period 1
(measures every step), UI8 on a non-measuring step, and naive INT8 (clip at
``max|g|`` every step, no LR scaling). First conv and classifier stay float
(``int8jax.nn.quantize_model``'s default, as in the paper). The amortised UI8
time for the default period P is ``((P - 1) * t_non_measure + t_measure) / P``.

Timing: ``jax.block_until_ready`` after each call, after compilation and two
warm-up calls; the median of ``--repeats`` calls. All variants of a table run
in the same process, interleaved round by round, so they see the same load.

Memory: XLA's buffer assignment of the compiled step
(``compiled.memory_analysis()``): temporaries (activations kept for the
backward pass plus scratch; on CPU XLA allocates them afresh every call, so
they cost page faults too) and arguments (parameters, optimizer and
quantization state, the batch).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import int8jax  # noqa: E402
from examples import models  # noqa: E402
from examples.config import BACKEND_CHOICES, backend_from_cli  # noqa: E402
from examples.steps import update_step  # noqa: E402
from int8jax import modes  # noqa: E402
from int8jax.nn import TRAINABLE, QuantConv  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def markers(block: str = "") -> tuple[str, str]:
  """RESULTS.md block of this platform (CPU and GPU tables live side by side;
  ``--block NAME`` keeps one more block per platform, e.g. steps and layers
  written by separate time-limited invocations)."""
  tag = "" if jax.default_backend() == "cpu" else f" ({jax.default_backend()})"
  tag += f" [{block}]" if block else ""
  return f"<!-- train_step.py{tag}: begin -->", f"<!-- train_step.py{tag}: end -->"

MODELS = {
    # name: (constructor kwargs, input side, classes)
    "resnet20": (dict(), 32, 10),
    "resnet50": (dict(), 224, 1000),
    "mobilenet_v2": (dict(), 224, 1000),
}


# QuantConfig.backend of every UI8 variant (--backend): None = the best
# available (Pallas kernels on a Hopper GPU, XLA elsewhere).
BACKEND: str | None = None


def qconfig(mode: str = "ui8", **kw) -> int8jax.QuantConfig:
  """``mode``'s layer config (``int8jax.modes``) on the chosen backend."""
  return modes.get(mode).quant_config(backend=BACKEND, **kw)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def machine() -> str:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return dev.device_kind
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.*)", f.read())
      cpu = m.group(1) if m else cpu
  except OSError:
    pass
  return f"CPU: {cpu}, {os.cpu_count()} cores"


def versions() -> str:
  import flax
  import jaxlib
  return (f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
          f"optax {optax.__version__}, Python {platform.python_version()}")


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


# ---------------------------------------------------------------------------
# The distinct quantized convs of a model, read off the model itself.


@contextlib.contextmanager
def _record_convs(out: list):
  """Record (input shape, kernel shape, strides, padding) of QuantConv calls."""
  orig = QuantConv.conv_general_dilated

  def rec(self, lhs, rhs, window_strides, padding, *a, **kw):
    out.append((tuple(lhs.shape), tuple(rhs.shape), tuple(window_strides), padding))
    return orig(self, lhs, rhs, window_strides, padding, *a, **kw)
  QuantConv.conv_general_dilated = rec
  try:
    yield
  finally:
    QuantConv.conv_general_dilated = orig


def distinct_convs(name: str) -> list[tuple]:
  """``(label, H, W, C_in, C_out, k, stride, padding)`` of every distinct
  quantized conv of ``name`` (input batch 1), in call order."""
  kw, side, classes = MODELS[name]
  model = models.create_model(name, num_classes=classes, rngs=nnx.Rngs(0), **kw)
  int8jax.nn.quantize_model(model, int8jax.QuantConfig(), rngs=nnx.Rngs(1))
  calls: list = []
  with _record_convs(calls):
    jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, side, side, 3),
                                                                   jnp.float32))
  seen, out = set(), []
  for lhs, rhs, strides, padding in calls:
    key = (lhs[1:], rhs, strides, str(padding))
    if key in seen:
      continue
    seen.add(key)
    k, cin, cout = rhs[0], rhs[2], rhs[3]
    s = strides[0]
    label = f"{k}x{k} {cin}->{cout}" + (f" /{s}" if s > 1 else "") + f" @{lhs[1]}"
    out.append((label, lhs[1], lhs[2], cin, cout, k, s, padding))
  return out


# ---------------------------------------------------------------------------
# Per layer.


def bench_ops(name: str, batch: int, repeats: int, bf16: bool,
              kernels: tuple[int, ...] | None = None) -> list[dict]:
  rows = []
  for label, h, w, cin, cout, k, s, padding in distinct_convs(name):
    if kernels and k not in kernels:
      continue
    x = jax.random.normal(jax.random.key(0), (batch, h, w, cin))
    conv_kw = dict(strides=s, padding=padding, use_bias=False)
    fl = nnx.Conv(cin, cout, (k, k), rngs=nnx.Rngs(0), **conv_kw)
    gy = jax.random.normal(jax.random.key(1), jax.eval_shape(fl, x).shape)

    def quant_conv(period):
      qc = QuantConv(cin, cout, (k, k),
                     config=qconfig(period=period, measure_early=False, clip_warmup=False),
                     rngs=nnx.Rngs(0), **conv_kw)
      qc(x)  # first call measures; with a huge period later calls do not
      return qc

    def programs(module, wrt, xin, g):
      """(forward, backward, forward + backward) zero-argument timers. Every
      array (input, gradient, state) is an argument of its jitted program,
      never a closed-over constant (XLA would fold a constant batch-256
      gradient at compile time); the backward program is the VJP alone on
      residuals computed beforehand, timed by itself."""
      graphdef, diff, rest = nnx.split(module, wrt, ...)

      def apply(diff, rest, x):
        return nnx.merge(graphdef, diff, rest, copy=True)(x)

      def vjp(diff, rest, x):
        return jax.vjp(lambda d, x: apply(d, rest, x), diff, x)

      fwd = jax.jit(apply)
      bwd = jax.jit(lambda vjp_fn, g: vjp_fn(g))
      fwd_bwd = jax.jit(lambda diff, rest, x, g: vjp(diff, rest, x)[1](g))
      _, vjp_fn = jax.block_until_ready(jax.jit(vjp)(diff, rest, xin))
      return ((lambda: fwd(diff, rest, xin)), (lambda: bwd(vjp_fn, g)),
              (lambda: fwd_bwd(diff, rest, xin, g)))

    variants = {"float32": programs(fl, nnx.Param, x, gy),
                "ui8": programs(quant_conv(10**9), TRAINABLE, x, gy)}
    if bf16:
      fb = nnx.Conv(cin, cout, (k, k), dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **conv_kw)
      variants["bf16"] = programs(fb, nnx.Param, x.astype(jnp.bfloat16),
                                  gy.astype(jnp.bfloat16))
    fns = {}
    for v, (f, b, fb_) in variants.items():
      fns[f"{v} fwd"], fns[f"{v} bwd"], fns[f"{v} fwd+bwd"] = f, b, fb_
    row = dict(name=label, shape=f"{batch}x{h}x{w}x{cin}")
    try:
      fns["ui8 measure fwd+bwd"] = programs(quant_conv(1), TRAINABLE, x, gy)[2]
      t = timed_rounds(fns, repeats)
    except Exception as e:  # reported in the table, not fatal
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      rows.append(row)
      print(f"  {name} {label} FAILED: {row['error']}", flush=True)
      continue
    for v in variants:
      row[f"{v} fwd"] = t[f"{v} fwd"]
      row[f"{v} bwd"] = t[f"{v} bwd"]
      row[f"{v} total"] = t[f"{v} fwd+bwd"]
    row["ui8 measure total"] = t["ui8 measure fwd+bwd"]
    rows.append(row)
    print(f"  {name} {label}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items()
                                           if isinstance(v, float)), flush=True)
  return rows


# ---------------------------------------------------------------------------
# Per training step.


def _loss(m, x, y):
  logits = m(x).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _make_step(model, mode: modes.Mode, base):
  opt = nnx.Optimizer(model, mode.optimizer(base), wrt=mode.wrt)
  graph, state = nnx.split((model, opt))
  return jax.jit(update_step(graph, _loss, mode.wrt)), state, graph


# label: (mode of int8jax.modes, measure period, measure mode of the layers).
# "non-measure": the periodic (lax.cond) step on a step that does not measure;
# "never": the step a loop compiles for its non-measure steps with
# set_measure_mode(model, "never") -- no measuring cond, the gradient's
# quantization fused into the fusion that produces it (docs/design.md §4);
# "clip warm-up": a non-measuring step of the first period with
# QuantConfig.clip_warmup (each step's max|g| is reduced for the clip).
STEP_SPECS = {
    "float32": ("float32", None, None),
    "bf16": ("bf16", None, None),
    "ui8 period 1": ("ui8", 1, "periodic"),
    "ui8 non-measure": ("ui8", 1_000_000, "periodic"),
    "ui8 clip warm-up": ("ui8", 1_000_000, "warm-up"),
    "ui8 never": ("ui8", 1_000_000, "never"),
    "ui8-bf16 period 1": ("ui8-bf16", 1, "periodic"),
    "ui8-bf16 never": ("ui8-bf16", 1_000_000, "never"),
    "naive int8": ("naive", 1_000_000, "periodic"),
}
STEP_VARIANTS = tuple(STEP_SPECS)


def bench_train(name: str, batch: int, repeats: int, bf16: bool,
                only: tuple[str, ...] = STEP_VARIANTS):
  kw, side, classes = MODELS[name]
  x = jax.random.normal(jax.random.key(0), (batch, side, side, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
  sgd = optax.sgd(0.05, momentum=0.9)
  memory = {}

  def variant(label, mode_name, period, measure_mode):
    mode = modes.get(mode_name)
    model = models.create_model(name, num_classes=classes, dtype=mode.dtype, rngs=nnx.Rngs(0),
                                **kw)
    if mode.quantized:
      # measure_early off (and clip_warmup, except in "warm-up"): a "period
      # 1e6" variant measures on call 0 only and then uses the cached clip
      int8jax.nn.quantize_model(model, qconfig(mode_name, period=period, measure_early=False,
                                               clip_warmup=measure_mode == "warm-up"),
                                rngs=nnx.Rngs(1))
    step, state, graph = _make_step(model, mode, sgd)
    xin = x.astype(mode.compute_dtype)
    if measure_mode == "never":
      # one measuring step first (ranges and clips stored), then the step
      # compiled without any measuring branch
      state, _ = step(state, xin, y)
      model, opt = nnx.merge(graph, state)
      int8jax.nn.set_measure_mode(model, "never")
      graph, state = nnx.split((model, opt))
      step = jax.jit(update_step(graph, _loss, mode.wrt))
    stats = step.lower(state, xin, y).compile().memory_analysis()
    memory[label] = (stats.temp_size_in_bytes, stats.argument_size_in_bytes)
    state, _ = step(state, xin, y)  # one step: caches ranges, learns a clip
    holder = {"state": state}

    def run():
      holder["state"], loss = step(holder["state"], xin, y)
      return loss
    return run

  fns, failed = {}, {}
  for label, spec in STEP_SPECS.items():
    if label not in only or (STEP_SPECS[label][0].endswith("bf16") and not bf16):
      continue
    try:
      fns[label] = variant(label, *spec)
    except Exception as e:  # a variant that does not compile is reported, not fatal
      failed[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      print(f"  {name} {label} FAILED: {failed[label]}", flush=True)
  t = timed_rounds(fns, repeats)
  print(f"  {name} step: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()), flush=True)
  return t, memory, failed


# ---------------------------------------------------------------------------
# Report.


def ops_table(name: str, batch: int, rows: list[dict], bf16: bool) -> list[str]:
  base = "bf16" if bf16 else "float32"
  cols = ["float32"] + (["bf16"] if bf16 else [])
  head = ["layer", "input"] + [f"{c} fwd / bwd ms" for c in cols] + [
      "UI8 fwd / bwd ms", f"UI8 fwd speed-up vs {base}", f"UI8 bwd speed-up vs {base}",
      "UI8 measure step fwd+bwd ms"]
  lines = [f"{name}: QuantConv vs nnx.Conv, forward and backward, batch {batch}:", "",
           "| " + " | ".join(head) + " |",
           "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
  tot = {k: 0.0 for k in ("bf", "bb", "uf", "ub")}
  for r in rows:
    cells = [r["name"], r["shape"]]
    if "error" in r:
      failed = [f"failed: {r['error']}"] + [""] * (len(head) - 3)
      lines.append("| " + " | ".join(cells + failed) + " |")
      continue
    for c in cols:
      cells.append(f"{r[f'{c} fwd'] * 1e3:.1f} / {r[f'{c} bwd'] * 1e3:.1f}")
    cells.append(f"{r['ui8 fwd'] * 1e3:.1f} / {r['ui8 bwd'] * 1e3:.1f}")
    sf = r[f"{base} fwd"] / r["ui8 fwd"]
    sb = r[f"{base} bwd"] / r["ui8 bwd"] if r["ui8 bwd"] > 0 else float("nan")
    cells += [f"{sf:.2f}x", f"{sb:.2f}x", f"{r['ui8 measure total'] * 1e3:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
    tot["bf"] += r[f"{base} fwd"]
    tot["bb"] += r[f"{base} bwd"]
    tot["uf"] += r["ui8 fwd"]
    tot["ub"] += r["ui8 bwd"]
  if tot["uf"] > 0 and tot["ub"] > 0:
    cells = ["all layers above (one each)", ""] + [""] * len(cols) + [
        f"{tot['uf'] * 1e3:.1f} / {tot['ub'] * 1e3:.1f}", f"{tot['bf'] / tot['uf']:.2f}x",
        f"{tot['bb'] / tot['ub']:.2f}x", ""]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def train_table(name: str, batch: int, t: dict, memory: dict, failed: dict) -> list[str]:
  period = int8jax.QuantConfig().period
  base = t.get("float32")
  kw, side, _ = MODELS[name]
  lines = [f"{name} training step (batch {batch}, {side}x{side}x3, SGD momentum):", "",
           "| variant | ms / step | vs float32 | step temporaries MiB | arguments MiB |",
           "| --- | ---: | ---: | ---: | ---: |"]
  mib = lambda b: b / 2**20
  rel = lambda v: f"{v / base:.2f}x" if base else ""
  for k in t:
    tmp, arg = memory[k]
    lines.append(f"| {k} | {t[k] * 1e3:.0f} | {rel(t[k])} | {mib(tmp):.1f} | {mib(arg):.1f} |")
  for k, why in failed.items():
    lines.append(f"| {k} | failed: {why} | | | |")
  for fam, base_name in (("ui8", "float32"), ("ui8-bf16", "bf16")):
    # amortised over the default period: (P - 1) non-measuring steps (the
    # split-compiled "never" step when timed, else the periodic one) + 1
    # measuring step
    rest = t.get(f"{fam} never", t.get(f"{fam} non-measure"))
    if rest is None or f"{fam} period 1" not in t:
      continue
    amort = ((period - 1) * rest + t[f"{fam} period 1"]) / period
    lines.append(f"| {fam} period {period} (amortised) | {amort * 1e3:.0f} | {rel(amort)} | | |")
    if base_name in t and base_name != "float32":
      lines.append(f"\n{fam} (period {period}, amortised) vs {base_name}: "
                   f"{amort / t[base_name]:.2f}x.")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=None,
                 help="timed calls per variant (default 15 per layer, 10 per step)")
  p.add_argument("--models", default="resnet20,resnet50",
                 help=f"training steps to time (comma list of {','.join(MODELS)}; '' for none)")
  p.add_argument("--ops", default="resnet20,resnet50",
                 help="models whose distinct convs to time per layer ('' for none)")
  p.add_argument("--batch20", type=int, default=128, help="ResNet-20 batch (steps and layers)")
  p.add_argument("--batch50", type=int, default=None,
                 help="ResNet-50 step batch (default 256 on GPU, 16 on CPU)")
  p.add_argument("--ops-batch50", type=int, default=None,
                 help="ResNet-50 per-layer batch (default 256 on GPU, 8 on CPU)")
  p.add_argument("--bf16", action="store_true", help="also time bf16 on CPU (always on GPU)")
  p.add_argument("--quick", action="store_true", help="5 repeats; print, do not write RESULTS.md")
  p.add_argument("--step-variants", default=",".join(STEP_VARIANTS),
                 help=f"training-step variants to time (comma list of {', '.join(STEP_VARIANTS)})")
  p.add_argument("--ops-kernels", default="",
                 help="per-layer table: only convs of these kernel sizes (e.g. '3'; default all)")
  p.add_argument("--block", default="",
                 help="name of the RESULTS.md block to (re)write (default: the platform's one)")
  p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                 help="QuantConfig.backend of the UI8 variants (int8jax.BACKEND_NAMES; auto: "
                 "the library's best available, Pallas on Hopper, else XLA)")
  args = p.parse_args(argv)
  global BACKEND
  BACKEND = backend_from_cli(args.backend)
  args.step_variants = tuple(v.strip() for v in args.step_variants.split(",") if v.strip())
  bad = [v for v in args.step_variants if v not in STEP_VARIANTS]
  if bad:
    p.error(f"--step-variants: unknown {bad}; choose from {list(STEP_VARIANTS)}")
  try:
    kernels = tuple(int(k) for k in args.ops_kernels.split(",") if k.strip())
  except ValueError:
    p.error(f"--ops-kernels: expected kernel sizes like '1,3', got {args.ops_kernels!r}")
  for opt in ("models", "ops"):
    names = [n for n in getattr(args, opt).split(",") if n]
    bad = [n for n in names if n not in MODELS]
    if bad:
      p.error(f"--{opt}: unknown model(s) {bad}; choose from {sorted(MODELS)}")
    setattr(args, opt, names)
  gpu = on_gpu()
  bf16 = gpu or args.bf16
  batch = {"resnet20": args.batch20,
           "resnet50": args.batch50 or (256 if gpu else 16),
           "mobilenet_v2": args.batch50 or (256 if gpu else 16)}
  ops_batch = {"resnet20": args.batch20,
               "resnet50": args.ops_batch50 or (256 if gpu else 8),
               "mobilenet_v2": args.ops_batch50 or (256 if gpu else 8)}
  rep_ops = 5 if args.quick else (args.repeats or 15)
  rep_step = 5 if args.quick else (args.repeats or 10)

  load_before = os.getloadavg()[0]
  sections = []
  # Steps first, then layers; RESULTS.md is rewritten after every section, so a
  # run cut short (a time-limited GPU lease) still leaves what it measured.
  for name in args.models:
    t, memory, failed = bench_train(name, batch[name], rep_step, bf16, args.step_variants)
    sections.append(train_table(name, batch[name], t, memory, failed))
    report(sections, args, argv, load_before, rep_ops, rep_step)
  for name in args.ops:
    rows = bench_ops(name, ops_batch[name], rep_ops, bf16, kernels)
    sections.append(ops_table(name, ops_batch[name], rows, bf16))
    report(sections, args, argv, load_before, rep_ops, rep_step)


def report(sections, args, argv, load_before, rep_ops, rep_step):
  lines = [f"### UI8 vs float on {machine()}", "",
           f"{datetime.date.today().isoformat()}; {versions()}; backend "
           f"{int8jax.backends.resolve(BACKEND)}; median of {rep_ops} (layers) / {rep_step} "
           "(steps) "
           "timed calls after warm-up, variants interleaved; 1-min load average "
           f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
           "`python benchmarks/train_step.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`"
           .rstrip() + ".", ""]
  for s in sections:
    lines += s + [""]
  lines += ["Backward: the VJP alone (its own jitted program on residuals computed "
            "beforehand; input, gradient and state are arguments, not constants). "
            "Memory: XLA's buffer assignment "
            "for the compiled step (`compiled.memory_analysis()`): temporaries are "
            "activations kept for the backward pass plus scratch; arguments are "
            "parameters, optimizer and quantization state and the batch."]
  table = "\n".join(lines)
  print(table, flush=True)
  if not args.quick:
    begin, end = markers(args.block)
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    block = f"{begin}\n{table}\n{end}"
    if begin in text:
      text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: block, text, flags=re.S)
    else:
      text = text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, RESULTS)
    print(f"\nwritten to {RESULTS}", flush=True)


if __name__ == "__main__":
  main()
