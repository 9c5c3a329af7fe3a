"""optax transforms: jit, chain, inject_hyperparams, dtypes, formulas."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

import int8jax
from int8jax import optim
from int8jax.dsgc import GradQuantState
from int8jax.nn import TRAINABLE


def _state(**kw):
  s = GradQuantState.initial()
  return s.replace(**{k: jnp.float32(v) for k, v in kw.items()})


def _tree(dtype=jnp.float32, d=0.05, best_ratio=0.4):
  params = {
      "conv1": {"kernel": jnp.ones((3, 3, 2, 4), dtype), "bias": jnp.ones((4,), dtype),
                "grad_quant": _state(clip=0.5, clip_ratio=0.5, channel_distance_mean=0.2,
                                     distance=0.2, measurements=3)},
      "fc": {"kernel": jnp.ones((4, 2), dtype)},  # float layer: untouched
  }
  grads = {  # a measurement as the ops return it (scaled, with its check value)
      "conv1": {"kernel": jnp.full((3, 3, 2, 4), 0.5, dtype), "bias": jnp.full((4,), 0.5, dtype),
                "grad_quant": int8jax.dsgc.as_cotangent(_state(
                    channel_distance_mean=d, distance=d, grad_absmax=2.0, dlog_clip=0.01,
                    best_ratio=best_ratio,
                    measurements=1))},
      "fc": {"kernel": jnp.full((4, 2), 0.5, dtype)},
  }
  return params, grads


def test_error_sensitive_lr_scales_quantized_layers_only():
  params, grads = _tree()
  tx = optax.chain(optim.direction_sensitive_clip(), optim.error_sensitive_lr())
  upd, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  phi = np.maximum(np.exp(-20 * 0.05), 0.1)
  np.testing.assert_allclose(upd["conv1"]["kernel"], 0.5 * phi, rtol=1e-6)
  np.testing.assert_allclose(upd["conv1"]["bias"], 0.5 * phi, rtol=1e-6)
  np.testing.assert_array_equal(upd["fc"]["kernel"], grads["fc"]["kernel"])
  new = optax.apply_updates(params, upd)["conv1"]["grad_quant"]
  np.testing.assert_allclose(new.distance, 0.05, rtol=1e-6)  # latest d used, stored


@pytest.mark.parametrize("d, expected", [(0.0, 1.0), (0.02, np.exp(-0.4)), (0.5, 0.1)])
def test_phi_matches_formula(d, expected):
  params, grads = _tree(d=d)
  tx = optax.chain(optim.direction_sensitive_clip(), optim.error_sensitive_lr())
  upd, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(upd["conv1"]["kernel"][0, 0, 0, 0], 0.5 * expected, rtol=1e-6)


def test_dtypes_are_kept():
  params, grads = _tree(jnp.bfloat16)
  tx = optim.ui8(optax.sgd(0.1, momentum=0.9))
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert upd["conv1"]["kernel"].dtype == jnp.bfloat16
  assert upd["fc"]["kernel"].dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(upd["conv1"]["grad_quant"]))


@pytest.mark.parametrize("best_ratio, r", [
    # QuantConfig(clip_method="gradient"): no search ran (best_ratio 0), the
    # paper's descent: log c -= lr * d(d)/d(log c)
    (0.0, 0.5 * np.exp(-2.0 * 0.01)),
    (0.4, 0.5 * (0.4 / 0.5) ** 2.0),  # "search": log r += lr * (log best - log r)
])
def test_clip_learner_update(best_ratio, r):
  """The rule is the layer's, carried by its measurement: the optimizer
  takes no clip-method setting."""
  params, grads = _tree(best_ratio=best_ratio)
  tx = optim.direction_sensitive_clip(learning_rate=2.0)
  upd, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, upd)
  gq = new["conv1"]["grad_quant"]
  np.testing.assert_allclose(gq.clip_ratio, r, rtol=1e-6)
  np.testing.assert_allclose(gq.clip, r * 2.0, rtol=1e-6)
  assert float(gq.measurements) == 4
  np.testing.assert_array_equal(new["conv1"]["kernel"], params["conv1"]["kernel"] + 0.5)


def test_inject_hyperparams():
  params, grads = _tree()
  tx = optax.chain(
      optax.inject_hyperparams(optim.direction_sensitive_clip)(learning_rate=2.0),
      optax.inject_hyperparams(optim.error_sensitive_lr)(alpha=10.0, beta=0.5))
  state = tx.init(params)
  upd, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(upd["conv1"]["kernel"][0, 0, 0, 0],
                             0.5 * max(np.exp(-10 * 0.05), 0.5), rtol=1e-6)
  assert float(state[1].hyperparams["alpha"]) == 10.0
  new = optax.apply_updates(params, upd)["conv1"]["grad_quant"]
  np.testing.assert_allclose(new.clip_ratio, 0.5 * (0.4 / 0.5) ** 2.0, rtol=1e-6)


@pytest.mark.parametrize("base", [optax.sgd(0.1, momentum=0.9),
                                  optax.adamw(1e-2, weight_decay=0.1)])
def test_ui8_base_optimizer_never_sees_quant_state(base):
  params, grads = _tree()
  tx = optim.ui8(base)
  state = jax.jit(tx.init)(params)
  upd, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, upd)
  gq = new["conv1"]["grad_quant"]
  # exactly the clip learner's result (jump to the best ratio): no momentum,
  # decay or Adam scaling
  np.testing.assert_allclose(gq.clip, 0.4 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(gq.channel_distance_mean, 0.05, rtol=1e-6)
  # the base optimizer's state holds no GradQuantState
  found = []
  jax.tree.map(lambda x: found.append(x), state,
               is_leaf=lambda x: isinstance(x, GradQuantState))
  assert not any(isinstance(x, GradQuantState) for x in found)
  # quantized layer's update = base update * phi; float layer's = base update
  base_upd, _ = base.update({"k": grads["fc"]["kernel"]}, base.init({"k": params["fc"]["kernel"]}),
                            {"k": params["fc"]["kernel"]})
  np.testing.assert_allclose(upd["fc"]["kernel"], base_upd["k"], rtol=1e-6)
  phi = np.exp(-20 * 0.05)
  np.testing.assert_allclose(upd["conv1"]["bias"], np.asarray(base_upd["k"])[0, 0] * phi,
                             rtol=1e-5)


def test_no_measurement_means_no_change():
  params, grads = _tree()
  grads["conv1"]["grad_quant"] = GradQuantState.initial()
  tx = optim.ui8(optax.sgd(0.1))
  upd, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, upd)["conv1"]["grad_quant"]
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params["conv1"]["grad_quant"])):
    assert float(a) == float(b)  # zero updates: bit-identical state
  # phi from the stored deviation (0.2)
  np.testing.assert_allclose(upd["conv1"]["kernel"][0, 0, 0, 0],
                             -0.1 * 0.5 * max(np.exp(-4.0), 0.1),
                             rtol=1e-5)


def test_params_required():
  params, grads = _tree()
  tx = optim.error_sensitive_lr()
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params))


# ---------------------------------------------------------------------------
# The optimizer chain a user builds around ui8 (a real model, nnx.Optimizer).


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv = int8jax.nn.QuantConv(8, 8, (3, 3), config=int8jax.QuantConfig(period=1),
                                     rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.conv(nnx.relu(self.stem(x))).mean((1, 2)))


_X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
_Y = jnp.arange(4) % 10


def _run(tx, batches):
  model = _Net(nnx.Rngs(0, quant=1))
  opt = nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(m, o, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    _, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(m)
    o.update(m, g)

  for x, y in batches:
    step(model, opt, x, y)
  return model


def test_clip_by_global_norm_before_ui8_sees_only_the_weights():
  """The usual placement. The measurement (scaled by 2^-40) adds nothing to
  the global norm, and the rescaling it gets leaves it unchanged: the same
  weights and clip as clipping inside ui8's base, where it sees only weights."""
  sgd = optax.sgd(0.5)
  outside = _run(optax.chain(optax.clip_by_global_norm(1e-3), optim.ui8(sgd)), [(_X, _Y)])
  inside = _run(optim.ui8(optax.chain(optax.clip_by_global_norm(1e-3), sgd)), [(_X, _Y)])
  np.testing.assert_array_equal(outside.conv.kernel[...], inside.conv.kernel[...])
  # the measurement read back after a uniform rescaling: equal up to one rounding
  np.testing.assert_allclose(outside.conv.grad_quant[...], inside.conv.grad_quant[...],
                             rtol=2.4e-7, atol=0)
  assert float(outside.conv.grad_quant.state.measurements) == 1


