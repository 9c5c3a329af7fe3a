"""Standalone reproduction of the XLA:GPU "2x input gradient" result (no int8jax).

    python benchmarks/xla_gpu_dgrad_repro.py            # on a GPU (and on a CPU: all OK)

On an H200 (jax 0.11.2, 2026-11-26) int8jax's XLA backend returned input
gradients exactly twice the exact integer result for the strided convs
(s2_same, valid_rdil, 1d) and the input-dilated one (lhs_dil); the
unstrided ones were right (docs/gpu_logs/2026-11-26_h200_tests_run1.txt).
This script rebuilds those computations from plain ``lax`` ops, stage by
stage, and compares each stage with an int64 NumPy result, so one run on a
GPU says which op is wrong:

* ``dot``     -- ``g @ w^T`` to patch space: int8 ``dot_general`` -> int32;
* ``pad_int`` -- one window offset's part scattered back with an
  interior-padded ``lax.pad`` (int32);
* ``col2im``  -- the sum over window offsets, then negative padding and a
  strided ``lax.slice`` (int32);
* ``slice8``  -- strided ``lax.slice`` of an int8 tensor (the im2col patches
  of the input-dilated case);
* ``conv8``   -- a stride-1 int8 ``conv_general_dilated`` with int32 output.

Each stage runs jitted and op by op, on int32/int8 and (as a control) on
float32 copies of the same integers. It prints one line per stage and a
verdict, and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _col2im_np(dp, x_shape, window, strides, pads):
  """int64 reference of the scatter: dp (N, Ho, Wo, taps, C) -> (N, H, W, C)."""
  n, h, w, c = x_shape
  hp, wp = h + sum(pads[0]), w + sum(pads[1])
  out = np.zeros((n, hp, wp, c), np.int64)
  _, ho, wo, _, _ = dp.shape
  for t, (kh, kw) in enumerate(itertools.product(range(window[0]), range(window[1]))):
    out[:, kh:kh + (ho - 1) * strides[0] + 1:strides[0],
        kw:kw + (wo - 1) * strides[1] + 1:strides[1]] += dp[:, :, :, t]
  return out[:, pads[0][0]:hp - pads[0][1], pads[1][0]:wp - pads[1][1]]


def _col2im_lax(dp, x_shape, window, strides, pads):
  """What int8jax's conv_geometry.col2im does (lax.pad with interior padding)."""
  n, h, w, c = x_shape
  padded = (h + sum(pads[0]), w + sum(pads[1]))
  _, ho, wo, _, _ = dp.shape
  zero = jnp.zeros((), dp.dtype)
  total = None
  for t, offs in enumerate(itertools.product(range(window[0]), range(window[1]))):
    cfg = [(0, 0, 0)]
    for o, m, s, p in zip(offs, (ho, wo), strides, padded):
      used = (m - 1) * s + 1
      cfg.append((o, p - o - used, s - 1))
    cfg.append((0, 0, 0))
    part = lax.pad(dp[:, :, :, t], zero, cfg)
    total = part if total is None else total + part
  cfg = [(0, 0, 0)] + [(-lo, -hi, 0) for lo, hi in pads] + [(0, 0, 0)]
  return lax.pad(total, zero, cfg)


def _case(name, x_shape, w_shape, strides, pads, seed):
  rng = np.random.default_rng(seed)
  kh, kw, c, o = w_shape
  n, h, w, _ = x_shape
  ho = (h + sum(pads[0]) - kh) // strides[0] + 1
  wo = (w + sum(pads[1]) - kw) // strides[1] + 1
  g = rng.integers(-127, 128, (n, ho, wo, o)).astype(np.int8)
  wq = rng.integers(-127, 128, w_shape).astype(np.int8)
  w2 = wq.reshape(kh * kw * c, o)
  dp_np = (g.reshape(-1, o).astype(np.int64) @ w2.astype(np.int64).T).reshape(
      n, ho, wo, kh * kw, c)
  dx_np = _col2im_np(dp_np, x_shape, (kh, kw), strides, pads)
  return dict(name=name, g=g, w2=w2, dp_np=dp_np, dx_np=dx_np, x_shape=x_shape,
              window=(kh, kw), strides=strides, pads=pads)


