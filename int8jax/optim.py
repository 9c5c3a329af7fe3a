"""optax transformations of UI8 (Zhu et al. 2020, §4.1–4.2).

* :func:`ui8` — the method around any base optimizer, which never sees the
  quantization state (no momentum or weight decay on clip values): the clip
  learner updates each layer's :class:`~int8jax.dsgc.GradQuantState`, the
  error-sensitive coefficient scales the layer's weight updates.
* :func:`direction_sensitive_clip` — the clip learner alone: turns each
  quantized layer's measurement (the gradient of its ``grad_quant`` variable)
  into the state's update (:func:`int8jax.dsgc.update_grad_state`).
* :func:`error_sensitive_lr` — the coefficient alone: multiplies each
  quantized layer's updates by ``max(exp(-alpha * d), beta)``, ``d`` the
  layer's latest cosine distance (:func:`lr_distance`). Put it last in the
  chain: it scales the final update, i.e. the layer's learning rate.

A layer is recognised by its ``grad_quant`` leaf (:func:`is_grad_quant`): the
parameters scaled by the coefficient are the leaves beside it (same parent in
the tree), e.g. ``kernel`` and ``bias`` of a :class:`int8jax.nn.QuantConv`.
Parameters of layers without one pass unchanged.

How the measurement gets here, and what a user composing transforms must
know: docs/design.md, "How the measurement reaches the optimizer". In short:
transforms placed before ``ui8`` may rescale all gradients uniformly
(``clip_by_global_norm``, ``MultiSteps``' average, ``scale``); one that
changes the measurement otherwise (``add_noise``, weight decay on all
leaves) raises a ``ValueError`` naming the layer, and so does a transform
placed *after* ``ui8`` that changes the state's update (``optax.scale``,
``add_decayed_weights``), on the following step. Put such transforms inside
``ui8``'s base optimizer.

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

#: The name of a quantized layer's gradient-state variable, and the label of
#: the states in :func:`grad_quant_labels` (what :func:`ui8` partitions by).
GRAD_QUANT = "grad_quant"

#: Which measured cosine distance drives the error-sensitive LR (see
#: :func:`lr_distance`): ``"mean"`` / ``"median"`` of the per-channel
#: distances, ``"global"`` the paper's ``d`` (``GradQuantState.distance``).
DISTANCE_KINDS = ("mean", "median", "global")
#: The paper's global distance: driven by the per-channel mean, the LR of
#: per-tensor-scaled ResNet convs was cut to phi ~0.2 by a few small channels
#: whose direction no LR can restore, and accuracy fell 2.9 pp below float32
#: (docs/results.md, 2026-12-01); lost channels in depthwise convs are
#: handled by their per-group gradient scales instead.
DEFAULT_DISTANCE_KIND = "global"


def _deprecated(old: str, new: str, stacklevel: int = 3) -> None:
  warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


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


def is_grad_quant(path, x) -> bool:
  """Whether the leaf ``x`` at ``path`` is a quantized layer's gradient state
  (or its measurement): a :class:`~int8jax.dsgc.GradQuantState`, or the packed
  vector a quantized layer keeps in its ``grad_quant`` variable (what
  ``nnx.Optimizer`` hands optax). The one test this module uses."""
  if isinstance(x, GradQuantState):
    return True
  return (_last_key(path) == GRAD_QUANT and getattr(x, "shape", None) == (NUM_FIELDS,)
          and jnp.issubdtype(x.dtype, jnp.floating))


def _need_params(params, name):
  if params is None:
    raise ValueError(f"{name} needs params: call tx.update(updates, state, params) "
                     "(nnx.Optimizer does)")


def _layers(updates, params):
  """The quantized layers in ``updates``: the one place measurements are found.

  Returns ``(paths, leaves, treedef, layers)``: ``updates`` flattened (state
  nodes as leaves) and, per layer, ``(index in leaves, path, leaf of params,
  state)`` with the state unpacked once. Raises if ``params`` lacks a layer's
  state.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_state)
  params_at = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_state)[0])
  layers = []
  for i, (path, u) in enumerate(flat):
    if is_grad_quant(path, u):
      if path not in params_at:
        raise ValueError(f"int8jax.optim: the gradient state at {jax.tree_util.keystr(path)} "
                         "has no counterpart in params (give tx.update the same tree)")
      p = params_at[path]
      layers.append((i, path, p, as_state(p)))
  return [p for p, _ in flat], [u for _, u in flat], treedef, layers


