"""benchmarks/traffic.py: the byte counter on the traced conv program, the
kernels' launch plans it must agree with, and the issue-24 target (xfail)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import traffic as tf
from pallas_kernels import conv_direct_wgrad

# The conv of issue 24: 8x32x32x64 -> 64, 3x3, SAME.
CONVS = {s: tf.Conv((8, 32, 32, 64), (3, 3, 64, 64), (s, s), "SAME") for s in (1, 2)}


@pytest.fixture(scope="module")
def counted():
  return {s: tf.count_conv(cv, direct=False) for s, cv in CONVS.items()}


@pytest.fixture(scope="module")
def counted_direct():
  return {s: tf.count_conv(cv, direct=True) for s, cv in CONVS.items()}


def test_pass_model_on_a_known_program():
  """A pad then a slice (fused: one pass) into a reduction: x read once, the
  padded-and-sliced tensor written once and read once by the reduction."""
  x = jax.ShapeDtypeStruct((64, 128), jnp.int8)

  def f(x):
    y = jnp.pad(x, ((1, 1), (0, 0)))[2:]  # (64, 128) int8, fused
    return jnp.min(y), jnp.transpose(y)

  t = tf.count(f, x)
  n = 64 * 128
  # outputs: min (1 byte, reads y's source x) and the transpose (n written,
  # reading x): 2 reads of x + n + 1 written.
  assert t.passes == 2 * n + n + 1, t
  assert t.launches == 0 and t.kernel == 0
  # A Ref made, frozen and reshaped is one buffer: no pass (a plain reshape of an input
  # is counted as one, as the model always has).
  assert tf.count(lambda x: jax.freeze(jax.new_ref(x)).reshape(128, 64), x).passes == 0
  assert tf.count(lambda x: x.reshape(128, 64), x).passes == 2 * n


@pytest.mark.parametrize("stride", [1, 2])
def test_counter_agrees_with_launch_plans(stride, counted):
  """The int8 operands the traced fwd+bwd hands the three GEMMs' kernels are
  what pallas_kernels.int8_conv's launch plans say, GEMM by GEMM; the traced
  vjp of the op has exactly those launches (3 / 6: stride-2 dgrad runs one
  launch per output phase)."""
  cv, got = CONVS[stride], counted[stride]
  plan = tf.planned_kernel_int8_bytes(cv)
  for which in tf.GEMMS:
    assert got[which].kernel_in_int8 == plan[which], (which, got[which], plan[which])
  assert got["all"].kernel_in_int8 == sum(plan.values())
  assert got["all"].launches == (3 if stride == 1 else 6)
  assert got["around"].launches == 0 and got["around"].kernel == 0
  # Issue 24's figures (2026-12-03): 17.6x (stride 1) and 11.9x (stride 2)
  # the int8 input's bytes; forward 4.08x (3 copies + weights), wgrad 9.43x
  # (7 transposed copies of x + g at stride 1).
  ratio = got["all"].kernel_in_int8 / cv.x_int8_bytes
  assert ratio == pytest.approx({1: 17.60, 2: 11.94}[stride], abs=0.01), ratio


@pytest.mark.parametrize("stride", [1, 2])
def test_direct_route_counts(stride, counted, counted_direct):
  """With the direct-addressing kernels (INT8JAX_DIRECT_CONV=1): the forward
  and the stride-1 dgrad kernels are handed x (g) itself plus the weight
  matrix -- as traced here in interpret mode, x with its low padding added in
  XLA (the compiled kernel reads it as TMA out-of-bounds zeros:
  direct_kernel_operand_bytes without low_pad_in_xla, 1.07x) -- the
  stride-2 forward the phase images; the wgrad x^T and g^T once each
  (channel-major; stride 1: x^T with its low padding, as the forward's; stride
  2: the phase images of x^T); the stride-2 dgrad g once per output phase (4
  launches: as traced, g with its low padding added in XLA; compiled, g itself)
  plus the phases' weight matrices, dx written once in place (a Ref the later
  launches take: the counter counts it once, as written). Pinned to the counted
  values (2026-12-03; before the direct wgrad: wgrad 9.4297 / 4.7812, all 11.6973 /
  9.6367; before the direct strided dgrad: dgrad 3.6562, all 6.3008 at stride 2)."""
  from pallas_kernels import conv_direct
  from pallas_kernels import conv_direct_wgrad
  cv, got, off = CONVS[stride], counted_direct[stride], counted[stride]
  ratio = {k: got[k].kernel_in_int8 / cv.x_int8_bytes for k in (*tf.GEMMS, "all")}
  want = {1: dict(fwd=1.1338, dgrad=1.1338, wgrad=2.0957, all=4.3633),
          2: dict(fwd=1.1992, dgrad=1.1992, wgrad=1.4453, all=3.8438)}[stride]
  for k, v in want.items():
    assert ratio[k] == pytest.approx(v, abs=1e-4), (k, ratio)
  wplan = conv_direct_wgrad.direct_wgrad_operand_bytes(cv.x_shape, cv.w_shape,
                                                       window_strides=cv.strides,
                                                       padding=cv.padding)
  if stride == 1:
    # compiled: x^T + g^T unpadded (N = 8: even widths), 2.0x; traced: x^T of the
    # low-padded 33x33 x, widths 34 (x) and 32 (g).
    assert wplan["handed"] == 2 * cv.x_int8_bytes
    assert got["wgrad"].kernel_in_int8 == 64 * 33 * 34 * 8 + 64 * 32 * 32 * 8
  else:
    assert got["wgrad"].kernel_in_int8 == wplan["handed"]  # phases pad in XLA anyway
  assert got["wgrad"].kernel_in_int8 < off["wgrad"].kernel_in_int8 / 3
  # The transposes to channel-major are XLA passes (a quantize fusion's second
  # output, later): the wgrad's passes still drop.
  assert got["wgrad"].passes < off["wgrad"].passes
  assert got["all"].launches == off["all"].launches == (3 if stride == 1 else 6)
  if stride == 1:
    assert got["dgrad"].kernel_in_int8 == got["fwd"].kernel_in_int8  # 64 -> 64, SAME
    plan, _ = conv_direct.direct_kernel_operand_bytes(cv.x_shape, cv.w_shape,
                                                      low_pad_in_xla=True)
    assert got["fwd"].kernel_in_int8 == plan
    compiled, x = conv_direct.direct_kernel_operand_bytes(cv.x_shape, cv.w_shape)
    assert compiled / x == pytest.approx(1.0703, abs=1e-4)
  else:
    n, h, w, c = cv.x_shape
    g = n * (h // 2 + 1) * (w // 2 + 1) * c  # traced: g (8x16x16x64) with its low pad
    assert got["dgrad"].kernel_in_int8 == 4 * g + 64 * 9 * 64
    assert got["dgrad"].launches == 4
    dx = n * h * w * c * 2  # bf16, written once: no interleave
    assert got["dgrad"].kernel_out == dx and off["dgrad"].kernel_out > dx
    # XLA passes: the weight matrices and (traced only) g's low pad
    assert got["dgrad"].passes == 464128 < off["dgrad"].passes / 7
  assert got["all"].total < off["all"].total


def test_multi_output_fusion_model_on_a_known_program():
  """A quantize-like pass materialised by a barrier, with a reduction and a transpose of
  it inside the barrier: with multi-output fusion the two read nothing (they are extra
  outputs of the pass that reads x); without it each reads the int8 tensor once. A
  reduction of the barrier's *output* is never fused (XLA cannot fuse across it)."""
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  n = 64 * 128

  def f(x):
    q = (x * 3.0).astype(jnp.int8)
    q, lo, qt = jax.lax.optimization_barrier((q, jnp.min(q), q.T))
    return q, lo, qt, jnp.max(q)

  fused, unfused = tf.count(f, x), tf.count(f, x, multi_output_fusion=False)
  # q: 4n read + n written; min: 1 written; q.T: n written; max of the barrier's q:
  # n read + 1 written -- and, unfused, one read of q each for min and q.T.
  assert fused.passes == 4 * n + n + 1 + n + n + 1, fused
  assert unfused.passes == fused.passes + 2 * n, unfused


