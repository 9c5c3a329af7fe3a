"""Speed of pallas_kernels.int8_matmul vs XLA int8 and bf16 GEMMs (GPU).

Usage::

  python benchmarks/kernels.py            # on a Hopper GPU: full table
  python benchmarks/kernels.py --quick    # 4096^3, 8192^3 and a few conv GEMMs
  python benchmarks/kernels.py --smoke    # CPU: tiny interpret-mode check
  python benchmarks/kernels.py --convs-only  # only the QuantConv section
  python benchmarks/kernels.py --implicit-only  # only the implicit-conv section
  python benchmarks/kernels.py --implicit-only --lower-only  # CPU: lower all
  python benchmarks/kernels.py --square-only --with-ws  # 4096^3, 8192^3 only
  python benchmarks/kernels.py --direct-wgrad-only  # direct wgrad vs its persistent variant

For every GEMM shape (M, N, K) it times, on the device, three programs that
compute the same (M, N) product of K-major operands:

  int8_matmul   this package's Mosaic GPU kernel: int8 x int8 -> int32 in
                registers, dequantized (per-row/col scales) to float32 in the
                epilogue;
  xla_int8      ``lax.dot_general(int8, int8, preferred_element_type=int32)``
                (cuBLAS IMMA), int32 result, no dequantization;
  xla_bf16      ``lax.dot_general(bf16, bf16, preferred_element_type=f32)``;
  int8_matmul_ws  (``--with-ws``) ``pk.int8_matmul_ws``, the persistent,
                warp-specialised kernel, same arguments and epilogue as
                int8_matmul (never run on a GPU before: gpu_session.sh passes
                --with-ws only when its smoke test passed).

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

Third section, the implicit-GEMM conv kernels (``pk.int8_conv``,
``pk.int8_conv_dgrad``, ``pk.int8_conv_wgrad``: no im2col matrix), for
every distinct ResNet-50 3x3
conv (strides 1 and 2) and the 64-wide 1x1s (plus the 1x1 stride-2
downsample), batch 256, each timed like the GEMMs (jitted, warm-up,
``block_until_ready``, median) against
  int8_matmul   this package's GEMM on the equivalent GEMM of the same MACs
                (forward M = B*Ho*Wo, N = O, K = KH*KW*C; dgrad M = B*H*W,
                N = C, K = KH*KW*O for stride 1, int8jax's col2im GEMM
                M = B*Ho*Wo, N = KH*KW*C, K = O for strides > 1), operands
                already laid out (the im2col pass is not timed);
  bf16 conv     ``lax.conv_general_dilated`` in bfloat16 (cuDNN), forward,
                its VJP w.r.t. x (dgrad) and w.r.t. (x, w) (backward);
  int8 wgrad    the weight gradient's existing route (what int8jax runs
    (XLA)       today): explicit int8 im2col and XLA's int8 ``dot_general``
                (cuBLAS) over K chunks of 131,072 pixels, chunks summed in
                float32;
with TOP/s = 2 * B*Ho*Wo*O*KH*KW*C / time (useful MACs); "bwd" is dgrad +
wgrad (kernels) against the bf16 VJP w.r.t. (x, w). The kernels are checked
first: int32 fwd / dgrad outputs and the float32 wgrad (exactly rounded) at
batch 2 equal the CPU references exactly. With ``--with-ws`` four more
columns time ``pk.int8_matmul_ws`` on the same two GEMMs as int8_matmul
(operands, scales and output dtype alike) and its speed-up over int8_matmul.
Rows are printed and appended to RESULTS.md as they finish.

Fourth section (``--direct-wgrad-only``, alone): the direct weight gradient
(``conv_direct_wgrad.int8_conv_wgrad_channel_major``, one work item per block)
against its persistent, warp-specialised variant
(``conv_direct_wgrad_ws.int8_conv_wgrad_channel_major_ws``; never run on a GPU
before: gpu_session.sh runs this section only when its smoke test passed) on
three ResNet-50 layers at batch 256 (3x3 64@56, 3x3/2 128, 3x3 512@7: long K,
strided, short K), both on the channel-major operands the library's quantizing
fusions write (the transposes untimed), float32 with a per-channel scale; the
"exact" column says whether the two results are equal bit for bit (both are
the exact sum rounded once). ``--no-direct-baseline`` times the persistent
kernel alone (when the non-persistent one failed its smoke test).

The markdown tables are printed and appended to benchmarks/RESULTS.md with the
card, date and jax version. Without a GPU the script says so and exits 0
(``--lower-only`` then lowers every timed function of the implicit-conv
section for CUDA from the CPU instead).
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


def bench_shape(m, n, k, warmup, iters, with_ws=False):
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
  r = dict(t_kernel=t_kernel, t_int8=t_int8, t_bf16=t_bf16,
           tops_kernel=ops / t_kernel / 1e12, tops_int8=ops / t_int8 / 1e12,
           tops_bf16=ops / t_bf16 / 1e12, rel_err=rel)
  if with_ws:
    try:
      ws = jax.jit(lambda a, b, sa, sb: pk.int8_matmul_ws(a, b, a_scale=sa, b_scale=sb))
      got_ws = ws(a, b, a_scale, b_scale)
      r["ws_rel_err"] = float(jnp.max(jnp.abs(got_ws - want)) /
                              jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
      r["t_ws"] = _time(ws, (a, b, a_scale, b_scale), warmup, iters)
      r["tops_ws"] = ops / r["t_ws"] / 1e12
    except Exception as e:  # pylint: disable=broad-except
      r["t_ws"] = f"failed: {type(e).__name__}: {str(e)[:60]}"
  del a, b, a16, b16, got, want
  return r


def markdown_table(rows, with_ws=False) -> str:
  """The GEMM table; ``with_ws``: four more columns, int8_matmul_ws's time,
  TOP/s, speed-up over int8_matmul and max relative error."""
  ws_head = " int8_matmul_ws ms | TOP/s | ws vs int8_matmul | ws max rel err |"
  lines = [
      "| GEMM | M | N | K | int8_matmul ms | TOP/s | XLA int8 ms | TOP/s "
      "| XLA bf16 ms | TFLOP/s | vs int8 | vs bf16 | max rel err |"
      + (ws_head if with_ws else ""),
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
      + ("---:|" * 4 if with_ws else ""),
  ]
  for label, m, n, k, r in rows:
    if isinstance(r, str):
      lines.append(f"| {label} | {m} | {n} | {k} | {r} | | | | | | | | |"
                   + (" | | | |" if with_ws else ""))
      continue
    ws_cells = ""
    if with_ws:
      t_ws = r.get("t_ws")
      ws_cells = (f" {t_ws*1e3:.3f} | {r['tops_ws']:.1f} | {r['t_kernel']/t_ws:.2f}x | "
                  f"{r['ws_rel_err']:.1e} |" if isinstance(t_ws, float)
                  else f" {t_ws} | | | |")
    lines.append(
        f"| {label} | {m} | {n} | {k} | {r['t_kernel']*1e3:.3f} | "
        f"{r['tops_kernel']:.1f} | {r['t_int8']*1e3:.3f} | {r['tops_int8']:.1f} "
        f"| {r['t_bf16']*1e3:.3f} | {r['tops_bf16']:.1f} | "
        f"{r['t_int8']/r['t_kernel']:.2f}x | {r['t_bf16']/r['t_kernel']:.2f}x | "
        f"{r['rel_err']:.1e} |" + ws_cells)
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
      config=QuantConfig(backend="pallas"))
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


# ---------------------------------------------------------------------------
# Implicit-GEMM conv kernels vs int8_matmul (equivalent GEMM) vs bf16 conv.

# (name, H_in, W_in, C_in, C_out, kernel, stride): every distinct 3x3 conv of
# ResNet-50 v1.5 (the stride-2 3x3 opens layers 2-4) and the 64-wide 1x1s.
IMPLICIT_CONV_LAYERS = (
    ("l1.3x3 64-64", 56, 56, 64, 64, 3, 1),
    ("l2.3x3/2 128-128", 56, 56, 128, 128, 3, 2),
    ("l2.3x3 128-128", 28, 28, 128, 128, 3, 1),
    ("l3.3x3/2 256-256", 28, 28, 256, 256, 3, 2),
    ("l3.3x3 256-256", 14, 14, 256, 256, 3, 1),
    ("l4.3x3/2 512-512", 14, 14, 512, 512, 3, 2),
    ("l4.3x3 512-512", 7, 7, 512, 512, 3, 1),
    ("l1.1x1a 64-64", 56, 56, 64, 64, 1, 1),
    ("l1.1x1b 64-256", 56, 56, 64, 256, 1, 1),
    ("l1.1x1a 256-64", 56, 56, 256, 64, 1, 1),
    ("l2.down 256-512 /2", 56, 56, 256, 512, 1, 2),
)
_NHWC = ("NHWC", "HWIO", "NHWC")


def _layer_geometry(h, w, cin, cout, ks, stride, batch=BATCH):
  pads = ((ks // 2, ks // 2),) * 2
  x_shape = (batch, h, w, cin)
  w_shape = (ks, ks, cin, cout)
  g_shape = pk.conv_output_shape(x_shape, w_shape, (stride, stride), pads)
  return x_shape, w_shape, g_shape, (stride, stride), pads


def _int8_random(key, shape):
  return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)


def _random_operands(key, specs):
  """Arrays for {name: ShapeDtypeStruct}: int8 in [-127, 127], bf16 normal,
  float32 scales 0.01."""
  out = {}
  for k, (name, spec) in zip(jax.random.split(key, len(specs)), specs.items()):
    if spec.dtype == jnp.int8:
      out[name] = _int8_random(k, spec.shape)
    elif spec.dtype == jnp.bfloat16:
      out[name] = jax.random.normal(k, spec.shape, jnp.bfloat16)
    else:
      out[name] = jnp.full(spec.shape, 0.01, spec.dtype)
  return out


def _wgrad_int8_xla(x, g, *, ks, strides, pads, chunk=131072):
  """dw (KH, KW, C, O) float32 by the existing route: explicit int8 im2col
  and XLA int8 dot_generals over pixel chunks (exact int32 per chunk)."""
  n, _, _, c = x.shape
  _, ho, wo, o = g.shape
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  cols = [xp[:, i: i + strides[0] * (ho - 1) + 1: strides[0],
             j: j + strides[1] * (wo - 1) + 1: strides[1]]
          for i in range(ks) for j in range(ks)]
  patches = jnp.concatenate(cols, axis=-1).reshape(n * ho * wo, ks * ks * c)
  gm = g.reshape(n * ho * wo, o)
  dims = (((0,), (0,)), ((), ()))
  total = None
  for start in range(0, patches.shape[0], chunk):
    part = lax.dot_general(patches[start: start + chunk],
                           gm[start: start + chunk], dims,
                           preferred_element_type=jnp.int32)
    part = part.astype(jnp.float32)
    total = part if total is None else total + part
  return total.reshape(ks, ks, c, o)


def _implicit_programs(layer, out_dtype, with_ws=False):
  """One layer's timed programs: ({name: (jitted fn, operand names)},
  {operand name: ShapeDtypeStruct}, useful MACs). ``with_ws``: also
  int8_matmul_ws on int8_matmul's two GEMMs (ws_fwd, ws_dgrad)."""
  _, h, w, cin, cout, ks, stride = layer
  x_shape, w_shape, g_shape, strides, pads = _layer_geometry(
      h, w, cin, cout, ks, stride)
  n, ho, wo, _ = g_shape
  macs = n * ho * wo * cout * ks * ks * cin
  sds = jax.ShapeDtypeStruct
  specs = {"x": sds(x_shape, jnp.int8), "w": sds(w_shape, jnp.int8),
           "g": sds(g_shape, jnp.int8), "s_out": sds((cout,), jnp.float32),
           "s_in": sds((cin,), jnp.float32),
           "x16": sds(x_shape, jnp.bfloat16), "w16": sds(w_shape, jnp.bfloat16),
           "g16": sds(g_shape, jnp.bfloat16)}
  conv_kw = dict(window_strides=strides, padding=pads, out_dtype=out_dtype)
  programs = {
      "fwd": (jax.jit(lambda x, w, s: pk.int8_conv(x, w, scale=s, **conv_kw)),
              ("x", "w", "s_out")),
      "dgrad": (jax.jit(lambda g, w, s: pk.int8_conv_dgrad(
          g, w, input_shape=x_shape, scale=s, **conv_kw)),
                ("g", "w", "s_in")),
  }
  # int8_matmul on the equivalent GEMMs (operands already K-major).
  fwd_gemm = (n * ho * wo, cout, ks * ks * cin)
  if stride == 1:
    dgrad_gemm = (n * h * w, cin, ks * ks * cout)
  else:  # int8jax's strided dgrad: int32 to patch space (col2im untimed)
    dgrad_gemm = (n * ho * wo, ks * ks * cin, cout)
  gemms = [(pk.int8_matmul, "mm_fwd", "mm_fwd", fwd_gemm),
           (pk.int8_matmul, "mm_dgrad", "mm_dgrad", dgrad_gemm)]
  if with_ws:  # the same GEMMs, operands and outputs
    gemms += [(pk.int8_matmul_ws, "ws_fwd", "mm_fwd", fwd_gemm),
              (pk.int8_matmul_ws, "ws_dgrad", "mm_dgrad", dgrad_gemm)]
  for gemm_fn, name, ops, (m, nn, k) in gemms:
    specs[ops + "_a"] = sds((m, k), jnp.int8)
    specs[ops + "_b"] = sds((nn, k), jnp.int8)
    if ops == "mm_dgrad" and stride > 1:
      fn = functools.partial(gemm_fn, out_dtype=jnp.int32)
      programs[name] = (jax.jit(fn), (ops + "_a", ops + "_b"))
    else:
      specs[ops + "_s"] = sds((nn,), jnp.float32)
      programs[name] = (jax.jit(lambda a, b, s, gemm_fn=gemm_fn: gemm_fn(
          a, b, b_scale=s, out_dtype=out_dtype)),
                        (ops + "_a", ops + "_b", ops + "_s"))
  programs["wgrad"] = (jax.jit(lambda x, g, s: pk.int8_conv_wgrad(
      x, g, kernel_shape=w_shape, window_strides=strides, padding=pads,
      scale=s)), ("x", "g", "s_out"))
  programs["wgrad_int8"] = (jax.jit(functools.partial(
      _wgrad_int8_xla, ks=ks, strides=strides, pads=pads)), ("x", "g"))

  def conv16(x, w):
    return lax.conv_general_dilated(x, w, strides, pads,
                                    dimension_numbers=_NHWC)

  programs["bf16_fwd"] = (jax.jit(conv16), ("x16", "w16"))
  programs["bf16_dgrad"] = (jax.jit(
      lambda x, w, gy: jax.vjp(lambda x: conv16(x, w), x)[1](gy)[0]),
                            ("x16", "w16", "g16"))
  programs["bf16_bwd"] = (jax.jit(
      lambda x, w, gy: jax.vjp(conv16, x, w)[1](gy)), ("x16", "w16", "g16"))
  return programs, specs, macs


