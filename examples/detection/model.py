"""RetinaNet-style detector in Flax NNX: ResNet backbone, FPN, shared class/box subnets.

Built from plain ``nnx.Conv`` / ``nnx.BatchNorm`` only (no norm in the FPN and
the heads, as in the RetinaNet paper), so :func:`int8jax.nn.quantize_model`
converts it like the classification models: every conv becomes a
``QuantConv`` except the first one in definition order -- the backbone stem.
The detector has no ``nnx.Linear``.

Layouts: input ``(B, S, S, C)`` NHWC float (normalised, ``dtype``); outputs
``cls_logits (B, N, num_classes)`` and ``box_deltas (B, N, 4)`` in the
anchor order of :func:`examples.detection.boxes.make_anchors`.

Shared heads and INT8: the class and box subnets are shared across pyramid
levels. A quantized layer counts its calls to pick its measure steps and
caches *one* activation range, so calling a shared ``QuantConv`` once per
level would measure on a rotating level and quantize the other levels with
that level's cached range. Instead the levels are **packed** side by side
into one canvas (zero gaps of one pixel between them, see :func:`pack_levels`)
and each head conv runs once per step on it. After every head conv the gaps
are multiplied back to zero, so a 3x3 conv at a level's border sees exactly
the zero padding it would see alone: the result equals running the head on
each level separately (tested), at the cost of the gap pixels (~25% more
head pixels for P3-P5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from examples import models as models_lib
from examples.detection.boxes import AnchorConfig, anchors_per_cell

__all__ = ["BACKBONES", "FPN", "Subnet", "RetinaNet", "check_levels", "LevelLayout", "level_layout",
           "pack_levels", "unpack_levels"]

#: Backbone name -> (blocks per stage, block class) of ``examples.models.ResNet``.
BACKBONES = {
    "resnet10": ((1, 1, 1, 1), models_lib.BasicBlock),
    "resnet18": ((2, 2, 2, 2), models_lib.BasicBlock),
    "resnet34": ((3, 4, 6, 3), models_lib.BasicBlock),
    "resnet50": ((3, 4, 6, 3), models_lib.Bottleneck),
}

_he_fan_in = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
_xavier = nnx.initializers.xavier_uniform()


def _conv(cin, cout, k, stride=1, *, dtype, rngs, kernel_init=_xavier, bias_init=None):
  kw = {} if bias_init is None else {"bias_init": bias_init}
  return nnx.Conv(cin, cout, (k, k), (stride, stride), padding=[(k // 2, k // 2)] * 2,
                  dtype=dtype, kernel_init=kernel_init, rngs=rngs, **kw)


def _upsample_to(x, shape):
  """Nearest-neighbour 2x upsampling of NHWC ``x``, cropped to ``shape`` (H, W)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :shape[0], :shape[1]]


class FPN(nnx.Module):
  """Feature pyramid (Lin et al. 2017) on backbone maps ``C_l``, levels ``levels``.

  Levels up to the backbone's last (``<= max_backbone_level``) get a 1x1
  lateral conv, the top-down sum with the 2x-upsampled coarser level and a
  3x3 output conv; levels above it are RetinaNet's extra levels: P6 = 3x3/2
  conv on ``C5`` (the backbone's last map), P7 = 3x3/2 conv on ``relu(P6)``.

  Args:
    in_channels: channels of the backbone maps used, one per backbone level
      in ``levels`` (finest first).
    width: channels of every pyramid level.
    num_extra: levels above the backbone's last (0, 1 or 2, ...).
  """

  def __init__(self, in_channels: Sequence[int], width: int, num_extra: int = 0, *,
               dtype=None, rngs: nnx.Rngs):
    self.lateral = nnx.List([_conv(c, width, 1, dtype=dtype, rngs=rngs) for c in in_channels])
    self.output = nnx.List([_conv(width, width, 3, dtype=dtype, rngs=rngs)
                            for _ in in_channels])
    extra, cin = [], in_channels[-1]
    for _ in range(num_extra):
      extra.append(_conv(cin, width, 3, 2, dtype=dtype, rngs=rngs))
      cin = width
    self.extra = nnx.List(extra)

  def __call__(self, feats: Sequence[jax.Array]) -> list[jax.Array]:
    """``feats``: backbone maps (finest first) -> pyramid maps (finest first)."""
    lat = [l(f) for l, f in zip(self.lateral, feats)]
    top = [lat[-1]]
    for x in reversed(lat[:-1]):
      top.append(x + _upsample_to(top[-1], x.shape[1:3]))
    outs = [o(x) for o, x in zip(self.output, reversed(top))]
    x = feats[-1]
    for i, conv in enumerate(self.extra):
      x = conv(x if i == 0 else nnx.relu(x))
      outs.append(x)
    return outs