def _flat(fn, *args):
  closed = jax.make_jaxpr(fn)(*args)
  env = {v: tf._Node(v.aval) for v in closed.jaxpr.invars}
  eqns = []
  tf._flatten(closed.jaxpr, env, eqns)
  return {n: e[0] for e in eqns for n in e[2]}, eqns


def test_direct_route_quantizing_fusion_writes_layouts_and_finiteness():
  """Issue 24, item 1, on the direct route: the channel-major x^T and g^T the weight
  gradient kernel reads are outputs of the barriers that materialise the quantized x and
  g (traced from the quantization itself: the quantizing fusion can write them as extra
  outputs), not transposes of the materialised int8 tensors; and every finiteness
  reduction over int8 x / g reads the quantization, not the materialised tensor."""
  cv = CONVS[1]
  cfg = tf.QuantConfig(backend="pallas_interpret")

  def fwd_bwd(x, w, gy):
    def f(x, w):
      return tf.int8jax.quant_conv_general_dilated(
          x, w, cv.strides, cv.padding, dimension_numbers=tf.DNUMS, x_clip=4.0,
          key=jax.random.key(0), config=cfg)
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(gy)

  sds = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in (cv.x_shape, cv.w_shape,
                                                           cv.out_shape)]
  for direct in (True, False):
    with tf.direct_route(direct):
      producer, eqns = _flat(fwd_bwd, *sds)
    if direct:
      ops = conv_direct_wgrad.channel_major_operands(
          cv.x_shape, cv.w_shape, window_strides=cv.strides, padding=cv.padding,
          interpret=True)
      cm = [producer.get(n) for name, ins, *_ in eqns if name in tf.KERNEL_PRIMITIVES
            for n in ins if n is not None and n.aval.dtype == jnp.int8
            and n.aval.shape in (ops.x_cm_shape, ops.g_cm_shape)]
      assert cm == ["optimization_barrier"] * 2, cm  # x^T and g^T, from the barriers
    mins = [producer.get(ins[0]) for name, ins, *_ in eqns
            if name == "reduce_min" and ins[0].aval.dtype == jnp.int8
            and ins[0].aval.shape in (cv.x_shape, cv.out_shape)]
    assert len(mins) == 2 and "optimization_barrier" not in mins, mins