def _check_implicit_exact(layer) -> bool:
  """fwd, dgrad (int32) and wgrad (float32) at batch 2 == the CPU
  references, exactly."""
  _, h, w, cin, cout, ks, stride = layer
  x_shape, w_shape, g_shape, strides, pads = _layer_geometry(
      h, w, cin, cout, ks, stride, batch=2)
  keys = jax.random.split(jax.random.key(2), 3)
  x, wt, g = (_int8_random(k, s) for k, s in zip(keys, (x_shape, w_shape,
                                                         g_shape)))
  conv_kw = dict(window_strides=strides, padding=pads, out_dtype=jnp.int32)
  got_y = jax.jit(functools.partial(pk.int8_conv, **conv_kw))(x, wt)
  got_dx = jax.jit(functools.partial(pk.int8_conv_dgrad, input_shape=x_shape,
                                     **conv_kw))(g, wt)
  wgrad_kw = dict(kernel_shape=w_shape, window_strides=strides, padding=pads)
  got_dw = jax.jit(functools.partial(pk.int8_conv_wgrad, **wgrad_kw))(x, g)
  cpu = jax.devices("cpu")[0]
  xc, wc, gc = jax.device_put((x, wt, g), cpu)
  with jax.default_device(cpu):
    want_y = pk.int8_conv_reference(xc, wc, **conv_kw)
    want_dx = pk.int8_conv_dgrad_reference(gc, wc, input_shape=x_shape,
                                           **conv_kw)
    want_dw = pk.int8_conv_wgrad_reference(xc, gc, **wgrad_kw)
  return bool(np.array_equal(np.asarray(got_y), np.asarray(want_y)) and
              np.array_equal(np.asarray(got_dx), np.asarray(want_dx)) and
              np.array_equal(np.asarray(got_dw), np.asarray(want_dw)))


