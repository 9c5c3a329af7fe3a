"""Diagnostics of INT8 training: what the paper plots (Zhu et al. 2020, §3).

Two kinds of measurement, usable from any training loop:

* :func:`layer_stats` -- per quantized layer, the latest measurement its
  backward pass recorded (built on :func:`int8jax.nn.grad_quant_stats`): cosine
  distance ``d`` between the output gradient and its int8 version, the clip
  value next to ``max|g|``, the clipped fraction and the error-sensitive LR
  coefficient ``phi = lr_coefficient(d)``. Cheap: reads state, runs nothing.
* :func:`capture_tensors` -- runs one forward and backward pass of
  ``loss_fn(model, *args)`` on a copy of the model and returns, per quantized
  layer, its input ``x``, weight ``w`` and the gradient ``g`` of the loss
  w.r.t. the layer's output (the tensor the layer quantizes in its backward
  pass). :func:`distribution` turns one tensor into a fixed-bin histogram of
  ``|v| / max|v|`` on a log scale plus its kurtosis and the share of entries
  an int8 grid clipped at ``max|v|`` rounds to zero -- the "sharpness" the
  paper shows for gradients (peaked, long-tailed; sharper later in training,
  in shallow layers and in depthwise convs).

How the tensors are captured without touching QuantConv's numerics: on a copy
of the model (``nnx.split`` / ``nnx.merge``), each quantized layer gets an
instance attribute ``conv_general_dilated`` (``dot_general`` for
QuantDense) that calls the layer's own quantized op unchanged, records its
input and kernel, and adds a zero "probe" array to its result. ``y + 0`` is
``y``, so the forward and the backward are bit-identical to a plain training
step; ``jax.grad`` w.r.t. the probes is ``dL/dy``. The original model's state
(call counters, cached ranges, clip values, rng streams) is not advanced.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from int8jax import optim
from int8jax.optim import lr_coefficient
from int8jax.nn.layers import QuantDense, grad_quant_stats, quant_layers

__all__ = ["LayerTensors", "Distribution", "layer_stats", "capture_tensors", "distribution",
           "LOG_BINS", "QuantizeFusion", "quantize_fusions"]

#: Bin edges of :func:`distribution`: ``log10(|v| / max|v|)`` from -6 to 0.
LOG_BINS = np.linspace(-6.0, 0.0, 49)


def layer_stats(model: nnx.Module, alpha: float = 20.0, beta: float = 0.1,
                distance_kind: str | None = None, *,
                lr_deviation: str | None = None) -> dict[str, dict[str, float]]:
  """Per quantized layer (``"a/b/c"`` path): its latest gradient measurement.

  ``distance_kind`` (default :data:`int8jax.optim.DEFAULT_DISTANCE_KIND`)
  picks the distance ``phi`` is computed from (:func:`int8jax.optim.lr_distance`;
  ``lr_deviation`` is its deprecated name).

  Keys of each entry (named as before the state's fields were renamed; the
  field each reads in brackets): ``cosine_distance`` (the mean of the
  per-channel distances, ``channel_distance_mean``),
  ``global_cosine_distance`` (the whole tensor's, norm-weighted: the paper's
  d, ``distance``, which drives the LR scaling by default),
  ``channel_cosine_distance_max`` and ``_median``,
  ``clip``, ``grad_absmax``
  (``max|g|``), ``clip_ratio`` (the learned ratio of ``max|g|``; 1 means
  clipping at the max, i.e. naive INT8), ``best_ratio`` (the best candidate
  of the latest measurement), ``clipped_fraction``, ``phi``
  (``lr_coefficient(d, alpha, beta)``), ``measurements``, ``nonfinite``.
  Values are Python floats (device arrays are fetched once).
  """
  if lr_deviation is not None:
    warnings.warn("layer_stats(lr_deviation=) is deprecated: use distance_kind=",
                  DeprecationWarning, stacklevel=2)
    distance_kind = lr_deviation
  kind = distance_kind or optim.DEFAULT_DISTANCE_KIND
  stats = jax.device_get(grad_quant_stats(model))
  out = {}
  for path, s in stats.items():
    gmax = float(s.grad_absmax)
    out[path] = {
        "cosine_distance": float(s.channel_distance_mean),
        "global_cosine_distance": float(s.distance),
        "channel_cosine_distance_max": float(s.channel_distance_max),
        "channel_cosine_distance_median": float(s.channel_distance_median),
        "clip": float(s.clip), "grad_absmax": gmax,
        "clip_ratio": float(s.clip_ratio) if float(s.clip_ratio) > 0 else 1.0,
        "best_ratio": float(s.best_ratio),
        "clipped_fraction": float(s.clipped_fraction),
        "phi": float(lr_coefficient(float(optim.lr_distance(s, kind)), alpha, beta)),
        "measurements": float(s.measurements), "nonfinite": float(s.nonfinite),
    }
  return out


@dataclasses.dataclass
class LayerTensors:
  """One quantized layer's tensors in one training step (NumPy, float32).

  Attributes:
    x: the layer's input (layout as given to the layer, e.g. NHWC).
    w: its kernel (HWIO for convs, (in, out) for dense layers).
    g: gradient of the loss w.r.t. the layer's output (before the bias).
    kind: ``"conv"``, ``"depthwise"`` (groups == input features > 1),
      ``"grouped"`` or ``"dense"``.
    index: position of the layer among the quantized layers in the order they
      ran in the forward pass (depth).
  """

  x: np.ndarray
  w: np.ndarray
  g: np.ndarray
  kind: str
  index: int


def _kind(layer) -> str:
  if isinstance(layer, QuantDense):
    return "dense"
  groups = getattr(layer, "feature_group_count", 1)
  if groups == 1:
    return "conv"
  return "depthwise" if groups == layer.in_features else "grouped"


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def capture_tensors(model: nnx.Module, loss_fn: Callable[..., jax.Array], *args: Any,
                    train: bool = True) -> dict[str, LayerTensors]:
  """Inputs, weights and output gradients of every quantized layer for one batch.

  Args:
    model: a model with :class:`~int8jax.nn.QuantConv` / ``QuantDense`` layers
      (quantized, or float with ``config=None``; plain ``nnx.Conv`` /
      ``nnx.Linear`` layers are not captured). It is not modified.
    loss_fn: ``loss_fn(model, *args) -> scalar`` (e.g. the training loss).
      The compiled pass is cached per (model structure, ``loss_fn`` object,
      ``train``): pass the same function object to avoid recompiling.
    *args: the batch, passed to ``loss_fn``.
    train: run the copy in training mode (BatchNorm batch statistics, the
      gradients a training step sees). ``False`` uses eval mode.

  Returns:
    ``{path: LayerTensors}`` keyed like :func:`int8jax.nn.grad_quant_stats`, in the
    order the layers run (``index``). Layers called more than once in one
    pass are not supported (``ValueError``).
  """
  graphdef, state = nnx.split(model)
  # 1. output shapes and call order (abstract pass), 2. one compiled pass with
  # zero probes (cached per graphdef / loss_fn / mode, so repeated captures
  # during training compile once).
  shapes: dict[str, Any] = {}
  jax.eval_shape(lambda s, a: _run(graphdef, loss_fn, train, None, s, a, shapes), state, args)
  probes = {k: jnp.zeros(v["y"].shape, v["y"].dtype) for k, v in shapes.items()}
  xw, grads = _compiled_pass(graphdef, loss_fn, train)(probes, state, args)
  layers = {_path_str(p): l for p, l in quant_layers(model)}
  out = {}
  for i, path in enumerate(shapes):  # insertion order = call order
    x, w = xw[path]
    out[path] = LayerTensors(
        x=np.asarray(x, np.float32), w=np.asarray(w, np.float32),
        g=np.asarray(grads[path], np.float32), kind=_kind(layers[path]), index=i)
  return out


def _run(graphdef, loss_fn, train, probes, state, args, record):
  state = jax.tree.map(lambda a: a, state)  # fresh Variables at this trace level
  m = nnx.merge(graphdef, state)
  if train:
    m.train()
  else:
    m.eval()
  for path, layer in quant_layers(m):
    _install(layer, _path_str(path), probes, record)
  return loss_fn(m, *args)


_PASSES: list = []  # (graphdef, loss_fn, train, jitted pass); GraphDefs are not hashable


def _compiled_pass(graphdef, loss_fn, train):
  for g, fn, t, jitted in _PASSES:
    if fn is loss_fn and t == train and g == graphdef:
      return jitted
  jitted = jax.jit(functools.partial(_grad_pass, graphdef, loss_fn, train))
  _PASSES.append((graphdef, loss_fn, train, jitted))
  del _PASSES[:-8]
  return jitted


def _grad_pass(graphdef, loss_fn, train, probes, state, args):
  def f(probes):
    rec: dict[str, Any] = {}
    loss = _run(graphdef, loss_fn, train, probes, state, args, rec)
    return loss, {k: (v["x"], v["w"]) for k, v in rec.items()}

  (_, xw), grads = jax.value_and_grad(f, has_aux=True)(probes)
  return xw, grads


def _install(layer, path: str, probes, record: dict) -> None:
  """Wrap ``layer``'s quantized op (instance attribute) to record x, w and probe y."""
  name = "dot_general" if isinstance(layer, QuantDense) else "conv_general_dilated"
  op = getattr(type(layer), name).__get__(layer)  # the layer's own (quantized) op

  def wrapped(lhs, rhs, *a, **kw):
    if path in record:
      raise ValueError(f"capture_tensors: layer {path} is called more than once per pass")
    y = op(lhs, rhs, *a, **kw)
    if probes is None:  # abstract pass: output shape only
      record[path] = {"y": jax.ShapeDtypeStruct(y.shape, y.dtype)}
      return y
    record[path] = {"x": lhs, "w": rhs}
    return y + probes[path].astype(y.dtype)

  object.__setattr__(layer, name, wrapped)


