"""The Pallas backend of the quantized ops (int8jax.backends.pallas).

On any machine (CPU included, a few seconds per case):
  * the full ops (``quant_conv_general_dilated`` / ``quant_dot_general``)
    forward + vjp with ``backend="pallas_interpret"`` (every GEMM on
    ``pallas_kernels.int8_matmul`` in Mosaic GPU interpret mode) equal the XLA
    backend bit for bit;
  * the whole forward + backward with ``backend="pallas"`` lowers for CUDA
    from the host, which runs Mosaic GPU's checks on every kernel config the
    op uses (no ptxas: that needs a GPU);
  * backend selection: ``"pallas"`` without a Hopper GPU is a ValueError,
    ``None`` falls back to XLA.
On a Hopper GPU (marked ``gpu``): the compiled backend against XLA.
"""

import collections
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import int8jax
import reference
import pallas_kernels as pk
from int8jax import backends
from int8jax.backends import pallas as pallas_backend
from int8jax.backends import platform
from int8jax.backends import xla

needs_gpu = pytest.mark.skipif(not pk.available(),
                               reason="needs a Hopper GPU (sm_90) with Mosaic GPU")

# (x shape NHWC/NWC, kernel shape HWIO/WIO, strides, padding, lhs_dil, rhs_dil, groups)
CONV_CASES = {
    "s1_same": ((2, 7, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", None, None, 1),
    "s2_same": ((2, 9, 8, 4), (3, 3, 4, 6), (2, 2), "SAME", None, None, 1),
    "valid_rdil": ((1, 10, 11, 3), (3, 2, 3, 5), (2, 3), "VALID", None, (2, 1), 1),
    "grouped": ((2, 6, 7, 6), (3, 3, 2, 9), (1, 2), ((2, 1), (0, 3)), None, None, 3),
    "depthwise": ((2, 8, 8, 5), (3, 3, 1, 5), (1, 1), "SAME", None, None, 5),
    "lhs_dil": ((2, 5, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (2, 0)), (2, 2), None, 1),
    "1d": ((3, 11, 4), (3, 4, 5), (2,), "SAME", None, (2,), 1),
}


def _dn(ndim):
  return ("NHWC", "HWIO", "NHWC") if ndim == 4 else ("NWC", "WIO", "NWC")


def _conv_fwd_bwd(case, config):
  """jit(x, w, gy -> (y, dx, dw)) of the quantized conv."""
  x_shape, _, s, p, ld, rd, g = case

  def f(x, w, gy, key):
    op = lambda a, b: int8jax.quant_conv_general_dilated(
        a, b, s, p, ld, rd, _dn(len(x_shape)), g, key=key, config=config)
    y, vjp = jax.vjp(op, x, w)
    return (y, *vjp(gy))

  return jax.jit(f)


def _conv_inputs(case, seed=0):
  x_shape, w_shape = case[:2]
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, w_shape, jnp.float32) * 0.3
  y_shape = jax.eval_shape(
      lambda a, b: int8jax.quant_conv_general_dilated(
          a, b, *case[2:6], _dn(len(x_shape)), case[6],
          config=int8jax.QuantConfig(grad_rounding="nearest")), x, w).shape
  # Heavy-ish tail, like real gradients.
  gy = jax.random.normal(kg, y_shape, jnp.float32) ** 3
  return x, w, gy, jax.random.key(seed + 1)


# The jitted launchers of the kernels (int8_matmul; the implicit-GEMM convs):
# one per GEMM product run on a kernel.
_KERNEL_FUNCS = ("_int8_matmul_padded", "_int8_conv_impl", "_int8_conv_dgrad_impl",
                 "_int8_conv_wgrad_impl", "_int8_conv_direct_impl",
                 "_int8_conv_wgrad_direct_impl", "_wgrad_channel_major_impl",
                 "_int8_conv_direct_dgrad_impl")


def _kernel_calls_by_name(fn, *args) -> collections.Counter:
  """Launches per kernel launcher (:data:`_KERNEL_FUNCS`) in the jaxpr of ``fn(*args)``."""
  n = collections.Counter()

  def count(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.params.get("name") in _KERNEL_FUNCS:
        n[eqn.params["name"]] += 1
        continue
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            count(sub)

  count(jax.make_jaxpr(fn)(*args).jaxpr)
  return n


def _kernel_calls(fn, *args) -> int:
  """Number of GEMM products run on a kernel in the jaxpr of ``fn(*args)``."""
  return sum(_kernel_calls_by_name(fn, *args).values())


def _assert_same_bits(got, want, names=("y", "dx", "dw")):
  for name, a, b in zip(names, got, want):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
    assert np.all(np.isfinite(a)), name
    bad = int(np.sum(a.view(np.uint32) != b.view(np.uint32)))
    assert bad == 0, f"{name}: {bad} of {a.size} values differ (max |diff| " \
                     f"{np.max(np.abs(a - b))})"


def _check_against_xla(case, expected_calls=None, **config):
  cfg = int8jax.QuantConfig(backend="pallas_interpret", **config)
  args = _conv_inputs(case)
  f_pallas = _conv_fwd_bwd(case, cfg)
  got = f_pallas(*args)
  want = _conv_fwd_bwd(case, cfg.replace(backend="xla"))(*args)
  _assert_same_bits(got, want)
  calls = _kernel_calls(f_pallas, *args)
  if expected_calls is not None:
    assert calls == expected_calls, calls
  return calls


# ---------------------------------------------------------------------------
# (a) interpret mode: the full op equals the XLA backend bit for bit.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CONV_CASES if CONV_CASES[n][6] == 1])
def test_conv_op_interpret_equals_xla(name):
  # G = 1: forward, dgrad, wgrad are one kernel GEMM each.
  _check_against_xla(CONV_CASES[name], expected_calls=3, grad_rounding="nearest")


def test_conv_op_interpret_stochastic_rounding_and_per_channel():
  """Same key -> same SR noise on both backends; per-channel scale fused in
  the epilogue (b_scale) and the per-tensor re-quantized weight in dgrad."""
  _check_against_xla(CONV_CASES["s2_same"], expected_calls=3,
                     weight_granularity="channel")


@pytest.mark.parametrize("name", ["grouped", "depthwise"])
@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_conv_op_narrow_groups_use_the_exact_float_path(name, granularity):
  """Groups narrower than MIN_GROUP_FEATURES: forward and input gradient as
  exact bf16 grouped convs (float_exact), weight gradient on int32
  arithmetic -- no kernel launch; bit-equal to the XLA backend."""
  assert not pallas_backend._use_kernel(_spec(CONV_CASES[name]))
  _check_against_xla(CONV_CASES[name], expected_calls=0, grad_rounding="nearest",
                     grad_granularity=granularity)


def test_float_exact_conv_splits_windows_beyond_the_exact_bound():
  """A window of more than 1,040 products per output is split along its
  first axis into exact partial convs; all +-127 operands (the worst case)."""
  from int8jax.backends import float_exact
  from int8jax.conv_spec import make_conv_spec
  spec = make_conv_spec((1, 12, 12, 64), (5, 5, 16, 8), (1, 1), "SAME", None, None,
                        ("NHWC", "HWIO", "NHWC"), 4)  # 25 * 16 = 400 per group: one conv
  spec_big = make_conv_spec((1, 12, 12, 256), (5, 5, 64, 8), (1, 1), ((2, 2), (1, 3)), None,
                            None, ("NHWC", "HWIO", "NHWC"), 4)  # 1,600 > 1,040: split
  rng = np.random.default_rng(0)
  for sp in (spec, spec_big):
    xq = rng.choice(np.array([-127, 127], np.int8), size=sp.lhs_shape)
    wq = rng.choice(np.array([-127, 127], np.int8), size=sp.rhs_shape)
    got = jax.jit(lambda a, b: float_exact.conv_exact(a, b, sp))(xq, wq)
    np.testing.assert_array_equal(np.asarray(got), reference.conv(xq, wq, sp).astype(np.float32))


@pytest.mark.parametrize("name", ["grouped", "depthwise"])
def test_conv_op_groups_on_kernel(name, monkeypatch):
  """The per-group kernel loop (used for wide groups), forced on small ones."""
  monkeypatch.setattr(pallas_backend, "MIN_GROUP_FEATURES", 1)
  g = CONV_CASES[name][6]
  _check_against_xla(CONV_CASES[name], expected_calls=3 * g, grad_rounding="nearest")


# The implicit-GEMM conv launchers (pallas_kernels.int8_conv*); the rest of
# _KERNEL_FUNCS is int8_matmul's.
_IMPLICIT_FUNCS = _KERNEL_FUNCS[1:4]

# Run in a fresh interpreter with INT8JAX_IMPLICIT_GEMM set (the variable is
# read once, at import): the conv op of CONV_CASES[argv[2]], its results
# saved to argv[1], its kernel launches and the switch's dict printed.
_SWITCH_CHILD = """
import json, sys
import numpy as np
import int8jax
import test_pallas_backend as t
case = t.CONV_CASES[sys.argv[2]]
f = t._conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas_interpret",
                                              grad_rounding="nearest"))
args = t._conv_inputs(case)
np.savez(sys.argv[1], *(np.asarray(a) for a in f(*args)))
print(json.dumps({"calls": t._kernel_calls_by_name(f, *args),
                  "switch": t.pallas_backend.IMPLICIT_GEMM}))
"""


def test_implicit_gemm_env_switch_selects_im2col_route(monkeypatch, tmp_path):
  """INT8JAX_IMPLICIT_GEMM=0 (read at import, so in a child process): no
  implicit conv kernel in the program, every GEMM on int8_matmul, and the
  same bits as the implicit kernels give (stride 2: fwd, dgrad, wgrad)."""
  name = "s2_same"
  monkeypatch.setattr(pallas_backend, "IMPLICIT_GEMM",
                      dict.fromkeys(pallas_backend.IMPLICIT_GEMM, True))
  case = CONV_CASES[name]
  f = _conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas_interpret",
                                              grad_rounding="nearest"))
  args = _conv_inputs(case)
  on_calls = _kernel_calls_by_name(f, *args)
  assert sum(on_calls[k] for k in _IMPLICIT_FUNCS) == 3, on_calls
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, INT8JAX_IMPLICIT_GEMM="0", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests),
                                         os.environ.get("PYTHONPATH", "")]))
  out = tmp_path / "off.npz"
  child = subprocess.run([sys.executable, "-c", _SWITCH_CHILD, str(out), name], env=env,
                         capture_output=True, text=True, timeout=300, cwd=os.path.dirname(tests))
  assert child.returncode == 0, child.stderr[-2000:]
  report = json.loads(child.stdout.strip().splitlines()[-1])
  assert report["switch"] == dict.fromkeys(pallas_backend.IMPLICIT_GEMM, False)
  assert sum(report["calls"].get(k, 0) for k in _IMPLICIT_FUNCS) == 0, report
  assert report["calls"].get("_int8_matmul_padded", 0) >= 3, report
  with np.load(out) as off:
    _assert_same_bits([off[f"arr_{i}"] for i in range(3)], f(*args))


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_implicit_gemm_from_env(value, on):
  environ = {} if value is None else {pallas_backend.IMPLICIT_GEMM_ENV: value}
  assert pallas_backend.implicit_gemm_from_env(environ) is on


