"""HBM traffic model of the quantized conv path: int8 as the code now plans it vs bf16.

    .venv/bin/python benchmarks/traffic.py                       # ResNet-50 + MobileNetV2
    .venv/bin/python benchmarks/traffic.py --models resnet50 --out traffic.md \\
        --peaks "h200-measured=1000,600,4.0"
    .venv/bin/python benchmarks/traffic.py --models resnet50 --direct  # INT8JAX_DIRECT_CONV=1

For every distinct conv of ResNet-50 and MobileNetV2 (ImageNet, batch 256,
224x224; shapes read from ``examples/models.py`` by tracing the model's
forward with ``jax.eval_shape``; the stem stays float in UI8 and is left out
of both sides) and each of its three GEMMs (forward, input gradient "dgrad",
weight gradient "wgrad"):

* FLOPs: ``2 * N*Ho*Wo * KH*KW*C/G * O`` (the same for all three GEMMs).
* bf16 bytes: an ideal bf16 conv -- each operand read once, the result
  written once (fwd: x, w, y; dgrad: g, w, dx; wgrad: x, g, dw), 2 bytes each.
* int8 bytes as the code now plans it, counted on the traced program
  (:func:`count_gemm`, :func:`count_conv`): each GEMM is the Pallas backend's
  ``conv_forward`` / ``conv_dgrad`` / ``conv_wgrad`` traced with
  ``jax.make_jaxpr`` on abstract int8 operands (no execution, no compile;
  backend ``pallas_interpret``, whose launches appear in the jaxpr as
  ``custom_vmap_call``; compiled ``pallas_call`` / ``mosaic_gpu_call`` are
  counted the same way). Counted:

  - *kernel*: every operand and result of every kernel launch (what the
    kernel is handed: the padded, row-shifted int8 copies, the weight
    matrix, the scale/bias vectors, the output grid), read/written once; a
    buffer launches write in place (a jax Ref operand: input_output_aliases,
    the direct strided dgrad's phases) is counted once, as written, not read.
  - *XLA passes* around the launches (pad, phase split, shifted copies,
    transposes, the grid-to-NHWC slice, the strided-dgrad interleave, the
    wgrad part combination, dequantization) under a simple fusion model:
    a tensor is *materialised* when it is an operand or result of a kernel,
    of an XLA conv / dot, of a nested call, of an ``optimization_barrier``
    or of a reduction, or an input or output of the traced function; every
    materialised tensor written by an XLA pass costs its bytes once plus one
    read of each materialised tensor it is computed from (one fusion per
    materialised result; chains of pads, slices and elementwise ops between
    them are assumed fused; a Ref's making and freezing, and a row-major
    reshape of it, are the same buffer: no pass). Multi-output fusion: a pass that reads a
    materialised tensor another XLA pass writes (not a barrier's, kernel's or
    GEMM's result) is taken as an extra output of that pass's fusion and
    reads nothing of its own -- XLA:GPU's producer-consumer multi-output
    fusion. The ops rely on it: the finiteness reduction over the int8 x / g
    and the weight gradient's channel-major copies (the Pallas backend's
    ``WgradLayout``, direct route) are computed from the quantization inside
    its ``optimization_barrier``. Whether XLA:GPU does fuse them is checked
    on a GPU by ``benchmarks/fusion_check.py``; XLA:CPU does not (it has no
    multi-output fusion); ``count(..., multi_output_fusion=False)`` counts
    them as passes of their own.
  - *XLA GEMMs*: operands and results of XLA ``conv_general_dilated`` /
    ``dot_general`` (depthwise convs run as exact bf16 convs, not kernels).
  - The weight gradient on a backend with a layout (``Backend.wgrad_layout``:
    the direct route) is traced on the laid-out operands, plus the writes of
    the two laid-out copies (the quantizing fusions' extra outputs).
  - *around* (per conv, not per GEMM): the quantize passes of x, w and g and
    the finiteness reductions over the int8 tensors, from the traced
    ``jax.vjp`` of ``int8jax.quant_conv_general_dilated`` (UI8's
    non-measuring step: stored clips, ``stored_clip_only=True``) minus its
    three GEMMs. The quantize passes are counted as standalone passes (read
    the bf16 tensor, write int8): in a model XLA fuses x's quantization into
    the BN + ReLU that produces x, so this is an upper bound.

  Not counted: L2 reuse (the kh taps of a tile re-read the same rows; a
  kernel operand is counted once however many taps read it), whether XLA:GPU
  really fuses the passes as assumed (unknown on the CPU: the model counts
  fused chains, not jaxpr equations), grid waste as FLOPs (the kernel computes
  the dropped grid rows: visible as larger operand and output bytes only),
  launch overheads, and BN / ReLU / optimizer traffic (the same on both sides).

* Time at peak: ``max(FLOPs / peak, bytes / bandwidth)`` per GEMM (and bytes
  / bandwidth for the passes around), with the int8 peak for kernels and XLA
  int8 ops and the bf16 peak for the bf16 side and for the exact-bf16
  depthwise convs. Default peaks: H200 (1979 int8 TOPS, 989 bf16 TFLOPS, 4.8
  TB/s) and H100 SXM (1979, 989, 3.35 TB/s) dense; ``--peaks`` adds measured
  ceilings. Summed over the model's convs (each distinct conv times its
  count): the int8 conv path's time over bf16's.

The targets of issue 24 (flagged in the table): int8 bytes <= bf16 bytes on
every conv, int8 conv path <= 0.7x bf16's.

Tracing at batch 256 is fast enough (seconds per conv: the kernel body is
traced once per launch, whatever the grid), so shapes are traced at the real
batch; ``--batch`` changes it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import int8jax  # noqa: E402
from int8jax import QuantConfig  # noqa: E402
from int8jax.backends import pallas as pallas_backend  # noqa: E402
from int8jax.backends.base import CHUNK_K  # noqa: E402
from int8jax.conv_spec import make_conv_spec  # noqa: E402

#: Primitive names of a Pallas / Mosaic GPU kernel launch in a jaxpr
#: (interpret mode wraps the kernel in a ``custom_vmap_call``).
KERNEL_PRIMITIVES = frozenset({"custom_vmap_call", "pallas_call", "mosaic_gpu_call"})
#: XLA GEMMs (counted operands + result, not as passes).
XLA_GEMM_PRIMITIVES = frozenset({"conv_general_dilated", "dot_general"})
#: Equations whose results are materialised (not fused into a consumer).
_BARRIERS = frozenset({"optimization_barrier"})
_REDUCTIONS = frozenset({"reduce_min", "reduce_max", "reduce_sum", "reduce_and", "reduce_or",
                         "reduce_prod", "argmax", "argmin", "cumsum", "cummax", "sort"})

#: name: (int8 TOPS, bf16 TFLOPS, TB/s), dense.
PEAKS = {"H200": (1979.0, 989.0, 4.8), "H100 SXM": (1979.0, 989.0, 3.35)}

DNUMS = ("NHWC", "HWIO", "NHWC")
GEMMS = ("fwd", "dgrad", "wgrad")


def nbytes(aval) -> int:
  dtype = aval.dtype
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return int(np.prod(aval.shape, dtype=np.int64)) * 8  # a threefry key: 2 x uint32
  return int(np.prod(aval.shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


@dataclasses.dataclass
class Traffic:
  """Bytes of one traced program (see the module docstring)."""
  kernel_in: int = 0          # every operand of every launch
  kernel_in_int8: int = 0     # the int8 operands among them
  kernel_out: int = 0
  launches: int = 0
  passes: int = 0             # XLA passes, fusion model: writes + reads
  xla_gemm: int = 0           # XLA conv / dot operands + results
  xla_gemm_float: bool = False  # an XLA GEMM on float operands (exact-bf16 depthwise)

  @property
  def kernel(self) -> int:
    return self.kernel_in + self.kernel_out

  @property
  def total(self) -> int:
    return self.kernel + self.passes + self.xla_gemm

  def __sub__(self, o: "Traffic") -> "Traffic":
    return Traffic(*(getattr(self, f.name) - getattr(o, f.name)
                     for f in dataclasses.fields(self) if f.name != "xla_gemm_float"),
                   xla_gemm_float=self.xla_gemm_float)


def _subjaxprs(eqn):
  for p in eqn.params.values():
    for q in (p if isinstance(p, (tuple, list)) else (p,)):
      if isinstance(q, jax.extend.core.ClosedJaxpr):
        yield q.jaxpr
      elif isinstance(q, jax.extend.core.Jaxpr):
        yield q


def _is_var(v) -> bool:
  return not isinstance(v, jax.extend.core.Literal)


#: Call-like equations inlined by the counter (XLA inlines them too: a jit
#: boundary inside a traced program is no materialisation point).
_INLINED = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                      "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint"})


#: Equations whose result is their operand's buffer (no XLA pass): a jax Ref made from
#: an array and frozen back (kernels writing into it in place: input_output_aliases),
#: and a row-major reshape of such a buffer (a bitcast in XLA). Other reshapes are
#: counted as the model always has (a materialised reshape = one pass), though XLA
#: makes them bitcasts too: the implicit route's 1x1 convs' flat views
#: ((N*H*W, C) in, (M, O) out) are counted as passes.
_REF_ALIASES = frozenset({"new_ref", "mutable_array", "freeze"})


def _is_ref(aval) -> bool:
  return type(aval).__name__ == "AbstractRef"  # jax._src.state.types (no public name)


class _Node:
  """One tensor of the flattened program."""
  __slots__ = ("aval",)

  def __init__(self, aval):
    self.aval = aval


def _flatten(jaxpr, env: dict, eqns: list, in_place: set | None = None) -> None:
  """Appends ``(name, in nodes, out nodes, sub-jaxprs, in nodes passed as Refs)`` of
  ``jaxpr`` to ``eqns``, inlining call-like equations (``env``: var -> node;
  ``in_place``: the buffers made into Refs)."""
  in_place = set() if in_place is None else in_place
  for v in jaxpr.constvars:
    env.setdefault(v, _Node(v.aval))
  for eqn in jaxpr.eqns:
    ins = [env[v] if _is_var(v) else None for v in eqn.invars]
    name = eqn.primitive.name
    subs = [] if name in KERNEL_PRIMITIVES else list(_subjaxprs(eqn))
    call = next((j for j in subs if len(j.invars) == len(eqn.invars)), None)
    if name in _INLINED and call is not None:
      sub_env = {sv: n for sv, n in zip(call.invars, ins) if n is not None}
      for sv, n in zip(call.invars, ins):
        if n is None:
          sub_env[sv] = _Node(sv.aval)
      _flatten(call, sub_env, eqns, in_place)
      for ov, sv in zip(eqn.outvars, call.outvars):
        env[ov] = sub_env[sv] if _is_var(sv) else _Node(ov.aval)
      continue
    if ins and ins[0] is not None and (
        name in _REF_ALIASES or (name == "reshape" and ins[0] in in_place
                                 and eqn.params.get("dimensions") is None)):
      env[eqn.outvars[0]] = ins[0]
      in_place.add(ins[0])
      continue
    outs = [_Node(v.aval) for v in eqn.outvars]
    env.update(zip(eqn.outvars, outs))
    refs = {n for v, n in zip(eqn.invars, ins) if n is not None and _is_ref(v.aval)}
    eqns.append((name, ins, outs, subs, refs))


def _count(jaxpr, t: Traffic, multi_output_fusion: bool = True) -> None:
  """Adds ``jaxpr``'s traffic to ``t`` (nested calls inlined; loops and
  conditionals counted on their own, once per body). ``multi_output_fusion``:
  a pass reading a tensor that another XLA pass writes is taken as an extra
  output of that pass's fusion (module docstring), reading nothing of its own."""
  env = {v: _Node(v.aval) for v in jaxpr.invars}
  eqns: list = []
  _flatten(jaxpr, env, eqns)
  producer, written = {}, set()
  materialised = {env[v] for v in jaxpr.invars}
  materialised.update(env[v] for v in jaxpr.outvars if _is_var(v))
  materialised.update(n for v, n in env.items() if v in set(jaxpr.constvars))
  for name, ins, outs, subs, ref_ins in eqns:
    for n in outs:
      producer[n] = (name, ins, subs)
    real_ins = [n for n in ins if n is not None]
    if name in KERNEL_PRIMITIVES or name in XLA_GEMM_PRIMITIVES or subs or name in _BARRIERS:
      materialised.update(real_ins)
      materialised.update(outs)
    elif name in _REDUCTIONS:
      materialised.update(outs)
    if name in KERNEL_PRIMITIVES:
      # A Ref operand is a result written in place (input_output_aliases), counted once
      # as written: by the launch that made the buffer, else by the first that takes it.
      refs = [n for n in real_ins if n in ref_ins]
      real_ins = [n for n in real_ins if n not in ref_ins]
      t.launches += 1
      t.kernel_in += sum(nbytes(n.aval) for n in real_ins)
      t.kernel_in_int8 += sum(nbytes(n.aval) for n in real_ins if n.aval.dtype == jnp.int8)
      t.kernel_out += sum(nbytes(n.aval) for n in (*outs, *refs) if n not in written)
      written.update((*outs, *refs))
    elif name in XLA_GEMM_PRIMITIVES:
      t.xla_gemm += sum(nbytes(n.aval) for n in (*real_ins, *outs))
      if any(jnp.issubdtype(n.aval.dtype, jnp.floating) for n in real_ins):
        t.xla_gemm_float = True
    for sub in subs:
      _count(sub, t, multi_output_fusion)
  # One fusion per materialised tensor an XLA pass writes: its bytes plus one
  # read of each materialised tensor it is computed from.
  skip = KERNEL_PRIMITIVES | XLA_GEMM_PRIMITIVES | _BARRIERS
  for node in materialised:
    prod = producer.get(node)
    if prod is None or prod[0] in skip or prod[2]:
      continue  # an input, or written by a kernel / GEMM / nested body
    t.passes += nbytes(node.aval)
    seen, stack = set(), [n for n in prod[1] if n is not None]
    while stack:
      u = stack.pop()
      if u in seen:
        continue
      seen.add(u)
      if u in materialised:
        if multi_output_fusion and _written_by_xla_pass(u, producer, skip):
          continue  # fused with the pass that writes u: u's own reads are counted there
        t.passes += nbytes(u.aval)
      elif u in producer:
        stack.extend(n for n in producer[u][1] if n is not None)