def bench_implicit_layer(layer, warmup, iters, out_dtype, with_ws=False):
  programs, specs, macs = _implicit_programs(layer, out_dtype, with_ws)
  r = {"gop": 2.0 * macs / 1e9}
  try:
    r["exact"] = "yes" if _check_implicit_exact(layer) else "NO"
  except Exception as e:  # pylint: disable=broad-except
    r["exact"] = f"failed: {type(e).__name__}: {str(e)[:60]}"
  for i, (name, (fn, operand_names)) in enumerate(programs.items()):
    try:
      # Operands per program, freed after it: batch-256 layers stay small.
      ops = _random_operands(jax.random.key(i),
                             {k: specs[k] for k in operand_names})
      r[name] = _time(fn, tuple(ops[k] for k in operand_names), warmup,
                      iters)
      del ops
    except Exception as e:  # pylint: disable=broad-except
      r[name] = f"failed: {type(e).__name__}: {str(e)[:60]}"
  return r


IMPLICIT_HEADER = (
    "| layer (batch 256) | GOP | fwd ms | fwd TOP/s | int8_matmul fwd-GEMM ms "
    "| fwd vs matmul | bf16 fwd ms | fwd vs bf16 | dgrad ms | dgrad TOP/s "
    "| int8_matmul dgrad-GEMM ms | dgrad vs matmul | bf16 dgrad ms "
    "| dgrad vs bf16 | wgrad ms | wgrad TOP/s | int8 wgrad (XLA) ms "
    "| wgrad vs XLA | bf16 bwd ms | bwd (dgrad+wgrad) vs bf16 | exact |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
    "|---:|---:|---:|---:|---:|---:|---|")