@pytest.mark.parametrize("stride", [1, 2])
def test_direct_route_within_5x_the_int8_input(stride, counted_direct):
  """The issue-24 target on the direct route (INT8JAX_DIRECT_CONV=1): 4.36x at stride 1,
  3.84x at stride 2 (as traced in interpret mode, the low padding in XLA included)."""
  ratio = counted_direct[stride]["all"].kernel_in_int8 / CONVS[stride].x_int8_bytes
  assert ratio <= 5.0, ratio


@pytest.mark.xfail(strict=True, reason=(
    "issue 24: the conv kernels are handed 17.6x (stride 1) / 11.9x (stride 2) "
    "the int8 input's bytes (shifted copies, transposed wgrad copies); target "
    "~5x. Remove this marker when the kernels read each quantized tensor ~once."))
@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_operands_within_5x_the_int8_input(stride, counted):
  ratio = counted[stride]["all"].kernel_in_int8 / CONVS[stride].x_int8_bytes
  assert ratio <= 5.0, ratio


def test_count_gemm_dispatches_the_backends_fallbacks():
  """A depthwise conv's GEMMs are counted on the route the ops take (the backend's
  fallbacks: exact bf16 grouped convs, XLA int32 arithmetic -- no kernel launch), not
  on per-group im2col GEMMs; and the per-GEMM counts add up to no more than the
  traced op's."""
  cv = tf.Conv((2, 8, 8, 32), (3, 3, 1, 32), (1, 1), "SAME", groups=32)
  got = tf.count_conv(cv)
  for which in tf.GEMMS:
    assert got[which].launches == 0 and got[which].kernel == 0, (which, got[which])
  assert got["around"].passes >= 0 and got["all"].launches == 0, got