def _written_by_xla_pass(node, producer, skip) -> bool:
  prod = producer.get(node)
  return prod is not None and prod[0] not in skip and not prod[2]


def count(fn, *args, multi_output_fusion: bool = True) -> Traffic:
  """Traffic of ``fn(*args)`` (abstract ``args``: traced only, never run);
  ``multi_output_fusion`` as :func:`_count`'s."""
  t = Traffic()
  _count(jax.make_jaxpr(fn)(*args).jaxpr, t, multi_output_fusion)
  return t


@dataclasses.dataclass(frozen=True)
class Conv:
  """One conv: NHWC input, HWIO kernel (``(KH, KW, C//G, O)``)."""
  x_shape: tuple
  w_shape: tuple
  strides: tuple = (1, 1)
  padding: object = "SAME"
  groups: int = 1

  def spec(self):
    pad = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
    return make_conv_spec(self.x_shape, self.w_shape, self.strides, pad, None, None, DNUMS,
                          self.groups)

  @property
  def out_shape(self):
    return tuple(self.spec().out_shape)

  @property
  def flops(self) -> int:
    kh, kw, cg, o = self.w_shape
    return 2 * math.prod(self.out_shape[:3]) * kh * kw * cg * o

  @property
  def x_int8_bytes(self) -> int:
    return math.prod(self.x_shape)

  def label(self) -> str:
    kh, kw, cg, o = self.w_shape
    n, h, w, c = self.x_shape
    s = f"/{self.strides[0]}" if self.strides[0] > 1 else ""
    dw = " dw" if self.groups > 1 else ""
    return f"{kh}x{kw}{dw} {c}->{o}{s} @{h}"

  def bf16_bytes(self) -> dict[str, int]:
    x, w, y = (2 * math.prod(s) for s in (self.x_shape, self.w_shape, self.out_shape))
    return {"fwd": x + w + y, "dgrad": y + w + x, "wgrad": x + y + w}


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def count_gemm(conv: Conv, which: str, *, backend=pallas_backend.INTERPRETED,
               dtype=jnp.bfloat16, chunk_k: int = CHUNK_K) -> Traffic:
  """Traffic of one GEMM of ``conv`` as the backend plans it (int8 operands in,
  ``dtype`` out, per-output-channel scale; the backend's fallbacks dispatched, as the
  ops do: depthwise convs off the kernels)."""
  spec = conv.spec()
  c = conv.x_shape[-1]
  o = conv.w_shape[-1]
  x, w, g = (_sds(s, jnp.int8) for s in (conv.x_shape, conv.w_shape, conv.out_shape))
  kw = dict(chunk_k=chunk_k, out_dtype=dtype)
  if which == "fwd":
    return count(lambda x, w, s: backend.function("conv_forward")(x, w, s, spec, **kw),
                 x, w, _sds((o,), jnp.float32))
  if which == "dgrad":
    return count(lambda g, w, s: backend.function("conv_dgrad")(g, w, s, spec, **kw),
                 g, w, _sds((c,), jnp.float32))
  if which == "wgrad":
    layout = backend.wgrad_layout(spec)
    if layout is None:
      return count(lambda x, g, s: backend.function("conv_wgrad")(x, g, s, spec, **kw),
                   x, g, _sds((o,), jnp.float32))
    # The operands in the backend's layout, as the ops hand them: extra outputs of the
    # fusions quantizing x and g (their writes are this GEMM's; their reads are fused).
    xl, gl = jax.eval_shape(layout.x, x), jax.eval_shape(layout.g, g)
    t = count(lambda xl, gl, s: layout.run(xl, gl, s, spec, out_dtype=dtype),
              xl, gl, _sds((o,), jnp.float32))
    t.passes += nbytes(xl) + nbytes(gl)
    return t
  raise ValueError(f"which must be one of {GEMMS}, got {which!r}")