@dataclasses.dataclass
class Distribution:
  """Shape of one tensor's value distribution (see :func:`distribution`).

  Attributes:
    hist: fraction of the nonzero entries per bin of ``log10(|v| / max|v|)``
      (edges :data:`LOG_BINS`; values below the first edge go to bin 0).
    zero_fraction: share of exact zeros (e.g. after ReLU).
    kurtosis: ``E[(v - mean)^4] / var^2`` over all entries (Gaussian: 3;
      Laplace: 6); large means peaked with heavy tails.
    below_step: share of nonzero entries with ``|v| < max|v| / 254``: those an
      int8 grid clipped at ``max|v|`` rounds to zero with nearest rounding.
    absmax: ``max|v|``.
    size: number of entries.
  """

  hist: np.ndarray
  zero_fraction: float
  kurtosis: float
  below_step: float
  absmax: float
  size: int


def distribution(v, bins: np.ndarray = LOG_BINS) -> Distribution:
  """Fixed-bin log-magnitude histogram, kurtosis and sub-step share of ``v``."""
  v = np.asarray(v, np.float64).ravel()
  a = np.abs(v)
  m = float(a.max()) if a.size else 0.0
  nz = a[a > 0]
  if m > 0 and nz.size:
    r = np.log10(nz / m)
    h, _ = np.histogram(np.clip(r, bins[0], bins[-1]), bins=bins)
    hist = h / nz.size
    below = float(np.mean(nz < m / 254.0))
  else:
    hist, below = np.zeros(len(bins) - 1), 0.0
  c = v - v.mean() if v.size else v
  var = float(np.mean(c * c)) if v.size else 0.0
  kurt = float(np.mean(c ** 4) / var ** 2) if var > 0 else float("nan")
  return Distribution(hist=hist, zero_fraction=float(np.mean(a == 0)) if a.size else 0.0,
                      kurtosis=kurt, below_step=below, absmax=m, size=int(v.size))


