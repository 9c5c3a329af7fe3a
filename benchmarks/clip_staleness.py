"""How far a layer's gradient outgrows the clip cached at its previous measurement.

Trains one setting of ``benchmarks/accuracy.py`` (UI8, one seed) and, after
every measure step, reads each quantized layer's state: the ``max|g|`` of the
measurement just taken against the clip cached at the one before. A ratio
above 1 means the gradients of the calls in between exceeded the cached clip
(they were saturated at it, unless ``QuantConfig.clip_warmup`` had the layer
clip at each step's own maximum). What docs/results.md quotes for the
``clip_warmup`` default::

    python benchmarks/clip_staleness.py --setting mnist-resnet-b32 --seed 4 --clip-warmup off

Prints one line per measure step; ``--out FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
import accuracy  # noqa: E402  (benchmarks/accuracy.py: settings, data, training loop)

from int8jax import diagnostics  # noqa: E402
from int8jax.nn import measure_step  # noqa: E402


def measure_calls(total: int, period: int, early: bool) -> list[int]:
  """The calls (0-based) on which a layer called once per step measures."""
  return [c for c in range(total) if bool(measure_step(c, period, early))]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--setting", default="mnist-resnet-b32",
                 help="a setting of benchmarks/accuracy.py")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--clip-warmup", choices=("on", "off"), default="off")
  p.add_argument("--measure-early", choices=("on", "off"), default="on")
  p.add_argument("--out", default=None, help="JSON file for the ratios")
  a = p.parse_args(argv)

  by_name = {s.name: s for s in accuracy.settings(1.0)}
  if a.setting not in by_name:
    raise SystemExit(f"--setting {a.setting!r} is not one of {sorted(by_name)}")
  s = by_name[a.setting]
  accuracy.OVERRIDES.update(clip_warmup=a.clip_warmup == "on",
                            measure_early=a.measure_early == "on")
  data = accuracy.load_data(s.dataset)
  steps_per_epoch = len(data[0]) // s.batch_size
  total = max(1, int(round(s.epochs * steps_per_epoch)))
  calls = measure_calls(total, s.period, a.measure_early == "on")
  seen = {}

  def hook(step, model):
    seen[step] = {k: (v["clip"], v["grad_absmax"])
                  for k, v in diagnostics.layer_stats(model).items()}

  r = accuracy.run_one(s, "ui8", a.seed, data, hook=hook, hook_steps={c + 1 for c in calls})
  print(f"{a.setting} seed {a.seed} clip_warmup {a.clip_warmup} measure_early "
        f"{a.measure_early}: test accuracy {100 * r['test_accuracy']:.2f}%")
  rows = []
  for prev, call in zip(calls, calls[1:]):
    before, now = seen[prev + 1], seen[call + 1]
    # A layer with no cached clip yet (a zero gradient at its first
    # measurement) has no ratio.
    ratio = {k: (now[k][1] / before[k][0] if before[k][0] > 0 else None) for k in now}
    rows.append({"call": call, "previous_call": prev, "gmax_over_cached_clip": ratio})
    print(f"call {call:5d} (cached at {prev:4d}): " + " ".join(
        f"{k}={'-' if v is None else f'{v:.2f}'}" for k, v in ratio.items()))
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"setting": a.setting, "seed": a.seed, "clip_warmup": a.clip_warmup,
                 "measure_early": a.measure_early, "test_accuracy": r["test_accuracy"],
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
