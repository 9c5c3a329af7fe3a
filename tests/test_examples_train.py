"""The examples' training loop end to end on tiny jobs: resume, checkpoints, metrics, devices."""

import json
import dataclasses
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from int8jax import modes

from examples import checkpoint as ckpt_lib
from examples import data as data_lib
from examples import metrics as metrics_lib
from examples import optimizers
from examples import tasks
from examples import train as train_lib
from examples.classification import ClassificationTask
from examples.config import Config, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="mnist", model="simple_cnn", width=4, batch_size=16, lr=0.05,
            warmup_epochs=0.0, period=2, log_every=1, eval_every_epochs=0,
            progress=False, eval_batch_size=500)


def _cfg(tmp_path, name, **kw):
  return Config(**{**TINY, "workdir": str(tmp_path / name), **kw})


def _assert_trees_equal(a, b):
  # Same structure, shapes, dtypes and bits; the failure names the leaf's path.
  chex.assert_trees_all_equal(a, b, strict=True)


def test_interrupted_then_resumed_run_equals_uninterrupted_run(tmp_path):
  # ui8 mode: the checkpoint must carry params, momentum, BN stats, the clip
  # state, layer counters and the stochastic-rounding RNG to be bit-exact.
  kw = dict(mode="ui8", steps=5, checkpoint_every=2)
  full = train_lib.train(_cfg(tmp_path, "full", **kw))
  # "Killed" after 3 steps: the last checkpoint is step 2, step 3 is redone.
  cut = train_lib.train(_cfg(tmp_path, "cut", stop_after_steps=3, **kw))
  assert cut.summary == {"stopped": "stop_after_steps", "step": 3}
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["2"]
  resumed = train_lib.train(_cfg(tmp_path, "cut", **kw))
  assert resumed.summary["steps_this_run"] == 3 and resumed.summary["steps"] == 5
  _assert_trees_equal(ckpt_lib.state_to_pure(resumed.state), ckpt_lib.state_to_pure(full.state))
  # ... and training did something: the parameters moved from their start.
  cfg = _cfg(tmp_path, "init", mode="ui8")
  init = nnx.to_pure_dict(nnx.state(
      tasks.build_model(ClassificationTask(), cfg, data_lib.load_dataset("mnist")), nnx.Param))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       init, full.params())
  assert max(jax.tree.leaves(moved)) > 0


def test_summary_json_tensorboard_and_quant_metrics(tmp_path):
  res = train_lib.train(_cfg(tmp_path, "run", mode="ui8", steps=2, checkpoint_every=0))
  s = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert s["steps"] == 2 and s["mode"] == "ui8" and s["eval_examples"] == 1000
  assert 0.0 <= s["eval_accuracy"] <= 1.0 and np.isfinite(s["train_loss"])
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]  # final save
  from tensorboard_reader import scalar_tags  # noqa: E402  (helper below)
  tags = scalar_tags(tmp_path / "run" / "tensorboard")
  for t in ("train/loss", "train/accuracy", "train/lr", "eval/accuracy"):
    assert t in tags
  assert any(t.startswith("quant/") and t.endswith("/cosine_distance") for t in tags)
  assert any(t.endswith("/phi") for t in tags) and any(t.endswith("/clip") for t in tags)
  assert res.summary["eval_accuracy"] == s["eval_accuracy"]


def test_non_finite_parameters_are_never_saved(tmp_path, caplog):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
  m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  state = nnx.state(m)
  assert ckpt.save(1, state, {"step": 1})
  m.kernel[...] = m.kernel[...].at[0, 0].set(jnp.nan)
  assert not ckpt.save(2, nnx.state(m), {"step": 2})
  ckpt.close()
  assert os.listdir(tmp_path / "ck") == ["1"]
  assert "non-finite" in caplog.text


@pytest.mark.parametrize("mode", [m for m in modes.MODE_NAMES if m != "ui8"])
def test_every_mode_trains_one_step(tmp_path, mode):
  res = train_lib.train(_cfg(tmp_path, mode, mode=mode, steps=1, checkpoint_every=0,
                             optimizer="adamw" if mode == "bf16" else "sgd",
                             schedule="step", label_smoothing=0.1, tensorboard=False))
  assert res.summary["steps"] == 1 and np.isfinite(res.summary["train_loss"])


def test_schedules_warm_up_and_decay():
  cfg = Config(lr=1.0, warmup_epochs=1, schedule="step", lr_steps="0.5,0.75")
  s = optimizers.make_schedule(cfg, total_steps=100, steps_per_epoch=10)
  assert float(s(0)) == pytest.approx(0.1) and float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.1) and float(s(80)) == pytest.approx(0.01)
  c = optimizers.make_schedule(Config(lr=1.0, schedule="cosine"), 100, 10)
  assert float(c(0)) == pytest.approx(1.0) and float(c(100)) == pytest.approx(0.0, abs=1e-6)


