"""Data parallelism with the Pallas path (QuantConfig.data_axis): the kernels
run per batch shard under jax.shard_map, the weight gradient's exact integer
halves are summed across devices -- bit-identical to one device.

Runs tests/data_parallel_check.py in a fresh process with 2 simulated CPU
devices. On a CPU the per-shard wrapping is exercised with the XLA
backend's functions inside shard_map (the Mosaic GPU interpreter is not
thread-safe across simulated devices: concurrent interpreted kernels fail
its barrier bookkeeping at random), and the Pallas version is lowered for
CUDA.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script):
  root = os.path.dirname(HERE)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  p = subprocess.run([sys.executable, os.path.join(HERE, script)],
                     capture_output=True, text=True, env=env, timeout=900,
                     cwd=os.path.dirname(HERE))
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
  assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-4000:]
  return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def result():
  return _run("data_parallel_check.py")


@pytest.mark.parametrize("case", ["s1", "s2", "depthwise"])
def test_sharded_equals_one_device(result, case):
  r = result[case]
  assert all(r["equal"]), r  # y, dx, dw bit for bit
  # float sums XLA partitions across the devices: reordered, and d(d)/d(log c)
  # is a difference of two near-equal sums, so a few 1e-3 relative
  assert r["measurement_rel"] < 1e-2, r
  assert r["y_spec"] == r["dx_spec"] == "P('data',)"  # stays sharded
  assert r["all_gather"] == 0  # no activation is gathered


@pytest.mark.parametrize("case", ["s1", "s2", "depthwise"])
def test_sharded_layout_equals_one_device(result, case):
  """A backend with a weight-gradient layout (Backend.conv_wgrad_layout) under data_axis:
  each shard laid out for the local conv (the layout's run sees the local shapes), the
  halves summed across devices -- bit-identical to one device, nothing gathered."""
  r = result["laid_" + case]
  assert all(r["equal"]), r
  assert r["measurement_rel"] < 1e-2, r
  assert r["y_spec"] == r["dx_spec"] == "P('data',)"
  assert r["all_gather"] == 0
  local = {tuple(s) for _, s in result["laid_runs"]}
  assert (2, 8, 8, 8) in local and (2, 9, 8, 8) in local, result["laid_runs"]
  assert [8, 2, 8, 8] in [x for x, _ in result["laid_runs"]], result["laid_runs"]  # CNHW


def test_pallas_data_parallel_lowers_for_cuda(result):
  r = result["cuda"]
  assert r["mosaic"] >= 3 and r["manual"] > 0 and r["all_reduce"] >= 2, r
  d = result["cuda_direct"]  # the direct kernels; the wgrad on its per-shard layout
  assert d["mosaic"] >= 3 and d["wgrad_direct"] >= 1 and d["all_reduce"] >= 2, d


def test_data_parallel_errors_name_the_problem(result):
  assert result["no_axis_warnings"], result  # a mesh in context but no data_axis
  assert "mesh of 2 devices" in result["no_axis_warnings"][0]
  e = result["errors"]
  assert "data_axis='data'" in e["no_mesh"] and "jax.set_mesh" in e["no_mesh"]
  assert "not divisible" in e["indivisible"] and "data_axis='data'" in e["indivisible"]


def test_examples_step_gathers_no_activation_on_the_pallas_path():
  """The training loop's step on 2 devices with the Pallas kernels (interpret
  mode): the loop sets the quantized layers' data axis itself, and the
  compiled step gathers no int8 operand; without it XLA gathers every one
  (the check can see them)."""
  r = _run("data_parallel_step_check.py")
  assert r["sharded"]["layers"] == 2 and r["sharded"]["kernels"] > 0, r
  assert r["sharded"]["int8_all_gathers"] == [], r
  assert len(r["unsharded"]["int8_all_gathers"]) >= 6, r  # x, g (twice) per layer
