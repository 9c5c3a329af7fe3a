"""Lowers pallas_kernels.conv_direct_wgrad_ws for CUDA (mosaic-offline's dump.py).

  PY=${MOSAIC_OFFLINE_CACHE:-$HOME/.cache/mosaic-offline}/venv/bin/python
  TOOL=../shared/tools/mosaic-offline
  $PY scripts/dump_conv_direct_wgrad_ws.py --out /tmp/dws && (cd $TOOL && $PY compile.py /tmp/dws)

Cases: the persistent, warp-specialised direct weight gradient of the ResNet-50 layers
scripts/dump_conv_direct.py lowers the direct weight gradient on (dump.py's LAYERS: 3x3 and
1x1, 56x56 to 7x7, strides 1 and 2, SAME; at stride 1 the low padding read as TMA
out-of-bounds zeros) at --batch, each with its default config (direct_wgrad_ws_config), on
the channel-major operands the library hands the non-persistent kernel; conv2_3x3 with each
DIRECT_WGRAD_WS_CONFIGS tile shape at swizzle 32/64/128; one ragged shape (odd H/W, C=24,
O=40) on a small 1-consumer config and a small 2-consumer one. --baseline adds the
non-persistent kernel (conv_direct_wgrad) on the layers. Exit status 1 if a case fails to
lower.
"""

import dataclasses
import os
import sys

import dump_args  # scripts/: the command line the dump scripts share


def main():
  a, dump = dump_args.parse('also lower conv_direct_wgrad (one item per block) on the layers')
  import jax
  import jax.numpy as jnp
  from pallas_kernels import conv_direct_wgrad as dw
  from pallas_kernels import conv_direct_wgrad_ws as dws

  S, i8, f32 = jax.ShapeDtypeStruct, jnp.int8, jnp.float32
  w = dump.Writer(os.path.abspath(a.out))
  C = dws.DirectWgradWSConfig
  small1 = C(tile_m=64, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=2,
             num_consumers=1)
  small2 = C(tile_m=64, tile_n=32, tile_k=32, swizzle=32, max_concurrent_steps=2,
             wg_split="n")
  names = {id(v): k for k, v in vars(dws).items() if isinstance(v, C)}
  cases = [(layer, (a.batch, *xs), ks, s, None, None)
           for layer, (xs, ks, s) in dump.LAYERS.items()]
  xs, ks, _ = dump.LAYERS["conv2_3x3"]
  for entry in dws.DIRECT_WGRAD_WS_CONFIGS:
    for sw in (32, 64, 128):
      cfg = dataclasses.replace(entry, tile_k=sw, swizzle=sw,
                                max_concurrent_steps=4 if sw == 128 else 6)
      cases.append(("conv2_3x3", (a.batch, *xs), ks, 1, cfg, f"{names[id(entry)]}s{sw}"))
  cases += [("ragged_5x7", (2, 5, 7, 24), (3, 3, 24, 40), 1, small1, "small_1wg"),
            ("ragged_5x7", (2, 5, 7, 24), (3, 3, 24, 40), 1, small2, "small_2wg_n")]
  for layer, xs, ks, s, cfg, cname in cases:
    ops = dw.channel_major_operands(xs, ks, window_strides=(s, s), padding="SAME")
    if cfg is None:
      _, _, wo, _ = ops.g_shape
      picked = dws.direct_wgrad_ws_config(ks[2], ks[3], wo * ops.layout.n_img)
      cname = (f"default_{picked.tile_m}x{picked.tile_n}s{picked.swizzle}"
               f"c{picked.num_consumers}")
    w.case(f"int8_conv_wgrad_direct_ws.{cname}.{layer}.f32",
           lambda xt, gt, sc, ops=ops, cfg=cfg: dws.int8_conv_wgrad_channel_major_ws(
               xt, gt, operands=ops, scale=sc, config=cfg),
           S(ops.x_cm_shape, i8), S(ops.g_cm_shape, i8), S((ks[3],), f32),
           function="int8_conv_wgrad_direct_ws", config=cname, layer=layer, out_dtype="f32",
           batch=xs[0])
    if a.baseline and cfg is None:
      w.case(f"int8_conv_wgrad_direct.default.{layer}.f32",
             lambda xt, gt, sc, ops=ops: dw.int8_conv_wgrad_channel_major(
                 xt, gt, operands=ops, scale=sc),
             S(ops.x_cm_shape, i8), S(ops.g_cm_shape, i8), S((ks[3],), f32),
             function="int8_conv_wgrad_direct", config="default", layer=layer,
             out_dtype="f32", batch=xs[0])
  print(f"{w.kernels} kernels from {w.cases} cases ({len(w.failed)} failed to lower)")
  sys.exit(1 if w.failed else 0)


if __name__ == "__main__":
  main()