@dataclasses.dataclass(frozen=True)
class LevelLayout:
  """Where each level sits in the packed canvas (static: Python ints).

  Attributes:
    canvas: ``(H, W)`` of the canvas.
    origins: ``(y, x)`` of each level's top-left pixel.
    sizes: ``(h, w)`` of each level.
  """

  canvas: tuple[int, int]
  origins: tuple[tuple[int, int], ...]
  sizes: tuple[tuple[int, int], ...]


def level_layout(sizes: Sequence[tuple[int, int]], gap: int = 1) -> LevelLayout:
  """Two-column packing: the finest level on the left, the others stacked
  top to bottom to its right, ``gap`` zero pixels between any two levels."""
  sizes = tuple((int(h), int(w)) for h, w in sizes)
  if not sizes:
    raise ValueError("level_layout needs at least one level")
  origins = [(0, 0)]
  h0, w0 = sizes[0]
  y, x, right = 0, w0 + gap, 0
  for h, w in sizes[1:]:
    origins.append((y, x))
    y += h + gap
    right = max(right, w)
  height = max(h0, y - gap) if len(sizes) > 1 else h0
  width = x + right if len(sizes) > 1 else w0
  return LevelLayout((height, width), tuple(origins), sizes)


def pack_levels(feats: Sequence[jax.Array], layout: LevelLayout) -> tuple[jax.Array, jax.Array]:
  """``[(B, h_l, w_l, C)]`` -> canvas ``(B, H, W, C)`` and mask ``(1, H, W, 1)``
  (1 on level pixels, 0 in the gaps), both in the features' dtype."""
  b, c, dt = feats[0].shape[0], feats[0].shape[-1], feats[0].dtype
  canvas = jnp.zeros((b, *layout.canvas, c), dt)
  mask = jnp.zeros((1, *layout.canvas, 1), dt)
  for f, (y, x), (h, w) in zip(feats, layout.origins, layout.sizes):
    canvas = canvas.at[:, y:y + h, x:x + w].set(f)
    mask = mask.at[:, y:y + h, x:x + w].set(1)
  return canvas, mask


def unpack_levels(canvas: jax.Array, layout: LevelLayout) -> list[jax.Array]:
  """Inverse of :func:`pack_levels`: the level crops of ``canvas``."""
  return [canvas[:, y:y + h, x:x + w] for (y, x), (h, w) in zip(layout.origins, layout.sizes)]


