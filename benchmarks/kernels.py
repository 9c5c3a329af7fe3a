"""Speed of pallas_kernels.int8_matmul vs XLA int8 and bf16 GEMMs (GPU).

Usage::

  python benchmarks/kernels.py            # on a Hopper GPU: full table
  python benchmarks/kernels.py --quick    # 4096^3, 8192^3 and a few conv GEMMs
  python benchmarks/kernels.py --smoke    # CPU: tiny interpret-mode check
  python benchmarks/kernels.py --convs-only  # only the QuantConv section

For every GEMM shape (M, N, K) it times, on the device, three programs that
compute the same (M, N) product of K-major operands:

  int8_matmul   this package's Mosaic GPU kernel: int8 x int8 -> int32 in
                registers, dequantized (per-row/col scales) to float32 in the
                epilogue;
  xla_int8      ``lax.dot_general(int8, int8, preferred_element_type=int32)``
                (cuBLAS IMMA), int32 result, no dequantization;
  xla_bf16      ``lax.dot_general(bf16, bf16, preferred_element_type=f32)``.

Each is jitted, run ``--warmup`` times, then timed ``--iters`` times with
``block_until_ready`` around each call (device-synchronised wall clock; the
median is reported), giving TOP/s = 2*M*N*K / time. The int8_matmul result is
checked against ``int8_matmul_reference`` (exact integer reference).

Shapes: 4096^3, 8192^3 and the conv GEMMs of ResNet-50 (ImageNet, 224x224,
batch 256, v1.5 strides) for the three GEMMs of each quantized conv (UI8 §3):
  forward  M = B*Ho*Wo, N = Cout,            K = kh*kw*Cin
  dgrad    M = B*Hi*Wi, N = Cin,             K = kh*kw*Cout
  wgrad    M = Cout,    N = kh*kw*Cin,       K = B*Ho*Wo   (K-chunked int32)
Second section, the whole quantized layer: ``int8jax.nn.QuantConv`` forward +
backward (input and weight gradients; quantization, im2col and dequantization
included) with ``backend="pallas"``, against
``flax.nnx.Conv`` in bfloat16 (bf16 inputs/params, float32 accumulation), for
ResNet-50's 3x3 convs at batch 256. Jitted ``jax.grad`` of ``sum(y * gy)``
w.r.t. the input and the kernel, medians of device-synchronised runs after
warm-up (the QuantConv is called once first, so its cached activation range
and call counter make the timed steps non-measuring steps, as in training).

The markdown tables are printed and appended to benchmarks/RESULTS.md with the
card, date and jax version. Without a GPU the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pallas_kernels as pk  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BATCH = 256

# (name, H_out, W_out, C_in, C_out, kernel, stride) -- one entry per distinct
# conv of ResNet-50 v1.5 (the first 7x7 conv stays float, as in the paper).
RESNET50_CONVS = (
    ("l1.1x1a 64-64", 56, 56, 64, 64, 1, 1),
    ("l1.3x3 64-64", 56, 56, 64, 64, 3, 1),
    ("l1.1x1b 64-256", 56, 56, 64, 256, 1, 1),
    ("l1.1x1a 256-64", 56, 56, 256, 64, 1, 1),
    ("l2.1x1a 256-128", 56, 56, 256, 128, 1, 1),
    ("l2.3x3/2 128-128", 28, 28, 128, 128, 3, 2),
    ("l2.3x3 128-128", 28, 28, 128, 128, 3, 1),
    ("l2.1x1b 128-512", 28, 28, 128, 512, 1, 1),
    ("l2.1x1a 512-128", 28, 28, 512, 128, 1, 1),
    ("l2.down 256-512", 28, 28, 256, 512, 1, 2),
    ("l3.1x1a 512-256", 28, 28, 512, 256, 1, 1),
    ("l3.3x3 256-256", 14, 14, 256, 256, 3, 1),
    ("l3.1x1b 256-1024", 14, 14, 256, 1024, 1, 1),
    ("l3.1x1a 1024-256", 14, 14, 1024, 256, 1, 1),
    ("l4.1x1a 1024-512", 14, 14, 1024, 512, 1, 1),
    ("l4.3x3 512-512", 7, 7, 512, 512, 3, 1),
    ("l4.1x1b 512-2048", 7, 7, 512, 2048, 1, 1),
    ("l4.1x1a 2048-512", 7, 7, 2048, 512, 1, 1),
)


def gemm_shapes(quick: bool = False):
  """[(label, M, N, K)] for the benchmark."""
  shapes = [("square 4096^3", 4096, 4096, 4096), ("square 8192^3", 8192, 8192, 8192)]
  convs = RESNET50_CONVS[:: 4] if quick else RESNET50_CONVS
  for name, ho, wo, cin, cout, ks, stride in convs:
    hi, wi = ho * stride, wo * stride
    shapes.append((f"{name} fwd", BATCH * ho * wo, cout, ks * ks * cin))
    shapes.append((f"{name} dgrad", BATCH * hi * wi, cin, ks * ks * cout))
    shapes.append((f"{name} wgrad", cout, ks * ks * cin, BATCH * ho * wo))
  return shapes


def _time(fn, args, warmup: int, iters: int) -> float:
  """Median seconds of ``fn(*args)``, device-synchronised."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_shape(m, n, k, warmup, iters):
  key_a, key_b, key_s = jax.random.split(jax.random.key(0), 3)
  a = jax.random.randint(key_a, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
  b = jax.random.randint(key_b, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
  a_scale = jax.random.uniform(key_s, (m,), jnp.float32, 1e-3, 1.0)
  b_scale = jnp.full((n,), 0.01, jnp.float32)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  dims = (((1,), (1,)), ((), ()))

  kernel = jax.jit(lambda a, b, sa, sb: pk.int8_matmul(a, b, a_scale=sa,
                                                       b_scale=sb))
  xla_int8 = jax.jit(lambda a, b: lax.dot_general(
      a, b, dims, preferred_element_type=jnp.int32))
  xla_bf16 = jax.jit(lambda a, b: lax.dot_general(
      a, b, dims, preferred_element_type=jnp.float32))

  got = kernel(a, b, a_scale, b_scale)
  want = pk.int8_matmul_reference(a, b, a_scale=a_scale, b_scale=b_scale)
  rel = float(jnp.max(jnp.abs(got - want)) /
              jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
  ops = 2.0 * m * n * k
  t_kernel = _time(kernel, (a, b, a_scale, b_scale), warmup, iters)
  t_int8 = _time(xla_int8, (a, b), warmup, iters)
  t_bf16 = _time(xla_bf16, (a16, b16), warmup, iters)
  del a, b, a16, b16, got, want
  return dict(t_kernel=t_kernel, t_int8=t_int8, t_bf16=t_bf16,
              tops_kernel=ops / t_kernel / 1e12, tops_int8=ops / t_int8 / 1e12,
              tops_bf16=ops / t_bf16 / 1e12, rel_err=rel)


def markdown_table(rows) -> str:
  lines = [
      "| GEMM | M | N | K | int8_matmul ms | TOP/s | XLA int8 ms | TOP/s "
      "| XLA bf16 ms | TFLOP/s | vs int8 | vs bf16 | max rel err |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for label, m, n, k, r in rows:
    if isinstance(r, str):
      lines.append(f"| {label} | {m} | {n} | {k} | {r} | | | | | | | | |")
      continue
    lines.append(
        f"| {label} | {m} | {n} | {k} | {r['t_kernel']*1e3:.3f} | "
        f"{r['tops_kernel']:.1f} | {r['t_int8']*1e3:.3f} | {r['tops_int8']:.1f} "
        f"| {r['t_bf16']*1e3:.3f} | {r['tops_bf16']:.1f} | "
        f"{r['t_int8']/r['t_kernel']:.2f}x | {r['t_bf16']/r['t_kernel']:.2f}x | "
        f"{r['rel_err']:.1e} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# QuantConv forward + backward vs nnx.Conv (bf16).


def _conv_fwd_bwd(module):
  """(jit((params, rest, x, gy) -> (dparams, dx)), params, rest) for an NNX conv."""
  from flax import nnx

  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  @jax.jit
  def step(params, rest, x, gy):
    def loss(params, x):
      y = nnx.merge(graphdef, params, rest, copy=True)(x)
      return jnp.sum(y.astype(jnp.float32) * gy.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  return step, params, rest


def bench_conv_layer(ho, wo, cin, cout, stride, warmup, iters):
  from flax import nnx
  from int8jax import QuantConfig
  from int8jax.nn import QuantConv

  hi, wi = ho * stride, wo * stride
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (BATCH, hi, wi, cin), jnp.bfloat16)
  gy = jax.random.normal(kg, (BATCH, ho, wo, cout), jnp.bfloat16)
  conv_args = dict(in_features=cin, out_features=cout, kernel_size=(3, 3),
                   strides=stride, padding=((1, 1), (1, 1)), use_bias=False)
  out = {}
  modules = {
      "bf16": lambda: nnx.Conv(**conv_args, dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
  }
  # Only the Pallas backend: the XLA backend is refused on GPUs (wrong input
  # gradients under XLA:GPU, see int8jax.backends).
  modules["pallas"] = functools.partial(
      QuantConv, **conv_args, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
      quant=QuantConfig(backend="pallas"))
  for label, make in modules.items():
    try:
      module = make()
      if label != "bf16":
        jax.block_until_ready(module(x))  # cache the range, count 1 call
      step, params, rest = _conv_fwd_bwd(module)
      out[label] = _time(step, (params, rest, x, gy), warmup, iters)
    except Exception as e:  # pylint: disable=broad-except
      out[label] = f"failed: {type(e).__name__}: {str(e)[:80]}"
  return out


def conv_table(rows) -> str:
  lines = [
      "| layer (3x3, batch 256) | GOP fwd+bwd | QuantConv pallas ms "
      "| nnx.Conv bf16 ms | pallas vs bf16 |",
      "|---|---:|---:|---:|---:|",
  ]
  for label, gop, r in rows:
    def ms(key):
      v = r.get(key)
      return f"{v*1e3:.3f}" if isinstance(v, float) else str(v)

    def ratio(key):
      v, ref = r.get(key), r.get("bf16")
      return (f"{ref / v:.2f}x" if isinstance(v, float) and isinstance(ref, float)
              else "")

    lines.append(f"| {label} | {gop:.1f} | {ms('pallas')} | {ms('bf16')} "
                 f"| {ratio('pallas')} |")
  return "\n".join(lines)


def conv_section(warmup, iters):
  rows = []
  for name, ho, wo, cin, cout, ks, stride in RESNET50_CONVS:
    if ks != 3:
      continue
    gop = 3 * 2.0 * BATCH * ho * wo * cout * 9 * cin / 1e9
    rows.append((name, gop, bench_conv_layer(ho, wo, cin, cout, stride, warmup,
                                             iters)))
    print(conv_table(rows[-1:]).splitlines()[-1], flush=True)
  return conv_table(rows)


def smoke() -> int:
  """Tiny interpret-mode run: checks the kernel on CPU, times nothing."""
  a = jnp.asarray(np.random.default_rng(0).integers(-127, 128, (130, 200)),
                  jnp.int8)
  b = jnp.asarray(np.random.default_rng(1).integers(-127, 128, (72, 200)),
                  jnp.int8)
  config = pk.Int8MatmulConfig(tile_m=64, tile_n=32, tile_k=64, swizzle=64,
                               max_concurrent_steps=2)
  got = pk.int8_matmul(a, b, a_scale=0.5, config=config, interpret=True)
  ok = bool(jnp.array_equal(got, pk.int8_matmul_reference(a, b, a_scale=0.5)))
  print(f"interpret-mode smoke test (130x72x200): "
        f"{'bit-exact' if ok else 'MISMATCH'}")
  return 0 if ok else 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU interpret-mode check, no timings")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--iters", type=int, default=50)
  parser.add_argument("--convs-only", action="store_true",
                      help="only the QuantConv vs nnx.Conv section")
  parser.add_argument("--no-append", action="store_true",
                      help="print the table only, don't touch RESULTS.md")
  args = parser.parse_args(argv)

  if not pk.available():
    print(f"benchmarks/kernels.py needs a Hopper GPU (sm_90) with Mosaic GPU; "
          f"this machine's jax backend is {jax.default_backend()!r}. "
          "No timings taken.")
    return smoke() if args.smoke else 0

  device = jax.devices()[0]
  rows = []
  for label, m, n, k in ([] if args.convs_only else gemm_shapes(args.quick)):
    try:
      r = bench_shape(m, n, k, args.warmup, args.iters)
    except Exception as e:  # pylint: disable=broad-except
      r = f"failed: {type(e).__name__}: {str(e)[:80]}"
    rows.append((label, m, n, k, r))
    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
  how = (f"Median of {args.iters} device-synchronised runs after "
         f"{args.warmup} warm-up runs; `python benchmarks/kernels.py"
         f"{' --quick' if args.quick else ''}"
         f"{' --convs-only' if args.convs_only else ''}`.\n")
  when = (f"{device.device_kind}, {datetime.date.today().isoformat()}, "
          f"jax {jax.__version__}")
  text = ""
  if rows:
    text += (f"### int8_matmul vs XLA ({when})\n\n{how}\n"
             f"{markdown_table(rows)}\n")
  print("\nQuantConv forward+backward vs nnx.Conv (bf16):", flush=True)
  text += (f"\n### QuantConv fwd+bwd vs nnx.Conv bf16, ResNet-50 3x3 ({when})"
           f"\n\n{how}\n{conv_section(args.warmup, args.iters)}\n")
  print()
  print(text)
  if not args.no_append:
    with open(RESULTS, "a", encoding="utf-8") as f:
      f.write("\n" + text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
