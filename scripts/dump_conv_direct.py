"""Lowers pallas_kernels.conv_direct for CUDA with mosaic-offline's dump.py machinery.

  PY=${MOSAIC_OFFLINE_CACHE:-$HOME/.cache/mosaic-offline}/venv/bin/python
  TOOL=../shared/tools/mosaic-offline
  $PY scripts/dump_conv_direct.py --out /tmp/direct && (cd $TOOL && $PY compile.py /tmp/direct)

Cases: the ResNet-50 layers of dump.py's LAYERS (3x3 and 1x1, 56x56 to 7x7, strides 1 and
2, SAME padding: at stride 1 the low padding read as TMA out-of-bounds zeros) at --batch, every
CONV_CONFIG with float32 and bfloat16 outputs, and int32 on the first config; one ragged shape
(odd H/W, C=24, O=40, the small config); the stride-1 dgrad of the two 3x3 layers (bfloat16).
--baseline adds int8_conv on the same cases. Exit status 1 if a case fails to lower.
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
  layers = dump.LAYERS
  cases = [(layer, (a.batch, *xs), ks, s, cfg, dname)
           for layer, (xs, ks, s) in layers.items()
           for cfg in pk.CONV_CONFIGS for dname in ("f32", "bf16")]
  cases += [("conv2_3x3", (a.batch, 56, 56, 64), (3, 3, 64, 64), 1, pk.CONV_CONFIGS[0], "i32"),
            ("ragged_5x7", (2, 5, 7, 24), (3, 3, 24, 40), 1, small, "f32")]
  dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "i32": jnp.int32}
  for layer, xs, ks, s, cfg, dname in cases:
    dt = dtypes[dname]
    cname = names.get(id(cfg), cfg.name)
    o = ks[3]
    scale = None if dname == "i32" else S((o,), f32)
    w.case(f"int8_conv_direct.{cname}.{layer}.{dname}",
           lambda x_, w_, sc, cfg=cfg, dt=dt, s=s: cd.int8_conv_direct(
               x_, w_, window_strides=(s, s), padding="SAME", scale=sc, out_dtype=dt,
               config=cfg),
           S(xs, i8), S(ks, i8), scale, function="int8_conv_direct", config=cname, layer=layer,
           out_dtype=dname, batch=xs[0])
    if a.baseline:
      w.case(f"int8_conv.{cname}.{layer}.{dname}",
             lambda x_, w_, sc, cfg=cfg, dt=dt, s=s: pk.int8_conv(
                 x_, w_, window_strides=(s, s), padding="SAME", scale=sc, out_dtype=dt,
                 config=cfg),
             S(xs, i8), S(ks, i8), scale, function="int8_conv", config=cname, layer=layer,
             out_dtype=dname, batch=xs[0])
  for layer in ("conv2_3x3", "conv5_3x3"):  # stride-1 dgrad: the same kernel on g
    xs, ks, _ = layers[layer]
    xs = (a.batch, *xs)
    gs = pk.conv_output_shape(xs, ks, (1, 1), "SAME")
    w.case(f"int8_conv_direct_dgrad.{layer}.bf16",
           lambda g_, w_, sc, xs=xs: cd.int8_conv_direct_dgrad(
               g_, w_, input_shape=xs, padding="SAME", scale=sc, out_dtype=jnp.bfloat16),
           S(gs, i8), S(ks, i8), S((ks[2],), f32), function="int8_conv_direct_dgrad",
           config="default", layer=layer, out_dtype="bf16", batch=xs[0])
  print(f"{w.kernels} kernels from {w.cases} cases ({len(w.failed)} failed to lower)")
  sys.exit(1 if w.failed else 0)


if __name__ == "__main__":
  main()
