"""The backend registry (int8jax.backends): one place defines a backend."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import int8jax
from int8jax import backends
from int8jax.backends import base, xla

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAX_DN = ("NHWC", "HWIO", "NHWC")


def test_backend_names_are_the_registry():
  assert int8jax.BACKEND_NAMES == (None, *backends.names())
  assert int8jax.config.BACKEND_NAMES == int8jax.BACKEND_NAMES
  assert set(backends.names()) == {"xla", "pallas", "pallas_interpret"}
  from examples.config import BACKEND_CHOICES  # pylint: disable=g-import-not-at-top
  assert BACKEND_CHOICES == tuple("auto" if b is None else b for b in int8jax.BACKEND_NAMES)


def test_docs_table_is_the_registry():
  """docs/design.md quotes backends.table() (regenerate it from there)."""
  design = (ROOT / "docs" / "design.md").read_text()
  assert backends.table() in design
  for name in backends.names():
    assert f"| `{name}` |" in backends.table()


def _conv_fwd_bwd(config):
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5)) * 0.3
  gy = jax.random.normal(jax.random.key(2), (2, 3, 3, 5))

  def f(x, w):
    y, vjp = jax.vjp(lambda a, b: int8jax.quant_conv_general_dilated(
        a, b, (2, 2), "SAME", dimension_numbers=FLAX_DN, key=jax.random.key(3),
        config=config), x, w)
    return (y, *vjp(gy))

  return [np.asarray(v) for v in jax.jit(f)(x, w)]


def test_a_registered_backend_runs_by_name():
  """A toy backend (xla's products, counted): one register() call makes it a
  QuantConfig.backend / BACKEND_NAMES name that the ops run; unregister()
  removes it again."""
  calls = []

  def counted(name):
    fn = getattr(xla.BACKEND, name)

    def run(*args, **kw):
      calls.append(name)
      return fn(*args, **kw)

    return run

  toy = xla.BACKEND.replace(name="toy", description="xla, counted (a test)",
                            check=base.Backend.check, auto_rank=None,
                            **{f: counted(f) for f in base.FUNCTIONS})
  backends.register(toy)
  try:
    assert "toy" in int8jax.BACKEND_NAMES
    with pytest.raises(ValueError, match="'toy' is already registered"):
      backends.register(toy)
    assert backends.get("toy") is toy
    assert backends.resolve(None) == "xla"  # auto_rank=None: never picked automatically
    got = _conv_fwd_bwd(int8jax.QuantConfig(backend="toy"))
    assert sorted(calls) == ["conv_dgrad", "conv_forward", "conv_wgrad"]
    want = _conv_fwd_bwd(int8jax.QuantConfig(backend="xla"))
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  finally:
    assert backends.unregister("toy") is toy
  assert "toy" not in int8jax.BACKEND_NAMES
  with pytest.raises(ValueError, match="QuantConfig.backend must be one of .*'toy'"):
    int8jax.QuantConfig(backend="toy")
  with pytest.raises(ValueError, match="unknown backend 'toy'"):
    backends.unregister("toy")


def test_check_refuses_and_fallbacks_dispatch():
  """A backend's check runs on every trace; a dispatched fallback replaces the
  product on the shapes it applies to."""

  def refuse():
    raise ValueError("backend='fussy' refuses this platform")

  used = []
  fallback = base.Fallback(("conv_forward",), "every conv (a test)", "xla.conv_forward",
                           applies=lambda spec: True,
                           run=lambda *a, **kw: used.append(1) or xla.conv_forward(*a, **kw))
  fussy = xla.BACKEND.replace(name="fussy", description="refuses", check=refuse,
                              auto_rank=None)
  routed = xla.BACKEND.replace(name="routed", description="falls back", auto_rank=None,
                               fallbacks=(fallback,))
  backends.register(fussy)
  backends.register(routed)
  try:
    with pytest.raises(ValueError, match="backend='fussy' refuses"):
      _conv_fwd_bwd(int8jax.QuantConfig(backend="fussy"))
    _conv_fwd_bwd(int8jax.QuantConfig(backend="routed"))
    assert used == [1]
    assert "`routed` | `conv_forward` | every conv (a test) | xla.conv_forward |" in \
        backends.table()
  finally:
    backends.unregister("fussy")
    backends.unregister("routed")


def test_a_backend_layout_reaches_its_weight_gradient():
  """Backend.conv_wgrad_layout: the ops keep x in the backend's layout as the residual
  (written in the forward pass, next to the quantization), lay out g the same way in the
  backward pass, and call the layout's run instead of conv_wgrad; a dispatched fallback
  for conv_wgrad keeps NHWC. Fwd + bwd bit-identical to xla."""
  seen = []

  def to_cnhw(q):
    return jnp.transpose(q, (3, 0, 1, 2))

  def run(xl, gl, scale, spec, *, out_dtype, halves=False):
    seen.append((xl.shape, gl.shape))
    back = lambda t: jnp.transpose(t, (1, 2, 3, 0))  # noqa: E731
    return xla.conv_wgrad(back(xl), back(gl), scale, spec, out_dtype=out_dtype, halves=halves)

  def layout(spec):
    return base.WgradLayout(key="cnhw", x=to_cnhw, g=to_cnhw, run=run)

  def no_wgrad(*a, **kw):
    raise AssertionError("conv_wgrad must not run: the layout's run replaces it")

  laid = xla.BACKEND.replace(name="laid", description="xla, wgrad on a CNHW layout",
                             check=base.Backend.check, auto_rank=None,
                             conv_wgrad=no_wgrad, conv_wgrad_layout=layout)
  fell = laid.replace(name="fell", description="falls back", fallbacks=(base.Fallback(
      ("conv_wgrad",), "every conv (a test)", "xla.conv_wgrad", applies=lambda spec: True,
      run=xla.conv_wgrad),))
  for b in (laid, fell):
    backends.register(b)
  try:
    want = _conv_fwd_bwd(int8jax.QuantConfig(backend="xla"))
    for name, n_runs in (("laid", 1), ("fell", 0)):
      seen.clear()
      got = _conv_fwd_bwd(int8jax.QuantConfig(backend=name))
      assert len(seen) == n_runs, (name, seen)
      for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert fell.wgrad_layout(None) is None
  finally:
    for b in (laid, fell):
      backends.unregister(b.name)
  with pytest.raises(TypeError, match="conv_wgrad_layout must be callable or None"):
    xla.BACKEND.replace(conv_wgrad_layout=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(functions=("conv_fwd",), when="w", route="r"), "unknown"),
    (dict(functions=("dense_forward",), when="w", route="r", applies=bool, run=print),
     "only conv functions"),
    (dict(functions=("conv_forward",), when="w", route="r", applies=bool), "both applies"),
])
def test_bad_fallbacks(kwargs, match):
  with pytest.raises(ValueError, match=match):
    base.Fallback(**kwargs)


def test_bad_backends():
  with pytest.raises(ValueError, match="Backend.name"):
    xla.BACKEND.replace(name="no spaces")
  with pytest.raises(TypeError, match="conv_dgrad must be callable"):
    xla.BACKEND.replace(conv_dgrad=None)
  with pytest.raises(TypeError, match="must be an int8jax.backends.Backend"):
    backends.register("xla")


def test_per_shard_is_declared_by_the_backend():
  assert [n for n, b in backends.BACKENDS.items() if b.per_shard] == ["pallas",
                                                                       "pallas_interpret"]


def test_dequant_is_the_shared_epilogue():
  exact = jnp.asarray([3, -7, 2**24 + 1], jnp.int32)
  got = backends.dequant(exact, jnp.float32(0.5), jnp.bfloat16)
  want = (np.asarray(exact).astype(np.float32) * np.float32(0.5)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert xla.dequant is backends.dequant