@pytest.mark.parametrize("value", ["", "true", "2", " 0"])
def test_implicit_gemm_env_rejects_other_values(value):
  with pytest.raises(ValueError, match=f"INT8JAX_IMPLICIT_GEMM.*{re.escape(repr(value))}"):
    pallas_backend.implicit_gemm_from_env({"INT8JAX_IMPLICIT_GEMM": value})


# The direct-addressing conv kernels (pallas_kernels.conv_direct, DIRECT_CONV):
# odd spatial sizes, channel counts no multiple of any tile (or of 16: C is
# padded for TMA), 3x3 and 1x1, strides 1 and 2.
DIRECT_CASES = {
    "3x3_s1": ((2, 7, 9, 20), (3, 3, 20, 36), (1, 1), "SAME", None, None, 1),
    "3x3_s2": ((2, 9, 7, 20), (3, 3, 20, 12), (2, 2), "SAME", None, None, 1),
    "1x1_s1": ((1, 5, 7, 36), (1, 1, 36, 20), (1, 1), "VALID", None, None, 1),
    "1x1_s2": ((2, 7, 5, 12), (1, 1, 12, 40), (2, 2), "SAME", None, None, 1),
}
_DIRECT = "_int8_conv_direct_impl"
# Through the ops, the direct wgrad kernel is handed x and g in its channel-major layout,
# written by the quantizing fusions (WgradLayout): its NHWC wrapper (which transposes) is
# not called.
_DIRECT_WGRAD = "_wgrad_channel_major_impl"
_DIRECT_WGRAD_NHWC = "_int8_conv_wgrad_direct_impl"
_DIRECT_DGRAD_STRIDED = "_int8_conv_direct_dgrad_impl"


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("name", list(DIRECT_CASES))
def test_direct_conv_switch_interpret_equals_xla(name, implicit, monkeypatch):
  """DIRECT_CONV on: the forward (any stride) and the stride-1 input gradient
  launch the direct kernel, the strided input gradient the direct per-phase kernels
  (1x1 stride 2: three phases epilogue(0)), the weight gradient (any stride) the
  direct wgrad kernel, whatever IMPLICIT_GEMM says; fwd + bwd bit-identical to the
  XLA backend."""
  monkeypatch.setattr(pallas_backend, "DIRECT_CONV",
                      dict.fromkeys(pallas_backend.DIRECT_CONV, True))
  monkeypatch.setattr(pallas_backend, "IMPLICIT_GEMM",
                      dict.fromkeys(pallas_backend.IMPLICIT_GEMM, implicit))
  case = DIRECT_CASES[name]
  cfg = int8jax.QuantConfig(backend="pallas_interpret", grad_rounding="nearest")
  args = _conv_inputs(case)
  f = _conv_fwd_bwd(case, cfg)
  _assert_same_bits(f(*args), _conv_fwd_bwd(case, cfg.replace(backend="xla"))(*args))
  calls = _kernel_calls_by_name(f, *args)
  stride1 = case[2] == (1, 1)
  assert calls[_DIRECT] == (2 if stride1 else 1), calls
  assert calls[_DIRECT_DGRAD_STRIDED] == (0 if stride1 else 1), calls
  assert calls[_DIRECT_WGRAD] == 1 and calls[_DIRECT_WGRAD_NHWC] == 0, calls
  assert sum(calls[k] for k in _IMPLICIT_FUNCS) == 0, calls
  assert calls["_int8_matmul_padded"] == 0, calls