# --with-ws: int8_matmul_ws on int8_matmul's two GEMMs, after the other columns
IMPLICIT_WS_HEADER = (" ws fwd-GEMM ms | ws vs matmul fwd | ws dgrad-GEMM ms "
                      "| ws vs matmul dgrad |", "---:|---:|---:|---:|")


def implicit_header(with_ws=False) -> str:
  if not with_ws:
    return IMPLICIT_HEADER
  head, rule = IMPLICIT_HEADER.split("\n")
  return f"{head}{IMPLICIT_WS_HEADER[0]}\n{rule}{IMPLICIT_WS_HEADER[1]}"


def implicit_row(name, r, with_ws=False) -> str:
  def ms(key):
    v = r.get(key)
    return f"{v * 1e3:.3f}" if isinstance(v, float) else str(v)

  def tops(key):
    v = r.get(key)
    return f"{r['gop'] / v / 1e3:.1f}" if isinstance(v, float) else ""

  def ratio(num, den):  # speed-up of `den` over `num` (time ratio)
    a = sum(r[k] for k in num) if all(isinstance(r.get(k), float)
                                      for k in num) else None
    b = r.get(den)
    return f"{a / b:.2f}x" if a is not None and isinstance(b, float) else ""

  bwd = ("dgrad", "wgrad")
  bwd_ratio = ""
  if all(isinstance(r.get(k), float) for k in bwd + ("bf16_bwd",)):
    bwd_ratio = f"{r['bf16_bwd'] / (r['dgrad'] + r['wgrad']):.2f}x"
  return (f"| {name} | {r['gop']:.1f} | {ms('fwd')} | {tops('fwd')} "
          f"| {ms('mm_fwd')} | {ratio(('mm_fwd',), 'fwd')} | {ms('bf16_fwd')} "
          f"| {ratio(('bf16_fwd',), 'fwd')} | {ms('dgrad')} | {tops('dgrad')} "
          f"| {ms('mm_dgrad')} | {ratio(('mm_dgrad',), 'dgrad')} "
          f"| {ms('bf16_dgrad')} | {ratio(('bf16_dgrad',), 'dgrad')} "
          f"| {ms('wgrad')} | {tops('wgrad')} | {ms('wgrad_int8')} "
          f"| {ratio(('wgrad_int8',), 'wgrad')} | {ms('bf16_bwd')} "
          f"| {bwd_ratio} | {r['exact']} |"
          + (f" {ms('ws_fwd')} | {ratio(('mm_fwd',), 'ws_fwd')} | {ms('ws_dgrad')} "
             f"| {ratio(('mm_dgrad',), 'ws_dgrad')} |" if with_ws else ""))