def test_model_convs_of_resnet50():
  convs = tf.model_convs("resnet50", batch=2, side=64)
  assert not convs[0][2], "the stem stays float"
  assert sum(n for _, n, _ in convs) == 53  # 1 stem + 16 x 3 + 4 projections
  labels = [cv.label() for cv, _, _ in convs]
  assert "3x3 64->64 @16" in labels and "1x1 1024->2048/2 @4" in labels, labels


def test_traffic_end_to_end(tmp_path, capsys):
  out = tmp_path / "t.md"
  assert tf.main(["--models", "resnet50", "--batch", "2", "--side", "32", "--limit", "2",
                  "--peaks", "lab=1000,500,3", "--out", str(out)]) == 0
  text = out.read_text()
  assert "| 1x1 64->64 @8 | 1 | fwd |" in text, text
  assert "resnet50 conv path at H200 peaks" in text and "at lab peaks" in text
  assert "| 1x1 64->64 @8 | 1 | fwd |" in capsys.readouterr().out


def test_traffic_direct_flag(tmp_path, capsys):
  """--direct counts with the direct kernels: a 3x3 stride-1 forward handed ~1x its input."""
  from int8jax.backends import pallas as pallas_backend
  before = dict(pallas_backend.DIRECT_CONV)
  out = tmp_path / "t.md"
  assert tf.main(["--models", "resnet50", "--batch", "2", "--side", "32", "--limit", "2",
                  "--direct", "--no-default-peaks", "--peaks", "lab=1000,500,3",
                  "--out", str(out)]) == 0
  assert pallas_backend.DIRECT_CONV == before  # restored
  text = out.read_text()
  assert "direct-addressing conv kernels on" in text, text
  row = next(r for r in text.splitlines() if r.startswith("| 3x3 64->64 @8 | 3 | fwd |"))
  # x with its low pad (2x8x8x64 -> 2x9x9x64) + the 64 x 9*64 weight matrix, over x
  assert row.split("|")[8].strip() == f"{(2 * 9 * 9 * 64 + 64 * 576) / (2 * 8 * 8 * 64):.1f}x"
  capsys.readouterr()


@pytest.mark.parametrize("argv, match", [
    (["--models", "nope"], "--models: unknown"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--peaks", "x=1,2"], "--peaks: expected"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_cli_errors(argv, match, capsys):
  with pytest.raises(SystemExit):
    tf.main(argv)
  assert match in capsys.readouterr().err


def test_fusion_check_finds_the_quantizing_fusions(tmp_path, capsys):
  """benchmarks/fusion_check.py (run on a GPU to check the traffic model's multi-output
  fusion) on XLA:CPU: it finds x and dy among the compiled entry's parameters and the
  fusions that read them, among them the one writing int8 x / int8 dy."""
  from benchmarks import fusion_check
  out = tmp_path / "f.json"
  assert fusion_check.main(["--backend", "xla", "--batch", "2", "--side", "6",
                            "--channels", "16", "24", "--out", str(out)]) == 0
  import json
  report = json.loads(out.read_text())
  assert report["platform"] == "cpu" and report["reads"]["x"] >= 1, report
  for key, shape in (("x", "s8[2,6,6,16]"), ("dy", "s8[2,6,6,24]")):
    assert any(shape in r["writes"] for r in report["readers"][key]), report["readers"][key]
  assert "fusions reading float x" in capsys.readouterr().out