@contextlib.contextmanager
def direct_route(on: bool):
  """The Pallas backend's :data:`~int8jax.backends.pallas.DIRECT_CONV` switch set
  to ``on`` (all its entries) while tracing, restored after."""
  saved = dict(pallas_backend.DIRECT_CONV)
  pallas_backend.DIRECT_CONV.update(dict.fromkeys(saved, bool(on)))
  try:
    yield
  finally:
    pallas_backend.DIRECT_CONV.update(saved)


def count_conv(conv: Conv, *, backend: str = "pallas_interpret", dtype=jnp.bfloat16,
               per_gemm: bool = True, direct: bool | None = None) -> dict[str, Traffic]:
  """``{"fwd", "dgrad", "wgrad", "around", "all"}`` traffic of one quantized
  conv's forward + backward (UI8 non-measuring step); ``"all"`` is the whole
  traced ``jax.vjp``, ``"around"`` what it has beyond the three GEMMs.
  ``direct``: trace with the direct-addressing conv kernels on (True) / off
  (False) (:func:`direct_route`); None: as the backend's switch stands."""
  if direct is not None:
    with direct_route(direct):
      return count_conv(conv, backend=backend, dtype=dtype, per_gemm=per_gemm)
  cfg = QuantConfig(backend=backend)
  gs = int8jax.GradQuantState.initial().replace(clip=jnp.float32(1e-3))

  def fwd_bwd(x, w, gy, key):
    def f(x, w):
      return int8jax.quant_conv_general_dilated(
          x, w, conv.strides, conv.padding, dimension_numbers=DNUMS,
          feature_group_count=conv.groups, key=key, grad_state=gs, x_clip=4.0,
          measure=False, stored_clip_only=True, config=cfg)
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(gy)

  w_full = conv.w_shape
  out = {"all": count(fwd_bwd, _sds(conv.x_shape, dtype), _sds(w_full, dtype),
                      _sds(conv.out_shape, dtype), jax.random.key(0))}
  if per_gemm:
    impl = int8jax.backends.get(backend)
    for which in GEMMS:
      out[which] = count_gemm(conv, which, backend=impl, dtype=dtype)
    around = out["all"]
    for which in GEMMS:
      around = around - out[which]
    out["around"] = around
  return out