# ---------------------------------------------------------------------------
# Where the quantization runs in a compiled program.

# HLO ops a fusion that only quantizes (scale, noise, round, clamp, mark
# non-finite, convert to int8; layout changes) is made of. A quantizing fusion
# with any other op also computes the tensor it quantizes: it is fused into
# the fusion that produces that tensor.
_QUANTIZE_OPS = frozenset((
    "add", "bitcast", "broadcast", "clamp", "constant", "convert", "floor", "round-nearest-even",
    "round-nearest-afz", "is-finite", "multiply", "parameter", "select", "iota", "xor",
    "shift-right-logical", "slice", "reshape", "copy", "transpose", "reverse", "divide"))


@dataclasses.dataclass
class QuantizeFusion:
  """One fusion of a compiled XLA program that writes an int8 tensor.

  Attributes:
    name: the fused computation's name in the HLO text.
    rounding: ``"stochastic"`` (a ``floor``: gradients) or ``"nearest"``.
    shape: the int8 result's shape.
    fused_with_producer: the fusion also computes the float tensor it
      quantizes (it holds ops other than quantization: BatchNorm, ReLU, their
      backward). ``False``: a standalone pass that reads a float tensor from
      memory only to quantize it.
    ops: the HLO op names in the fusion.
  """

  name: str
  rounding: str
  shape: tuple[int, ...]
  fused_with_producer: bool
  ops: tuple[str, ...]


def quantize_fusions(hlo_text: str) -> list[QuantizeFusion]:
  """The int8-producing fusions of a compiled program's HLO text
  (``jax.jit(f).lower(...).compile().as_text()``), and whether each one is
  fused into the fusion that produces the tensor it quantizes.

  This is how docs/performance.md shows where the quantization runs; a test
  guards that, with ``set_measure_mode(model, "never")``, every gradient
  quantization is fused with the BatchNorm / ReLU backward that produces the
  gradient.
  """
  import re  # pylint: disable=g-import-not-at-top
  comps: dict[str, list[str]] = {}
  cur = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      cur = m.group(1)
      comps[cur] = []
    elif cur is not None and line.strip() != "}":
      comps[cur].append(line)
  out = []
  for name, body in comps.items():
    if not name.startswith("fused_computation") and "fusion" not in name:
      continue
    text = "\n".join(body)
    root = [l for l in body if "ROOT" in l]
    root_s8 = re.search(r"ROOT [^=]+= s8\[([\d,]*)\]", root[0]) if root else None
    if root_s8 is None:
      continue
    ops = tuple(sorted(set(re.findall(r" ([a-z][a-z0-9\-]*)\(", text))))
    rounding = "stochastic" if "floor" in ops else "nearest"
    if "floor" not in ops and not any(o.startswith("round") for o in ops):
      continue
    shape = tuple(int(d) for d in root_s8.group(1).split(",") if d)
    out.append(QuantizeFusion(name, rounding, shape, not set(ops) <= _QUANTIZE_OPS, ops))
  return out
