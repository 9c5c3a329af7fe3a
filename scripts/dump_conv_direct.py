"""Lowers pallas_kernels.conv_direct for CUDA with mosaic-offline's dump.py machinery.

  PY=${MOSAIC_OFFLINE_CACHE:-$HOME/.cache/mosaic-offline}/venv/bin/python
  TOOL=../shared/tools/mosaic-offline
  $PY scripts/dump_conv_direct.py --out /tmp/direct && (cd $TOOL && $PY compile.py /tmp/direct)

Cases: the stride-1 ResNet-50 layers of dump.py's LAYERS (3x3 and 1x1, 56x56 and 7x7, SAME
padding: the low padding read as TMA out-of-bounds zeros) at --batch, every CONV_CONFIG with
float32 and bfloat16 outputs, and int32 on the first config; plus one ragged shape (odd H/W,
C=24, O=40, the small config). Exit status 1 if a case fails to lower.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--baseline", action="store_true",
                 help="also lower int8_conv (shifted copies) on the same cases, to compare")
  p.add_argument("--tool", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                "shared", "tools", "mosaic-offline"))
  a = p.parse_args()
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  sys.path.insert(0, root)
  sys.path.insert(0, os.path.abspath(a.tool))
  import dump  # mosaic-offline's Writer / lower / launch_info
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  from pallas_kernels import conv_direct as cd

  S, i8, f32 = jax.ShapeDtypeStruct, jnp.int8, jnp.float32
  names = dump._config_names(pk)  # pylint: disable=protected-access
  w = dump.Writer(os.path.abspath(a.out))
  small = pk.Int8ConvConfig(tile_m=64, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=2)
  layers = {k: v for k, v in dump.LAYERS.items() if v[2] == 1}
  cases = [(layer, (a.batch, *xs), ks, cfg, dname)
           for layer, (xs, ks, _) in layers.items()
           for cfg in pk.CONV_CONFIGS for dname in ("f32", "bf16")]
  cases += [("conv2_3x3", (a.batch, 56, 56, 64), (3, 3, 64, 64), pk.CONV_CONFIGS[0], "i32"),
            ("ragged_5x7", (2, 5, 7, 24), (3, 3, 24, 40), small, "f32")]
  dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "i32": jnp.int32}
  for layer, xs, ks, cfg, dname in cases:
    dt = dtypes[dname]
    cname = names.get(id(cfg), cfg.name)
    o = ks[3]
    scale = None if dname == "i32" else S((o,), f32)
    w.case(f"int8_conv_direct.{cname}.{layer}.{dname}",
           lambda x_, w_, sc, cfg=cfg, dt=dt: cd.int8_conv_direct(
               x_, w_, padding="SAME", scale=sc, out_dtype=dt, config=cfg),
           S(xs, i8), S(ks, i8), scale, function="int8_conv_direct", config=cname, layer=layer,
           out_dtype=dname, batch=xs[0])
    if a.baseline:
      w.case(f"int8_conv.{cname}.{layer}.{dname}",
             lambda x_, w_, sc, cfg=cfg, dt=dt: pk.int8_conv(
                 x_, w_, padding="SAME", scale=sc, out_dtype=dt, config=cfg),
             S(xs, i8), S(ks, i8), scale, function="int8_conv", config=cname, layer=layer,
             out_dtype=dname, batch=xs[0])
  print(f"{w.kernels} kernels from {w.cases} cases ({len(w.failed)} failed to lower)")
  sys.exit(1 if w.failed else 0)


if __name__ == "__main__":
  main()