def implicit_section(warmup, iters, out_dtype, quick, append_to=None,
                     title="", with_ws=False):
  layers = IMPLICIT_CONV_LAYERS[::3] if quick else IMPLICIT_CONV_LAYERS
  head = (f"\n### {title}\n\n" if title else "") + implicit_header(with_ws)
  print(head, flush=True)
  if append_to:
    with open(append_to, "a", encoding="utf-8") as f:
      f.write(head + "\n")
  rows = []
  for layer in layers:
    row = implicit_row(layer[0], bench_implicit_layer(layer, warmup, iters,
                                                       out_dtype, with_ws),
                       with_ws)
    rows.append(row)
    print(row, flush=True)
    if append_to:  # as it goes: a run cut short keeps its rows
      with open(append_to, "a", encoding="utf-8") as f:
        f.write(row + "\n")
  return "\n".join([IMPLICIT_HEADER] + rows)


def lower_implicit_section(out_dtype, with_ws=False) -> int:
  """CPU check: every program of the section lowers for CUDA (Mosaic GPU's
  own checks included), on shapes only; times nothing."""
  failures = 0
  for layer in IMPLICIT_CONV_LAYERS:
    programs, specs, _ = _implicit_programs(layer, out_dtype, with_ws)
    for name, (fn, operand_names) in programs.items():
      try:
        fn.trace(*(specs[k] for k in operand_names)).lower(
            lowering_platforms=("cuda",))
        status = "ok"
      except Exception as e:  # pylint: disable=broad-except
        failures += 1
        status = f"FAILED {type(e).__name__}: {str(e)[:160]}"
      print(f"{layer[0]:20s} {name:11s} {status}", flush=True)
  print(f"{failures} failures")
  return 1 if failures else 0


