"""Turn an existing Flax NNX model into an INT8-training model, in place.

``quantize_model`` walks a model, replaces each ``nnx.Conv`` by a
``QuantConv`` and each ``nnx.Linear`` by a ``QuantDense`` with the same
arguments (strides, padding, dilations, ``feature_group_count``, ``use_bias``,
``dtype``, ...) and the *same* weight variables, and leaves everything else
(BatchNorm, pooling, the float master weights' values) untouched. By default
the first convolution and the last dense layer stay in float, as in
Zhu et al., "Towards Unified INT8 Training for Convolutional Neural Network"
(CVPR 2020), §5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import inspect
import warnings
from typing import Any

from flax import nnx

from int8jax.config import QuantConfig
from int8jax.nn.layers import QuantConv, QuantConvTranspose, QuantDense

__all__ = ["quantize_model", "default_skip", "quantizable_layers"]

PathParts = tuple[Any, ...]
SkipFn = Callable[[PathParts, nnx.Module], bool]


# nnx.Conv / nnx.Linear store their GEMM function as an attribute; the quantized
# layers bring their own, so these are not carried over.
_NOT_CARRIED = ("self", "rngs", "quant", "conv_general_dilated", "dot_general")


def _children(node) -> Iterator[tuple[Any, Any]]:
  """Child (key, value) pairs of a graph node in *definition* order.

  ``nnx.iter_graph`` sorts attribute names, which would put a stem called
  ``stem`` after ``blocks``; the order attributes were assigned is the order a
  typical ``__init__`` builds (and ``__call__`` runs) the layers.

  Caveat: a module rebuilt by ``nnx.merge`` (and so by ``nnx.eval_shape`` or
  the output of ``nnx.jit``) has its attributes in sorted order; convert a
  model right after constructing it, or pass an explicit ``skip``.
  """
  if isinstance(node, nnx.List):
    yield from enumerate(node)
  elif isinstance(node, nnx.Module):
    for k, v in vars(node).items():
      if not (isinstance(k, str) and k.startswith("_")):
        yield k, v
  elif isinstance(node, (list, tuple)):
    yield from enumerate(node)
  elif isinstance(node, dict):
    yield from node.items()


def _walk(node, path=(), seen=None) -> Iterator[tuple[PathParts, Any, Any, Any]]:
  """Yields (path, parent, key, child) for every module below ``node``."""
  seen = set() if seen is None else seen
  for k, v in _children(node):
    if isinstance(v, nnx.Variable) or id(v) in seen:
      continue
    if isinstance(v, (nnx.Module, list, tuple, dict)):
      seen.add(id(v))
      if isinstance(v, nnx.Module):
        yield path + (k,), node, k, v
      yield from _walk(v, path + (k,), seen)


def quantizable_layers(model: nnx.Module) -> list[tuple[PathParts, nnx.Module]]:
  """Every ``nnx.Conv`` / ``nnx.ConvTranspose`` / ``nnx.Linear`` below
  ``model``, in definition order.

  Already quantized layers are not listed.
  """
  return [(p, m) for p, _, _, m in _walk(model)
          if _quant_class(m) is not None and not isinstance(m, _QUANTIZED)]


def default_skip(model: nnx.Module) -> SkipFn:
  """The paper's rule: keep the first conv and the last dense layer float.

  "First" and "last" are in definition order (see ``_children``). Returns a
  predicate ``skip(path, module) -> bool`` for ``quantize_model``.
  """
  layers = quantizable_layers(model)
  convs = [p for p, m in layers if isinstance(m, nnx.Conv)]
  denses = [p for p, m in layers if isinstance(m, nnx.Linear)]
  keep = set(convs[:1]) | set(denses[-1:])
  return lambda path, module: tuple(path) in keep


def _constructor_kwargs(old: nnx.Module, cls: type) -> dict[str, Any]:
  """Arguments of ``cls.__init__`` that ``old`` stores under the same name.

  Walks the MRO so a subclass forwarding ``**kwargs`` to ``nnx.Conv`` still
  receives every argument ``nnx.Conv`` accepts.
  """
  kw = {}
  for klass in cls.__mro__:
    if "__init__" not in vars(klass) or not issubclass(klass, nnx.Module):
      continue
    for name, p in inspect.signature(klass.__init__).parameters.items():
      if name in _NOT_CARRIED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      if name in vars(old) and name not in kw:
        kw[name] = vars(old)[name]
  return kw


def _convert(old: nnx.Module, cls: type, config: QuantConfig, rngs: nnx.Rngs):
  kw = _constructor_kwargs(old, cls)
  new = cls(**kw, config=config, rngs=rngs)
  for name in ("kernel", "bias"):
    old_v, new_v = getattr(old, name, None), getattr(new, name, None)
    if old_v is None and new_v is None:
      continue
    if (old_v is None) != (new_v is None) or old_v.shape != new_v.shape:
      raise ValueError(
          f"cannot carry {name!r} from {type(old).__name__} to {cls.__name__}: "
          f"{None if old_v is None else old_v.shape} vs "
          f"{None if new_v is None else new_v.shape}")
    setattr(new, name, old_v)  # the same Variable: values, sharding, metadata
  return new


def _set_child(parent, key, value):
  if isinstance(parent, nnx.List) or isinstance(parent, (list, dict)):
    parent[key] = value
  elif isinstance(parent, nnx.Module):
    setattr(parent, key, value)
  else:
    raise TypeError(f"cannot replace a child of a {type(parent).__name__} at {key=}")


def quantize_model(model: nnx.Module, config: QuantConfig | None = None, *,
                   skip: SkipFn | None = None, rngs: nnx.Rngs) -> nnx.Module:
  """Replaces ``nnx.Conv`` / ``nnx.ConvTranspose`` / ``nnx.Linear`` layers by
  ``QuantConv`` / ``QuantConvTranspose`` / ``QuantDense``.

  GEMM layers int8jax cannot quantize (``nnx.LinearGeneral``, ``nnx.Einsum``)
  stay float with a warning naming them.

  The conversion is in place: the model object is modified and returned. Each
  new layer receives the old layer's constructor arguments and its kernel and
  bias ``nnx.Param`` objects, so the model computes the same function up to
  quantization, and an optimizer must be created *after* conversion.

  Args:
    model: any NNX module tree (lists via ``nnx.List`` and dicts are walked).
    config: the quantization config of every converted layer (default
      ``QuantConfig()``: UI8 with learned gradient clipping).
    skip: ``skip(path, module) -> bool``; layers for which it is true stay
      float. ``path`` is the tuple of attribute names / indices from ``model``.
      Default: ``default_skip(model)`` -- the first conv and the last dense
      layer in definition order.
    rngs: random streams for the new layers (the ``'quant'`` stream is used
      for stochastic rounding when present).

  Returns:
    ``model``, converted.

  Example::

    model = examples.models.resnet20(num_classes=10, rngs=nnx.Rngs(0))
    quantize_model(model, QuantConfig(period=100), rngs=nnx.Rngs(0, quant=1))
  """
  config = QuantConfig() if config is None else config
  skip = default_skip(model) if skip is None else skip
  # Collect first, then replace: mutating while walking would revisit nodes.
  todo, unsupported = [], []
  for path, parent, key, module in _walk(model):
    if isinstance(module, _QUANTIZED):
      continue
    cls = _quant_class(module)
    if cls is None:
      if isinstance(module, _FLOAT_ONLY):
        unsupported.append(f"{'/'.join(map(str, path))} ({type(module).__name__})")
      continue
    if not skip(path, module):
      todo.append((parent, key, module, cls))
  for parent, key, module, cls in todo:
    _set_child(parent, key, _convert(module, cls, config, rngs))
  if unsupported:
    warnings.warn(
        "quantize_model: these layers stay float (int8jax has no quantized version of "
        f"their type): {', '.join(unsupported)}", stacklevel=2)
  return model


# What each Flax layer becomes (subclasses of these convert too).
_CONVERSIONS = ((nnx.Conv, QuantConv), (nnx.ConvTranspose, QuantConvTranspose),
                (nnx.Linear, QuantDense))
_QUANTIZED = (QuantConv, QuantConvTranspose, QuantDense)
# GEMM layers without a quantized counterpart: left float, with a warning.
_FLOAT_ONLY = (nnx.LinearGeneral, nnx.Einsum)


def _quant_class(module):
  for float_cls, quant_cls in _CONVERSIONS:
    if isinstance(module, float_cls):
      return quant_cls
  return None