@pytest.mark.parametrize("name", ["3x3_s1", "1x1_s2"])
def test_direct_wgrad_alone(name, monkeypatch):
  """DIRECT_CONV["wgrad"] alone: only the weight gradient leaves the implicit kernels
  (the entries are independent); fwd + bwd bit-identical to the XLA backend."""
  monkeypatch.setattr(pallas_backend, "DIRECT_CONV",
                      {"forward": False, "dgrad": False, "wgrad": True})
  monkeypatch.setattr(pallas_backend, "IMPLICIT_GEMM",
                      dict.fromkeys(pallas_backend.IMPLICIT_GEMM, True))
  case = DIRECT_CASES[name]
  cfg = int8jax.QuantConfig(backend="pallas_interpret", grad_rounding="nearest")
  args = _conv_inputs(case, seed=3)
  f = _conv_fwd_bwd(case, cfg)
  _assert_same_bits(f(*args), _conv_fwd_bwd(case, cfg.replace(backend="xla"))(*args))
  calls = _kernel_calls_by_name(f, *args)
  assert calls[_DIRECT_WGRAD] == 1 and calls[_DIRECT] == 0, calls
  assert calls[_DIRECT_WGRAD_NHWC] == 0, calls
  assert calls["_int8_conv_wgrad_impl"] == 0 and calls["_int8_conv_impl"] == 1, calls