# The direct weight gradient vs its persistent variant: (name, x shape, kernel shape, stride).
DIRECT_WGRAD_LAYERS = (
    ("conv2_3x3 56x56 64", (BATCH, 56, 56, 64), (3, 3, 64, 64), 1),
    ("conv3_3x3_s2 128", (BATCH, 56, 56, 128), (3, 3, 128, 128), 2),
    ("conv5_3x3 7x7 512", (BATCH, 7, 7, 512), (3, 3, 512, 512), 1),
)


def _direct_wgrad_programs(layer, baseline=True):
  """({name: jitted fn of (xt, gt, scale)}, {operand: ShapeDtypeStruct}, useful MACs)."""
  from pallas_kernels import conv_direct_wgrad as dw
  from pallas_kernels import conv_direct_wgrad_ws as dws
  _, x_shape, w_shape, s = layer
  ops = dw.channel_major_operands(x_shape, w_shape, window_strides=(s, s), padding="SAME")
  n, ho, wo, o = ops.g_shape
  macs = n * ho * wo * o * w_shape[0] * w_shape[1] * w_shape[2]
  specs = {"xt": jax.ShapeDtypeStruct(ops.x_cm_shape, jnp.int8),
           "gt": jax.ShapeDtypeStruct(ops.g_cm_shape, jnp.int8),
           "scale": jax.ShapeDtypeStruct((o,), jnp.float32)}
  programs = {}
  if baseline:
    programs["direct"] = jax.jit(lambda xt, gt, sc: dw.int8_conv_wgrad_channel_major(
        xt, gt, operands=ops, scale=sc))
  programs["direct_ws"] = jax.jit(lambda xt, gt, sc: dws.int8_conv_wgrad_channel_major_ws(
      xt, gt, operands=ops, scale=sc))
  return programs, specs, macs


DIRECT_WGRAD_HEADER = (
    "| layer (batch 256) | GOP | direct wgrad ms | TOP/s | persistent (ws) ms | TOP/s "
    "| ws vs direct | exact |\n|---|---:|---:|---:|---:|---:|---:|---|")


