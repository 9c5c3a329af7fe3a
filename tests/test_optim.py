"""optax transforms: jit, chain, inject_hyperparams, dtypes, formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import int8jax
from int8jax import optim
from int8jax.dsgc import GradQuantState


def _state(**kw):
  s = GradQuantState.initial()
  return s.replace(**{k: jnp.float32(v) for k, v in kw.items()})


def _tree(dtype=jnp.float32, d=0.05):
  params = {
      "conv1": {"kernel": jnp.ones((3, 3, 2, 4), dtype), "bias": jnp.ones((4,), dtype),
                "grad_quant": _state(clip=0.5, clip_ratio=0.5, deviation=0.2,
                                     measurements=3)},
      "fc": {"kernel": jnp.ones((4, 2), dtype)},  # float layer: untouched
  }
  grads = {
      "conv1": {"kernel": jnp.full((3, 3, 2, 4), 0.5, dtype), "bias": jnp.full((4,), 0.5, dtype),
                "grad_quant": _state(clip=0.01, deviation=d, grad_absmax=2.0, dlog_clip=0.01,
                                     measurements=1)},
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
  np.testing.assert_allclose(new.deviation, 0.05, rtol=1e-6)  # latest d used and stored


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


def test_clip_learner_update():
  params, grads = _tree()
  tx = optim.direction_sensitive_clip(learning_rate=2.0)
  upd, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, upd)
  gq = new["conv1"]["grad_quant"]
  r = 0.5 * np.exp(-2.0 * 0.01)
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
  np.testing.assert_allclose(new.clip_ratio, 0.5 * np.exp(-2.0 * 0.01), rtol=1e-6)


@pytest.mark.parametrize("base", [optax.sgd(0.1, momentum=0.9),
                                  optax.adamw(1e-2, weight_decay=0.1)])
def test_ui8_base_optimizer_never_sees_quant_state(base):
  params, grads = _tree()
  tx = optim.ui8(base)
  state = jax.jit(tx.init)(params)
  upd, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, upd)
  gq = new["conv1"]["grad_quant"]
  # exactly the clip learner's result: no momentum, decay or Adam scaling
  r = 0.5 * np.exp(-1.0 * 0.01)
  np.testing.assert_allclose(gq.clip, r * 2.0, rtol=1e-6)
  np.testing.assert_allclose(gq.deviation, 0.05, rtol=1e-6)
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
  np.testing.assert_allclose(upd["conv1"]["kernel"][0, 0, 0, 0], -0.1 * 0.5 * max(np.exp(-4.0), 0.1),
                             rtol=1e-5)


def test_params_required():
  params, grads = _tree()
  tx = optim.error_sensitive_lr()
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params))
