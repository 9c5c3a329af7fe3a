"""Figures of the paper's gradient-distribution claims (Zhu et al. 2020, §3).

Trains the small UI8 nets of ``benchmarks/accuracy.py`` on the MNIST subset
and captures, with :func:`int8jax.diagnostics.capture_tensors`, each quantized
layer's output gradient g, input x and weight w at several steps. Writes PNGs
to ``docs/figures/`` (or ``--out``) and prints the numbers behind them:

* ``dist_g_x_w.png`` -- one layer's g vs x vs w (histogram of
  ``log10(|v| / max|v|)``; kurtosis in the legend);
* ``dist_g_training.png`` -- that layer's g at several points in training;
* ``dist_g_depth.png`` -- g across depth (ResNet), with kurtosis and the share
  of entries below one int8 step per layer;
* ``dist_g_dw_pw.png`` -- depthwise vs pointwise convs (MobileNetV2-style);
* ``cosine_distance.png`` -- per layer, the cosine distance between g and its
  int8 version with the clip at ``max|g|`` (naive) vs the clip UI8 learned,
  and, when ``accuracy_results.json`` exists, d over training per variant.

Usage::

    python benchmarks/plots.py            # ~3-4 min on a 2-core CPU (or python -m benchmarks.plots)
    python benchmarks/plots.py --scale 4  # wider nets / longer (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks`, `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import accuracy as acc  # noqa: E402  (settings, data, training loop)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import int8jax  # noqa: E402
from int8jax import diagnostics as dg  # noqa: E402

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CENTERS = 0.5 * (dg.LOG_BINS[1:] + dg.LOG_BINS[:-1])


def trace(setting, data, steps, seed=0, mode="ui8"):
  """Trains ``setting`` in ``mode`` and captures every quantized layer at ``steps``."""
  xtr, ytr = data[0][:setting.batch_size], data[1][:setting.batch_size]  # fixed batch

  def loss_fn(m, x, y):
    return acc._ce(m(x), y)  # pylint: disable=protected-access

  snaps = {}

  def hook(step, model):
    snaps[step] = {"tensors": dg.capture_tensors(model, loss_fn, jnp.asarray(xtr),
                                                 jnp.asarray(ytr)),
                   "stats": dg.layer_stats(model)}

  total = int(round(setting.epochs * (len(data[0]) // setting.batch_size)))
  steps = sorted({min(s, total) for s in steps})
  r = acc.run_one(setting, mode, seed, data, hook=hook, hook_steps=set(steps))
  return snaps, r


def _hist(ax, v, label, **kw):
  d = dg.distribution(v)
  ax.plot(CENTERS, d.hist, label=f"{label} (kurt {d.kurtosis:.1f}, <1 step {d.below_step:.0%})",
          **kw)
  return d


def _style(ax, title):
  ax.set_xlabel("log10(|v| / max|v|)")
  ax.set_ylabel("fraction of nonzero entries")
  ax.axvline(np.log10(1 / 254), color="gray", ls=":", lw=0.8)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)


def _naive_vs_learned(g, clip, key):
  """Cosine distance of g's int8 version: clip at max|g| vs ``clip`` (stochastic)."""
  g = jnp.asarray(g)
  m = jnp.max(jnp.abs(g))
  d_max = int8jax.cosine_distance(g, int8jax.fake_quantize(g, m, rounding="stochastic", key=key))
  d_l = int8jax.cosine_distance(g, int8jax.fake_quantize(g, clip, rounding="stochastic", key=key))
  return float(d_max), float(d_l)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--out", default=os.path.join(acc.ROOT, "docs", "figures"))
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  t0 = time.time()
  grid = {s.name: s for s in acc.settings(a.scale)}
  data = acc.load_data("mnist")
  lines = []

  # ---- ResNet on MNIST: g vs x vs w, over training, across depth.
  res = grid["mnist-resnet-b32"]
  spe = len(data[0]) // res.batch_size
  total = int(round(res.epochs * spe))
  steps = [0, total // 6, total // 2, total]
  snaps, run = trace(res, data, steps)
  steps = sorted(snaps)
  last = snaps[steps[-1]]["tensors"]
  names = list(last)
  layer = names[0]  # shallowest quantized conv
  t = last[layer]
  fig, ax = plt.subplots(figsize=(6, 4))
  for v, lab in ((t.g, "gradient g"), (t.x, "input x"), (t.w, "weight w")):
    d = _hist(ax, v, lab)
    lines.append(f"g/x/w  {res.name} {layer} step {steps[-1]}: {lab:10s} "
                 f"kurtosis {d.kurtosis:8.2f} "
                 f"below-one-step {d.below_step:.3f} zeros {d.zero_fraction:.3f}")
  _style(ax, f"{res.name}, layer {layer}, step {steps[-1]} (UI8 training)")
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "dist_g_x_w.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for i, s in enumerate(steps):
    d = _hist(ax, snaps[s]["tensors"][layer].g, f"step {s}",
              color=plt.cm.viridis(i / max(len(steps) - 1, 1)))
    lines.append(f"train  {res.name} {layer} g at step {s:4d}: kurtosis {d.kurtosis:8.2f} "
                 f"below-one-step {d.below_step:.3f}")
  _style(ax, f"{res.name}, layer {layer}: gradient during training")
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "dist_g_training.png"), dpi=110)
  plt.close(fig)

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ordered = sorted(last.items(), key=lambda kv: kv[1].index)
  kurts, below = [], []
  for path, lt in ordered:
    d = _hist(ax, lt.g, path, color=plt.cm.plasma(lt.index / max(len(ordered) - 1, 1)), lw=1)
    kurts.append(d.kurtosis)
    below.append(d.below_step)
    lines.append(f"depth  {res.name} #{lt.index:2d} {path:22s} g kurtosis {d.kurtosis:8.2f} "
                 f"below-one-step {d.below_step:.3f}")
  _style(ax, f"{res.name}: gradient across depth (step {steps[-1]})")
  ax.legend(fontsize=5)
  idx = np.arange(len(ordered))
  ax2.plot(idx, kurts, "o-", label="kurtosis of g")
  ax2.set_yscale("log")
  ax2.set_xlabel("quantized layer (depth order)")
  ax2.set_ylabel("kurtosis of g")
  ax3 = ax2.twinx()
  ax3.plot(idx, below, "s--", color="C1", label="share below one int8 step")
  ax3.set_ylabel("share of g below max|g|/254")
  ax2.set_title("sharpness per layer", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "dist_g_depth.png"), dpi=110)
  plt.close(fig)

  # Naive (max|g|) vs learned clip: cosine distance per layer on the captured g.
  key = jax.random.key(0)
  dnaive, dlearn = [], []
  stats = snaps[steps[-1]]["stats"]
  for path, lt in ordered:
    dm, dl = _naive_vs_learned(lt.g, stats[path]["clip_ratio"] * np.abs(lt.g).max(), key)
    dnaive.append(dm)
    dlearn.append(dl)
    lines.append(f"clip   {res.name} {path:22s} d(clip=max|g|) {dm:.5f}  d(learned clip, "
                 f"ratio {stats[path]['clip_ratio']:.3f}) {dl:.5f}")

  # ---- MobileNetV2-style on MNIST: depthwise vs pointwise.
  mob = grid["mnist-mobilenet-b32"]
  total_m = int(round(mob.epochs * spe))
  msnaps, _ = trace(mob, data, [total_m])
  mt = msnaps[max(msnaps)]["tensors"]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  by_kind = {"depthwise": [], "conv": []}
  for path, lt in sorted(mt.items(), key=lambda kv: kv[1].index):
    if lt.kind not in by_kind:
      continue
    d = dg.distribution(lt.g)
    by_kind[lt.kind].append((lt.index, d))
    lines.append(f"dw/pw  {mob.name} #{lt.index:2d} {path:22s} {lt.kind:9s} g kurtosis "
                 f"{d.kurtosis:8.2f} below-one-step {d.below_step:.3f}")
  for kind, col, lab in (("depthwise", "C3", "depthwise 3x3"), ("conv", "C0", "pointwise 1x1")):
    for j, (i, d) in enumerate(by_kind[kind]):
      ax.plot(CENTERS, d.hist, color=col, alpha=0.5, lw=0.8, label=lab if j == 0 else None)
    ax2.plot([i for i, _ in by_kind[kind]], [d.kurtosis for _, d in by_kind[kind]], "o",
             color=col, label=lab)
    if by_kind[kind]:
      lines.append(f"dw/pw  {mob.name} median kurtosis {kind:9s} "
                   f"{np.median([d.kurtosis for _, d in by_kind[kind]]):.2f}, median "
                   f"below-one-step {np.median([d.below_step for _, d in by_kind[kind]]):.3f}")
  _style(ax, f"{mob.name}: gradient of depthwise vs pointwise convs (step {max(msnaps)})")
  ax2.set_yscale("log")
  ax2.set_xlabel("quantized layer (depth order)")
  ax2.set_ylabel("kurtosis of g")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "dist_g_dw_pw.png"), dpi=110)
  plt.close(fig)

  # ---- cosine distance: naive vs learned clip (captured g), and over training.
  res_json = os.path.join(a.out, "accuracy_results.json")
  have = os.path.exists(res_json)
  fig, axes = plt.subplots(1, 2 if have else 1, figsize=(11 if have else 6, 4), squeeze=False)
  ax = axes[0, 0]
  ax.plot(idx, dnaive, "o-", label="clip = max|g| (naive)")
  ax.plot(idx, dlearn, "s-", label="clip learned by UI8")
  ax.set_yscale("log")
  ax.set_xlabel("quantized layer (depth order)")
  ax.set_ylabel("cosine distance d(g, int8 g)")
  ax.set_title(f"{res.name}, step {steps[-1]}, stochastic rounding", fontsize=9)
  ax.legend(fontsize=7)
  if have:
    with open(res_json) as f:
      rj = json.load(f)["results"]
    ax = axes[0, 1]
    for r in rj:
      if r["seed"] != 0 or not r["cosine_distance_by_epoch"]:
        continue
      if r["mode"] not in ("ui8", "naive"):
        continue
      ep = r["cosine_distance_by_epoch"]
      mean_d = [np.mean([v for k, v in e.items() if k != "step"]) for e in ep]
      ax.plot([e["step"] for e in ep], mean_d, "o-" if r["mode"] == "ui8" else "x--",
              label=f"{r['setting']} {r['mode']}", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean d over quantized layers")
    ax.set_title("measured d during training (seed 0)", fontsize=9)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "cosine_distance.png"), dpi=110)
  plt.close(fig)

  lines.append(f"plots: total {time.time() - t0:.0f} s; figures in {a.out}")
  text = "\n".join(lines)
  with open(os.path.join(a.out, "plots_numbers.txt"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
