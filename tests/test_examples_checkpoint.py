"""The trained model: written at the end of a run, loaded in a fresh process with one call."""

import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from flax import nnx

import examples
from examples import checkpoint as ckpt_lib
from examples import train as train_lib
from examples.classification import ClassificationTask
from examples.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="mnist", model="simple_cnn", width=4, batch_size=16, lr=0.05,
            warmup_epochs=0.0, period=2, log_every=1, eval_every_epochs=0, progress=False,
            tensorboard=False, eval_batch_size=500, steps=3, checkpoint_every=2)

_LOGITS = """
import jax, numpy as np
from flax import nnx
from examples.classification import normalize
from examples import data
images = data.mnist_subset().test.images[:64]
logits = nnx.jit(lambda m, x: m(x))
def eval_logits(model):
  return np.asarray(logits(model, normalize(images, "mnist")))
"""
_LOAD = _LOGITS + """
import examples, sys
model = examples.load_model(sys.argv[1])
np.save(sys.argv[2], eval_logits(model))
"""


def test_model_loads_in_a_fresh_process_with_equal_eval_logits(tmp_path):
  """UI8 model: weights, BatchNorm statistics and quantization state all come back."""
  workdir = str(tmp_path / "run")
  result = train_lib.train(Config(**TINY, mode="ui8", workdir=workdir))
  assert os.path.isdir(os.path.join(workdir, "model"))
  model = result.model()
  model.eval()
  ns = {}
  exec(_LOGITS, ns)  # pylint: disable=exec-used
  expected = ns["eval_logits"](model)
  out = tmp_path / "loaded.npy"
  proc = subprocess.run([sys.executable, "-c", _LOAD, workdir, str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_array_equal(np.load(out), expected)  # bit for bit
  info = examples.model_info(workdir)
  assert info["step"] == 3 and info["config"]["mode"] == "ui8"
  assert info["summary"] == result.summary


def test_export_model_from_a_training_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  cut = train_lib.train(Config(**TINY, mode="ui8", workdir=workdir, stop_after_steps=3))
  assert "stopped" in cut.summary and not os.path.exists(os.path.join(workdir, "model"))
  path = examples.export_model(workdir)  # the latest checkpoint: step 2
  assert path == os.path.join(workdir, "model")
  loaded = examples.load_model(workdir)
  # The model part of the step-2 training state, restored directly:
  graphdef, state = ckpt_lib.train_state(ClassificationTask(), Config(**TINY, mode="ui8"),
                                         {"num_classes": 10, "image_shape": [28, 28, 1]})
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 2)
  state, meta = ckpt.restore(2, state)
  ckpt.close()
  want = nnx.merge(graphdef, state)[0]
  assert meta["step"] == 2 and examples.model_info(workdir)["step"] == 2
  a = ckpt_lib.state_to_pure(nnx.state(loaded))
  b = ckpt_lib.state_to_pure(nnx.state(want))
  chex.assert_trees_all_equal(a, b, strict=True)  # structure, dtypes and bits
  with pytest.raises(ValueError, match="--step 7"):
    examples.export_model(workdir, step=7)


def test_load_model_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
    examples.load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no training checkpoints"):
    examples.export_model(str(tmp_path))