def test_gradient_accumulation_with_multisteps():
  """optax.MultiSteps(ui8(...), 2): two micro-batches, one update; the
  measurement is the average of the two micro-batches' measurements."""
  xs = [(_X[:2], _Y[:2]), (_X[2:], _Y[2:])]
  acc = _run(optax.MultiSteps(optim.ui8(optax.sgd(0.1)), 2), xs)
  st = acc.conv.grad_quant.state
  assert float(st.measurements) == 1 and float(st.nonfinite) == 0
  # the same two micro-batch measurements, averaged by hand
  model = _Net(nnx.Rngs(0, quant=1))
  loss_fn = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  ms = [int8jax.read_measurement(GradQuantState.unpack(
      nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model, x, y)
      ["conv"]["grad_quant"][...]))
        for x, y in xs]
  np.testing.assert_allclose(st.channel_distance_mean,
                             (ms[0].channel_distance_mean + ms[1].channel_distance_mean) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(st.grad_absmax, (ms[0].grad_absmax + ms[1].grad_absmax) / 2,
                             rtol=1e-5)


def test_a_transform_that_corrupts_the_measurement_is_refused():
  """optax.add_noise before ui8 changes the measurement's fields unequally:
  a clear error (from inside the jitted step), and the state is not poisoned."""
  tx = optax.chain(optax.add_noise(0.1, 0.0, 0), optim.ui8(optax.sgd(0.1)))
  with pytest.raises(Exception, match=r"measurement of \['conv'\].* was changed by a gradient "
                     "transformation placed before"):
    m = _run(tx, [(_X, _Y)])
    jax.block_until_ready(m.conv.grad_quant[...])


def test_consistent_measurements_call_no_host_callback(monkeypatch):
  """The consistency check is one per step and reaches the host only on an
  inconsistent measurement (a host callback per layer and step was a large
  part of the MobileNetV2 CPU step regression, benchmarks/RESULTS.md)."""
  calls = []
  monkeypatch.setattr(int8jax.dsgc, "_raise_if_inconsistent", lambda *a: calls.append(a))
  m = _run(optim.ui8(optax.sgd(0.1)), [(_X, _Y), (_X, _Y)])
  jax.block_until_ready(m.conv.grad_quant[...])
  assert calls == []
  m = _run(optax.chain(optax.add_noise(0.1, 0.0, 0), optim.ui8(optax.sgd(0.1))), [(_X, _Y)])
  jax.block_until_ready(m.conv.grad_quant[...])
  assert len(calls) == 1 and list(calls[0][1]) == ["['conv']['grad_quant']"]


def test_the_ui8_step_has_no_side_effects():
  """A jitted computation with a side effect (``jax.debug.callback``, also
  inside a ``lax.cond``) loses jit's C++ dispatch fast path: the step then
  paid ~80 ms of Python per call on MobileNetV2 (benchmarks/RESULTS.md).
  The whole training step (forward, backward, ui8 update with its
  consistency check) must have none."""
  model = _Net(nnx.Rngs(0, quant=1))
  opt = nnx.Optimizer(model, optim.ui8(optax.sgd(0.1)), wrt=TRAINABLE)
  graphdef, state = nnx.split((model, opt))

  def step(state, x, y):
    m, o = nnx.merge(graphdef, state)
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    _, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(m)
    o.update(m, g)
    return nnx.state((m, o))

  jaxpr = jax.make_jaxpr(step)(state, _X, _Y)
  assert not jaxpr.effects, jaxpr.effects
  assert "pure_callback" in str(jaxpr)  # the check is there, without an effect


def test_readme_composition_trains():
  """The README's composition: clipping before ui8, masked weight decay and a
  schedule inside its base, gradient accumulation around it."""
  sgd = optax.sgd(optax.cosine_decay_schedule(0.1, 100), momentum=0.9)
  decay = optax.add_decayed_weights(5e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optim.ui8(optax.chain(decay, sgd)))
  tx = optax.MultiSteps(tx, every_k_schedule=2)
  m = _run(tx, [(_X[:2], _Y[:2]), (_X[2:], _Y[2:])])
  st = m.conv.grad_quant.state
  assert float(st.measurements) == 1 and 0 < float(st.clip_ratio) <= 1
  assert bool(jnp.all(jnp.isfinite(m.conv.kernel[...])))
  readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  assert "optax.MultiSteps(tx, every_k_schedule=4)" in readme
  assert "int8jax.optim.ui8(optax.chain(decay, sgd))" in readme


def test_lr_coefficient_formula():
  d = jnp.array([0.0, 0.01, 0.05, 0.1, 0.2, 1.0])
  np.testing.assert_allclose(int8jax.lr_coefficient(d), np.maximum(np.exp(-20 * d), 0.1),
                             rtol=1e-6)
  np.testing.assert_allclose(int8jax.lr_coefficient(d, alpha=5.0, beta=0.5),
                             np.maximum(np.exp(-5 * d), 0.5), rtol=1e-6)


@pytest.mark.parametrize("which,field", [("mean", "channel_distance_mean"),
                                         ("median", "channel_distance_median"),
                                         ("global", "distance")])
def test_error_sensitive_lr_reads_the_chosen_distance(which, field):
  s = int8jax.GradQuantState.initial()
  params = {"conv": {"kernel": jnp.ones(2), "grad_quant": s}}
  # Three different distances: only the chosen one may set the coefficient.
  m = s.replace(channel_distance_mean=jnp.float32(0.01), channel_distance_median=jnp.float32(0.02),
                distance=jnp.float32(0.04))
  upd = {"conv": {"kernel": jnp.ones(2), "grad_quant": m}}
  tx = int8jax.optim.error_sensitive_lr(distance_kind=which)
  out, _ = tx.update(upd, tx.init(params), params)
  d = float(getattr(m, field))
  np.testing.assert_allclose(out["conv"]["kernel"], np.exp(-20 * d), rtol=1e-6)
  with pytest.raises(ValueError, match="distance_kind must be one of.*'max'"):
    int8jax.optim.error_sensitive_lr(distance_kind="max")


# ---------------------------------------------------------------------------
# Names, deprecated aliases, the clip learner's settings, the route's checks.


def test_deprecated_names_warn_and_still_work():
  params, grads = _tree()
  s = params["conv1"]["grad_quant"]
  for old, new in int8jax.dsgc.DEPRECATED_FIELDS.items():
    with pytest.warns(DeprecationWarning, match=f"GradQuantState.{old} is deprecated: use .{new}"):
      assert float(getattr(s, old)) == float(getattr(s, new))
  with pytest.warns(DeprecationWarning, match="use .distance"):
    assert float(s.replace(global_deviation=jnp.float32(0.3)).distance) == pytest.approx(0.3)
  with pytest.warns(DeprecationWarning, match=r"use lr_coefficient\(distance=\)"):
    assert float(int8jax.lr_coefficient(deviation=0.05)) == float(
        int8jax.lr_coefficient(distance=0.05))
  with pytest.warns(DeprecationWarning, match="use int8jax.optim.lr_distance"):
    assert float(optim.lr_deviation(s, "mean")) == float(optim.lr_distance(s, "mean"))
  with pytest.warns(DeprecationWarning, match="use int8jax.optim.DISTANCE_KINDS"):
    assert optim.LR_DEVIATIONS == optim.DISTANCE_KINDS
  with pytest.warns(DeprecationWarning, match="use int8jax.optim.DEFAULT_DISTANCE_KIND"):
    assert optim.DEFAULT_LR_DEVIATION == optim.DEFAULT_DISTANCE_KIND == "global"
  with pytest.warns(DeprecationWarning, match="use int8jax.optim.is_grad_quant"):
    assert optim.is_quant_state((), s)
  with pytest.warns(DeprecationWarning, match=r"error_sensitive_lr\(distance_kind=\)"):
    old = optim.error_sensitive_lr(deviation="mean")
  new = optim.error_sensitive_lr(distance_kind="mean")
  np.testing.assert_array_equal(old.update(grads, old.init(params), params)[0]["conv1"]["kernel"],
                                new.update(grads, new.init(params), params)[0]["conv1"]["kernel"])
  with pytest.warns(DeprecationWarning, match=r"ui8\(distance_kind=\)"):
    optim.ui8(optax.sgd(0.1), lr_deviation="mean")
  with pytest.warns(DeprecationWarning, match=r"QuantConfig\(clip_method=\)"):
    optim.ui8(optax.sgd(0.1), clip_method="gradient")
  with pytest.warns(DeprecationWarning, match=r"QuantConfig\(grad_clip='max'\)"):
    optim.ui8(optax.sgd(0.1), learn_clip=False)
  with pytest.warns(DeprecationWarning, match=r"QuantConfig\(clip_method=\)"):
    optim.direction_sensitive_clip(method="search")
  with pytest.raises(ValueError, match="clip_method must be one of"):
    optim.ui8(optax.sgd(0.1), clip_method="newton")


@pytest.mark.parametrize("kw, r", [
    ({"clip_method": "gradient"}, 0.5 * np.exp(-1.0 * 0.01)),  # forced descent
    ({"learn_clip": False}, 1.0),                               # c = max|g|
])
def test_deprecated_ui8_clip_keywords_keep_their_effect(kw, r):
  params, grads = _tree()  # a search measurement (best_ratio 0.4)
  with pytest.warns(DeprecationWarning):
    tx = optim.ui8(optax.sgd(0.1), **kw)
  upd, _ = tx.update(grads, tx.init(params), params)
  gq = optax.apply_updates(params, upd)["conv1"]["grad_quant"]
  np.testing.assert_allclose(gq.clip_ratio, r, rtol=1e-6)


def _measure_once(config):
  """One measuring step of a QuantConv with ``config``: its measurement (read back)
  and the jaxpr of the gradient computation."""
  conv = int8jax.nn.QuantConv(3, 4, (3, 3), config=config, rngs=nnx.Rngs(0, quant=1))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  loss = lambda m: (m(x) ** 2).sum()  # noqa: E731
  grad = lambda m: nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE))(m)  # noqa: E731
  g = grad(conv)
  conv2 = int8jax.nn.QuantConv(3, 4, (3, 3), config=config, rngs=nnx.Rngs(0, quant=1))
  graphdef, state = nnx.split(conv2)
  jaxpr = jax.make_jaxpr(lambda st: grad(nnx.merge(graphdef, st)))(state)
  return int8jax.read_measurement(GradQuantState.unpack(g["grad_quant"][...])), str(jaxpr)


