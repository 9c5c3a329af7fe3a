"""What a user of the example scripts meets: messages, signals, defaults, set-up."""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import int8jax
import pytest

from examples import steps
from examples import train as train_lib
from examples.config import BACKEND_CHOICES, Config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ["-m", "examples.mnist_flax"]  # run from ROOT, as the README says
TINY = ["--width", "4", "--batch-size", "16", "--warmup-epochs", "0", "--no-progress",
        "--no-tensorboard", "--eval-batch-size", "500", "--eval-every-epochs", "0"]


def _wait_for(path, pattern: str, proc, timeout=300.0) -> str:
  t0 = time.time()
  while time.time() - t0 < timeout:
    text = open(path).read() if os.path.exists(path) else ""
    if re.search(pattern, text):
      return text
    if proc.poll() is not None:
      break
    time.sleep(0.2)
  raise AssertionError(f"never logged {pattern!r}; stderr:\n{text[-3000:]}")


def test_sigterm_saves_exits_75_and_the_rerun_resumes(tmp_path):
  """The loop's messages reach stderr; SIGTERM -> checkpoint + EX_TEMPFAIL (75)."""
  workdir, err = str(tmp_path / "run"), tmp_path / "stderr1.txt"
  with open(err, "w") as f:
    proc = subprocess.Popen([sys.executable, *SCRIPT, *TINY, "--steps", "2000",
                             "--checkpoint-every", "0", "--workdir", workdir],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)
  try:
    _wait_for(err, r"training steps 1\.\.2000", proc)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
  finally:
    proc.kill()
  text = open(err).read()
  assert rc == train_lib.EXIT_STOPPED == 75, text[-3000:]
  m = re.search(r"INFO examples\.train: stopping at step (\d+) \(SIGTERM\)", text)
  assert m, text[-3000:]
  step = int(m.group(1))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  proc = subprocess.run([sys.executable, *SCRIPT, *TINY, "--steps", str(step + 1),
                         "--checkpoint-every", "0", "--workdir", workdir],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from step {step} (epoch 0, batch {step})" in proc.stderr
  assert f"steps={step + 1} " in proc.stdout and "steps_this_run=1 " in proc.stdout


def test_backend_defaults_to_the_librarys_choice():
  """--backend auto (None): XLA on a CPU, Pallas on a Hopper GPU (xla is refused there)."""
  assert Config().backend is None and parse_config([]).backend is None
  assert steps.quant_config(Config()) == int8jax.QuantConfig()
  assert BACKEND_CHOICES == tuple("auto" if b is None else b for b in int8jax.BACKEND_NAMES)
  for name, value in zip(BACKEND_CHOICES, int8jax.BACKEND_NAMES):
    assert parse_config(["--backend", name]).backend == value
  with pytest.raises(SystemExit):
    parse_config(["--backend", "cuda"])


def test_choice_options_are_the_librarys_own_lists():
  """Each option whose values the library defines offers the library's constant, not a copy."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from int8jax import config as qc_lib, dsgc, modes  # pylint: disable=import-outside-toplevel
  from examples import optimizers  # pylint: disable=import-outside-toplevel
  choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Config)}
  assert choices["mode"] is modes.MODE_NAMES
  assert choices["weight_granularity"] is qc_lib.WEIGHT_GRANULARITIES
  assert choices["grad_rounding"] is qc_lib.GRAD_ROUNDINGS
  assert choices["clip_method"] is dsgc.CLIP_METHODS
  assert choices["lr_deviation"] is int8jax.optim.DISTANCE_KINDS
  assert choices["optimizer"] is optimizers.OPTIMIZERS
  assert choices["schedule"] is optimizers.SCHEDULES
  # ... and every value of them reaches the library as given.
  for g in qc_lib.WEIGHT_GRANULARITIES:
    for r in qc_lib.GRAD_ROUNDINGS:
      cfg = Config(weight_granularity=g, grad_rounding=r)
      assert steps.quant_config(cfg) == int8jax.QuantConfig(weight_granularity=g, grad_rounding=r)


def test_bad_options_name_the_flag_and_value():
  with pytest.raises(ValueError, match=r"--lr-steps 'a,b'"):
    Config(lr_steps="a,b")
  with pytest.raises(ValueError, match=r"--batch-size 0: must be >= 1"):
    Config(batch_size=0)
  with pytest.raises(ValueError, match=r"--mode 'int4': choose from float32, bf16, ui8, ui8-bf16"):
    Config(mode="int4")


def test_corrupt_images_are_warned_and_counted_once_per_file(tmp_path, caplog):
  from test_examples_data import _write_image_folder  # noqa: E402
  import examples.imagenet_flax as script
  root = _write_image_folder(tmp_path / "imagenet", n_per_class=4, size=10)
  (root / "train" / "dog" / "broken.JPEG").write_bytes(b"\x00 not an image")  # 2 bad files
  # 10 training files, batch 5: 2 steps an epoch; 6 steps = every file seen 3 times.
  summary = train_lib.main(
      ["--data-dir", str(root), "--image-size", "8", "--model", "simple_cnn", "--width", "4",
       "--batch-size", "5", "--steps", "6", "--mode", "ui8", "--warmup-epochs", "0",
       "--workers", "1", "--no-progress", "--no-tensorboard", "--workdir", str(tmp_path / "run")],
      defaults=script.DEFAULTS)
  assert summary["epochs"] == 3.0
  assert summary["corrupt_images_skipped"] == 2
  warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
  assert len(warned) == 2, warned
  assert any("corrupt.JPEG" in w for w in warned) and any("broken.JPEG" in w for w in warned)


def test_tensorboard_reads_the_event_files(tmp_path):
  """`tensorboard --logdir` (docs/examples.md) is installed by the dev set-up and reads runs."""
  assert importlib.util.find_spec("tensorboard") is not None, "pip install -e .[dev]"
  from tensorboard.backend.event_processing import event_accumulator
  train_lib.train(Config(dataset="mnist", model="simple_cnn", width=4, batch_size=16, steps=2,
                         log_every=1, eval_every_epochs=0, eval_batch_size=500,
                         checkpoint_every=0, progress=False, workdir=str(tmp_path / "run")))
  acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
  assert "eval/accuracy" in acc.Tags()["scalars"]


def test_setup_script_says_which_python_it_needs(tmp_path):
  """No Python >= 3.12 on PATH: setup.sh names what it found and what to do."""
  old = [p for p in ("/usr/bin/python3.11", "/usr/bin/python3") if os.path.exists(p) and not
         subprocess.run([p, "-c", "import sys; sys.exit(sys.version_info >= (3, 12))"]).returncode]
  if not old:
    pytest.skip("needs a system Python < 3.12 to pose as the only interpreter")
  py311 = old[0]
  bindir = tmp_path / "bin"
  bindir.mkdir()
  os.symlink(py311, bindir / "python3")
  for tool in ("bash", "env", "dirname", "rm", "cat"):
    if shutil.which(tool):
      os.symlink(shutil.which(tool), bindir / tool)
  repo = tmp_path / "repo"
  shutil.copytree(os.path.join(ROOT, "scripts"), repo / "scripts")
  proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, capture_output=True, text=True,
                        env={"PATH": str(bindir), "HOME": str(tmp_path)}, timeout=120)
  assert proc.returncode != 0
  assert "Python >= 3.12" in proc.stderr, proc.stderr
  assert re.search(r"python3: Python 3\.(\d+)\.", proc.stderr), proc.stderr  # what it found
  assert "PYTHON=" in proc.stderr  # how to point it at one
  assert not (repo / ".venv").exists()


def test_readme_states_what_a_new_user_needs():
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert "Python >= 3.12" in readme
  assert re.search(r"test suite takes about \d+ minutes on 2 cores", readme)
  assert "examples.load_model(" in readme
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2" in ci
  assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2" in readme
  assert "bash scripts/setup.sh && .venv/bin/python -m examples.compare" in readme


def test_readme_modes_table_quotes_int8jax_modes():
  from int8jax import modes
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert modes.table() in readme
  rows = re.findall(r"^\| `([\w-]+)` \| (?:yes|no) \|", readme, re.M)
  assert rows == list(modes.MODE_NAMES)

ENTRY_POINTS = ("compare", "mnist_flax", "cifar10_flax", "imagenet_flax", "export_model", "train",
                "detection.train")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_entry_point_run_as_a_file_names_the_module_command(module):
  """The entry points run as modules (`python -m examples.X`); run by path, they say so."""
  path = os.path.join("examples", *module.split(".")) + ".py"
  proc = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip() == (f"run it from the repository root as: python -m examples."
                                 f"{module} [ARGS]")