# ---------------------------------------------------------------------------
# The kernels' launch plans, without tracing: what the counter must find.


def _pads(conv: Conv):
  spec = conv.spec()
  return tuple(tuple(int(v) for v in p) for p in spec.padding)


def planned_kernel_int8_bytes(conv: Conv) -> dict[str, int]:
  """Int8 operand bytes of each GEMM's kernel launches, from the launch plans
  of :mod:`pallas_kernels.int8_conv` (implicit-GEMM convs: 2-D, ungrouped).

  forward: every shifted copy of the padded source plus the weight matrix;
  dgrad: every copy of the padded ``g`` plus each launch's weight matrix,
  per launch (each output phase is a launch handed all copies); wgrad: the
  transposed copies of x plus the transposed ``g`` grid.
  """
  from pallas_kernels import conv_common as cc  # pylint: disable=g-import-not-at-top
  from pallas_kernels.conv_dgrad import dgrad_plan  # pylint: disable=g-import-not-at-top
  from pallas_kernels.conv_wgrad import wgrad_plan  # pylint: disable=g-import-not-at-top
  if conv.groups != 1:
    raise ValueError(f"planned_kernel_int8_bytes: ungrouped convs only, got groups={conv.groups}")
  n, h, w, c = conv.x_shape
  kh, kw, _, o = conv.w_shape
  strides, pads = tuple(conv.strides), _pads(conv)
  r = cc.round_up
  cfg = cc.select_conv_config(c, o)
  cp, op = r(c, cfg.tile_k), r(o, cfg.tile_n)
  plan, _ = cc.forward_plan(n, h, w, c, kh, kw, o, strides, pads, cfg.tile_m, cp, op, 2)
  ntaps = len(plan.launches[0].offsets)
  fwd = len(plan.residues) * plan.copy_rows * cp + op * ntaps * cp
  cfg = cc.select_conv_config(o, c)
  kp, np_ = r(o, cfg.tile_k), r(c, cfg.tile_n)
  plan, *_ = dgrad_plan(conv.x_shape, conv.w_shape, strides, pads, cfg.tile_m, kp, np_, 2)
  copies = len(plan.residues) * plan.copy_rows * kp
  dgrad = sum(copies + np_ * len(t.offsets) * kp for t in plan.launches)
  cfg = cc.select_wgrad_config(c, o)
  plan, _, split, cp, op = wgrad_plan(conv.x_shape, conv.w_shape, strides, pads, cfg)
  taps = plan.launches[0]
  cols = split.k_pad + max(taps.align * q for q in taps.tap_offq)
  wgrad = len(plan.residues) * cp * cols + op * split.k_pad
  return {"fwd": fwd, "dgrad": dgrad, "wgrad": wgrad}


