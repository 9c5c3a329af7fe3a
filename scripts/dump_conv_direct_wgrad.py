"""Lowers pallas_kernels.conv_direct_wgrad for CUDA with mosaic-offline's dump.py machinery.

  PY=${MOSAIC_OFFLINE_CACHE:-$HOME/.cache/mosaic-offline}/venv/bin/python
  TOOL=../shared/tools/mosaic-offline
  $PY scripts/dump_conv_direct_wgrad.py --out /tmp/dwg && (cd $TOOL && $PY compile.py /tmp/dwg)

Cases: the ResNet-50 layers of dump.py's LAYERS (3x3 and 1x1, strides 1 and 2, SAME: at
stride 1 the low padding read as TMA out-of-bounds zeros) at --batch with the default config
(direct_wgrad_config), plus
every tile_m x tile_n of WGRAD_CONFIGS at each swizzle (32, 64, 128) on conv2_3x3, and one
ragged shape (odd H/W, N=2, C=24, O=40). --baseline adds int8_conv_wgrad on the layers.
Exit status 1 if a case fails to lower.
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
                 help="also lower int8_conv_wgrad (transposed shifted copies) on the layers")
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
  from pallas_kernels import conv_direct_wgrad as dw

  S, i8, f32 = jax.ShapeDtypeStruct, jnp.int8, jnp.float32
  w = dump.Writer(os.path.abspath(a.out))
  layers = dump.LAYERS
  cases = [(layer, (a.batch, *xs), ks, s, None, "default")
           for layer, (xs, ks, s) in layers.items()]
  xs, ks, _ = layers["conv2_3x3"]
  for base in pk.WGRAD_CONFIGS:
    for sw in (32, 64, 128):
      cfg = pk.Int8ConvConfig(tile_m=base.tile_m, tile_n=base.tile_n, tile_k=sw, swizzle=sw,
                              max_concurrent_steps=4 if sw == 128 else 6)
      cases.append(("conv2_3x3", (a.batch, *xs), ks, 1, cfg,
                    f"{base.tile_m}x{base.tile_n}s{sw}"))
  cases.append(("ragged_5x7", (2, 5, 7, 24), (3, 3, 24, 40), 1, None, "default"))
  for layer, xs, ks, s, cfg, cname in cases:
    gs = pk.conv_output_shape(xs, ks, (s, s), "SAME")
    w.case(f"int8_conv_wgrad_direct.{cname}.{layer}.f32",
           lambda x_, g_, sc, ks=ks, cfg=cfg, s=s: dw.int8_conv_wgrad_direct(
               x_, g_, kernel_shape=ks, window_strides=(s, s), padding="SAME", scale=sc,
               config=cfg),
           S(xs, i8), S(gs, i8), S((ks[3],), f32), function="int8_conv_wgrad_direct",
           config=cname, layer=layer, out_dtype="f32", batch=xs[0])
    if a.baseline and cname == "default":
      w.case(f"int8_conv_wgrad.default.{layer}.f32",
             lambda x_, g_, sc, ks=ks, s=s: pk.int8_conv_wgrad(
                 x_, g_, kernel_shape=ks, window_strides=(s, s), padding="SAME", scale=sc),
             S(xs, i8), S(gs, i8), S((ks[3],), f32), function="int8_conv_wgrad",
             config="default", layer=layer, out_dtype="f32", batch=xs[0])
  print(f"{w.kernels} kernels from {w.cases} cases ({len(w.failed)} failed to lower)")
  sys.exit(1 if w.failed else 0)


if __name__ == "__main__":
  main()