def test_imagenet_script_on_a_tiny_folder_with_a_corrupt_file(tmp_path):
  from test_examples_data import _write_image_folder  # noqa: E402
  root = _write_image_folder(tmp_path / "imagenet", n_per_class=4, size=10)
  import examples.imagenet_flax as script
  summary = train_lib.main(
      ["--data-dir", str(root), "--image-size", "8", "--model", "simple_cnn", "--width", "4",
       "--batch-size", "3", "--steps", "3", "--workers", "0", "--mode", "ui8",
       "--warmup-epochs", "0", "--no-progress", "--workdir", str(tmp_path / "run")],
      defaults=script.DEFAULTS)
  assert summary["steps"] == 3 and summary["dataset"] == "imagenet"
  assert summary["corrupt_images_skipped"] >= 1  # 9 files, 3 steps x 3 = all seen
  assert summary["eval_examples"] == 8


def test_help_documents_every_option():
  out = subprocess.run([sys.executable, "-m", "examples.mnist_flax", "--help"],
                       capture_output=True, text=True, check=True,
                       cwd=ROOT, timeout=120).stdout
  for field in (f.name for f in dataclasses.fields(Config)):
    if field not in ("dataset", "data_dir", "image_size"):  # not MNIST's (next test)
      assert "--" + field.replace("_", "-") in out, field
  assert "ui8" in out and "clip-only" in out


def test_each_entry_point_shows_only_its_flags():
  import examples.cifar10_flax, examples.imagenet_flax, examples.mnist_flax  # noqa: E401
  helps = {name: build_parser(getattr(examples, name).DEFAULTS).format_help()
           for name in ("mnist_flax", "cifar10_flax", "imagenet_flax")}
  for name, text in helps.items():
    assert "--dataset" not in text, name  # the entry point fixes it
    assert "--mode" in text and "--backend" in text and "--workdir" in text
  assert "--image-size" in helps["imagenet_flax"] and "--data-dir" in helps["imagenet_flax"]
  assert "--image-size" not in helps["cifar10_flax"] and "--data-dir" in helps["cifar10_flax"]
  assert "--image-size" not in helps["mnist_flax"] and "--data-dir" not in helps["mnist_flax"]
  assert "--image-size" in build_parser().format_help()  # the generic loop offers everything


_MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from examples import train as T
    from examples.config import Config
    assert jax.device_count() == 4, jax.devices()
    out = {{}}
    for mode in {modes!r}:
      res = {{}}
      for n in (1, 4):
        cfg = Config(dataset="mnist", model="simple_cnn", width=4, batch_size=16,
                     steps=2, mode=mode, period=1, num_devices=n, progress=False,
                     tensorboard=False, checkpoint_every=0, eval_every_epochs=0,
                     eval_batch_size=500, workdir={tmp!r} + f"/{{mode}}{{n}}")
        r = T.train(cfg)
        res[n] = (r.summary, jax.tree.leaves(r.params()))
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(res[1][1], res[4][1]))
      scale = max(float(np.max(np.abs(a))) for a in res[1][1])
      out[mode] = dict(diff=diff, scale=scale, devices=res[4][0]["devices"],
                       loss1=res[1][0]["train_loss"], loss4=res[4][0]["train_loss"])
    print("RESULT" + json.dumps(out))
""")


# UI8 included: stochastic-rounding noise is a hash of the global element
# index, so the sharded step draws the same noise as the single-device one.
MULTI_DEVICE_MODES = ("float32", "ui8")


def test_four_simulated_devices_match_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE.format(root=ROOT, tmp=str(tmp_path),
                                                            modes=MULTI_DEVICE_MODES)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert proc.returncode == 0 and line, proc.stderr[-3000:]
  out = json.loads(line[0][len("RESULT"):])
  for mode, r in out.items():
    assert r["devices"] == 4
    # Same math, different reduction order over the sharded batch.
    assert r["diff"] <= 1e-5 * max(r["scale"], 1.0), (mode, r)
    assert abs(r["loss1"] - r["loss4"]) <= 1e-5 * max(abs(r["loss1"]), 1.0), (mode, r)


def test_train_loop_logs_histograms(tmp_path):
  """--histogram-every: hist/<layer>/{g,x,w} in TensorBoard."""
  from tensorboard_reader import scalar_tags
  cfg = Config(dataset="mnist", model="simple_cnn", width=4, mode="ui8",
               histogram_every=1, progress=False, workdir=str(tmp_path / "run"))
  task = ClassificationTask()
  model = tasks.build_model(task, cfg, data_lib.load_dataset("mnist"))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (4, 28, 28, 1), dtype=np.uint8),
           "label": np.arange(4, dtype=np.int32), "valid": np.ones(4, np.float32)}
  tensors = metrics_lib.layer_tensors(model, lambda m, b: task.loss(m, b, cfg)[0], batch)
  assert list(tensors) == ["convs/1", "convs/2"]  # first conv and head stay float
  assert tensors["convs/1"].g.shape == (4, 14, 14, 8)
  metrics = metrics_lib.MetricWriter(cfg.workdir, total_steps=1, initial_step=0, is_main=True)
  metrics.histograms(1, tensors)
  metrics.close()
  tags = scalar_tags(tmp_path / "run" / "tensorboard")
  assert {f"hist/convs/{i}/{n}" for i in (1, 2) for n in "gxw"} <= tags
