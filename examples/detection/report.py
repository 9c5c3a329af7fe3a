"""Results of detection runs: a markdown table of every run, loss curves (PNG) and
the per-layer cosine distances of the quantized layers.

    python -m examples.detection.report runs/det/* --plot docs/figures/detection_loss.png \\
        --markdown docs/detection_results.md

Reads each run directory's ``summary.json`` and its TensorBoard events
(``train/loss``, ``eval/loss``, ``quant/<layer>/cosine_distance``), written
by :mod:`examples.detection.train`. Runs are grouped by ``mode``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import numpy as np

from examples.metrics import read_scalars

__all__ = ["read_scalars", "load_runs", "markdown", "plot", "main"]


def load_runs(dirs: list[str]) -> list[dict]:
  """Summaries (+ ``scalars``) of the run directories holding a ``summary.json``."""
  runs = []
  for d in dirs:
    p = os.path.join(d, "summary.json")
    if not os.path.isfile(p):
      print(f"skipping {d}: no summary.json (unfinished run?)")
      continue
    with open(p) as f:
      s = json.load(f)
    s["scalars"] = read_scalars(os.path.join(d, "tensorboard"))
    s["dir"] = d
    runs.append(s)
  return runs


def _mean_std(v):
  v = np.asarray(v, np.float64)
  return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def _s_per_step(r: dict) -> float:
  """Training seconds per step: the shared loop's images/s, or an older runner's field."""
  if r.get("images_per_s"):
    return r["batch_size"] / r["images_per_s"]
  return r.get("train_s_per_step") or float("nan")


def markdown(runs: list[dict]) -> str:
  """Every run, the per-mode mean +- std, and the per-layer cosine distances."""
  lines = ["| mode | seed | mAP@[.5:.95] | mAP@.5 | mAP@.75 | AR@100 | train loss | eval loss "
           "| steps | s/step (training) | wall time (all) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in sorted(runs, key=lambda r: (r["mode"], r["seed"])):
    lines.append(
        f"| {r['mode']} | {r['seed']} | {100 * r['eval_mAP']:.2f} | {100 * r['eval_mAP50']:.2f} | "
        f"{100 * r['eval_mAP75']:.2f} | {100 * r['eval_AR100']:.2f} | {r['train_loss']:.4f} | "
        f"{r['eval_loss']:.4f} | {r['steps']} | {_s_per_step(r):.3f} | "
        f"{r['wall_s'] / 60:.1f} min |")
  lines += ["", "| mode | runs | mAP@[.5:.95] mean ± std | mAP@.5 mean ± std |",
            "| --- | ---: | ---: | ---: |"]
  by_mode = defaultdict(list)
  for r in runs:
    by_mode[r["mode"]].append(r)
  for mode, rs in sorted(by_mode.items()):
    m, s = _mean_std([100 * r["eval_mAP"] for r in rs])
    m50, s50 = _mean_std([100 * r["eval_mAP50"] for r in rs])
    lines.append(f"| {mode} | {len(rs)} | {m:.2f} ± {s:.2f} | {m50:.2f} ± {s50:.2f} |")
  quant = [r for r in runs if r.get("quant_layers")]
  if quant:
    lines += ["", f"Per quantized layer, at the end of training (mean over the {len(quant)} "
              "quantized runs; `d` is the cosine distance between the layer's output gradient "
              "and its int8 version at the latest measurement, phi the error-sensitive LR "
              "coefficient):", "",
              "| layer | d mean | d min | d max | clip / max\\|g\\| | phi |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for path in quant[0]["quant_layers"]:
      vals = [r["quant_layers"][path] for r in quant if path in r["quant_layers"]]
      d = [v["cosine_distance"] for v in vals]
      lines.append(f"| `{path}` | {np.mean(d):.2e} | {min(d):.2e} | {max(d):.2e} | "
                   f"{np.mean([v['clip_ratio'] for v in vals]):.3f} | "
                   f"{np.mean([v['phi'] for v in vals]):.3f} |")
  return "\n".join(lines) + "\n"


def _group(path: str) -> str:
  if path.startswith("backbone"):
    return "backbone"
  if path.startswith("fpn"):
    return "fpn"
  return "heads"


def plot(runs: list[dict], out: str) -> None:
  """Training / eval loss of every run and cosine distance per layer group (UI8 runs)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  modes = sorted({r["mode"] for r in runs})
  colours = dict(zip(modes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  quant = [r for r in runs if r.get("quant_layers")]
  fig, axes = plt.subplots(1, 3 if quant else 2, figsize=(16 if quant else 11, 4.2))
  for r in sorted(runs, key=lambda r: (r["mode"], r["seed"])):
    for ax, tag in zip(axes[:2], ("train/loss", "train/cls_loss")):
      pts = r["scalars"].get(tag, [])
      if pts:
        s, v = zip(*pts)
        ax.plot(s, v, color=colours[r["mode"]], alpha=0.8, lw=1,
                label=f"{r['mode']} seed {r['seed']}")
    ev = r["scalars"].get("eval/loss", [])
    if ev:
      s, v = zip(*ev)
      axes[0].plot(s, v, "o", color=colours[r["mode"]], ms=4)
  axes[0].set(title="training loss (focal + smooth L1; dots: validation)", xlabel="step",
              yscale="log")
  axes[1].set(title="training focal loss per positive anchor", xlabel="step", yscale="log")
  axes[0].legend(fontsize=7)
  if quant:
    ax = axes[2]
    for g, c in zip(("backbone", "fpn", "heads"), ("tab:blue", "tab:green", "tab:red")):
      first = True
      for r in quant:
        for tag, pts in r["scalars"].items():
          if tag.startswith("quant/") and tag.endswith("/cosine_distance") and _group(
              tag[6:]) == g:
            s, v = zip(*pts)
            ax.plot(s, v, color=c, alpha=0.3, lw=0.8, label=g if first else None)
            first = False
    ax.set(title="UI8: per-layer cosine distance d (all seeds)", xlabel="step", yscale="log")
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="run directories (--workdir of each run)")
  p.add_argument("--plot", default=None, help="write the loss-curve PNG here")
  p.add_argument("--markdown", default=None, help="write the tables here (else print them)")
  args = p.parse_args(argv)
  runs = load_runs(args.runs)
  if not runs:
    raise SystemExit(f"no finished runs (summary.json) among {args.runs}")
  md = markdown(runs)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md)
  print(md)
  if args.plot:
    plot(runs, args.plot)
    print(f"plot: {args.plot}")
  return md


if __name__ == "__main__":
  main()