@pytest.mark.parametrize("name", ["3x3_s1", "3x3_s2"])
def test_direct_wgrad_halves_equal_xla(name, monkeypatch):
  """The data-parallel per-shard form (conv_wgrad(..., halves=True), what
  int8jax.parallel psums) on the direct wgrad kernel: the same exact integer as the
  XLA backend's halves (the split may differ, hi * 65536 + lo may not)."""
  monkeypatch.setattr(pallas_backend, "DIRECT_CONV",
                      dict.fromkeys(pallas_backend.DIRECT_CONV, True))
  case = DIRECT_CASES[name]
  spec = _spec(case)
  kx, kg = jax.random.split(jax.random.key(7))
  xq = jax.random.randint(kx, spec.lhs_shape, -127, 128, jnp.int32).astype(jnp.int8)
  gq = jax.random.randint(kg, spec.out_shape, -127, 128, jnp.int32).astype(jnp.int8)
  gq = gq.at[0].set(127)  # large sums: the hi half non-zero
  f = jax.jit(lambda x, g: pallas_backend.INTERPRETED.conv_wgrad(x, g, 1.0, spec,
                                                                 halves=True))
  got = f(xq, gq)
  want = xla.conv_wgrad(xq, gq, 1.0, spec, halves=True)
  def exact_int(h):
    return np.asarray(h[0], np.int64) * 65536 + np.asarray(h[1], np.int64)

  np.testing.assert_array_equal(exact_int(got), exact_int(want))
  assert np.abs(np.asarray(got[0])).max() > 0  # sums past 2^16: the hi half is exercised
  calls = _kernel_calls_by_name(f, xq, gq)
  assert calls[_DIRECT_WGRAD_NHWC] == 1 and calls["_int8_conv_wgrad_impl"] == 0, calls


def test_direct_conv_switch_off_launches_no_direct_kernel(monkeypatch):
  monkeypatch.setattr(pallas_backend, "DIRECT_CONV",
                      dict.fromkeys(pallas_backend.DIRECT_CONV, False))
  monkeypatch.setattr(pallas_backend, "IMPLICIT_GEMM",
                      dict.fromkeys(pallas_backend.IMPLICIT_GEMM, True))
  case = DIRECT_CASES["3x3_s1"]
  f = _conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas_interpret"))
  calls = _kernel_calls_by_name(f, *_conv_inputs(case))
  assert calls[_DIRECT] == 0 and sum(calls[k] for k in _IMPLICIT_FUNCS) == 3, calls


