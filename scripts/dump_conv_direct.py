"""Lowers pallas_kernels.conv_direct and conv_direct_wgrad for CUDA (mosaic-offline's dump.py).

  PY=${MOSAIC_OFFLINE_CACHE:-$HOME/.cache/mosaic-offline}/venv/bin/python
  TOOL=../shared/tools/mosaic-offline
  $PY scripts/dump_conv_direct.py --out /tmp/direct && (cd $TOOL && $PY compile.py /tmp/direct)

Cases: the ResNet-50 layers of dump.py's LAYERS (3x3 and 1x1, 56x56 to 7x7, strides 1 and
2, SAME padding: at stride 1 the low padding read as TMA out-of-bounds zeros) at --batch, every
CONV_CONFIG with float32 and bfloat16 outputs, and int32 on the first config; one ragged shape
(odd H/W, C=24, O=40, the small config); the stride-1 dgrad of the two 3x3 layers (bfloat16);
the stride-2 dgrad (one kernel per output phase) of the two stride-2 layers with every
CONV_CONFIG (bfloat16), float32 and int32 on the first config, and of a ragged shape;
the direct weight gradient of every layer (default config), of conv2_3x3 with each wgrad tile
shape at swizzle 32/64/128, and of a ragged shape. --baseline adds int8_conv and
int8_conv_wgrad on the same cases. Exit status 1 if a case fails to lower.
"""

import os
import sys

import dump_args  # scripts/: the command line the dump scripts share


def main():
  a, dump = dump_args.parse('also lower int8_conv (shifted copies) on the same cases, to compare')
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  from pallas_kernels import conv_direct as cd
  from pallas_kernels import conv_direct_wgrad as dw

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
  # Strided dgrad (one kernel per output phase, stored in place into dx): the two stride-2
  # layers (3x3: 4 phases of 4/2/2/1 taps; 1x1: 1 phase of 1 tap + 3 epilogue(0) phases)
  # with every CONV_CONFIG (bfloat16), float32 and int32 on the first config, and a ragged
  # shape (odd H/W, C=40: a slab that C' does not hold whole, the small config).
  dcases = [(layer, cfg, dname) for layer in ("conv3_3x3_s2", "conv3_down_s2")
            for cfg in pk.CONV_CONFIGS for dname in ("bf16",)]
  dcases += [("conv3_3x3_s2", pk.CONV_CONFIGS[0], "f32"),
             ("conv3_3x3_s2", pk.CONV_CONFIGS[0], "i32"), ("ragged_7x9", small, "f32")]
  for layer, cfg, dname in dcases:
    if layer == "ragged_7x9":
      xs, ks = (2, 7, 9, 40), (3, 3, 40, 24)
    else:
      xs, ks, _ = layers[layer]
      xs = (a.batch, *xs)
    gs = pk.conv_output_shape(xs, ks, (2, 2), "SAME")
    dt, cname = dtypes[dname], names.get(id(cfg), cfg.name)
    scale = None if dname == "i32" else S((ks[2],), f32)
    w.case(f"int8_conv_direct_dgrad.{cname}.{layer}.{dname}",
           lambda g_, w_, sc, xs=xs, cfg=cfg, dt=dt: cd.int8_conv_direct_dgrad(
               g_, w_, input_shape=xs, window_strides=(2, 2), padding="SAME", scale=sc,
               out_dtype=dt, config=cfg),
           S(gs, i8), S(ks, i8), scale, function="int8_conv_direct_dgrad", config=cname,
           layer=layer, out_dtype=dname, batch=xs[0])
  # The direct weight gradient (conv_direct_wgrad): every ResNet-50 layer with its default config,
  # the wgrad tile shapes at swizzle 32/64/128 on conv2_3x3, and a ragged shape.
  wcases = [(layer, (a.batch, *xs), ks, s, None, "default")
            for layer, (xs, ks, s) in layers.items()]
  xs, ks, _ = layers["conv2_3x3"]
  for base in pk.WGRAD_CONFIGS:
    for sw in (32, 64, 128):
      cfg = pk.Int8ConvConfig(tile_m=base.tile_m, tile_n=base.tile_n, tile_k=sw, swizzle=sw,
                              max_concurrent_steps=4 if sw == 128 else 6)
      wcases.append(("conv2_3x3", (a.batch, *xs), ks, 1, cfg,
                     f"{base.tile_m}x{base.tile_n}s{sw}"))
  wcases.append(("ragged_5x7", (2, 5, 7, 24), (3, 3, 24, 40), 1, None, "default"))
  for layer, xs, ks, s, cfg, cname in wcases:
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
