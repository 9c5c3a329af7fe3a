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

import warnings

import jax
import jax.numpy as jnp
import optax

from int8jax.dsgc import (CLIP_METHODS, NUM_FIELDS, GradQuantState, as_state,
                          check_measurements, update_grad_state)


def _is_state(x) -> bool:
  return isinstance(x, GradQuantState)


def _last_key(path):
  """The last dict / attribute key of ``path``, skipping the ``.value`` an
  ``nnx.Variable`` adds when a tree of Variables (``nnx.state(...)``, what
  ``nnx.Optimizer`` gives ``tx.init``) is flattened."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue
    return getattr(k, "key", getattr(k, "name", None))
  return None


def is_quant_state(path, x) -> bool:
  """Whether the leaf ``x`` at ``path`` is a quantized layer's gradient state:
  a :class:`~int8jax.dsgc.GradQuantState`, or the packed vector a
  ``QuantConv`` / ``QuantDense`` keeps in its ``grad_quant`` variable
  (what ``nnx.Optimizer`` hands optax)."""
  if isinstance(x, GradQuantState):
    return True
  return (_last_key(path) == "grad_quant" and getattr(x, "shape", None) == (NUM_FIELDS,)
          and jnp.issubdtype(x.dtype, jnp.floating))


def _like(template, state: GradQuantState):
  """``state`` in the form of ``template`` (packed if the template is)."""
  return state if isinstance(template, GradQuantState) else state.pack()


def _need_params(params, name):
  if params is None:
    raise ValueError(f"{name} needs params: call tx.update(updates, state, params) "
                     "(nnx.Optimizer does)")


def direction_sensitive_clip(learning_rate: jax.typing.ArrayLike = 1.0,
                             learn_clip: jax.typing.ArrayLike = True,
                             method: str = "search") -> optax.GradientTransformation:
  """Learn each layer's gradient clip value by minimising the cosine distance.

  For every :class:`~int8jax.dsgc.GradQuantState` leaf, the incoming
  "gradient" is the backward pass's measurement; the outgoing update is
  ``update_grad_state(state, measurement) - state``
  (:func:`int8jax.dsgc.update_grad_state`). On measure steps the clip ratio
  (of ``max|g|``; 1 at a layer's first measurement) moves towards the
  candidate clip with the smallest cosine distance between the gradient and
  its quantization, found in the measuring pass (``method="search"``:
  ``log r += learning_rate * (log r_best - log r)``), or takes the paper's
  descent step ``log c -= learning_rate * d(d)/d(log c)``
  (``method="gradient"``); the deviation statistics are recorded. Both
  minimise the paper's objective; the search converges in a few
  measurements where the descent, whose derivative is about ``2 d``
  (~1e-3), needs ~100 (docs/results.md). Otherwise the update is zero;
  non-finite measurements leave the state unchanged (only ``nonfinite``
  counts). Other leaves pass through untouched.

  Args:
    learning_rate: step size on ``log c`` (1: jump to the best candidate).
    learn_clip: ``False`` records ``c = max|g|`` instead of learning.
    method: ``"search"`` (default) or ``"gradient"`` (the paper's descent).

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

    checked, names = [], []

    def one(path, u, p):
      if not is_quant_state(path, u):
        return u
      u_s, p_s = as_state(u), as_state(p)
      checked.append(u_s)
      names.append(jax.tree_util.keystr(path))
      new = update_grad_state(p_s, u_s, learning_rate, learn_clip, method)
      delta = jax.tree.map(lambda a, b: (a - b).astype(b.dtype), new, p_s)
      return _like(u, delta)

    out = jax.tree_util.tree_map_with_path(one, updates, params, is_leaf=_is_state)
    if checked:  # one check for all layers, kept alive by adding its zero to the output
      zero = check_measurements(checked, names)
      flat, tree = jax.tree_util.tree_flatten_with_path(out, is_leaf=_is_state)
      first = next(i for i, (path, u) in enumerate(flat) if is_quant_state(path, u))
      leaves = [u for _, u in flat]
      leaves[first] = jax.tree.map(lambda v: v + zero.astype(v.dtype), leaves[first])
      out = jax.tree_util.tree_unflatten(tree, leaves)
    return out, state

  if method not in CLIP_METHODS:
    raise ValueError(f"method must be one of {CLIP_METHODS}, got {method!r}")
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


#: Which measured cosine distance drives the error-sensitive LR (see
#: :func:`lr_deviation`).
LR_DEVIATIONS = ("mean", "median", "global")
#: The paper's global distance: driven by the per-channel mean, the LR of
#: per-tensor-scaled ResNet convs was cut to phi ~0.2 by a few small channels
#: whose direction no LR can restore, and accuracy fell 2.9 pp below float32
#: (docs/results.md, 2026-12-01); lost channels in depthwise convs are
#: handled by their per-group gradient scales instead.
DEFAULT_LR_DEVIATION = "global"


def lr_deviation(state: GradQuantState, which: str = DEFAULT_LR_DEVIATION) -> jax.Array:
  """The ``d`` of ``state`` that scales the layer's learning rate.

  ``"mean"``: the mean of the per-channel cosine distances (``deviation``);
  ``"median"``: their median; ``"global"``: the whole tensor's, norm-weighted
  (the paper's). The per-channel ones see channels whose direction is lost
  although the norm-weighted distance is tiny (docs/results.md).
  """
  if which == "mean":
    return state.deviation
  if which == "median":
    return state.channel_deviation_median
  if which == "global":
    return state.global_deviation
  raise ValueError(f"lr deviation must be one of {LR_DEVIATIONS}, got {which!r}")


def error_sensitive_lr(alpha: jax.typing.ArrayLike = 20.0,
                       beta: jax.typing.ArrayLike = 0.1,
                       deviation: str = DEFAULT_LR_DEVIATION) -> optax.GradientTransformation:
  """Scale each quantized layer's updates by ``max(exp(-alpha * d), beta)``.

  ``d`` is the layer's latest measured distance chosen by ``deviation``
  (:func:`lr_deviation`: by default the paper's global, norm-weighted one;
  ``"mean"`` / ``"median"`` of the per-channel distances slow a layer whose
  small-gradient channels lose their direction, which measured worse,
  :data:`DEFAULT_LR_DEVIATION`) -- read as ``params + updates`` of
  its :class:`~int8jax.dsgc.GradQuantState` leaf — so place this after
  :func:`direction_sensitive_clip` (as :func:`ui8` does) and last in the
  chain. The state leaves themselves are not scaled; leaves of layers without
  a state pass unchanged; dtypes are kept.

  Args:
    alpha: sensitivity (paper: 20).
    beta: lower bound of the coefficient (paper: 0.1).
    deviation: ``"mean"``, ``"median"`` or ``"global"`` (:func:`lr_deviation`).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import int8jax, jax.numpy as jnp
    >>> s = int8jax.GradQuantState.initial()
    >>> params = {"conv": {"kernel": jnp.ones(2), "q": s}}
    >>> upd = {"conv": {"kernel": jnp.ones(2),
    ...                 "q": s.replace(global_deviation=jnp.float32(0.05))}}
    >>> tx = int8jax.optim.error_sensitive_lr()
    >>> out, _ = tx.update(upd, tx.init(params), params)
    >>> round(float(out["conv"]["kernel"][0]), 4)  # exp(-20 * 0.05)
    0.3679

  References:
    Zhu et al. 2020, §4.2 (deviation counteractive learning rate scaling).
  """

  if deviation not in LR_DEVIATIONS:
    raise ValueError(f"error_sensitive_lr: deviation must be one of {LR_DEVIATIONS}, "
                     f"got {deviation!r}")

  def update_fn(updates, state, params=None):
    _need_params(params, "error_sensitive_lr")
    phi = {}
    flat_u = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_state)[0]
    flat_p = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_state)[0]
    params_at = dict(flat_p)
    for path, u in flat_u:
      if is_quant_state(path, u):
        d = (lr_deviation(as_state(params_at[path]), deviation)
             + lr_deviation(as_state(u), deviation))
        phi[path[:-1]] = lr_coefficient(d, alpha, beta)

    def scale(path, u):
      if u is None or is_quant_state(path, u) or path[:-1] not in phi:
        return u
      return (u * phi[path[:-1]]).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates, is_leaf=_is_state), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_coefficient(deviation: jax.typing.ArrayLike, alpha: jax.typing.ArrayLike = 20.0,
                   beta: jax.typing.ArrayLike = 0.1) -> jax.Array:
  """Error-sensitive learning-rate coefficient ``max(exp(-alpha * d), beta)`` (§4.2)."""
  return jnp.maximum(jnp.exp(-jnp.asarray(alpha) * deviation), beta)