def test_direct_conv_policy(monkeypatch):
  """Grouped / dilated / 1-D convs never take the direct kernels; a config with
  tile_k != swizzle falls back to the implicit kernel; the weight gradient takes
  the direct kernel at any stride unless its row-padded pixel steps pass the exact
  parts' bound."""
  monkeypatch.setattr(pallas_backend, "DIRECT_CONV",
                      dict.fromkeys(pallas_backend.DIRECT_CONV, True))
  for name in ("grouped", "valid_rdil", "lhs_dil", "1d"):
    assert not pallas_backend._direct(_spec(CONV_CASES[name]), "forward", 64, 64), name
    assert not pallas_backend._direct_wgrad(_spec(CONV_CASES[name]), True), name
  s1, s2 = _spec(DIRECT_CASES["3x3_s1"]), _spec(DIRECT_CASES["3x3_s2"])
  assert pallas_backend._direct_wgrad(s1, True) and pallas_backend._direct_wgrad(s2, False)
  # 2^25 pixels (256 parts of INT32_SAFE_K): accepted at N = 32 (rows of Wo*N = 1024
  # pixels, no padding), one more column is too many pixels. N = 2, Wo = 9: each row
  # of 18 pixels is laid out as 32 (N' = 2, Wo' = 16), one 32-pixel step: 2^20 rows
  # fill 256 parts of 4096 steps (18.9M pixels, within the pixel bound), 2^20 + 1 not.
  from pallas_kernels import conv_direct_wgrad as cdw
  assert cdw.direct_wgrad_accepts((32, 1024, 1024, 8), (1, 1, 8, 8))
  assert not cdw.direct_wgrad_accepts((32, 1024, 1025, 8), (1, 1, 8, 8))
  assert cdw.direct_wgrad_accepts((2, 2 ** 20, 9, 8), (1, 1, 8, 8))
  assert not cdw.direct_wgrad_accepts((2, 2 ** 20 + 1, 9, 8), (1, 1, 8, 8))
  assert pallas_backend._direct(s1, "forward", 20, 36)
  assert pallas_backend._direct(s2, "forward", 20, 12)
  assert pallas_backend._direct(s1, "dgrad", 36, 20)
  assert pallas_backend._direct(s2, "dgrad", 12, 20)
  odd = pk.Int8ConvConfig(tile_m=128, tile_n=64, tile_k=128, swizzle=64)
  monkeypatch.setattr(pk, "select_conv_config", lambda k, n: odd)
  assert not pallas_backend._direct(s1, "forward", 20, 36)
  monkeypatch.undo()
  monkeypatch.setattr(pallas_backend, "DIRECT_CONV",
                      dict.fromkeys(pallas_backend.DIRECT_CONV, False))
  assert not pallas_backend._direct(s1, "forward", 20, 36)
  assert not pallas_backend._direct_wgrad(s1, True)


# A fresh interpreter with INT8JAX_DIRECT_CONV set (read at import): the switch
# and the kernel launches of DIRECT_CASES[argv[1]]'s traced fwd + bwd.
_DIRECT_CHILD = """
import json, sys
import int8jax
import test_pallas_backend as t
case = t.DIRECT_CASES[sys.argv[1]]
f = t._conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas_interpret"))
print(json.dumps({"calls": t._kernel_calls_by_name(f, *t._conv_inputs(case)),
                  "switch": t.pallas_backend.DIRECT_CONV}))
"""


def _child(code, *argv, **env_vars):
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars,
             PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests),
                                         os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(tests))


def test_direct_conv_env_switch():
  """INT8JAX_DIRECT_CONV=1 in a child process: the switch is on (all three
  entries), the traced stride-1 fwd + bwd launches the direct kernel twice
  (forward, dgrad) and the direct wgrad kernel once; a bad
  value fails the import with the variable and the value named."""
  child = _child(_DIRECT_CHILD, "3x3_s1", INT8JAX_DIRECT_CONV="1", INT8JAX_IMPLICIT_GEMM="1")
  assert child.returncode == 0, child.stderr[-2000:]
  report = json.loads(child.stdout.strip().splitlines()[-1])
  assert report["switch"] == dict.fromkeys(pallas_backend.DIRECT_CONV, True)
  assert report["calls"].get(_DIRECT, 0) == 2, report
  assert report["calls"].get(_DIRECT_WGRAD, 0) == 1, report
  assert report["calls"].get("_int8_conv_wgrad_impl", 0) == 0, report
  child = _child("import int8jax.backends.pallas", INT8JAX_DIRECT_CONV="yes")
  assert child.returncode != 0
  assert "INT8JAX_DIRECT_CONV must be '0'" in child.stderr and "'yes'" in child.stderr, \
      child.stderr[-2000:]


@pytest.mark.parametrize("value, on", [(None, False), ("0", False), ("1", True)])
def test_direct_conv_from_env(value, on):
  environ = {} if value is None else {pallas_backend.DIRECT_CONV_ENV: value}
  assert pallas_backend.direct_conv_from_env(environ) is on


@pytest.mark.parametrize("value", ["", "true", "2", " 1"])
def test_direct_conv_env_rejects_other_values(value):
  with pytest.raises(ValueError, match=f"INT8JAX_DIRECT_CONV.*{re.escape(repr(value))}"):
    pallas_backend.direct_conv_from_env({"INT8JAX_DIRECT_CONV": value})


def test_use_kernel_policy():
  wide = ((1, 4, 4, 256), (3, 3, 64, 128), (1, 1), "SAME", None, None, 4)  # 64 in, 32 out
  assert not pallas_backend._use_kernel(_spec(wide))
  wide = ((1, 4, 4, 256), (3, 3, 64, 256), (1, 1), "SAME", None, None, 4)  # 64 in, 64 out
  assert pallas_backend._use_kernel(_spec(wide))


