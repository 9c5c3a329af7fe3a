"""The README's main job (python -m examples.compare) on a few steps, run twice."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import compare  # noqa: E402

ARGS = ["--modes", "float32,ui8", "--steps", "3", "--width", "4", "--no-progress",
        "--no-tensorboard", "--checkpoint-every", "0", "--eval-batch-size", "500"]


def test_compare_runs_each_mode_and_reports_accuracy(tmp_path, capsys):
  out = compare.main(ARGS + ["--workdir", str(tmp_path)])
  assert set(out) == {"float32", "ui8"}
  for mode, s in out.items():
    assert s["mode"] == mode and s["steps"] == 3 and s["eval_examples"] == 1000
    assert 0.0 <= s["eval_accuracy"] <= 1.0
  printed = capsys.readouterr().out
  assert "float32" in printed and "ui8" in printed and "test accuracy" in printed
  saved = json.load(open(tmp_path / "compare.json"))
  assert saved["ui8"]["eval_accuracy"] == out["ui8"]["eval_accuracy"]

  # The README's command again: both runs are finished; they re-report what they
  # reported the first time (no training, same table) instead of crashing.
  again = compare.main(ARGS + ["--workdir", str(tmp_path)])
  assert again == out
  reprinted = capsys.readouterr().out
  table = lambda text: text[text.index("held-out images"):]  # noqa: E731
  assert table(reprinted) == table(printed)
  assert json.load(open(tmp_path / "compare.json")) == saved