def direct_wgrad_row(name, r) -> str:
  def ms(key):
    v = r.get(key)
    return f"{v * 1e3:.3f}" if isinstance(v, float) else str(v or "")

  def tops(key):
    v = r.get(key)
    return f"{r['gop'] / v / 1e3:.1f}" if isinstance(v, float) else ""

  a, b = r.get("direct"), r.get("direct_ws")
  ratio = f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else ""
  return (f"| {name} | {r['gop']:.1f} | {ms('direct')} | {tops('direct')} "
          f"| {ms('direct_ws')} | {tops('direct_ws')} | {ratio} | {r.get('exact', '')} |")


def bench_direct_wgrad_layer(layer, warmup, iters, baseline=True):
  programs, specs, macs = _direct_wgrad_programs(layer, baseline)
  r = {"gop": 2.0 * macs / 1e9}
  ops = _random_operands(jax.random.key(5), specs)
  args = (ops["xt"], ops["gt"], ops["scale"])
  outs = {}
  for name, fn in programs.items():
    try:
      outs[name] = np.asarray(fn(*args))
      r[name] = _time(fn, args, warmup, iters)
    except Exception as e:  # pylint: disable=broad-except
      r[name] = f"failed: {type(e).__name__}: {str(e)[:60]}"
  if len(outs) == 2:
    r["exact"] = "yes" if np.array_equal(outs["direct"], outs["direct_ws"]) else "NO"
  return r


def direct_wgrad_section(warmup, iters, baseline=True, append_to=None, title=""):
  head = (f"\n### {title}\n\n" if title else "") + DIRECT_WGRAD_HEADER
  print(head, flush=True)
  if append_to:
    with open(append_to, "a", encoding="utf-8") as f:
      f.write(head + "\n")
  for layer in DIRECT_WGRAD_LAYERS:
    row = direct_wgrad_row(layer[0], bench_direct_wgrad_layer(layer, warmup, iters,
                                                              baseline))
    print(row, flush=True)
    if append_to:  # as it goes: a run cut short keeps its rows
      with open(append_to, "a", encoding="utf-8") as f:
        f.write(row + "\n")


