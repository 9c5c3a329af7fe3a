"""Run by tests/test_data_parallel.py in a fresh process with 2 simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=2 must be set
before jax is imported). Prints one JSON line of results."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import int8jax
from int8jax import backends
from int8jax.backends import xla as xla_backend

FLAX_DN = ("NHWC", "HWIO", "NHWC")
CASES = {  # x, w, strides, groups
    "s1": ((4, 8, 8, 8), (3, 3, 8, 8), (1, 1), 1),
    "s2": ((4, 9, 8, 8), (3, 3, 8, 8), (2, 2), 1),
    "depthwise": ((4, 8, 8, 6), (3, 3, 1, 6), (1, 1), 6),
}


def fwd_bwd(case, cfg):
  xs, ws, st, g = case

  def f(x, w, gy, st_):
    y, vjp = jax.vjp(lambda a, b, s: int8jax.quant_conv_general_dilated(
        a, b, st, "SAME", dimension_numbers=FLAX_DN, feature_group_count=g,
        key=jax.random.key(3), grad_state=s, measure=True, config=cfg), x, w, st_)
    return (y, *vjp(gy))
  return f


def main():
  assert len(jax.devices()) == 2, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  out = {}
  # (a) the per-shard wrapping (local specs, int32-halves psum of the weight
  # gradient) exercised with the XLA backend's functions inside shard_map (a
  # registered copy of the XLA backend declared per_shard): bit-identical to
  # one device, results batch-sharded.
  # (a2) the same with a backend whose weight gradient reads a layout of its own
  # (Backend.conv_wgrad_layout, here CNHW): each device's shard laid out for the local
  # conv, the shards stacked along the layout's first axis, the halves summed.
  laid_runs = []

  def to_cnhw(q):
    return jnp.transpose(q, (3, 0, 1, 2))

  def laid_run(xl, gl, scale, spec, *, out_dtype, halves=False):
    laid_runs.append((tuple(xl.shape), tuple(spec.lhs_shape)))
    back = lambda t: jnp.transpose(t, (1, 2, 3, 0))  # noqa: E731
    return xla_backend.conv_wgrad(back(xl), back(gl), scale, spec, out_dtype=out_dtype,
                                  halves=halves)

  per_shard = xla_backend.BACKEND.replace(name="xla_per_shard", per_shard=True, auto_rank=None)
  laid = per_shard.replace(name="xla_per_shard_laid", conv_wgrad_layout=lambda spec:
                           backends.WgradLayout("cnhw", to_cnhw, to_cnhw, laid_run))
  backends.register(per_shard)
  backends.register(laid)
  try:
    for prefix, bname in (("", "xla_per_shard"), ("laid_", "xla_per_shard_laid")):
      for name, case in CASES.items():
        xs, ws, st, g = case
        x = jax.random.normal(jax.random.key(0), xs)
        w = jax.random.normal(jax.random.key(1), ws) * 30.0
        cfg = int8jax.QuantConfig(backend=bname)
        st0 = int8jax.GradQuantState.initial()
        yshape = jax.eval_shape(lambda a, b: int8jax.quant_conv_general_dilated(
            a, b, st, "SAME", dimension_numbers=FLAX_DN, feature_group_count=g,
            key=jax.random.key(3), config=cfg), x, w).shape
        gy = jax.random.normal(jax.random.key(2), yshape) * 1e3
        one = jax.jit(fwd_bwd(case, cfg))(x, w, gy, st0)
        with jax.set_mesh(mesh):
          f2 = jax.jit(fwd_bwd(case, cfg.replace(data_axis="data")),
                       in_shardings=(sh, rep, sh, rep))
          two = f2(jax.device_put(x, sh), jax.device_put(w, rep), jax.device_put(gy, sh), st0)
          hlo = f2.lower(x, w, gy, st0).compile().as_text()
        la, lb = jax.tree.leaves(one), jax.tree.leaves(two)
        out[prefix + name] = {
            # y, dx, dw: the GEMM results, bit for bit
            "equal": [bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
                      zip(la[:3], lb[:3])],
            # the measurement: float sums XLA partitions across devices (reordered)
            "measurement_rel": max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max()
                                         / max(float(np.abs(np.asarray(a)).max()), 1e-30))
                                   for a, b in zip(la[3:], lb[3:])),
            "y_spec": str(two[0].sharding.spec), "dx_spec": str(two[1].sharding.spec),
            "all_gather": hlo.count("all-gather("),
        }
  finally:
    backends.unregister("xla_per_shard")
    backends.unregister("xla_per_shard_laid")
  out["laid_runs"] = sorted(set(laid_runs))
  # (b) the Pallas backend's data-parallel fwd + bwd lowers for CUDA: the
  # kernels inside the per-device (manual) computations, the weight
  # gradient's halves all-reduced.
  case = CASES["s2"]
  cfg = int8jax.QuantConfig(backend="pallas", data_axis="data")
  args = [jax.ShapeDtypeStruct(case[0], jnp.float32), jax.ShapeDtypeStruct(case[1], jnp.float32),
          jax.ShapeDtypeStruct((4, 5, 4, 8), jnp.float32), int8jax.GradQuantState.initial()]
  with backends.assume_pallas_available(), jax.set_mesh(mesh):
    txt = jax.jit(fwd_bwd(case, cfg)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  out["cuda"] = {"mosaic": txt.count("custom_call @mosaic_gpu"),
                 "manual": txt.count("manual"), "all_reduce": txt.count("all_reduce")}
  # ... and with the direct kernels (their weight gradient reads the channel-major
  # layout, per shard): a direct kernel per GEMM, the halves all-reduced.
  from int8jax.backends import pallas as pallas_backend  # pylint: disable=import-outside-toplevel
  saved = dict(pallas_backend.DIRECT_CONV)
  pallas_backend.DIRECT_CONV.update(dict.fromkeys(saved, True))
  try:
    with backends.assume_pallas_available(), jax.set_mesh(mesh):
      txt = jax.jit(fwd_bwd(case, cfg)).trace(*args).lower(
          lowering_platforms=("cuda",)).as_text()
  finally:
    pallas_backend.DIRECT_CONV.update(saved)
  out["cuda_direct"] = {"mosaic": txt.count("custom_call @mosaic_gpu"),
                        "wgrad_direct": txt.count("int8_conv_wgrad_direct"),
                        "manual": txt.count("manual"), "all_reduce": txt.count("all_reduce")}
  # (c) clear errors
  errs = {}
  with backends.assume_pallas_available():
    try:
      jax.jit(fwd_bwd(case, cfg)).trace(*args)
    except ValueError as e:
      errs["no_mesh"] = str(e)
  with backends.assume_pallas_available(), jax.set_mesh(mesh):
    bad = [jax.ShapeDtypeStruct((3, *case[0][1:]), jnp.float32)] + args[1:2] + [
        jax.ShapeDtypeStruct((3, 5, 4, 8), jnp.float32), args[3]]
    try:
      jax.jit(fwd_bwd(case, cfg)).trace(*bad)
    except ValueError as e:
      errs["indivisible"] = str(e)
  out["errors"] = errs
  # (d) the Pallas kernels traced under a 2-device mesh without data_axis: a
  # warning that names the fix (XLA would gather the whole batch per device).
  import warnings  # pylint: disable=import-outside-toplevel
  with backends.assume_pallas_available(), jax.set_mesh(mesh), \
      warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(fwd_bwd(case, cfg.replace(data_axis=None))).trace(*args)
  out["no_axis_warnings"] = [str(w.message) for w in caught
                             if "without QuantConfig.data_axis" in str(w.message)]
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