# ---------------------------------------------------------------------------
# The models' convs.


def model_convs(name: str, batch: int = 256, side: int = 224) -> list[tuple[Conv, int, bool]]:
  """``[(conv, count, quantized)]`` of ``examples.models`` ``name`` at ``batch``
  x ``side`` x ``side`` x 3, distinct convs in order of first use; the first
  conv (the stem) is not quantized by ``int8jax.nn.quantize_model``."""
  from flax import nnx
  from examples import models

  found: list[Conv] = []
  orig = nnx.Conv.__call__

  def record(self, x):
    found.append(Conv(tuple(x.shape), (*self.kernel_size, self.in_features //
                                       self.feature_group_count, self.out_features),
                      tuple(self.strides), self.padding, self.feature_group_count))
    return orig(self, x)

  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=1000,
                                                     rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  nnx.Conv.__call__ = record
  try:
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                   _sds((batch, side, side, 3), jnp.float32))
  finally:
    nnx.Conv.__call__ = orig
  out: dict[Conv, list] = {}
  for i, cv in enumerate(found):
    key = dataclasses.replace(cv, padding=_norm_padding(cv.padding))
    if key in out:
      out[key][0] += 1
    else:
      out[key] = [1, i > 0]
  return [(cv, n, q) for cv, (n, q) in out.items()]


