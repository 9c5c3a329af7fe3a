"""The GPU-session tooling, on the CPU: the per-config smoke test's gate
(benchmarks/gpu_smoke.py) and the one-variant step timer
(benchmarks/step_time.py). Cheap: no interpret-mode kernel runs here."""

import json
import os
import subprocess
import sys

import pytest

import pallas_kernels as pk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_smoke  # noqa: E402


def test_smoke_covers_every_config_of_the_tables():
  names = gpu_smoke.config_names()
  from pallas_kernels import conv_direct_wgrad_ws
  tables = {"conv": pk.CONV_CONFIGS, "wgrad": pk.WGRAD_CONFIGS, "matmul": pk.LIBRARY_CONFIGS,
            "direct": pk.CONV_CONFIGS, "ws": pk.WS_CONFIGS,
            "direct_ws": conv_direct_wgrad_ws.DIRECT_WGRAD_WS_CONFIGS}
  assert len(names) == sum(map(len, tables.values())) == len(set(names))
  for name in names:
    kind, config = gpu_smoke._config(name)
    assert any(config is c for c in tables[kind]), name
    assert not name.split(":")[1].isdigit(), f"{name}: config without a module-level name"


def test_smoke_check_reports_a_wrong_result(monkeypatch):
  real = pk.int8_matmul_reference

  def wrong(a, b, *, config=None, interpret=False, **kw):
    out = real(a, b, **kw)
    return out.at[3, 5].add(1)

  monkeypatch.setattr(pk, "int8_matmul", wrong)
  why = gpu_smoke._check("matmul:NARROW_CONFIG", interpret=True)
  assert "matmul float32: 1 of" in why and "matmul int32: 1 of" in why, why
  monkeypatch.setattr(pk, "int8_matmul", lambda a, b, *, config=None, interpret=False, **kw:
                      real(a, b, **kw))
  assert gpu_smoke._check("matmul:NARROW_CONFIG", interpret=True) == ""


def test_smoke_check_reports_a_wrong_direct_result(monkeypatch):
  """The direct-addressing kernels' cases (forward s1 / s2, dgrad s1 / s2, wgrad
  s1 / s2) each compare against the reference: an off-by-one element in each is
  reported."""
  from pallas_kernels import conv_direct
  from pallas_kernels import conv_direct_wgrad
  names = gpu_smoke.config_names()
  assert [n for n in names if n.startswith("direct:")] == [
      n.replace("conv:", "direct:") for n in names if n.startswith("conv:")]
  # the kernels never run on a GPU come last: the direct ones, then int8_matmul_ws's, then
  # conv_direct_wgrad_ws's
  from pallas_kernels import conv_direct_wgrad_ws
  n_dws = len(conv_direct_wgrad_ws.DIRECT_WGRAD_WS_CONFIGS)
  n_ws = len(pk.WS_CONFIGS) + n_dws
  assert names[-n_ws - len(pk.CONV_CONFIGS):-n_ws] == [n for n in names
                                                        if n.startswith("direct:")]
  assert names[-n_ws:-n_dws] == [n for n in names if n.startswith("ws:")]
  assert names[-n_dws:] == [n for n in names if n.startswith("direct_ws:")]

  def wrong(ref, by):
    def fn(a, b, *, config=None, interpret=False, **kw):
      return ref(a, b, **kw).at[0, 1, 2, 3].add(by)
    return fn

  for by, want in ((1, ["direct fwd s1 float32: 1 of", "direct fwd s2 int32: 1 of",
                        "direct dgrad s1 int32: 1 of", "direct dgrad s2 int32: 1 of",
                        "direct wgrad s1 float32: 1 of",
                        "direct wgrad s2 float32: 1 of"]), (0, [])):
    monkeypatch.setattr(conv_direct, "int8_conv_direct", wrong(pk.int8_conv_reference, by))
    monkeypatch.setattr(conv_direct, "int8_conv_direct_dgrad",
                        wrong(pk.int8_conv_dgrad_reference, by))
    monkeypatch.setattr(conv_direct_wgrad, "int8_conv_wgrad_direct",
                        wrong(pk.int8_conv_wgrad_reference, by))
    why = gpu_smoke._check("direct:CONV_64x64", interpret=True)
    assert all(w in why for w in want) and (why == "") == (not want), why