class Subnet(nnx.Module):
  """RetinaNet head: ``num_convs`` 3x3 conv + ReLU (``width`` channels), 3x3 output conv.

  Hidden convs: He-normal init (no normalisation layer follows them);
  output conv: normal(0.01) kernel and ``bias_init`` (the class subnet's
  prior-probability bias ``-log((1 - pi) / pi)``, RetinaNet §4.1).
  """

  def __init__(self, width: int, num_convs: int, out: int, *, bias: float = 0.0,
               dtype=None, rngs: nnx.Rngs):
    self.convs = nnx.List([_conv(width, width, 3, dtype=dtype, rngs=rngs,
                                 kernel_init=_he_fan_in) for _ in range(num_convs)])
    self.out = _conv(width, out, 3, dtype=dtype, rngs=rngs,
                     kernel_init=nnx.initializers.normal(0.01),
                     bias_init=nnx.initializers.constant(bias))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``x`` NHWC; ``mask`` (broadcastable) re-zeroes the packing gaps after each conv."""
    for conv in self.convs:
      x = nnx.relu(conv(x))
      if mask is not None:
        x = x * mask
    return self.out(x)


def check_levels(levels: Sequence[int]) -> tuple[list[int], list[int]]:
  """``(backbone levels, extra levels)`` of a pyramid; ``ValueError`` unless the
  levels are consecutive, start at 2..5 (C2..C5) and go on past 5 only from 5."""
  levels = list(levels)
  if not levels or min(levels) < 2 or min(levels) > 5:
    raise ValueError(f"levels must start at a backbone level 2..5 (C2..C5), got {levels!r}")
  if levels != list(range(levels[0], levels[0] + len(levels))):
    raise ValueError(f"levels must be consecutive, got {levels!r}")
  return [l for l in levels if l <= 5], [l for l in levels if l > 5]


class RetinaNet(nnx.Module):
  """ResNet + FPN + shared class / box subnets (Lin et al. 2017).

  Args:
    num_classes: object classes (no background class: sigmoid outputs).
    anchors: the :class:`~examples.detection.boxes.AnchorConfig` (its
      ``levels`` choose the pyramid levels; backbone stages above the
      highest backbone level are not built).
    backbone: a key of :data:`BACKBONES`.
    width: backbone stem width (stage ``i`` has ``width * 2**i * expansion``).
    in_channels: image channels.
    fpn_width: channels of the pyramid and the heads.
    head_convs: hidden convs per subnet (RetinaNet: 4).
    prior_prob: initial foreground probability of every class output.
    dtype: computation dtype (``jnp.bfloat16`` for bf16; params stay float32).
  """

  def __init__(self, *, num_classes: int, anchors: AnchorConfig = AnchorConfig(),
               backbone: str = "resnet18", width: int = 16, in_channels: int = 3,
               fpn_width: int = 32, head_convs: int = 2, prior_prob: float = 0.01,
               dtype=None, rngs: nnx.Rngs):
    if backbone not in BACKBONES:
      raise ValueError(f"unknown backbone={backbone!r}; choose from {sorted(BACKBONES)}")
    if not 0 < prior_prob < 1:
      raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob!r}")
    levels = anchors.levels
    bb_levels, extra = check_levels(levels)
    stage_sizes, block = BACKBONES[backbone]
    n_stages = bb_levels[-1] - 1          # C2 is stage 0
    self.anchor_config = anchors
    self.num_classes = num_classes
    self.backbone = models_lib.ResNet(stage_sizes[:n_stages], block, num_classes=None,
                                      width=width, in_channels=in_channels, dtype=dtype,
                                      rngs=rngs)
    self.first_stage = bb_levels[0] - 2    # index of the first used map in feature_maps
    chans = self.backbone.stage_channels[self.first_stage:]
    self.fpn = FPN(chans, fpn_width, len(extra), dtype=dtype, rngs=rngs)
    a = anchors_per_cell(anchors)
    self.num_anchors = a
    self.cls_head = Subnet(fpn_width, head_convs, a * num_classes,
                           bias=-math.log((1 - prior_prob) / prior_prob), dtype=dtype, rngs=rngs)
    self.box_head = Subnet(fpn_width, head_convs, a * 4, dtype=dtype, rngs=rngs)

  def pyramid(self, x: jax.Array) -> list[jax.Array]:
    """The FPN maps ``P_l`` (finest first), each ``(B, h_l, w_l, fpn_width)``."""
    return self.fpn(self.backbone.feature_maps(x)[self.first_stage:])

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x (B, S, S, C)`` -> ``(cls_logits (B, N, num_classes), box_deltas (B, N, 4))``
    in the computation dtype."""
    feats = self.pyramid(x)
    layout = level_layout([f.shape[1:3] for f in feats])
    canvas, mask = pack_levels(feats, layout)
    b = x.shape[0]

    def flat(out, k):
      return jnp.concatenate([o.reshape(b, -1, k) for o in unpack_levels(out, layout)], axis=1)

    return (flat(self.cls_head(canvas, mask), self.num_classes),
            flat(self.box_head(canvas, mask), 4))