def _norm_padding(p):
  return p if isinstance(p, str) else tuple(tuple(int(v) for v in q) for q in p)


# ---------------------------------------------------------------------------
# The model and its table.


def gemm_time(flops, nbytes_, peak_flops, bw) -> float:
  return max(flops / peak_flops, nbytes_ / bw)


def analyse(convs, peaks: dict[str, tuple[float, float, float]], *,
            backend="pallas_interpret", progress=None, direct: bool | None = None) -> list[dict]:
  """One row per (quantized conv, GEMM) and one "around" row per conv
  (``direct``: as :func:`count_conv`)."""
  rows = []
  for cv, n, quantized in convs:
    if not quantized:
      continue
    if progress:
      progress(cv)
    tr = count_conv(cv, backend=backend, direct=direct)
    bf = cv.bf16_bytes()
    for which in (*GEMMS, "around"):
      t = tr[which]
      row = dict(conv=cv, count=n, gemm=which, traffic=t,
                 flops=cv.flops if which != "around" else 0,
                 bf16=bf.get(which, 0), int8=t.total,
                 x_bytes=cv.x_int8_bytes, times={})
      engine_int8 = not t.xla_gemm_float
      for pname, (i8, b16, bw) in peaks.items():
        tb = gemm_time(row["flops"], row["bf16"], b16 * 1e12, bw * 1e12)
        ti = gemm_time(row["flops"], row["int8"], (i8 if engine_int8 else b16) * 1e12,
                       bw * 1e12)
        tk = gemm_time(row["flops"], t.kernel + t.xla_gemm,
                       (i8 if engine_int8 else b16) * 1e12, bw * 1e12)
        row["times"][pname] = (tb, ti, tk)
      rows.append(row)
  return rows