def _fold(leaves, layers, learning_rate, learn_clip, method):
  """The clip learner on every layer: each measurement in ``leaves`` unpacked
  once, checked (one check for all layers, :func:`~int8jax.dsgc.check_measurements`)
  and folded into its state; the update (new - old) written back packed, once,
  in the form of the incoming leaf. Returns, in ``layers``' order, the states
  ``optax.apply_updates`` will store (``old + (new - old)``, rounded as it
  rounds, so a coefficient read from them uses the bits the layer will hold)."""
  measured = [as_state(leaves[i]) for i, *_ in layers]
  names = [jax.tree_util.keystr(path) for _, path, *_ in layers]
  zero = check_measurements(measured, names, [s for *_, s in layers])
  new_states = []
  for k, ((i, _, p, s), m) in enumerate(zip(layers, measured)):
    new = update_grad_state(s, m, learning_rate, learn_clip, method)
    if k == 0:  # the check's zero, added where it keeps the check alive
      new = new.replace(measurements=new.measurements + zero)
    if isinstance(leaves[i], GradQuantState):
      leaves[i] = jax.tree.map(lambda a, b: (a - b).astype(b.dtype), new, p)
    else:
      leaves[i] = (new.pack() - p).astype(p.dtype)
    new_states.append(jax.tree.map(lambda a, b: (a + (b - a)).astype(jnp.float32), s, new))
  return new_states


def _stored(state: GradQuantState, update: GradQuantState) -> GradQuantState:
  """What ``optax.apply_updates`` will store: ``state + update`` (rounded as it
  rounds, so the coefficient is read from the bits the layer will hold)."""
  return jax.tree.map(lambda a, b: (a + b).astype(jnp.float32), state, update)


def _scale_layers(leaves, flat_paths, phi):
  """Multiplies every leaf beside a layer's state (same parent) by its ``phi``."""
  for i, path in enumerate(flat_paths):
    u = leaves[i]
    if u is None or is_grad_quant(path, u) or path[:-1] not in phi:
      continue
    leaves[i] = (u * phi[path[:-1]]).astype(u.dtype)