def test_smoke_check_reports_a_wrong_ws_result(monkeypatch):
  """int8_matmul_ws's three cases (float32 with scales, int32, float32 over K chunks) each
  compare against the reference: an off-by-one element in each is reported."""
  real = pk.int8_matmul_reference
  for by, want in ((1, ["ws float32: 1 of", "ws int32: 1 of", "ws chunks float32: 1 of"]),
                   (0, [])):
    monkeypatch.setattr(pk, "int8_matmul_ws", lambda a, b, *, config=None, interpret=False,
                        by=by, **kw: real(a, b, k_chunk=config.k_chunk, **kw).at[3, 5].add(by))
    why = gpu_smoke._check("ws:WS_NARROW_CONFIG", interpret=True)
    assert all(w in why for w in want) and (why == "") == (not want), why


def test_smoke_check_reports_a_wrong_direct_ws_result(monkeypatch):
  """conv_direct_wgrad_ws's three cases (stride 1 on 2 blocks, stride 2, stride 1 swizzle 32
  on 3 blocks) each compare against the reference: an off-by-one element in each is
  reported."""
  from pallas_kernels import conv_direct_wgrad_ws
  real = pk.int8_conv_wgrad_reference
  for by, want in ((1, ["direct_ws wgrad s1 2 blocks float32: 1 of",
                        "direct_ws wgrad s2 float32: 1 of",
                        "direct_ws wgrad s1 sw32 3 blocks float32: 1 of"]), (0, [])):
    monkeypatch.setattr(conv_direct_wgrad_ws, "int8_conv_wgrad_direct_ws",
                        lambda x, g, *, config=None, interpret=False, by=by, **kw:
                        real(x, g, **kw).at[0, 1, 2, 3].add(by))
    why = gpu_smoke._check("direct_ws:DW_WS_64x64", interpret=True)
    assert all(w in why for w in want) and (why == "") == (not want), why


def test_smoke_gate_direct_ws_apart_from_the_others(tmp_path):
  """A failing conv_direct_wgrad_ws config clears direct_ws_ok only; a failing direct
  config leaves it set."""
  gate = tmp_path / "smoke.json"
  for fake, direct_ok, direct_ws_ok in (("direct_ws:DW_WS_128x64=hang", True, False),
                                        ("direct:CONV_64x64=mismatch", False, True)):
    other = ("direct:CONV_64x64=ok" if fake.startswith("direct_ws") else
             "direct_ws:DW_WS_128x64=ok")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--timeout", "3",
         "--json", str(gate), "--only",
         "conv:CONV_64x64,direct:CONV_64x64,ws:WS_SHORT_CONFIG,direct_ws:DW_WS_128x64",
         "--fake", f"conv:CONV_64x64=ok,ws:WS_SHORT_CONFIG=ok,{fake},{other}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(gate.read_text())
    assert (doc["implicit_ok"], doc["direct_ok"], doc["ws_ok"], doc["direct_ws_ok"]) == (
        True, direct_ok, True, direct_ws_ok), doc


def test_smoke_gate_ws_apart_from_the_others(tmp_path):
  """A failing int8_matmul_ws config clears ws_ok only."""
  gate = tmp_path / "smoke.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--timeout", "30",
       "--json", str(gate), "--only", "conv:CONV_64x64,direct:CONV_64x64,ws:WS_SHORT_CONFIG",
       "--fake", "conv:CONV_64x64=ok,direct:CONV_64x64=ok,ws:WS_SHORT_CONFIG=mismatch"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  doc = json.loads(gate.read_text())
  assert (doc["implicit_ok"], doc["direct_ok"], doc["ws_ok"]) == (True, True, False), doc