def _conv_products(case, backend, chunk_k):
  """jit(x, w, g -> (y, dx, dw)): the backend's three conv products on int8
  operands with ``chunk_k`` (what the op runs with CHUNK_K), scales 1."""
  x_shape, w_shape, s, p, ld, rd, g = case
  spec = _spec(case)
  b = backends.BACKENDS[backend]
  one = jnp.ones((), jnp.float32)

  def f(xq, wq, gq):
    return (b.function("conv_forward")(xq, wq, one, spec, chunk_k=chunk_k),
            b.function("conv_dgrad")(gq, wq, one, spec, chunk_k=chunk_k),
            b.function("conv_wgrad")(xq, gq, one, spec, chunk_k=chunk_k))

  rng = np.random.default_rng(0)
  ints = lambda shape: jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)  # noqa: E731
  return jax.jit(f), (ints(spec.lhs_shape), ints(spec.rhs_shape), ints(spec.out_shape))


def test_conv_op_interpret_chunked_contractions(monkeypatch):
  """chunk_k=16 on the im2col GEMMs (implicit kernels off): every GEMM's K
  (forward 36, dgrad 54, wgrad 40) is split; the int32 chunk parts
  (out_dtype=int32) are combined exactly like XLA's. The implicit kernels
  accumulate each (short) contraction in one int32 sum: the same bits.
  (The ops use backends.CHUNK_K; the backends take chunk_k for this check.)"""
  case = CONV_CASES["s2_same"]

  def check():
    f, args = _conv_products(case, "pallas_interpret", 16)
    xla_f, _ = _conv_products(case, "xla", 16)
    _assert_same_bits(f(*args), xla_f(*args))
    return _kernel_calls(f, *args)

  assert check() == 3
  monkeypatch.setattr(pallas_backend, "IMPLICIT_GEMM",
                      dict.fromkeys(pallas_backend.IMPLICIT_GEMM, False))
  calls = check()
  # forward ceil(36/16) + wgrad ceil(40/16); strided dgrad with win*O = 54 > 16
  # takes the transposed-conv path: ceil(54/16).
  assert calls == 3 + 3 + 4, calls


def test_int_gemm_between_safe_k_and_chunk_k(monkeypatch):
  """INT32_SAFE_K < K <= chunk_k: chunk parts summed in int32 (exact)."""
  monkeypatch.setattr(pk, "INT32_SAFE_K", 128)
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.choice([-127, 127], (5, 300)), jnp.int8)
  b = jnp.asarray(rng.choice([-127, 127], (3, 300)), jnp.int8)
  exact = np.asarray(a, np.int64) @ np.asarray(b, np.int64).T
  got = pallas_backend._int_gemm(a, b, chunk_k=300, interpret=True)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), exact)
  got = pallas_backend._int_gemm(a, b, chunk_k=200, interpret=True)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), exact.astype(np.float32))


def test_dense_op_interpret_equals_xla():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.float32)
  dn = (((2,), (1,)), ((0,), (0,)))

  def fwd_bwd(backend):
    cfg = int8jax.QuantConfig(backend=backend, grad_rounding="nearest",
                              weight_granularity="channel")

    def f(x, w, gy):
      y, vjp = jax.vjp(lambda a, b: int8jax.quant_dot_general(a, b, dn, config=cfg), x, w)
      return (y, *vjp(gy))

    return jax.jit(f)

  gy = jnp.asarray(rng.normal(size=(2, 5, 4, 6)), jnp.float32)
  f = fwd_bwd("pallas_interpret")
  _assert_same_bits(f(x, w, gy), fwd_bwd("xla")(x, w, gy))
  assert _kernel_calls(f, x, w, gy) == 3 * 2  # batch of 2: one call per entry


# ---------------------------------------------------------------------------
# (b) backend selection.
# ---------------------------------------------------------------------------


def _spec(case):
  from int8jax.conv_spec import make_conv_spec
  x, w, s, p, ld, rd, g = case
  return make_conv_spec(x, w, s, p, ld, rd, _dn(len(x)), g)


@pytest.mark.skipif(pk.available(), reason="checks the behaviour without Hopper")
def test_pallas_without_hopper_is_a_clear_error():
  case = CONV_CASES["s1_same"]
  args = _conv_inputs(case)
  with pytest.raises(ValueError, match="backend='pallas' needs a Hopper GPU"):
    _conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas"))(*args)
  assert backends.resolve(None) == "xla"
  assert backends.get(None) is backends.get("xla")
  # backend=None traces on XLA here: no kernel.
  assert _kernel_calls(_conv_fwd_bwd(case, int8jax.QuantConfig(backend=None)), *args) == 0


def test_backend_names():
  assert backends.get("pallas_interpret") is pallas_backend.INTERPRETED
  for name in backends.base.FUNCTIONS:
    assert callable(getattr(pallas_backend.INTERPRETED, name))
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    backends.get("cuda")
  with pytest.raises(ValueError, match="QuantConfig.backend"):
    int8jax.QuantConfig(backend="triton")
  with backends.assume_pallas_available():
    assert backends.get("pallas") is pallas_backend.BACKEND


# ---------------------------------------------------------------------------
# (c) the whole fwd + bwd lowers for CUDA (Mosaic GPU checks every config).
# ---------------------------------------------------------------------------


