"""Run by tests/test_multiprocess.py as 2 real processes (argv: process id, port):
jax.distributed over loopback (gloo), a per-shard backend whose weight gradient reads a
layout of its own (Backend.conv_wgrad_layout, a CNHW toy), data_axis over the two
processes' devices. Prints one RESULT line: per case, whether y, dx, dw equal one
device's bit for bit, and the (layout shape, local conv shape) pairs the layout's run
saw."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import int8jax
from int8jax import backends
from int8jax.backends import xla as xla_backend

pid, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)

runs = []


def to_cnhw(q):
  return jnp.transpose(q, (3, 0, 1, 2))


def run(xl, gl, scale, spec, *, out_dtype, halves=False):
  runs.append((tuple(xl.shape), tuple(spec.lhs_shape)))
  back = lambda t: jnp.transpose(t, (1, 2, 3, 0))  # noqa: E731
  return xla_backend.conv_wgrad(back(xl), back(gl), scale, spec, out_dtype=out_dtype,
                                halves=halves)


laid = xla_backend.BACKEND.replace(name="laid", per_shard=True, auto_rank=None,
    conv_wgrad_layout=lambda spec: backends.WgradLayout("cnhw", to_cnhw, to_cnhw, run))
backends.register(laid)
DN = ("NHWC", "HWIO", "NHWC")
out = {}
for name, (xs, ws, st) in {"s1": ((4, 8, 8, 8), (3, 3, 8, 8), (1, 1)),
                           "s2": ((4, 9, 8, 8), (3, 3, 8, 8), (2, 2))}.items():
  x = jax.random.normal(jax.random.key(0), xs)
  w = jax.random.normal(jax.random.key(1), ws) * 30.0
  cfg = int8jax.QuantConfig(backend="laid")
  def fwd_bwd(cfg):
    def f(x, w, gy):  # noqa: B023
      y, vjp = jax.vjp(lambda a, b: int8jax.quant_conv_general_dilated(
          a, b, st, "SAME", dimension_numbers=DN, key=jax.random.key(3), config=cfg), x, w)
      return (y, *vjp(gy))
    return f
  yshape = jax.eval_shape(lambda a, b: int8jax.quant_conv_general_dilated(
      a, b, st, "SAME", dimension_numbers=DN, key=jax.random.key(3), config=cfg), x, w).shape
  gy = jax.random.normal(jax.random.key(2), yshape) * 1e3
  local_dev = jax.local_devices()[0]
  with jax.default_device(local_dev):
    one = jax.jit(fwd_bwd(cfg))(jax.device_put(x, local_dev), jax.device_put(w, local_dev),
                                jax.device_put(gy, local_dev))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  def glob(a, s):
    return jax.make_array_from_callback(a.shape, s, lambda idx: np.asarray(a)[idx])
  with jax.set_mesh(mesh):
    two = jax.jit(fwd_bwd(cfg.replace(data_axis="data")))(glob(x, sh), glob(w, rep), glob(gy, sh))
  two = [multihost_utils.process_allgather(t, tiled=True) for t in two]
  out[name] = [bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in zip(one, two)]
out["runs"] = sorted(set(runs))
print("RESULT", pid, json.dumps(out))
jax.distributed.shutdown()