def _mb(b):
  return f"{b / 1e6:.1f}"


def table(model: str, rows: list[dict], peaks, batch: int) -> str:
  """Markdown: per-GEMM rows, then the summed conv path per peak."""
  pnames = list(peaks)
  head = ("| conv | n | GEMM | GFLOP | bf16 MB | int8 MB (kernel / passes / XLA GEMM) "
          "| int8 / bf16 bytes | kernel int8 operands / x | "
          + " | ".join(f"{p} bf16 / int8 us" for p in pnames) + " | flag |")
  lines = [f"\n### {model}, batch {batch}: int8 conv path as planned vs bf16\n",
           head, "| " + " | ".join(["---"] * (8 + len(pnames))) + " |"]
  for r in rows:
    t = r["traffic"]
    ratio = f"{r['int8'] / r['bf16']:.2f}" if r["bf16"] else ""
    flag = "int8 bytes > bf16" if r["bf16"] and r["int8"] > r["bf16"] else ""
    times = " | ".join(f"{r['times'][p][0] * 1e6:.0f} / {r['times'][p][1] * 1e6:.0f}"
                       for p in pnames)
    k_ratio = f"{t.kernel_in_int8 / r['x_bytes']:.1f}x" if t.launches else ""
    lines.append(
        f"| {r['conv'].label()} | {r['count']} | {r['gemm']} | {r['flops'] / 1e9:.1f} "
        f"| {_mb(r['bf16'])} | {_mb(r['int8'])} ({_mb(t.kernel)} / {_mb(t.passes)} / "
        f"{_mb(t.xla_gemm)}) | {ratio} | {k_ratio} | {times} | {flag} |")
  lines.append("")
  lines.append(summary(model, rows, peaks))
  return "\n".join(lines)


def totals(rows, pname) -> dict:
  """Summed (count-weighted) times and bytes of the conv path at ``pname``'s peaks."""
  w = lambda f: sum(r["count"] * f(r) for r in rows)  # noqa: E731
  return dict(t_bf16=w(lambda r: r["times"][pname][0]), t_int8=w(lambda r: r["times"][pname][1]),
              t_kernels=w(lambda r: r["times"][pname][2]),
              bytes_bf16=w(lambda r: r["bf16"]), bytes_int8=w(lambda r: r["int8"]),
              kernel=w(lambda r: r["traffic"].kernel), xla_gemm=w(lambda r: r["traffic"].xla_gemm),
              passes=w(lambda r: r["traffic"].passes if r["gemm"] != "around" else 0),
              around=w(lambda r: r["traffic"].passes if r["gemm"] == "around" else 0),
              worse=sum(1 for r in rows if r["gemm"] != "around" and r["int8"] > r["bf16"]),
              gemms=sum(1 for r in rows if r["gemm"] != "around"))


def worst(rows, k=5) -> list[dict]:
  """The ``k`` GEMMs with the largest int8 / bf16 byte ratio."""
  g = [r for r in rows if r["gemm"] != "around"]
  return sorted(g, key=lambda r: -r["int8"] / r["bf16"])[:k]


