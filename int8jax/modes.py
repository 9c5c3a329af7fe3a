"""Training modes: the one table of float baselines, UI8 and the paper's ablations.

A :class:`Mode` says everything that differs between the variants a user (or
a benchmark) compares: whether convs/dense layers are quantized, the
computation dtype of the float parts, how the gradient is clipped and
whether the error-sensitive learning rate is on. It yields both halves of a
training setup from one place, so the layer config and the optimizer cannot
disagree:

* :meth:`Mode.quant_config` -- the :class:`~int8jax.QuantConfig` of the
  quantized layers (``None`` for the float modes);
* :meth:`Mode.optimizer` -- the optax chain around a base optimizer
  (:func:`int8jax.optim.ui8` for the quantized modes, ``base`` unchanged for
  the float ones);
* :attr:`Mode.wrt` -- the ``nnx.Optimizer`` / ``nnx.grad`` filter.

================  =========  ===========  ===============  ==========  ===========
mode              quantized  float dtype  gradient clip    LR scaling  grad scales
================  =========  ===========  ===============  ==========  ===========
``float32``       no         float32      --               --          --
``bf16``          no         bfloat16     --               --          --
``ui8``           yes        float32      learned (DSGC)   yes         auto
``ui8-bf16``      yes        bfloat16     learned (DSGC)   yes         auto
``ui8-tensor``    yes        float32      learned (DSGC)   yes         tensor
``naive``         yes        float32      ``max|g|``       no          tensor
``clip-only``     yes        float32      learned (DSGC)   no          auto
``lr-only``       yes        float32      ``max|g|``       yes         auto
================  =========  ===========  ===============  ==========  ===========

"auto" gradient scales: one per feature group in grouped and depthwise
convs, one per tensor elsewhere (``QuantConfig.grad_granularity="group"``).

Example::

    mode = int8jax.modes.get("ui8")
    model = build_model(dtype=mode.dtype)
    if mode.quantized:
      int8jax.nn.quantize_model(model, mode.quant_config(period=100), rngs=rngs)
    optimizer = nnx.Optimizer(model, mode.optimizer(optax.sgd(0.1, 0.9)), wrt=mode.wrt)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

from int8jax import optim
from int8jax.config import QuantConfig

__all__ = ["Mode", "MODES", "MODE_NAMES", "get", "table"]


@dataclasses.dataclass(frozen=True)
class Mode:
  """One training variant (see the module table).

  Attributes:
    name: the name used on command lines and in result tables.
    description: one line for ``--help`` and docs.
    quantized: convs / dense layers run their three GEMMs in INT8.
    dtype: computation dtype of the float parts (activations, BatchNorm,
      the layers' outputs); ``None`` is float32. Parameters stay float32.
    grad_clip: ``"learned"`` (direction-sensitive clipping, UI8 §4.1) or
      ``"max"`` (clip at ``max|g|``: naive INT8).
    scale_lr: error-sensitive learning-rate scaling (UI8 §4.2).
    grad_granularity: the gradient scales (``QuantConfig.grad_granularity``):
      ``"auto"`` (``"group"``: per group in grouped / depthwise convs) or
      ``"tensor"``.
  """

  name: str
  description: str
  quantized: bool = False
  dtype: Any = None
  grad_clip: str = "learned"
  scale_lr: bool = True
  grad_granularity: str = "auto"

  def quant_config(self, base: QuantConfig | None = None, **changes) -> QuantConfig | None:
    """The layers' config: ``base`` (default ``QuantConfig()``) with this mode's
    clipping and ``changes`` applied; ``None`` for float modes."""
    if not self.quantized:
      return None
    base = QuantConfig() if base is None else base
    # The table's "auto" is QuantConfig's "group" (its former name there).
    gran = "group" if self.grad_granularity == "auto" else self.grad_granularity
    return base.replace(grad_clip=self.grad_clip, grad_granularity=gran, **changes)

  def optimizer(self, base: optax.GradientTransformation,
                **ui8_kwargs) -> optax.GradientTransformation:
    """``base`` for float modes; :func:`int8jax.optim.ui8` around it otherwise.

    ``ui8_kwargs`` (``clip_learning_rate``, ``alpha``, ``beta``,
    ``distance_kind``) go to :func:`~int8jax.optim.ui8`; the mode sets
    ``scale_lr``. How the clip is learned (or not: ``grad_clip="max"``) is the
    layers' setting, :meth:`quant_config`.
    """
    if not self.quantized:
      return base
    return optim.ui8(base, scale_lr=self.scale_lr, **ui8_kwargs)

  @property
  def wrt(self):
    """What the optimizer updates: weights, plus the gradient state when quantized."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from int8jax.nn import TRAINABLE  # pylint: disable=g-import-not-at-top
    return TRAINABLE if self.quantized else nnx.Param

  @property
  def compute_dtype(self):
    """``dtype`` with ``None`` read as float32 (what inputs are cast to)."""
    return jnp.float32 if self.dtype is None else self.dtype


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("float32", "float baseline: nnx.Conv / nnx.Linear in float32"),
    Mode("bf16", "float baseline: bfloat16 compute, float32 parameters", dtype=jnp.bfloat16),
    Mode("ui8", "UI8: int8 GEMMs, learned gradient clip (DSGC) and error-sensitive LR",
         quantized=True),
    Mode("ui8-bf16", "UI8 with bfloat16 float parts (BatchNorm, activations): the GPU "
         "comparison against bf16", quantized=True, dtype=jnp.bfloat16),
    Mode("ui8-tensor", "ablation: UI8 with one gradient scale per tensor everywhere (the "
         "paper's granularity)", quantized=True, grad_granularity="tensor"),
    Mode("naive", "naive INT8: int8 GEMMs, one gradient scale per tensor, clip at max|g|, "
         "no LR scaling", quantized=True, grad_clip="max", scale_lr=False,
         grad_granularity="tensor"),
    Mode("clip-only", "ablation: learned clip (DSGC), no LR scaling",
         quantized=True, scale_lr=False),
    Mode("lr-only", "ablation: clip at max|g|, error-sensitive LR",
         quantized=True, grad_clip="max"),
)}

#: The mode names, in table order.
MODE_NAMES: tuple[str, ...] = tuple(MODES)


def table() -> str:
  """The modes as a Markdown table (the README quotes it; a test keeps them equal)."""
  esc = lambda t: t.replace("|", "\\|")  # noqa: E731
  rows = ["| mode | quantized | float dtype | gradient clip | LR scaling | gradient scales "
          "| what |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
  for m in MODES.values():
    q = m.quantized
    clip = ("learned (DSGC)" if m.grad_clip == "learned" else "`max\\|g\\|`") if q else "--"
    rows.append(f"| `{m.name}` | {'yes' if q else 'no'} | {jnp.dtype(m.compute_dtype).name} | "
                f"{clip} | {('yes' if m.scale_lr else 'no') if q else '--'} | "
                f"{m.grad_granularity if q else '--'} | {esc(m.description)} |")
  return "\n".join(rows)


def get(name: str) -> Mode:
  """The :class:`Mode` called ``name``; ``ValueError`` naming the choices otherwise."""
  try:
    return MODES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown mode {name!r}; choose from {MODE_NAMES}") from None
