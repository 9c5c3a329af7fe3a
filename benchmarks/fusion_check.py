"""Which XLA fusions read the float x and g of one quantized conv, fwd + bwd (issue 24).

    python benchmarks/fusion_check.py --backend pallas --out fusions.json   # on the GPU
    INT8JAX_DIRECT_CONV=1 python benchmarks/fusion_check.py --backend pallas

The traffic model (benchmarks/traffic.py) assumes XLA:GPU's multi-output
fusion: the quantization of x (and of g) writes the int8 tensor, its
finiteness reduction and, on the direct route, the weight gradient's
channel-major copy in one fusion that reads the float tensor once. XLA:CPU
has no multi-output fusion, so only a GPU compile can say. This compiles
(never runs) one quantized 3x3 conv's forward + backward on ``--backend``,
finds the compiled entry computation's parameters x and dy by shape, and
lists every fusion that reads each (through bitcasts / copies), with the
shapes it writes. ``reads`` = how many fusions read the float tensor: 1 is
the model's assumption; more are extra passes over it. The JSON goes to
``--out`` and a one-line verdict to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import int8jax  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*?)\)(.*)$")
_ALIASES = ("bitcast", "copy", "reshape", "get-tuple-element")


def _entry(text: str) -> list[str]:
  lines, inside = [], False
  for line in text.splitlines():
    if line.startswith("ENTRY"):
      inside = True
      continue
    if inside:
      if line.startswith("}"):
        break
      lines.append(line)
  return lines


def readers(text: str, shapes: dict[str, str]) -> dict[str, list[dict]]:
  """Per named parameter shape (e.g. ``{"x": "bf16[8,32,32,64]"}``), the fusions of
  the entry computation that read it (directly or through aliasing ops), with their
  kind and output shape(s)."""
  instrs = []
  for line in _entry(text):
    m = _INSTR.match(line)
    if m:
      name, shape, op, args, rest = m.groups()
      operands = re.findall(r"%([\w.\-]+)", args)
      instrs.append((name, shape, op, operands, rest))
  out = {}
  for key, want in shapes.items():
    params = {n for n, s, op, _, _ in instrs if op == "parameter" and s.startswith(want)}
    names = set(params)
    changed = True
    while changed:  # follow aliases of the parameter
      changed = False
      for n, _, op, operands, _ in instrs:
        if op in _ALIASES and n not in names and names & set(operands):
          names.add(n)
          changed = True
    found = []
    for n, shape, op, operands, rest in instrs:
      if names & set(operands) and op not in _ALIASES:
        kind = re.search(r"kind=(\w+)", rest)
        found.append({"name": n, "op": op, "kind": kind.group(1) if kind else None,
                      "writes": shape})
    out[key] = found
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--backend", default="pallas", choices=int8jax.backends.names())
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--side", type=int, default=32)
  ap.add_argument("--channels", type=int, nargs=2, default=(64, 128), metavar=("C", "O"))
  ap.add_argument("--out", default=None, help="write the JSON report here")
  ap.add_argument("--hlo", default=None, help="also write the compiled HLO text here")
  args = ap.parse_args(argv)
  c, o = args.channels
  x_shape = (args.batch, args.side, args.side, c)
  y_shape = (args.batch, args.side, args.side, o)
  cfg = int8jax.QuantConfig(backend=args.backend)
  gs = int8jax.GradQuantState.initial().replace(clip=jnp.float32(1e-3))

  def fwd_bwd(x, w, dy, key):
    def f(x, w):
      return int8jax.quant_conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), key=key,
          grad_state=gs, x_clip=4.0, measure=False, stored_clip_only=True, config=cfg)
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(dy)

  sds = jax.ShapeDtypeStruct
  text = jax.jit(fwd_bwd).lower(sds(x_shape, jnp.bfloat16), sds((3, 3, c, o), jnp.bfloat16),
                                sds(y_shape, jnp.bfloat16),
                                jax.random.key(0)).compile().as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(text)
  shape = lambda s: "bf16[" + ",".join(map(str, s)) + "]"  # noqa: E731
  found = readers(text, {"x": shape(x_shape), "dy": shape(y_shape)})
  from int8jax.backends import pallas as pallas_backend
  report = {"backend": args.backend, "platform": jax.default_backend(),
            "jax": jax.__version__, "direct_conv": dict(pallas_backend.DIRECT_CONV),
            "x_shape": x_shape, "dy_shape": y_shape,
            "reads": {k: len(v) for k, v in found.items()}, "readers": found}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  print(f"fusion_check: {args.backend} on {report['platform']}, direct={report['direct_conv']}:"
        f" fusions reading float x: {report['reads']['x']}, float dy: {report['reads']['dy']}"
        " (1 each = the traffic model's multi-output fusion)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