CASES = [
    ("s2_same", (2, 9, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (0, 1))),
    ("valid_rdil_like", (1, 10, 11, 3), (3, 2, 3, 5), (2, 3), ((0, 0), (0, 0))),
    ("s1_control", (2, 7, 9, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1))),
]


def _ratio(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  nz = want != 0
  if np.array_equal(got, want):
    return "exact"
  r = got[nz] / want[nz]
  if nz.any() and np.allclose(r, r.flat[0]):
    return f"x{r.flat[0]:g} everywhere"
  return f"{int(np.sum(got != want))}/{got.size} differ"


def run(devices) -> dict:
  results = {}
  for name, x_shape, w_shape, strides, pads in CASES:
    c = _case(name, x_shape, w_shape, strides, pads, seed=len(name))
    for dtype in ("int", "float32"):
      g = jnp.asarray(c["g"]) if dtype == "int" else jnp.asarray(c["g"], jnp.float32)
      w2 = jnp.asarray(c["w2"]) if dtype == "int" else jnp.asarray(c["w2"], jnp.float32)
      acc = jnp.int32 if dtype == "int" else jnp.float32
      n, ho, wo, o = c["g"].shape

      def dot(g, w2):
        return lax.dot_general(g.reshape(-1, o), w2, (((1,), (1,)), ((), ())),
                               preferred_element_type=acc).reshape(c["dp_np"].shape)

      def col2im(dp):
        return _col2im_lax(dp, c["x_shape"], c["window"], c["strides"], c["pads"])

      def whole(g, w2):
        return col2im(dot(g, w2))

      dp_in = jnp.asarray(c["dp_np"].astype(np.int32 if dtype == "int" else np.float32))
      for mode, wrap in (("jit", jax.jit), ("eager", lambda f: f)):
        key = f"{name}/{dtype}/{mode}"
        try:
          results[key] = {
              "dot": _ratio(wrap(dot)(g, w2), c["dp_np"]),
              "col2im": _ratio(wrap(col2im)(dp_in), c["dx_np"]),
              "dot+col2im": _ratio(wrap(whole)(g, w2), c["dx_np"]),
          }
        except Exception as e:  # pylint: disable=broad-except
          results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(f"{key:32s} {results[key]}", flush=True)
  # int8 strided slice (im2col patches of the input-dilated case) and a
  # stride-1 int8 conv with int32 output.
  rng = np.random.default_rng(7)
  x8 = rng.integers(-127, 128, (2, 11, 12, 3)).astype(np.int8)
  for mode, wrap in (("jit", jax.jit), ("eager", lambda f: f)):
    f = wrap(lambda a: lax.slice(a, (0, 1, 0, 0), (2, 11, 12, 3), (1, 2, 2, 1)))
    results[f"slice8/{mode}"] = {"slice8": _ratio(f(jnp.asarray(x8)), x8[:, 1:11:2, 0:12:2])}
    print(f"slice8/{mode:27s} {results[f'slice8/{mode}']}", flush=True)
  w8 = rng.integers(-127, 128, (3, 3, 3, 32)).astype(np.int8)
  ref = np.zeros((2, 9, 10, 32), np.int64)
  for kh, kw in itertools.product(range(3), range(3)):
    ref += x8[:, kh:kh + 9, kw:kw + 10].astype(np.int64) @ w8[kh, kw].astype(np.int64)
  for mode, wrap in (("jit", jax.jit), ("eager", lambda f: f)):
    key = f"conv8/{mode}"
    try:
      y = wrap(lambda a, b: lax.conv_general_dilated(
          a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          preferred_element_type=jnp.int32))(jnp.asarray(x8), jnp.asarray(w8))
      results[key] = {"conv8": _ratio(y, ref)}
    except Exception as e:  # pylint: disable=broad-except
      results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    print(f"{key:32s} {results[key]}", flush=True)
  return results


# The four convs whose input gradient came out 2x on the H200 (int8jax's
# tests/test_pallas_backend.py CONV_CASES), for the --with-int8jax section.
INT8JAX_CASES = {
    "s2_same": ((2, 9, 8, 4), (3, 3, 4, 6), (2, 2), "SAME", None, None),
    "valid_rdil": ((1, 10, 11, 3), (3, 2, 3, 5), (2, 3), "VALID", None, (2, 1)),
    "lhs_dil": ((2, 5, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (2, 0)), (2, 2), None),
    "1d": ((3, 11, 4), (3, 4, 5), (2,), "SAME", None, (2,)),
    "s1_same": ((2, 7, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", None, None),
}


def run_int8jax() -> dict:
  """int8jax's XLA-backend input gradient alone (xla.conv_dgrad, called
  directly: the platform check is in the op), then the whole op's backward
  with the check bypassed, against the int64 reference (tests/reference.py).
  Says whether the wrong result is in the backend's ops or around them."""
  import os  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  import reference  # pylint: disable=g-import-not-at-top
  from int8jax.backends import platform as plat  # pylint: disable=g-import-not-at-top
  from int8jax.backends import xla  # pylint: disable=g-import-not-at-top
  from int8jax.conv_spec import make_conv_spec  # pylint: disable=g-import-not-at-top
  import int8jax  # pylint: disable=g-import-not-at-top
  out = {}
  rng = np.random.default_rng(0)
  for name, (xs, ws, s, p, ld, rd) in INT8JAX_CASES.items():
    dn = ("NHWC", "HWIO", "NHWC") if len(xs) == 4 else ("NWC", "WIO", "NWC")
    spec = make_conv_spec(xs, ws, s, p, ld, rd, dn, 1)
    gq = rng.integers(-127, 128, spec.out_shape).astype(np.int8)
    wq = rng.integers(-127, 128, spec.rhs_shape).astype(np.int8)
    ref = reference.conv_dgrad(gq, wq, spec)
    one = jnp.float32(1.0)
    try:
      got = jax.jit(lambda a, b: xla.conv_dgrad(a, b, one, spec, chunk_k=131072))(gq, wq)
      r = {"xla.conv_dgrad": _ratio(got, ref)}
    except Exception as e:  # pylint: disable=broad-except
      r = {"xla.conv_dgrad": f"error {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    # the whole op (custom_vjp, barriers, NaN folding), refusal bypassed
    old = plat.check_xla_allowed
    plat.check_xla_allowed = lambda what="": None
    try:
      x = jnp.asarray(rng.normal(size=xs), jnp.float32)
      w = jnp.asarray(rng.normal(size=ws), jnp.float32)
      cfg = int8jax.QuantConfig(backend="xla", grad_rounding="nearest",
                                grad_granularity="tensor")
      f = lambda a, b: int8jax.quant_conv_general_dilated(a, b, s, p, ld, rd, dn, config=cfg)
      y, vjp = jax.vjp(jax.jit(f), x, w)
      gy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
      dx, _ = vjp(gy)
      from int8jax import quant  # pylint: disable=g-import-not-at-top
      sg = quant.scale_from_clip(quant.absmax(gy))
      sw = quant.scale_from_clip(quant.absmax(w))
      ref2 = reference.conv_dgrad(np.asarray(quant.quantize(gy, sg)),
                                  np.asarray(quant.quantize(w, sw)), spec)
      r["op dx"] = _ratio(np.rint(np.asarray(dx, np.float64) / np.float64(sg * sw)), ref2)
    except Exception as e:  # pylint: disable=broad-except
      r["op dx"] = f"error {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
      plat.check_xla_allowed = old
    out[f"int8jax/{name}"] = r
    print(f"int8jax/{name:24s} {r}", flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--with-int8jax", action="store_true",
                 help="also run int8jax's XLA-backend dgrad and the whole op (bisection)")
  args = p.parse_args(argv)
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()], "python": platform.python_version()}
  print(env, flush=True)
  results = run(jax.devices())
  if args.with_int8jax:
    results.update(run_int8jax())
  wrong = sorted(k for k, v in results.items()
                 if any(s != "exact" for s in v.values()))
  verdict = ("all stages exact" if not wrong else "WRONG: " + ", ".join(wrong))
  print("verdict:", verdict, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"env": env, "results": results, "verdict": verdict}, f, indent=2)
  return 0 if not wrong else 1


if __name__ == "__main__":
  sys.exit(main())