def quant_state_labels(params, state_label: str = "grad_quant", param_label: str = "params",
                       **deprecated):
  """Label tree (a prefix of ``params``): ``state_label`` for the gradient-
  quantization states (:func:`is_quant_state`), ``param_label`` for the rest.

  (``quant=`` / ``other=`` are the deprecated former names of the two labels.)
  """
  unknown = set(deprecated) - {"quant", "other"}
  if unknown:
    raise TypeError(f"quant_state_labels: unexpected arguments {sorted(unknown)}")
  if deprecated:
    warnings.warn("quant_state_labels(quant=, other=) is deprecated: use state_label=, "
                  "param_label=", DeprecationWarning, stacklevel=2)
    state_label = deprecated.get("quant", state_label)
    param_label = deprecated.get("other", param_label)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: state_label if is_quant_state(path, x) else param_label, params,
      is_leaf=_is_state)


def ui8(base: optax.GradientTransformation, *,
        clip_learning_rate: jax.typing.ArrayLike = 1.0,
        alpha: jax.typing.ArrayLike = 20.0, beta: jax.typing.ArrayLike = 0.1,
        scale_lr: bool = True, learn_clip: bool = True,
        clip_method: str = "search",
        lr_deviation: str = DEFAULT_LR_DEVIATION) -> optax.GradientTransformation:
  """UI8 around a base optimizer.

  ``chain(partition({params: base, grad_quant: direction_sensitive_clip}),
  error_sensitive_lr)``: the base optimizer (SGD with momentum, AdamW, ...)
  updates the weights only; the clip learner updates the quantization state;
  the error-sensitive coefficient scales each quantized layer's final update.

  Args:
    base: optimizer for the weights.
    clip_learning_rate: step size of the clip learner on ``log c``.
    alpha, beta: of :func:`error_sensitive_lr`.
    scale_lr: ``False`` leaves out :func:`error_sensitive_lr` (ablation
      "clip learning only").
    learn_clip: ``False`` records ``c = max|g|`` (layers with
      ``QuantConfig(grad_clip="max")`` report ratio 1 by themselves, so the
      modes of :mod:`int8jax.modes` need not set it).
    clip_method: ``"search"`` or ``"gradient"`` (see
      :func:`direction_sensitive_clip`).
    lr_deviation: which measured distance drives the LR (:func:`lr_deviation`).
  """
  tx = optax.partition(
      {"params": base,
       "grad_quant": direction_sensitive_clip(clip_learning_rate, learn_clip, clip_method)},
      quant_state_labels)
  if scale_lr:
    tx = optax.chain(tx, error_sensitive_lr(alpha, beta, lr_deviation))
  return tx
