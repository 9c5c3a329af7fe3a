"""The README's main job (examples/compare.py) on a few steps."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import compare  # noqa: E402


def test_compare_runs_each_mode_and_reports_accuracy(tmp_path, capsys):
  out = compare.main(["--modes", "float32,ui8", "--workdir", str(tmp_path), "--steps", "3",
                      "--width", "4", "--no-progress", "--no-tensorboard",
                      "--checkpoint-every", "0", "--eval-batch-size", "500"])
  assert set(out) == {"float32", "ui8"}
  for mode, s in out.items():
    assert s["mode"] == mode and s["steps"] == 3 and s["eval_examples"] == 1000
    assert 0.0 <= s["eval_accuracy"] <= 1.0
  printed = capsys.readouterr().out
  assert "float32" in printed and "ui8" in printed and "test accuracy" in printed
  saved = json.load(open(tmp_path / "compare.json"))
  assert saved["ui8"]["eval_accuracy"] == out["ui8"]["eval_accuracy"]
