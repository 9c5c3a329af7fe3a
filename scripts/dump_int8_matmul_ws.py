"""Lowers pallas_kernels.int8_matmul_ws for CUDA (mosaic-offline's dump.py), with int8_matmul
on the same GEMMs to compare.

  PY=${MOSAIC_OFFLINE_CACHE:-$HOME/.cache/mosaic-offline}/venv/bin/python
  TOOL=../shared/tools/mosaic-offline
  $PY scripts/dump_int8_matmul_ws.py --out /tmp/ws && (cd $TOOL && $PY compile.py /tmp/ws)

Cases (GEMM (M, N, K), the config select_ws_config picks unless named): 4096^3 and 8192^3
(float32, bfloat16; int32 at 4096^3), the conv-shaped 802816x64x64 and 802816x64x576
(N = 64: forward / dgrad of ResNet-50's 64-channel layers at batch 256; bfloat16, float32),
802816x256x64 (a 1x1 64->256 forward, K = 64; bfloat16) and
64x576x802816 (a weight gradient as one GEMM: M = O, N = 9C, K = B*H*W, seven K chunks;
float32); the 128x256 block tile shared by two consumers the other way (two 128x128, wg_split
"n") and as 256x128 (two 128x128 along M), both at 4096^3 float32; a ragged shape on a small
config with one consumer. --baseline adds int8_matmul (its select_config) on the same GEMMs.
--batch is ignored (compile_kernels.sh passes it to every target). Exit status 1 if a case
fails to lower.
"""

import os
import importlib
import sys

import dump_args  # scripts/: the command line the dump scripts share


def main():
  a, dump = dump_args.parse('also lower int8_matmul on the same GEMMs, to compare',
                            batch_help='ignored')
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  ws = importlib.import_module("pallas_kernels.int8_matmul_ws")  # pk.int8_matmul_ws: the function

  S, i8, f32 = jax.ShapeDtypeStruct, jnp.int8, jnp.float32
  dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "i32": jnp.int32}
  names = {id(v): k for k, v in vars(ws).items() if isinstance(v, ws.Int8MatmulWSConfig)}
  C = ws.Int8MatmulWSConfig
  # consumers of 128x128: 32-column float32 stores keep them in 227 KiB of SMEM
  split_n = C(tile_m=128, tile_n=256, tile_k=128, max_concurrent_steps=3, epi_tile_n=32,
              wg_split="n")
  tall = C(tile_m=256, tile_n=128, tile_k=128, max_concurrent_steps=3, epi_tile_n=32)
  small = C(tile_m=64, tile_n=32, tile_k=64, swizzle=64, max_concurrent_steps=2,
            num_consumers=1, epi_tile_n=None)
  sq4, sq8 = (4096, 4096, 4096), (8192, 8192, 8192)
  cases = [("sq4096", sq4, None, "f32"), ("sq4096", sq4, None, "bf16"),
           ("sq4096", sq4, None, "i32"), ("sq8192", sq8, None, "f32"),
           ("sq8192", sq8, None, "bf16"),
           ("conv_802816x64x64", (802816, 64, 64), None, "bf16"),
           ("conv_802816x64x64", (802816, 64, 64), None, "f32"),
           ("conv_802816x64x576", (802816, 64, 576), None, "bf16"),
           ("conv_802816x64x576", (802816, 64, 576), None, "f32"),
           ("conv_802816x256x64", (802816, 256, 64), None, "bf16"),
           ("wgrad_64x576x802816", (64, 576, 802816), None, "f32"),
           ("sq4096", sq4, (split_n, "128x256_split_n"), "f32"),
           ("sq4096", sq4, (tall, "256x128_split_m"), "f32"),
           ("ragged_130x72x200", (130, 72, 200), (small, "small_1wg"), "f32")]
  w = dump.Writer(os.path.abspath(a.out))
  for gemm, (m, n, k), named, dname in cases:
    dt = dtypes[dname]
    cfg, cname = named if named else (ws.select_ws_config(m, n, k), None)
    cname = cname or names.get(id(cfg), repr(cfg))
    scale = None if dname == "i32" else S((n,), f32)
    w.case(f"int8_matmul_ws.{cname}.{gemm}.{dname}",
           lambda a_, b_, sc, cfg=cfg, dt=dt: ws.int8_matmul_ws(a_, b_, b_scale=sc, out_dtype=dt,
                                                                config=cfg),
           S((m, k), i8), S((n, k), i8), scale, function="int8_matmul_ws", config=cname,
           layer=gemm, out_dtype=dname, batch=256)
    if a.baseline and not named:
      w.case(f"int8_matmul.default.{gemm}.{dname}",
             lambda a_, b_, sc, dt=dt: pk.int8_matmul(a_, b_, b_scale=sc, out_dtype=dt),
             S((m, k), i8), S((n, k), i8), scale, function="int8_matmul", config="default",
             layer=gemm, out_dtype=dname, batch=256)
  print(f"{w.kernels} kernels from {w.cases} cases ({len(w.failed)} failed to lower)")
  sys.exit(1 if w.failed else 0)


if __name__ == "__main__":
  main()