def _lower_for_cuda(fn, *args) -> int:
  with backends.assume_pallas_available():
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "custom_call @mosaic_gpu" in text, "no Mosaic GPU kernel in the module"
  # Identical launches share one private function: count the call sites.
  return len(re.findall(r"call @(?:%s)(?:_\d+)?\(" % "|".join(_KERNEL_FUNCS), text))


def _abstract(case, batch=None):
  x_shape, w_shape = case[:2]
  if batch is not None:
    x_shape = (batch, *x_shape[1:])
  y = jax.eval_shape(
      lambda a, b: int8jax.quant_conv_general_dilated(
          a, b, *case[2:6], _dn(len(x_shape)), case[6],
          config=int8jax.QuantConfig(grad_rounding="nearest")),
      jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(w_shape, jnp.float32))
  return [jax.ShapeDtypeStruct(s, jnp.float32) for s in (x_shape, w_shape, y.shape)] + [
      jax.random.key(0)]


@pytest.mark.parametrize("name", [n for n in CONV_CASES if CONV_CASES[n][6] == 1])
def test_conv_op_lowers_for_cuda(name):
  case = CONV_CASES[name]
  cfg = int8jax.QuantConfig(backend="pallas")
  assert _lower_for_cuda(_conv_fwd_bwd(case, cfg), *_abstract(case)) == 3


# ResNet-50 3x3 layers at batch 256 (and ResNeXt-style wide groups): the real
# GEMM shapes, hence the real kernel configs. Ungrouped 2-D convs run all
# three GEMMs on the implicit-GEMM kernels (IMPLICIT_GEMM); wide groups run
# the im2col GEMM per group on int8_matmul.
LOWERING_CASES = {
    "r50_l1_3x3_64": (((256, 56, 56, 64), (3, 3, 64, 64), (1, 1), "SAME", None, None, 1),
                      3),
    "r50_l2_3x3s2_128": (((256, 56, 56, 128), (3, 3, 128, 128), (2, 2), "SAME", None,
                          None, 1), 3),
    "r50_l4_3x3_512": (((256, 7, 7, 512), (3, 3, 512, 512), (1, 1), "SAME", None, None, 1),
                       3),
    "resnext_g2": (((8, 14, 14, 128), (3, 3, 64, 128), (1, 1), "SAME", None, None, 2), 6),
}


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_real_conv_shapes_lower_for_cuda(name):
  case, calls = LOWERING_CASES[name]
  cfg = int8jax.QuantConfig(backend="pallas")
  assert _lower_for_cuda(_conv_fwd_bwd(case, cfg), *_abstract(case)) == calls


def test_im2col_wgrad_routes(monkeypatch):
  """The im2col weight gradient (implicit kernels off): its 802,816-long
  contraction is a split-K shape that runs on XLA's int8 dot (2 kernel
  GEMMs); with the split-K routing off too, it runs on int8_matmul in
  ceil(802816 / 131072) = 7 int32-output chunks."""
  monkeypatch.setattr(pallas_backend, "IMPLICIT_GEMM",
                      dict.fromkeys(pallas_backend.IMPLICIT_GEMM, False))
  case, _ = LOWERING_CASES["r50_l1_3x3_64"]
  cfg = int8jax.QuantConfig(backend="pallas")
  assert _lower_for_cuda(_conv_fwd_bwd(case, cfg), *_abstract(case)) == 2
  monkeypatch.setattr(pallas_backend, "SPLIT_K_MIN_K", 2**62)
  assert _lower_for_cuda(_conv_fwd_bwd(case, cfg), *_abstract(case)) == 2 + 7


def test_depthwise_lowers_for_cuda_as_exact_bf16_convs():
  """MobileNetV2's depthwise 3x3 (stride 1 and 2) on the Pallas backend: the
  forward and input gradient are bf16 grouped convs (exact: 9 products per
  output), no int8 conv; the whole fwd+bwd lowers for CUDA."""
  for stride in (1, 2):
    case = ((64, 28, 28, 144), (3, 3, 1, 144), (stride, stride), "SAME", None, None, 144)
    cfg = int8jax.QuantConfig(backend="pallas")
    with backends.assume_pallas_available():
      text = jax.jit(_conv_fwd_bwd(case, cfg)).trace(*_abstract(case)).lower(
          lowering_platforms=("cuda",)).as_text()
    convs = re.findall(r"stablehlo.convolution.*", text)
    assert len(convs) == 2, convs  # forward and input gradient
    assert all("feature_group_count = 144" in c and "bf16" in c for c in convs)
    assert not re.search(r"stablehlo.convolution.*xi8", text)