def summary(model: str, rows, peaks) -> str:
  out = []
  for p in peaks:
    s = totals(rows, p)
    out.append(f"{model} conv path at {p} peaks {peaks[p]}: bf16 {s['t_bf16'] * 1e3:.2f} ms, "
               f"int8 as planned {s['t_int8'] * 1e3:.2f} ms: **{s['t_int8'] / s['t_bf16']:.2f}x** "
               f"(target <= 0.7x); the kernels and XLA GEMMs alone (every XLA pass around "
               f"them fused away): {s['t_kernels'] * 1e3:.2f} ms, "
               f"{s['t_kernels'] / s['t_bf16']:.2f}x.")
  s = totals(rows, next(iter(peaks)))
  gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
  out.append(f"{model} bytes: int8 {gb(s['bytes_int8'])} vs bf16 {gb(s['bytes_bf16'])} "
             f"(**{s['bytes_int8'] / s['bytes_bf16']:.2f}x**; target <= 1x on every conv): "
             f"kernel operands + outputs {gb(s['kernel'])} "
             f"({s['kernel'] / s['bytes_bf16']:.2f}x bf16), XLA passes around the kernels "
             f"{gb(s['passes'])}, XLA GEMMs {gb(s['xla_gemm'])}, quantize + finiteness passes "
             f"{gb(s['around'])}; GEMMs with int8 bytes > bf16: {s['worse']} of {s['gemms']}.")
  out.append("Largest int8 / bf16 byte ratios: " + "; ".join(
      f"{r['conv'].label()} {r['gemm']} {r['int8'] / r['bf16']:.1f}x" for r in worst(rows)) + ".")
  return "\n\n".join(out) + "\n"


def parse_peaks(text: str) -> dict[str, tuple[float, float, float]]:
  """``"name=int8_tops,bf16_tflops,tb_per_s;..."`` -> dict (ValueError naming the text)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(";"))):
    try:
      name, vals = item.split("=")
      vals = tuple(float(v) for v in vals.split(","))
      if len(vals) != 3 or min(vals) <= 0 or not name.strip():
        raise ValueError
    except ValueError:
      raise ValueError(f"--peaks: expected 'name=INT8_TOPS,BF16_TFLOPS,TB_PER_S' "
                       f"(positive numbers), got {item!r}") from None
    out[name.strip()] = vals
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="resnet50,mobilenet_v2",
                 help="comma list of examples.models names (ImageNet input)")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--side", type=int, default=224, help="input image side")
  p.add_argument("--limit", type=int, default=None,
                 help="only the first N distinct quantized convs of each model (tests)")
  p.add_argument("--peaks", default="",
                 help="extra ceilings 'name=int8_TOPS,bf16_TFLOPS,TB/s;...' (measured ones)")
  p.add_argument("--no-default-peaks", action="store_true",
                 help="only the --peaks ceilings, not H200 / H100 SXM")
  p.add_argument("--out", default=None, help="markdown file to append the tables to")
  p.add_argument("--direct", action="store_true",
                 help="count with the direct-addressing conv kernels on (the Pallas backend's "
                 "INT8JAX_DIRECT_CONV switch: forward, dgrad, wgrad); default: off")
  args = p.parse_args(argv)
  from examples import models
  names = [m.strip() for m in args.models.split(",") if m.strip()]
  bad = [m for m in names if m not in models.MODELS]
  if bad or not names:
    p.error(f"--models: unknown or none {bad or names}; choose from {sorted(models.MODELS)}")
  for opt in ("batch", "side"):
    if getattr(args, opt) < 1:
      p.error(f"--{opt} must be >= 1, got {getattr(args, opt)}")
  if args.limit is not None and args.limit < 1:
    p.error(f"--limit must be >= 1, got {args.limit}")
  try:
    extra = parse_peaks(args.peaks)
  except ValueError as e:
    p.error(str(e))
  peaks = ({} if args.no_default_peaks else dict(PEAKS)) | extra
  if not peaks:
    p.error("--no-default-peaks needs --peaks")
  header = (f"\n## Conv traffic model (`benchmarks/traffic.py`), "
            f"{datetime.date.today().isoformat()}, jax {jax.__version__}\n\n"
            "int8 bytes counted on the traced program of the Pallas backend "
            f"(pallas_interpret, direct-addressing conv kernels "
            f"{'on' if args.direct else 'off'}), fusion model and exclusions in the module "
            "docstring; "
            f"`python benchmarks/traffic.py {' '.join(sys.argv[1:] if argv is None else argv)}`."
            "\n")
  text = [header]
  print(header, flush=True)
  for m in names:
    convs = [c for c in model_convs(m, args.batch, args.side) if c[2]]
    if args.limit:
      convs = convs[:args.limit]
    rows = analyse(convs, peaks, direct=args.direct,
                   progress=lambda cv: print(f"  tracing {m} {cv.label()}", file=sys.stderr,
                                             flush=True))
    t = table(m, rows, peaks, args.batch)
    print(t, flush=True)
    text.append(t)
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write("\n".join(text) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