def lower_direct_wgrad_section(baseline=True) -> int:
  """CPU check: every program of the direct-wgrad section lowers for CUDA."""
  failures = 0
  for layer in DIRECT_WGRAD_LAYERS:
    programs, specs, _ = _direct_wgrad_programs(layer, baseline)
    for name, fn in programs.items():
      try:
        fn.trace(specs["xt"], specs["gt"], specs["scale"]).lower(
            lowering_platforms=("cuda",))
        status = "ok"
      except Exception as e:  # pylint: disable=broad-except
        failures += 1
        status = f"FAILED {type(e).__name__}: {str(e)[:160]}"
      print(f"{layer[0]:20s} {name:11s} {status}", flush=True)
  print(f"{failures} failures")
  return 1 if failures else 0


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
  x = _int8_random(jax.random.key(3), (2, 7, 9, 24))
  w = _int8_random(jax.random.key(4), (3, 3, 24, 40))
  conv_kw = dict(window_strides=(2, 2), padding="SAME", scale=0.5)
  got = pk.int8_conv(x, w, interpret=True, **conv_kw)
  conv_ok = bool(jnp.array_equal(got, pk.int8_conv_reference(x, w, **conv_kw)))
  print(f"interpret-mode smoke test (int8_conv 2x7x9x24, 3x3/2 -> 40): "
        f"{'bit-exact' if conv_ok else 'MISMATCH'}")
  return 0 if ok and conv_ok else 1


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
  parser.add_argument("--implicit-only", action="store_true",
                      help="only the implicit-GEMM conv kernel section")
  parser.add_argument("--conv-out", default="bfloat16",
                      choices=("bfloat16", "float32"),
                      help="output dtype of the implicit conv / dgrad and "
                      "their int8_matmul GEMMs")
  parser.add_argument("--lower-only", action="store_true",
                      help="no GPU needed: lower every program of the "
                      "implicit-conv section for CUDA, time nothing")
  parser.add_argument("--with-ws", action="store_true",
                      help="also time pk.int8_matmul_ws next to int8_matmul "
                      "(GEMM table and the implicit section's GEMM columns)")
  parser.add_argument("--square-only", action="store_true",
                      help="only the GEMM table on 4096^3 and 8192^3")
  parser.add_argument("--direct-wgrad-only", action="store_true",
                      help="only the direct weight gradient vs its persistent, "
                      "warp-specialised variant (conv_direct_wgrad_ws)")
  parser.add_argument("--no-direct-baseline", action="store_true",
                      help="--direct-wgrad-only without the non-persistent kernel")
  args = parser.parse_args(argv)
  conv_out = jnp.dtype(args.conv_out)
  baseline = not args.no_direct_baseline

  if args.lower_only:
    if args.direct_wgrad_only:
      return lower_direct_wgrad_section(baseline)
    return lower_implicit_section(conv_out, args.with_ws)
  if not pk.available():
    print(f"benchmarks/kernels.py needs a Hopper GPU (sm_90) with Mosaic GPU; "
          f"this machine's jax backend is {jax.default_backend()!r}. "
          "No timings taken.")
    return smoke() if args.smoke else 0

  device = jax.devices()[0]
  how = (f"Median of {args.iters} device-synchronised runs after "
         f"{args.warmup} warm-up runs; `python benchmarks/kernels.py"
         f"{' --quick' if args.quick else ''}"
         f"{' --convs-only' if args.convs_only else ''}"
         f"{' --implicit-only' if args.implicit_only else ''}"
         f"{' --square-only' if args.square_only else ''}"
         f"{' --with-ws' if args.with_ws else ''}`.\n")
  when = (f"{device.device_kind}, {datetime.date.today().isoformat()}, "
          f"jax {jax.__version__}")
  if args.direct_wgrad_only:
    title = (f"Direct weight gradient vs its persistent, warp-specialised variant ({when}; "
             f"float32, channel-major operands)\n\nMedian of {args.iters} device-synchronised "
             f"runs after {args.warmup} warm-up runs; `python benchmarks/kernels.py "
             f"--direct-wgrad-only{'' if baseline else ' --no-direct-baseline'}`.\n")
    direct_wgrad_section(args.warmup, args.iters, baseline,
                         append_to=None if args.no_append else RESULTS, title=title)
    return 0
  if args.implicit_only:
    title = (f"Implicit-GEMM int8 conv kernels vs int8_matmul vs bf16 conv "
             f"({when}; {args.conv_out} outputs)\n\n{how}")
    implicit_section(args.warmup, args.iters, conv_out, args.quick,
                     append_to=None if args.no_append else RESULTS,
                     title=title, with_ws=args.with_ws)
    return 0
  rows = []
  shapes = [] if args.convs_only else gemm_shapes(args.quick)
  if args.square_only:
    shapes = shapes[:2]
  for label, m, n, k in shapes:
    try:
      r = bench_shape(m, n, k, args.warmup, args.iters, args.with_ws)
    except Exception as e:  # pylint: disable=broad-except
      r = f"failed: {type(e).__name__}: {str(e)[:80]}"
    rows.append((label, m, n, k, r))
    print(markdown_table(rows[-1:], args.with_ws).splitlines()[-1], flush=True)
  text = ""
  if rows:
    text += (f"### int8_matmul vs XLA ({when})\n\n{how}\n"
             f"{markdown_table(rows, args.with_ws)}\n")
  if args.square_only:
    print(text)
    if not args.no_append:
      with open(RESULTS, "a", encoding="utf-8") as f:
        f.write("\n" + text)
    return 0
  print("\nQuantConv forward+backward vs nnx.Conv (bf16):", flush=True)
  text += (f"\n### QuantConv fwd+bwd vs nnx.Conv bf16, ResNet-50 3x3 ({when})"
           f"\n\n{how}\n{conv_section(args.warmup, args.iters)}\n")
  print()
  print(text)
  if not args.no_append:
    with open(RESULTS, "a", encoding="utf-8") as f:
      f.write("\n" + text)
  print("\nImplicit-GEMM conv kernels:", flush=True)
  implicit_section(
      args.warmup, args.iters, conv_out, args.quick,
      append_to=None if args.no_append else RESULTS,
      title=(f"Implicit-GEMM int8 conv kernels vs int8_matmul vs bf16 conv "
             f"({when}; {args.conv_out} outputs)\n\n{how}"), with_ws=args.with_ws)
  return 0


if __name__ == "__main__":
  sys.exit(main())
