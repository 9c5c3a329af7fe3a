"""benchmarks/accuracy.py's reporting: paired differences and --baseline runs."""

import json

import numpy as np
import pytest

from benchmarks import accuracy


def _run(setting, mode, seed, acc):
  return {"setting": setting, "mode": mode, "seed": seed, "test_accuracy": acc,
          "final_train_loss": 0.1, "final_layer_stats": {}, "diverged": False, "wall_s": 1.0}


def _setting(**kw):
  kw = {"name": "s", "dataset": "mnist1d", "arch": "resnet", "width": 4, "depth": 1,
        "epochs": 1, "lr": 0.1, **kw}
  return accuracy.Setting(**kw)


def test_paired_delta_is_mean_and_standard_error_of_per_seed_differences():
  rng = np.random.default_rng(0)
  f = rng.uniform(0.8, 0.95, 5)
  q = f + rng.normal(0, 0.01, 5)
  base = {i: 100 * a for i, a in enumerate(f)}
  # seeds out of order and one seed without a float32 run (ignored)
  runs = [_run("s", "ui8", i, q[i]) for i in (3, 0, 4, 1, 2)] + [_run("s", "ui8", 9, 0.5)]
  d = 100 * (q - f)
  want = f"{np.mean(d):+.2f} ± {np.std(d, ddof=1) / np.sqrt(5):.2f}"
  assert accuracy.paired_delta(runs, base) == want
  assert accuracy.paired_delta([_run("s", "ui8", 7, 0.9)], base) == "–"


def test_baseline_float32_runs_join_the_tables(tmp_path):
  path = tmp_path / "old.json"
  old = [_run("s", "float32", i, 0.90 + 0.01 * i) for i in range(4)]
  old += [_run("s", "ui8", 0, 0.1), _run("t", "float32", 0, 0.5)]
  path.write_text(json.dumps({"results": old}))
  grid = [_setting(variants=("ui8",), seeds=3)]
  runs = accuracy.baseline_runs(str(path), grid)
  assert sorted((r["setting"], r["mode"], r["seed"]) for r in runs) == [
      ("s", "float32", 0), ("s", "float32", 1), ("s", "float32", 2)]
  new = [_run("s", "ui8", i, 0.90 + 0.01 * i + 0.002) for i in range(3)]
  text = accuracy.tables(runs + new, grid)
  rows = [l for l in text.splitlines() if l.startswith("| float32") or l.startswith("| ui8")]
  assert rows[0].startswith("| float32 | 91.00 ± 1.00 | +0.00 ± 0.00 |"), rows
  assert rows[1].startswith("| ui8 | 91.20 ± 1.00 | +0.20 ± 0.00 |"), rows
  with pytest.raises(SystemExit, match="no float32 runs of \\['u'\\]"):
    accuracy.baseline_runs(str(path), [_setting(name="u", variants=("ui8",))])
