"""int8jax.nn.freeze and the serving export: int8 weights, trained ranges, the
trained model's eval outputs bit for bit, runnable by a process with only jax."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import examples
import int8jax
from examples import models
from int8jax.nn import (FrozenConv, FrozenDense, FrozenParam, QuantConv, QuantConvTranspose,
                        QuantizedWeight, export_serving, freeze, quantize_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = int8jax.QuantConfig(backend="xla", period=2)
X = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))


def _trained(granularity="tensor", skip=None, off=()):
  """A tiny CNN with measured ranges (one training-mode call), in eval mode;
  the quantized layers at paths ``off`` with quantization switched off."""
  m = models.simple_cnn(num_classes=10, width=4, rngs=nnx.Rngs(0))
  quantize_model(m, CFG.replace(weight_granularity=granularity), skip=skip,
                 rngs=nnx.Rngs(1, quant=2))
  for path, layer in nnx.iter_graph(m):
    if path in off:
      layer.config = None
  m(X)
  m.eval()
  return m


_run = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_frozen_model_is_bit_identical_to_eval_and_holds_int8(granularity):
  trained = _trained(granularity, skip=lambda path, m: path == ("convs", 0),  # head int8 too
                     off=[("convs", 2)])
  frozen = freeze(trained)
  np.testing.assert_array_equal(_run(frozen, X), _run(trained, X))
  x2 = 3.0 * jax.random.normal(jax.random.key(5), (3, 28, 28, 1))  # beyond the ranges: saturates
  np.testing.assert_array_equal(_run(frozen, x2), _run(trained, x2))
  layers = dict(nnx.iter_graph(frozen))
  assert isinstance(layers[("convs", 1)], FrozenConv) and isinstance(layers[("head",)], FrozenDense)
  assert type(layers[("convs", 0)]) is nnx.Conv  # the stem stays float (as trained)
  assert type(layers[("convs", 2)]) is nnx.Conv  # quantization off: the float layer
  conv = layers[("convs", 1)]
  assert conv.kernel[...].dtype == jnp.int8 and isinstance(conv.kernel, QuantizedWeight)
  assert conv.kernel_scale[...].shape == ((8,) if granularity == "channel" else ())
  assert float(conv.act_range[...]) == float(trained.convs[1].act_range[...]) > 0
  # Nothing trainable or training-only is left.
  for t in (nnx.Param, int8jax.nn.GradQuant, int8jax.nn.QuantCounter, nnx.RngState):
    assert not jax.tree.leaves(nnx.state(frozen, t)), t
  assert jax.tree.leaves(nnx.state(frozen, FrozenParam))
  assert isinstance(trained.convs[1], QuantConv)  # the trained model is untouched
  # Bytes of the weights: int8 codes for the quantized layers.
  int8_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(frozen, QuantizedWeight))
                   if v.dtype == jnp.int8)
  assert int8_bytes == sum(m.kernel[...].size for m in (trained.convs[1], trained.head))


def test_exported_program_any_batch_bit_identical_and_wrong_input_errors():
  trained = _trained()
  exp = jax.export.deserialize(export_serving(freeze(trained), (28, 28, 1)).serialize())
  for n in (1, 7):
    np.testing.assert_array_equal(exp.call(X[:n]), _run(trained, X[:n]))
  # jax.export's own errors (shown in the README).
  with pytest.raises(ValueError, match=r"Shape mismatch for args\[0\].shape\[3\] \(expected same "
                     r"constant\): expected \(b, 28, 28, 1\) and called with \(2, 28, 28, 3\)"):
    exp.call(jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match=r"Dtype mismatch for args\[0\]: expected float32 and "
                     "called with uint8"):
    exp.call(jnp.zeros((2, 28, 28, 1), jnp.uint8))


def test_freeze_refuses_float_unmeasured_and_transpose_layers():
  float_model = models.simple_cnn(num_classes=10, width=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="SimpleCNN has no quantized layer"):
    freeze(float_model)
  fresh = models.simple_cnn(num_classes=10, width=4, rngs=nnx.Rngs(0))
  quantize_model(fresh, CFG, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError,
                     match=r"layer 'convs/1' has no activation range \(act_range=0.0\)"):
    freeze(fresh)


@pytest.mark.parametrize("transpose_kernel,granularity,padding", [
    (False, "tensor", "SAME"), (True, "channel", "VALID"), (False, "channel", "CIRCULAR")])
def test_frozen_conv_transpose_is_bit_identical(transpose_kernel, granularity, padding):
  """A decoder-style model: QuantConv down, QuantConvTranspose up (stride 2)."""

  class UNetish(nnx.Module):
    def __init__(self, rngs):
      cfg = CFG.replace(weight_granularity=granularity)
      self.down = QuantConv(1, 4, (3, 3), strides=2, config=cfg, rngs=rngs)
      self.up = QuantConvTranspose(4, 3, (3, 3), strides=2, padding=padding,
                                   transpose_kernel=transpose_kernel, config=cfg, rngs=rngs)

    def __call__(self, x):
      return self.up(jax.nn.relu(self.down(x)))

  m = UNetish(nnx.Rngs(0, quant=1))
  m(X)  # measures the ranges
  m.eval()
  frozen = freeze(m)
  assert isinstance(frozen.up, int8jax.nn.FrozenConvTranspose)
  assert frozen.up.kernel[...].dtype == jnp.int8
  assert frozen.up.kernel_scale[...].shape == ((3,) if granularity == "channel" else ())
  y = _run(frozen, X)
  assert y.shape == _run(m, X).shape and float(jnp.abs(y).max()) > 0
  np.testing.assert_array_equal(y, _run(m, X))


_PLAIN_JAX = r"""
import sys
class _Refuse:  # any import of the training stack fails loudly
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("int8jax", "flax", "examples", "optax", "orbax"):
      raise ImportError(f"plain-JAX serving imported {name}")