def test_clip_method_gradient_runs_no_search_in_the_backward_pass():
  """QuantConfig(clip_method="gradient"): the backward pass measures what the
  descent needs (dlog_clip, the distances) and not the candidate search
  (its lax.map over the candidates is absent); best_ratio 0 tells the learner
  to descend."""
  base = int8jax.QuantConfig(period=1, backend="xla")
  ms, jaxpr_s = _measure_once(base)
  mg, jaxpr_g = _measure_once(base.replace(clip_method="gradient"))
  n_cands = len(int8jax.dsgc.CANDIDATE_RATIOS) + len(int8jax.dsgc.LOCAL_FACTORS)
  assert f"length={n_cands}" in jaxpr_s and f"length={n_cands}" not in jaxpr_g
  assert 0 < float(ms.best_ratio) <= 1 and float(mg.best_ratio) == 0.0
  assert float(mg.distance) == float(ms.distance) > 0
  assert float(mg.dlog_clip) == float(ms.dlog_clip) != 0
  # The learner descends for this layer, with no optimizer setting.
  st = GradQuantState.initial()
  raw = int8jax.dsgc.as_cotangent(mg)
  new = int8jax.update_grad_state(st, raw, learning_rate=0.5)
  np.testing.assert_allclose(new.clip_ratio, np.exp(-0.5 * float(mg.dlog_clip)), rtol=1e-6)
  with pytest.raises(ValueError, match="clip_method must be one of"):
    int8jax.QuantConfig(clip_method="newton")