def _largest_intermediate(fn, *args) -> int:
  """Elements of the largest array any equation of ``fn``'s jaxpr produces
  (nested jaxprs included)."""
  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        n = max(n, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            n = max(n, walk(sub))
    return n
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("stride, c", [(1, 64), (2, 128)])
def test_3x3_conv_fwd_bwd_holds_no_patch_matrix(stride, c):
  """The Pallas backend's ResNet-50 3x3 convs (batch 32, 56x56), forward +
  backward traced: no tensor above 2.5x the input activation (an im2col
  patch matrix would be 9x / stride^2). (On tiny images the weight
  gradient's split-K partial sums, taps x parts x C x O int32, can exceed
  that; they do not grow with the batch.)"""
  case = ((32, 56, 56, c), (3, 3, c, c), (stride, stride), "SAME", None, None, 1)
  args = _abstract(case)
  with backends.assume_pallas_available():
    big = _largest_intermediate(_conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas")),
                                *args)
  x_size = int(np.prod(case[0]))
  assert big <= 2.5 * x_size, big / x_size
  # ... and the measure can fail: the im2col route holds the 9x patch matrix
  with backends.assume_pallas_available(), pytest.MonkeyPatch.context() as mp:
    mp.setattr(pallas_backend, "IMPLICIT_GEMM", dict.fromkeys(pallas_backend.IMPLICIT_GEMM,
                                                               False))
    big_im2col = _largest_intermediate(
        _conv_fwd_bwd(case, int8jax.QuantConfig(backend="pallas")), *args)
  assert big_im2col >= 9 * x_size / stride ** 2 * 0.99


def test_split_k_policy():
  assert pallas_backend._split_k_shape(576, 64, 802816)        # r50 l1 wgrad
  assert not pallas_backend._split_k_shape(4608, 512, 802816)  # 36 x 4 = 144 blocks
  assert not pallas_backend._split_k_shape(576, 64, 4096)      # short K
  assert not pallas_backend._split_k_shape(802816, 64, 576)    # forward GEMM


def test_dense_op_lowers_for_cuda():
  cfg = int8jax.QuantConfig(backend="pallas", weight_granularity="channel",
                            grad_rounding="nearest")
  dn = (((1,), (0,)), ((), ()))

  def f(x, w, gy):
    y, vjp = jax.vjp(lambda a, b: int8jax.quant_dot_general(a, b, dn, config=cfg), x, w)
    return (y, *vjp(gy))

  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((256, 2048), (2048, 1000),
                                                         (256, 1000))]
  assert _lower_for_cuda(f, *args) == 3


# ---------------------------------------------------------------------------
# (d) compiled on a Hopper GPU.
# ---------------------------------------------------------------------------


def _on_cpu(fn, *args):
  """``fn(*args)`` computed by XLA:CPU (the exact reference), as numpy."""
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    return [np.asarray(a) for a in fn(*jax.device_put(args, cpu))]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_op_gpu_equals_cpu_reference(name):
  """The Pallas backend on the GPU against the XLA backend on the CPU (same
  integers; 1 ulp for the float dequantization multiply). Narrow groups
  (depthwise) run the exact bf16-conv path on the GPU."""
  case = CONV_CASES[name]
  cfg = int8jax.QuantConfig(backend="pallas", grad_rounding="nearest")
  args = _conv_inputs(case)
  got = _conv_fwd_bwd(case, cfg)(*args)
  want = _on_cpu(_conv_fwd_bwd(case, cfg.replace(backend="xla")), *args)
  for what, a, b in zip(("y", "dx", "dw"), got, want):
    np.testing.assert_allclose(np.asarray(a), b, rtol=2.4e-7, atol=0, err_msg=what)


@pytest.mark.gpu
@needs_gpu
def test_xla_backend_refused_on_gpu():
  case = CONV_CASES["s1_same"]
  with pytest.raises(ValueError, match="CPU backend"):
    _conv_fwd_bwd(case, int8jax.QuantConfig(backend="xla"))(*_conv_inputs(case))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["r50_l4_3x3_512", "resnext_g2", "r50_l1_3x3_64"])
def test_real_conv_shapes_gpu_equal_cpu_reference(name):
  """Real layer shapes at batch 16; r50_l1's wgrad (K = 16*56*56 = 50,176) is
  a split-K shape, so it runs on XLA:GPU's int8 dot (SPLIT_K_*)."""
  case, _ = LOWERING_CASES[name]
  case = ((16, *case[0][1:]),) + case[1:]
  cfg = int8jax.QuantConfig(backend="pallas", grad_rounding="nearest")
  args = _conv_inputs(case)
  got = _conv_fwd_bwd(case, cfg)(*args)
  want = _on_cpu(_conv_fwd_bwd(case, cfg.replace(backend="xla")), *args)
  for what, a, b in zip(("y", "dx", "dw"), got, want):
    np.testing.assert_allclose(np.asarray(a), b, rtol=2.4e-7, atol=0, err_msg=what)


def test_xla_backend_refused_when_tracing_for_gpu(monkeypatch):
  """No GPU here: pretend the ops are traced for one."""
  monkeypatch.setattr(platform, "target_platform", lambda: "gpu")
  case = CONV_CASES["s1_same"]
  with pytest.raises(ValueError, match="backend='xla' is int8jax's CPU backend"):
    _conv_fwd_bwd(case, int8jax.QuantConfig(backend="xla"))(*_conv_inputs(case))


def test_target_platform_follows_default_device():
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    assert backends.target_platform() == "cpu"