def direction_sensitive_clip(learning_rate: jax.typing.ArrayLike = 1.0,
                             learn_clip: jax.typing.ArrayLike = True,
                             method: str | None = None) -> optax.GradientTransformation:
  """Learn each layer's gradient clip value by minimising the cosine distance.

  For every gradient-state leaf (:func:`is_grad_quant`), the incoming
  "gradient" is the backward pass's measurement; the outgoing update is
  ``update_grad_state(state, measurement) - state``
  (:func:`int8jax.dsgc.update_grad_state`). The rule is the layer's
  ``QuantConfig.clip_method``, which the measurement carries: by default
  (``"search"``) the clip ratio (of ``max|g|``; 1 at a layer's first
  measurement) moves towards the candidate clip with the smallest cosine
  distance between the gradient and its quantization, found in the measuring
  pass (``log r += learning_rate * (log r_best - log r)``); with
  ``"gradient"`` it takes the paper's descent step
  ``log c -= learning_rate * d(d)/d(log c)``. Both minimise the paper's
  objective; the search converges in a few measurements where the descent,
  whose derivative is about ``2 d`` (~1e-3), needs ~100 (docs/results.md).
  The distance statistics are recorded. Without a measurement the update is
  zero; non-finite measurements leave the state unchanged (only
  ``nonfinite`` counts). Other leaves pass through untouched.

  Args:
    learning_rate: step size on ``log c`` (1: jump to the best candidate).
    learn_clip: ``False`` records ``c = max|g|`` instead of learning (layers
      with ``QuantConfig(grad_clip="max")`` do so by themselves).
    method: deprecated: ``None`` (the layer's ``QuantConfig.clip_method``);
      ``"search"`` / ``"gradient"`` force a rule.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import int8jax, jax.numpy as jnp
    >>> tx = int8jax.optim.direction_sensitive_clip(1.0)
    >>> s = int8jax.GradQuantState.initial()
    >>> m = s.replace(grad_absmax=jnp.float32(2.0), best_ratio=jnp.float32(1.0),
    ...               measurements=jnp.float32(1.0))
    >>> m = int8jax.dsgc.as_cotangent(m)  # as the ops return it
    >>> upd, _ = tx.update({"g": m}, tx.init({"g": s}), {"g": s})
    >>> float(upd["g"].clip)  # first measurement: clip starts at max|g|
    2.0
  """
  if method is not None:
    if method not in CLIP_METHODS:
      raise ValueError(f"method must be one of {CLIP_METHODS}, got {method!r}")
    _deprecated("direction_sensitive_clip(method=)", "QuantConfig(clip_method=) on the layers")

  def update_fn(updates, state, params=None):
    _need_params(params, "direction_sensitive_clip")
    _, leaves, treedef, layers = _layers(updates, params)
    _fold(leaves, layers, learning_rate, learn_clip, method)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_distance(state: GradQuantState, kind: str = DEFAULT_DISTANCE_KIND) -> jax.Array:
  """The ``d`` of ``state`` that scales the layer's learning rate.

  ``"global"`` (default): the paper's ``d``, the whole tensor's norm-weighted
  cosine distance (``state.distance``); ``"mean"`` / ``"median"``: the mean
  (``channel_distance_mean``) / median of the per-channel distances, which
  see channels whose direction is lost although the norm-weighted distance is
  tiny (docs/results.md).
  """
  if kind == "mean":
    return state.channel_distance_mean
  if kind == "median":
    return state.channel_distance_median
  if kind == "global":
    return state.distance
  raise ValueError(f"lr distance kind must be one of {DISTANCE_KINDS}, got {kind!r}")


def lr_deviation(state: GradQuantState, which: str = DEFAULT_DISTANCE_KIND) -> jax.Array:
  """Deprecated name of :func:`lr_distance`."""
  _deprecated("int8jax.optim.lr_deviation", "int8jax.optim.lr_distance")
  return lr_distance(state, which)


def _distance_kind(kind, deprecated_kind, where, old_name):
  if deprecated_kind is not None:
    _deprecated(f"{where}({old_name}=)", f"{where}(distance_kind=)", stacklevel=4)
    kind = deprecated_kind
  if kind not in DISTANCE_KINDS:
    raise ValueError(f"{where}: distance_kind must be one of {DISTANCE_KINDS}, got {kind!r}")
  return kind


