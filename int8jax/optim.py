"""optax transformations of UI8 (Zhu et al. 2020, §4.1–4.2).

* :func:`direction_sensitive_clip` — the clip learner: turns each quantized
  layer's measurement (the gradient of its
  :class:`~int8jax.dsgc.GradQuantState`) into the state's update, a
  gradient-descent step on ``log c`` of the cosine distance.
* :func:`error_sensitive_lr` — multiplies each quantized layer's parameter
  updates by ``max(exp(-alpha * d), beta)``, ``d`` the layer's latest cosine
  distance. Put it last in the chain: it scales the final update, i.e. the
  layer's learning rate, whatever the base optimizer.
* :func:`ui8` — both around any base optimizer, which never sees the
  quantization state (no momentum or weight decay on clip values).

A layer is recognised by its ``GradQuantState`` node: the parameters scaled by
``error_sensitive_lr`` are the leaves beside it (same parent in the tree),
e.g. ``kernel`` and ``bias`` of a :class:`int8jax.nn.QuantConv`. Parameters
of layers without one pass unchanged.

Example::

    import optax, int8jax
    from flax import nnx
    tx = int8jax.optim.ui8(optax.sgd(0.1, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=int8jax.nn.TRAINABLE)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, int8jax.nn.TRAINABLE))(model, x, y)
    optimizer.update(model, grads)

References:
  Zhu et al., "Towards Unified INT8 Training for Convolutional Neural
  Network", CVPR 2020, arXiv:1912.12607.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from int8jax.dsgc import GradQuantState, lr_coefficient, update_grad_state


def _is_state(x) -> bool:
  return isinstance(x, GradQuantState)


def _need_params(params, name):
  if params is None:
    raise ValueError(f"{name} needs params: call tx.update(updates, state, params) "
                     "(nnx.Optimizer does)")


def direction_sensitive_clip(learning_rate: jax.typing.ArrayLike = 1.0,
                             learn_clip: jax.typing.ArrayLike = True
                             ) -> optax.GradientTransformation:
  """Learn each layer's gradient clip value by descent on the cosine distance.

  For every :class:`~int8jax.dsgc.GradQuantState` leaf, the incoming
  "gradient" is the backward pass's measurement; the outgoing update is
  ``update_grad_state(state, measurement) - state``
  (:func:`int8jax.dsgc.update_grad_state`): on measure steps the clip takes
  one step ``log c -= learning_rate * d(d)/d(log c)`` (initialised from
  ``max|g|`` at the layer's first measurement, kept ``<= max|g|``), and the
  deviation statistics are recorded; otherwise the update is zero.
  Non-finite measurements leave the state unchanged. Other leaves pass
  through untouched.

  Args:
    learning_rate: step size on ``log c``.
    learn_clip: ``False`` records ``c = max|g|`` instead of descending.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import int8jax, jax.numpy as jnp
    >>> tx = int8jax.optim.direction_sensitive_clip(1.0)
    >>> s = int8jax.GradQuantState.initial()
    >>> m = s.replace(grad_absmax=jnp.float32(2.0), measurements=jnp.float32(1.0))
    >>> upd, _ = tx.update({"g": m}, tx.init({"g": s}), {"g": s})
    >>> float(upd["g"].clip)  # first measurement: clip starts at max|g|
    2.0
  """

  def update_fn(updates, state, params=None):
    _need_params(params, "direction_sensitive_clip")

    def one(u, p):
      if not _is_state(u):
        return u
      new = update_grad_state(p, u, learning_rate, learn_clip)
      return jax.tree.map(lambda a, b: (a - b).astype(b.dtype), new, p)

    return jax.tree.map(one, updates, params, is_leaf=_is_state), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def error_sensitive_lr(alpha: jax.typing.ArrayLike = 20.0,
                       beta: jax.typing.ArrayLike = 0.1) -> optax.GradientTransformation:
  """Scale each quantized layer's updates by ``max(exp(-alpha * d), beta)``.

  ``d`` is the layer's latest cosine distance, read as ``params + updates`` of
  its :class:`~int8jax.dsgc.GradQuantState` leaf — so place this after
  :func:`direction_sensitive_clip` (as :func:`ui8` does) and last in the
  chain. The state leaves themselves are not scaled; leaves of layers without
  a state pass unchanged; dtypes are kept.

  Args:
    alpha: sensitivity (paper: 20).
    beta: lower bound of the coefficient (paper: 0.1).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import int8jax, jax.numpy as jnp
    >>> s = int8jax.GradQuantState.initial()
    >>> params = {"conv": {"kernel": jnp.ones(2), "q": s}}
    >>> upd = {"conv": {"kernel": jnp.ones(2), "q": s.replace(deviation=jnp.float32(0.05))}}
    >>> tx = int8jax.optim.error_sensitive_lr()
    >>> out, _ = tx.update(upd, tx.init(params), params)
    >>> round(float(out["conv"]["kernel"][0]), 4)  # exp(-20 * 0.05)
    0.3679

  References:
    Zhu et al. 2020, §4.2 (deviation counteractive learning rate scaling).
  """

  def update_fn(updates, state, params=None):
    _need_params(params, "error_sensitive_lr")
    phi = {}
    flat_u = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_state)[0]
    flat_p = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_state)[0]
    params_at = dict(flat_p)
    for path, u in flat_u:
      if _is_state(u):
        d = params_at[path].deviation + u.deviation
        phi[path[:-1]] = lr_coefficient(d, alpha, beta)

    def scale(path, u):
      if _is_state(u) or u is None or path[:-1] not in phi:
        return u
      return (u * phi[path[:-1]]).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates, is_leaf=_is_state), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def quant_state_labels(params, quant: str = "quant", other: str = "params"):
  """Label tree (a prefix of ``params``): ``quant`` for GradQuantState nodes."""
  return jax.tree.map(lambda x: quant if _is_state(x) else other, params, is_leaf=_is_state)


def ui8(base: optax.GradientTransformation, *,
        clip_learning_rate: jax.typing.ArrayLike = 1.0,
        alpha: jax.typing.ArrayLike = 20.0, beta: jax.typing.ArrayLike = 0.1,
        scale_lr: bool = True, learn_clip: bool = True) -> optax.GradientTransformation:
  """UI8 around a base optimizer.

  ``chain(partition({params: base, quant: direction_sensitive_clip}),
  error_sensitive_lr)``: the base optimizer (SGD with momentum, AdamW, ...)
  updates the weights only; the clip learner updates the quantization state;
  the error-sensitive coefficient scales each quantized layer's final update.

  Args:
    base: optimizer for the weights.
    clip_learning_rate: step size of the clip learner on ``log c``.
    alpha, beta: of :func:`error_sensitive_lr`.
    scale_lr: ``False`` leaves out :func:`error_sensitive_lr` (ablation
      "clip learning only").
    learn_clip: ``False`` records ``c = max|g|`` (use with
      ``QuantConfig(grad_clip="max")`` for naive INT8 / "LR scaling only").
  """
  tx = optax.partition(
      {"params": base, "quant": direction_sensitive_clip(clip_learning_rate, learn_clip)},
      quant_state_labels)
  if scale_lr:
    tx = optax.chain(tx, error_sensitive_lr(alpha, beta))
  return tx