sys.meta_path.insert(0, _Refuse())
import jax, numpy as np
out = sys.argv[1]
prog = jax.export.deserialize(open(out + "/model.jaxexport", "rb").read())
images = np.load(sys.argv[2])  # uint8: the program normalises them
logits = np.concatenate([prog.call(images[:1]), prog.call(images[1:])])  # two batch sizes
np.save(sys.argv[3], logits)
bad = [m for m in sys.modules if m.split(".")[0] in ("int8jax", "flax", "examples")]
assert not bad, bad
"""


def test_cli_serving_export_runs_in_a_plain_jax_process(tmp_path):
  from examples import train as train_lib
  from examples.classification import normalize
  from examples.config import Config
  from examples import data
  from tests.test_examples_checkpoint import TINY
  workdir, out = str(tmp_path / "run"), str(tmp_path / "serving")
  train_lib.train(Config(**TINY, mode="ui8", workdir=workdir))
  # The README's command, as written (a subprocess: importing the script's
  # module here would shadow the function examples.export_model).
  proc = subprocess.run([sys.executable, "-m", "examples.export_model", workdir, "--serving", out],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "int8 serving program written to" in proc.stdout
  sig = json.load(open(os.path.join(out, "signature.json")))
  assert sig["input"] == {"shape": [None, 28, 28, 1], "dtype": "uint8", "layout": "NHWC",
                          "batch": "any size (symbolic)"}
  assert sig["preprocess"]["compute_dtype"] == "float32"
  assert sig["num_classes"] == 10 and sig["source"]["step"] == 3
  assert sig["source"]["model_checkpoint"] == os.path.join(workdir, "model")
  assert sig["int8_layers"] == 2 and sig["float_layers"] == 2  # stem and classifier float
  images = data.mnist_subset().test.images[:9]
  np.save(tmp_path / "images.npy", images)
  proc = subprocess.run([sys.executable, "-c", _PLAIN_JAX, out, str(tmp_path / "images.npy"),
                         str(tmp_path / "logits.npy")], cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = examples.load_model(workdir)
  # Per call (batch 1, then 8): XLA:CPU's float GEMMs are not batch-invariant
  # (the float classifier of a batch of 1 rounds differently from a batch of 8).
  # As the README's load_model example: normalize, then the eval model.
  want = np.concatenate([_run(model, normalize(images[:1], "mnist")),
                         _run(model, normalize(images[1:], "mnist"))])
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), want)
  # The README's examples of a wrong input: jax.export's own errors.
  prog = jax.export.deserialize(open(os.path.join(out, "model.jaxexport"), "rb").read())
  with pytest.raises(ValueError, match=r"Shape mismatch for args\[0\].shape\[3\] \(expected same "
                     r"constant\): expected \(b, 28, 28, 1\) and called with \(2, 28, 28, 3\)"):
    prog.call(np.zeros((2, 28, 28, 3), np.uint8))
  with pytest.raises(ValueError, match=r"Dtype mismatch for args\[0\]: expected uint8 and "
                     "called with float32"):
    prog.call(np.zeros((2, 28, 28, 1), np.float32))

  # A checkpoint whose config cannot be rebuilt: an error naming the checkpoint.
  meta_file = os.path.join(workdir, "model", "meta", "metadata")  # Orbax's JsonSave file
  info = json.load(open(meta_file))
  info["config"]["model"] = "no_such_model"
  json.dump(info, open(meta_file, "w"))
  from examples import serving
  with pytest.raises(ValueError, match=r"model'.*cannot be rebuilt.*no_such_model"):
    serving.write_serving(workdir, str(tmp_path / "bad"))