def error_sensitive_lr(alpha: jax.typing.ArrayLike = 20.0,
                       beta: jax.typing.ArrayLike = 0.1,
                       distance_kind: str = DEFAULT_DISTANCE_KIND, *,
                       deviation: str | None = None) -> optax.GradientTransformation:
  """Scale each quantized layer's updates by ``max(exp(-alpha * d), beta)``.

  ``d`` is the layer's latest measured distance chosen by ``distance_kind``
  (:func:`lr_distance`: by default the paper's global, norm-weighted one;
  ``"mean"`` / ``"median"`` of the per-channel distances slow a layer whose
  small-gradient channels lose their direction, which measured worse,
  :data:`DEFAULT_DISTANCE_KIND`) -- read as ``params + updates`` of its
  gradient-state leaf — so place this after :func:`direction_sensitive_clip`
  (:func:`ui8` does both in one pass) and last in the chain. The state leaves
  themselves are not scaled; leaves of layers without a state pass
  unchanged; dtypes are kept.

  Args:
    alpha: sensitivity (paper: 20).
    beta: lower bound of the coefficient (paper: 0.1).
    distance_kind: ``"global"``, ``"mean"`` or ``"median"`` (:func:`lr_distance`).
    deviation: deprecated name of ``distance_kind``.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import int8jax, jax.numpy as jnp
    >>> s = int8jax.GradQuantState.initial()
    >>> params = {"conv": {"kernel": jnp.ones(2), "q": s}}
    >>> upd = {"conv": {"kernel": jnp.ones(2),
    ...                 "q": s.replace(distance=jnp.float32(0.05))}}
    >>> tx = int8jax.optim.error_sensitive_lr()
    >>> out, _ = tx.update(upd, tx.init(params), params)
    >>> round(float(out["conv"]["kernel"][0]), 4)  # exp(-20 * 0.05)
    0.3679

  References:
    Zhu et al. 2020, §4.2 (deviation counteractive learning rate scaling).
  """
  kind = _distance_kind(distance_kind, deviation, "error_sensitive_lr", "deviation")

  def update_fn(updates, state, params=None):
    _need_params(params, "error_sensitive_lr")
    paths, leaves, treedef, layers = _layers(updates, params)
    phi = {path[:-1]: lr_coefficient(lr_distance(_stored(s, as_state(leaves[i])), kind),
                                     alpha, beta)
           for i, path, _, s in layers}
    _scale_layers(leaves, paths, phi)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_coefficient(distance: jax.typing.ArrayLike = None, alpha: jax.typing.ArrayLike = 20.0,
                   beta: jax.typing.ArrayLike = 0.1, *,
                   deviation: jax.typing.ArrayLike = None) -> jax.Array:
  """Error-sensitive learning-rate coefficient ``max(exp(-alpha * d), beta)`` (§4.2),
  ``d`` = ``distance`` (``deviation=`` is its deprecated name)."""
  if deviation is not None:
    _deprecated("lr_coefficient(deviation=)", "lr_coefficient(distance=)")
    distance = deviation
  if distance is None:
    raise TypeError("lr_coefficient: missing the distance d")
  return jnp.maximum(jnp.exp(-jnp.asarray(alpha) * distance), beta)


def grad_quant_labels(params, state_label: str = GRAD_QUANT, param_label: str = "params"):
  """Label tree (a prefix of ``params``): ``state_label`` for the gradient
  states (:func:`is_grad_quant`), ``param_label`` for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: state_label if is_grad_quant(path, x) else param_label, params,
      is_leaf=_is_state)


def quant_state_labels(params, state_label: str = GRAD_QUANT, param_label: str = "params",
                       **deprecated):
  """Deprecated name of :func:`grad_quant_labels` (``quant=`` / ``other=``:
  former names of its two labels)."""
  _deprecated("int8jax.optim.quant_state_labels", "int8jax.optim.grad_quant_labels")
  unknown = set(deprecated) - {"quant", "other"}
  if unknown:
    raise TypeError(f"quant_state_labels: unexpected arguments {sorted(unknown)}")
  if deprecated:
    _deprecated("quant_state_labels(quant=, other=)", "state_label=, param_label=")
    state_label = deprecated.get("quant", state_label)
    param_label = deprecated.get("other", param_label)
  return grad_quant_labels(params, state_label, param_label)


def is_quant_state(path, x) -> bool:
  """Deprecated name of :func:`is_grad_quant`."""
  _deprecated("int8jax.optim.is_quant_state", "int8jax.optim.is_grad_quant")
  return is_grad_quant(path, x)


def _clip_and_lr(learning_rate, learn_clip, method, alpha, beta, kind):
  """:func:`direction_sensitive_clip` then :func:`error_sensitive_lr` in one
  pass: each layer's coefficient is read from the state the learner wrote."""

  def update_fn(updates, state, params=None):
    _need_params(params, "ui8")
    paths, leaves, treedef, layers = _layers(updates, params)
    stored = _fold(leaves, layers, learning_rate, learn_clip, method)
    phi = {path[:-1]: lr_coefficient(lr_distance(st, kind), alpha, beta)
           for (_, path, _, _), st in zip(layers, stored)}
    _scale_layers(leaves, paths, phi)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