def test_smoke_gate_direct_apart_from_implicit(tmp_path):
  """A failing direct config clears direct_ok only; a failing conv config clears
  implicit_ok only."""
  gate = tmp_path / "smoke.json"
  for fake, implicit_ok, direct_ok in (("direct:CONV_64x64=mismatch", True, False),
                                       ("conv:CONV_64x64=crash", False, True)):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--timeout", "30",
         "--json", str(gate), "--only", "conv:CONV_64x64,direct:CONV_64x64",
         "--fake", f"{fake},"
         + ("conv:CONV_64x64=ok" if fake.startswith("direct") else "direct:CONV_64x64=ok")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(gate.read_text())
    assert (doc["ok"], doc["implicit_ok"], doc["direct_ok"]) == (False, implicit_ok,
                                                                 direct_ok), doc


def test_smoke_gate_survives_crash_and_hang(tmp_path):
  """A crashing and a hanging config cost their own time limit only; the
  next configs still run in a new child; the gate file says what failed."""
  names = ["conv:CONV_64x64", "wgrad:WGRAD_64x64", "matmul:DEFAULT_CONFIG",
           "matmul:NARROW_CONFIG"]
  fake = ["crash", "hang", "ok", "mismatch"]
  gate = tmp_path / "smoke.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--timeout", "3",
       "--json", str(gate), "--only", ",".join(names),
       "--fake", ",".join(f"{n}={f}" for n, f in zip(names, fake))],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  doc = json.loads(gate.read_text())
  assert [r["name"] for r in doc["results"]] == names
  assert [r["status"] for r in doc["results"]] == ["CRASH", "HANG", "ok", "MISMATCH"]
  assert doc["ok"] is False and doc["implicit_ok"] is False
  assert "FAILED: conv:CONV_64x64, wgrad:WGRAD_64x64, matmul:NARROW_CONFIG" in proc.stdout


def test_smoke_gate_all_ok(tmp_path):
  names = gpu_smoke.config_names()
  gate = tmp_path / "smoke.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--json", str(gate),
       "--fake", ",".join(f"{n}=ok" for n in names)],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  doc = json.loads(gate.read_text())
  assert doc["ok"] is True and doc["implicit_ok"] is True and doc["direct_ok"] is True
  assert doc["ws_ok"] is True and doc["direct_ws_ok"] is True
  assert len(doc["results"]) == len(names)


def _processes_with_env(marker: str) -> list[int]:
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if marker.encode() in f.read():
          pids.append(int(pid))
    except OSError:
      pass
  return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_smoke_killed_by_timeout_takes_its_child_along(tmp_path):
  """gpu_session.sh's `timeout` signals the smoke parent only; the config's
  child (own process group) must not outlive it holding the GPU."""
  marker = f"INT8JAX_SMOKE_TEST_MARK={tmp_path.name}"
  env = dict(os.environ, INT8JAX_SMOKE_TEST_MARK=tmp_path.name)
  proc = subprocess.run(
      ["timeout", "4", sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"),
       "--timeout", "100", "--only", "conv:CONV_64x64", "--fake", "conv:CONV_64x64=hang"],
      env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 124
  import time
  time.sleep(0.5)
  left = _processes_with_env(marker)
  for pid in left:  # clean up before failing
    os.kill(pid, 9)
  assert not left, f"smoke child processes left running: {left}"


def test_step_time_variants_have_no_measuring_step():
  from benchmarks import step_time, train_step
  assert "bf16" in step_time.VARIANTS and "ui8-bf16 never" in step_time.VARIANTS
  for label in step_time.VARIANTS:
    assert train_step.STEP_SPECS[label][2] in (None, "never"), label
  assert "ui8-bf16 period 1" not in step_time.VARIANTS


def test_step_time_seeds_every_quantized_layer():
  from flax import nnx

  import int8jax
  from benchmarks import step_time
  from int8jax.nn import quant_layers

  model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)),
                         nnx.Conv(8, 4, (3, 3), rngs=nnx.Rngs(1)))
  int8jax.nn.quantize_model(model, int8jax.QuantConfig(), skip=lambda path, m: False,
                            rngs=nnx.Rngs(2))
  n = step_time.seed_quant_state(model, 3.5, 2e-3)
  layers = quant_layers(model)
  assert n == len(layers) == 2
  for _, m in layers:
    assert float(m.act_range[...]) == 3.5
    assert float(m.grad_quant.state.clip) == pytest.approx(2e-3)
    assert float(m.grad_quant.state.clip_ratio) == 1.0