def test_a_transform_after_ui8_that_changes_the_state_is_refused():
  """optax.scale after ui8 scales the state's update too: the stored state is
  then not one the learner wrote (a fractional count); the next step says so
  instead of learning from it."""
  tx = optax.chain(optim.ui8(optax.sgd(0.1)), optax.scale(0.5))
  with pytest.raises(Exception, match=r"gradient-quantization state of \['conv'\].* placed "
                     "after int8jax.optim.ui8"):
    m = _run(tx, [(_X, _Y), (_X, _Y)])
    jax.block_until_ready(m.conv.grad_quant[...])
  # The same transform masked off the states (docs/design.md §5) is fine.
  keep = lambda p: optim.grad_quant_labels(p, False, True)  # noqa: E731
  m = _run(optax.chain(optim.ui8(optax.sgd(0.1)), optax.masked(optax.scale(0.5), keep)),
           [(_X, _Y), (_X, _Y)])
  assert float(m.conv.grad_quant.state.measurements) == 2


def test_checkpoint_layout_is_unchanged():
  """What Orbax stores (examples/checkpoint.py: nnx.to_pure_dict of model and
  optimizer) is the layout of releases before the renames: the variable's
  attribute name, the packed vector's length and the optimizer state's tree;
  field and class names are not stored. The packed field order is pinned."""
  model = _Net(nnx.Rngs(0, quant=1))
  opt = nnx.Optimizer(model, optim.ui8(optax.sgd(0.1, momentum=0.9)), wrt=TRAINABLE)
  pure = nnx.to_pure_dict(nnx.state((model, opt)))
  keys = {jax.tree_util.keystr(p): getattr(v, "shape", None)
          for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]}
  assert keys["[0]['conv']['grad_quant']"] == (12,)
  assert keys["[1]['opt_state'][0]['inner_states']['params']['inner_state'][0]['trace']"
              "['conv']['kernel']"] == (3, 3, 8, 8)
  assert not any("grad_quant" in k for k in keys if k.startswith("[1]"))
  assert [f.name for f in __import__("dataclasses").fields(GradQuantState)] == [
      "clip", "clip_ratio", "channel_distance_mean", "distance", "channel_distance_max",
      "channel_distance_median", "grad_absmax", "clipped_fraction", "dlog_clip", "best_ratio",
      "measurements", "nonfinite"]  # the former deviation, global_deviation, ... in order