_UNSET = object()


def ui8(base: optax.GradientTransformation, *,
        clip_learning_rate: jax.typing.ArrayLike = 1.0,
        alpha: jax.typing.ArrayLike = 20.0, beta: jax.typing.ArrayLike = 0.1,
        scale_lr: bool = True, distance_kind: str = DEFAULT_DISTANCE_KIND,
        learn_clip=_UNSET, clip_method=_UNSET, lr_deviation=_UNSET,
        ) -> optax.GradientTransformation:
  """UI8 around a base optimizer.

  The base optimizer (SGD with momentum, AdamW, ...) updates the weights
  only (``optax.partition`` by :func:`grad_quant_labels`); then, in one pass,
  the clip learner (:func:`direction_sensitive_clip`) updates each layer's
  gradient state and the error-sensitive coefficient
  (:func:`error_sensitive_lr`) scales the layer's final update.

  The clip is learned as each layer's ``QuantConfig`` says (``grad_clip``,
  ``clip_method``, ``clip_noise_weight``: what the backward pass measures);
  this optimizer holds only the learner's step size.

  Args:
    base: optimizer for the weights.
    clip_learning_rate: step size of the clip learner on ``log c``.
    alpha, beta: of :func:`error_sensitive_lr`.
    scale_lr: ``False`` leaves out :func:`error_sensitive_lr` (ablation
      "clip learning only").
    distance_kind: which measured distance drives the LR (:func:`lr_distance`).
    learn_clip: deprecated: ``False`` records ``c = max|g|``; set
      ``QuantConfig(grad_clip="max")`` on the layers instead.
    clip_method: deprecated: forces the learner's rule; set
      ``QuantConfig(clip_method=)`` on the layers instead (which also keeps
      the backward pass from measuring what the rule does not use).
    lr_deviation: deprecated name of ``distance_kind``.
  """
  if learn_clip is not _UNSET:
    _deprecated("ui8(learn_clip=)", "QuantConfig(grad_clip='max') on the layers")
  else:
    learn_clip = True
  if clip_method is not _UNSET:
    if clip_method not in CLIP_METHODS:
      raise ValueError(f"ui8: clip_method must be one of {CLIP_METHODS}, got {clip_method!r}")
    _deprecated("ui8(clip_method=)", "QuantConfig(clip_method=) on the layers")
  else:
    clip_method = None
  kind = _distance_kind(distance_kind, None if lr_deviation is _UNSET else lr_deviation,
                        "ui8", "lr_deviation")
  if not scale_lr:
    learner = _quiet_clip(clip_learning_rate, learn_clip, clip_method)
    return optax.partition({"params": base, GRAD_QUANT: learner}, grad_quant_labels)
  # The states pass the partition unchanged; the last transform learns and scales.
  # (The optimizer state's layout is that of chain(partition(base, clip), lr).)
  return optax.chain(
      optax.partition({"params": base, GRAD_QUANT: optax.identity()}, grad_quant_labels),
      _clip_and_lr(clip_learning_rate, learn_clip, clip_method, alpha, beta, kind))


def _quiet_clip(learning_rate, learn_clip, method):
  """:func:`direction_sensitive_clip` without its deprecation warning (ui8 gave one)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return direction_sensitive_clip(learning_rate, learn_clip, method)


_DEPRECATED_NAMES = {"LR_DEVIATIONS": ("DISTANCE_KINDS", DISTANCE_KINDS),
                     "DEFAULT_LR_DEVIATION": ("DEFAULT_DISTANCE_KIND", DEFAULT_DISTANCE_KIND)}


def __getattr__(name):
  if name in _DEPRECATED_NAMES:
    new, value = _DEPRECATED_NAMES[name]
    _deprecated(f"int8jax.optim.{name}", f"int8jax.optim.{new}")
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