@pytest.mark.parametrize("script, args, what", [
    ("gpu_smoke", ["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
    ("gpu_smoke", ["--only", "conv:NOPE"], "--only: unknown config(s) ['conv:NOPE']"),
    ("gpu_smoke", ["--fake", "conv:CONV_64x64=slow"], "--fake: 'conv:CONV_64x64=slow' is not"),
    ("step_time", ["--variants", "ui8-bf16 period 1"],
     "--variants: unknown or none ['ui8-bf16 period 1']"),
    ("step_time", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("step_time", ["--seed-clip", "0"], "--seed-clip must be > 0, got 0.0"),
])
def test_bad_arguments_are_named(script, args, what, capsys):
  import importlib
  with pytest.raises(SystemExit) as e:
    importlib.import_module(f"benchmarks.{script}").main(args)
  assert e.value.code == 2
  assert what in capsys.readouterr().err


def test_kernels_tables_with_ws_have_matching_columns():
  """benchmarks/kernels.py --with-ws: the header, rule and rows of both tables have as many
  cells as each other, and the ws cells say int8_matmul_ws's time and its speed-up."""
  from benchmarks import kernels

  def cells(line):
    return line.count("|")

  for with_ws in (False, True):
    head, rule = kernels.implicit_header(with_ws).split("\n")
    r = {"gop": 1.0, "exact": "yes", "mm_fwd": 2e-3, "ws_fwd": 1e-3, "mm_dgrad": 3e-3,
         "ws_dgrad": "failed: X"}
    row = kernels.implicit_row("l", r, with_ws)
    assert cells(head) == cells(rule) == cells(row), (head, rule, row)
    assert (" 1.000 | 2.00x | failed: X |  |" in row) == with_ws, row
    t = {"t_kernel": 2e-3, "t_int8": 2e-3, "t_bf16": 4e-3, "tops_kernel": 1.0, "tops_int8": 1.0,
         "tops_bf16": 0.5, "rel_err": 0.0, "t_ws": 1e-3, "tops_ws": 2.0, "ws_rel_err": 0.0}
    lines = kernels.markdown_table([("sq", 1, 2, 3, t), ("x", 1, 2, 3, "failed: Y")],
                                   with_ws).splitlines()
    assert len({cells(line) for line in lines}) == 1, lines
    assert (" 1.000 | 2.0 | 2.00x |" in lines[2]) == with_ws, lines[2]


def test_kernels_direct_wgrad_table_has_matching_columns():
  """benchmarks/kernels.py --direct-wgrad-only: header, rule and rows have as many cells; a
  row says both times, the persistent kernel's speed-up and whether the bits agree; without
  the baseline (--no-direct-baseline) the non-persistent cells are empty."""
  from benchmarks import kernels
  head, rule = kernels.DIRECT_WGRAD_HEADER.split("\n")
  full = kernels.direct_wgrad_row("l", {"gop": 6.0, "direct": 2e-3, "direct_ws": 1e-3,
                                        "exact": "yes"})
  alone = kernels.direct_wgrad_row("l", {"gop": 6.0, "direct_ws": "failed: X"})
  assert head.count("|") == rule.count("|") == full.count("|") == alone.count("|")
  assert full == "| l | 6.0 | 2.000 | 3.0 | 1.000 | 6.0 | 2.00x | yes |", full
  assert alone == "| l | 6.0 |  |  | failed: X |  |  |  |", alone
  programs, specs, _ = kernels._direct_wgrad_programs(kernels.DIRECT_WGRAD_LAYERS[0], False)
  assert list(programs) == ["direct_ws"] and specs["xt"].shape == (64, 56, 56 * 256)
