"""CNNs for the int8jax examples, written with plain Flax NNX layers.

Every model is built from ``nnx.Conv`` / ``nnx.Linear`` / ``nnx.BatchNorm``
only; INT8 training is switched on afterwards with
``int8jax.nn.quantize_model(model, config, rngs=...)``, which swaps the
convolutions and dense layers for their quantized versions in place (keeping
the first convolution and the classifier in float, as in Zhu et al. 2020).

Layouts: inputs are NHWC float arrays, outputs are ``(N, num_classes)`` logits.
Layers are defined in the order they run, so "first conv" and "last linear" in
definition order are the stem and the classifier.

Models:
  * ``ResNet`` -- ImageNet ResNet-18/34/50 (He et al. 2016), ``resnet18`` ...
  * ``CifarResNet`` -- CIFAR ResNet-20/56 (3 stages, 16/32/64 channels).
  * ``MobileNetV2`` -- Sandler et al. 2018; ``cifar=True`` uses the usual
    CIFAR strides (stem stride 1, first two downsamplings removed).
    Depthwise convolutions use ``feature_group_count``.
  * ``VGGSmall`` -- the 6-conv "VGG-small" of the quantization literature.
  * ``SimpleCNN`` -- three conv stages; quick MNIST runs and tests.
  * ``resnet1d`` / ``mobilenet1d`` -- the CIFAR ResNet and MobileNetV2 over
    sequences (``ndim=1``: NLC inputs, e.g. MNIST-1D), used by
    ``benchmarks/accuracy.py``.

``width`` scales every channel count (``width=64`` is the standard ResNet; tests
use 4-8) and ``dtype`` sets the computation dtype (``jnp.bfloat16`` for the
bf16 mode; parameters stay float32). ``ndim`` (CIFAR ResNet, MobileNetV2) is
the number of spatial dimensions (2: NHWC images, 1: NLC sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

from flax import nnx
import jax
import jax.numpy as jnp

__all__ = [
    "ResNet", "CifarResNet", "MobileNetV2", "VGGSmall", "SimpleCNN",
    "resnet18", "resnet34", "resnet50", "resnet20", "resnet56",
    "mobilenet_v2", "vgg_small", "simple_cnn", "resnet1d", "mobilenet1d", "MODELS",
    "create_model",
]

_he_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, k, stride=1, *, groups=1, dtype, rngs, padding=None, ndim=2):
  pad = padding if padding is not None else [(k // 2, k // 2)] * ndim
  return nnx.Conv(cin, cout, (k,) * ndim, (stride,) * ndim, padding=pad,
                  feature_group_count=groups, use_bias=False, dtype=dtype,
                  kernel_init=_he_init, rngs=rngs)


def _bn(c, *, dtype, rngs, zero=False):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs,
                       scale_init=(nnx.initializers.zeros if zero
                                   else nnx.initializers.ones))


def _projection(cin, cout, stride, *, dtype, rngs, ndim=2):
  """1x1 conv + BN shortcut when the block changes shape, else (None, None)."""
  if stride == 1 and cin == cout:
    return None, None
  return (_conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs, padding="VALID", ndim=ndim),
          _bn(cout, dtype=dtype, rngs=rngs))


class BasicBlock(nnx.Module):
  """Two 3x3 convs with a residual (ResNet-18/34, CIFAR ResNets)."""
  expansion = 1

  def __init__(self, cin, cout, stride, *, dtype, rngs, ndim=2):
    self.conv1 = _conv(cin, cout, 3, stride, dtype=dtype, rngs=rngs, ndim=ndim)
    self.bn1 = _bn(cout, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs, ndim=ndim)
    self.bn2 = _bn(cout, dtype=dtype, rngs=rngs, zero=True)
    self.proj, self.proj_bn = _projection(cin, cout, stride, dtype=dtype, rngs=rngs, ndim=ndim)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    sc = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(y + sc)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 -> 1x1 (x4) residual block (ResNet-50, stride on the 3x3)."""
  expansion = 4

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    mid = cout // 4
    self.conv1 = _conv(cin, mid, 1, dtype=dtype, rngs=rngs, padding="VALID")
    self.bn1 = _bn(mid, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(mid, mid, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(mid, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(mid, cout, 1, dtype=dtype, rngs=rngs, padding="VALID")
    self.bn3 = _bn(cout, dtype=dtype, rngs=rngs, zero=True)
    self.proj, self.proj_bn = _projection(cin, cout, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    sc = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(y + sc)


class ResNet(nnx.Module):
  """ImageNet-style ResNet: 7x7/2 stem + 3x3/2 max-pool, 4 stages, GAP, FC.

  Args:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: ``BasicBlock`` or ``Bottleneck``.
    num_classes: classifier outputs; ``None`` builds no classifier (a
      backbone: use :meth:`feature_maps`, e.g. for detection).
    width: channels of the stem (64 in the paper); stage ``i`` has
      ``width * 2**i * block.expansion`` output channels.
    in_channels: input channels (3 for RGB).
    small_input: use a 3x3/1 stem without max-pool (for tiny test images).
  """

  def __init__(self, stage_sizes: Sequence[int], block=BasicBlock, *,
               num_classes=1000, width=64, in_channels=3, small_input=False,
               dtype=None, rngs: nnx.Rngs):
    self.small_input = small_input
    if small_input:
      self.stem = _conv(in_channels, width, 3, 1, dtype=dtype, rngs=rngs)
    else:
      self.stem = _conv(in_channels, width, 7, 2, dtype=dtype, rngs=rngs)
    self.stem_bn = _bn(width, dtype=dtype, rngs=rngs)
    blocks, cin, ends, chans = [], width, [], []
    for i, n in enumerate(stage_sizes):
      cout = width * 2**i * block.expansion
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(cin, cout, stride, dtype=dtype, rngs=rngs))
        cin = cout
      ends.append(len(blocks) - 1)
      chans.append(cout)
    self.blocks = nnx.List(blocks)
    #: index in ``blocks`` of each stage's last block, and each stage's channels.
    self.stage_ends = tuple(ends)
    self.stage_channels = tuple(chans)
    self.head = (nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)
                 if num_classes is not None else None)

  def feature_maps(self, x) -> list[jax.Array]:
    """The output of every stage, NHWC: ``[C2, C3, C4, C5]`` for 4 stages.

    With the standard stem, stage ``i`` (0-based) has stride ``2**(i + 2)``
    (C2 at 1/4 of the input, C5 at 1/32) and ``stage_channels[i]`` channels;
    ``small_input`` divides every stride by 4. Spatial sizes round up
    (SAME padding): a 64x64 input gives 16, 8, 4, 2.
    """
    x = nnx.relu(self.stem_bn(self.stem(x)))
    if not self.small_input:
      x = nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    feats = []
    for i, b in enumerate(self.blocks):
      x = b(x)
      if i in self.stage_ends:
        feats.append(x)
    return feats

  def __call__(self, x):
    if self.head is None:
      raise ValueError("this ResNet was built with num_classes=None (a backbone); "
                       "call feature_maps(x)")
    x = self.feature_maps(x)[-1]
    return self.head(jnp.mean(x, axis=(1, 2)))


def _global_pool(x):
  """Mean over the spatial axes (all but batch and channels)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class CifarResNet(nnx.Module):
  """CIFAR ResNet-(6n+2): 3x3 stem, 3 stages of n basic blocks, GAP, FC.

  ``stem_kernel`` and ``ndim`` (spatial dimensions) give the 1-D variant
  (:func:`resnet1d`).
  """

  def __init__(self, depth=20, *, num_classes=10, width=16, in_channels=3,
               stem_kernel=3, ndim=2, dtype=None, rngs: nnx.Rngs):
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth=}")
    n = (depth - 2) // 6
    self.stem = _conv(in_channels, width, stem_kernel, dtype=dtype, rngs=rngs, ndim=ndim)
    self.stem_bn = _bn(width, dtype=dtype, rngs=rngs)
    blocks, cin = [], width
    for i in range(3):
      cout = width * 2**i
      for j in range(n):
        blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1,
                                 dtype=dtype, rngs=rngs, ndim=ndim))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for b in self.blocks:
      x = b(x)
    return self.head(_global_pool(x))


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear project."""

  def __init__(self, cin, cout, stride, expand, *, dtype, rngs, ndim=2):
    hid = cin * expand
    self.expand = expand
    if expand != 1:
      self.pw = _conv(cin, hid, 1, dtype=dtype, rngs=rngs, padding="VALID", ndim=ndim)
      self.pw_bn = _bn(hid, dtype=dtype, rngs=rngs)
    else:
      self.pw = self.pw_bn = None
    self.dw = _conv(hid, hid, 3, stride, groups=hid, dtype=dtype, rngs=rngs, ndim=ndim)
    self.dw_bn = _bn(hid, dtype=dtype, rngs=rngs)
    self.pl = _conv(hid, cout, 1, dtype=dtype, rngs=rngs, padding="VALID", ndim=ndim)
    self.pl_bn = _bn(cout, dtype=dtype, rngs=rngs)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x):
    y = x
    if self.pw is not None:
      y = nnx.relu6(self.pw_bn(self.pw(y)))
    y = nnx.relu6(self.dw_bn(self.dw(y)))
    y = self.pl_bn(self.pl(y))
    return x + y if self.residual else y


def _round_ch(c, divisor=8):
  return max(divisor, int(c + divisor / 2) // divisor * divisor)


class MobileNetV2(nnx.Module):
  """MobileNetV2 (ImageNet, or CIFAR strides with ``cifar=True``).

  ``width_mult`` scales the channel table; ``divisor`` (default 8) is the
  rounding divisor, so tiny test models stay valid. ``stem_channels``,
  ``stem_kernel``, ``stem_stride`` and ``ndim`` (spatial dimensions) give the
  1-D variant (:func:`mobilenet1d`).
  """

  # (expansion t, channels c, repeats n, stride s) from Sandler et al. Table 2.
  CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

  def __init__(self, *, num_classes=1000, width_mult=1.0, cifar=False,
               in_channels=3, config=None, divisor=8, last_channels=None,
               stem_channels=None, stem_kernel=3, stem_stride=None, ndim=2,
               dtype=None, rngs: nnx.Rngs):
    config = config or self.CONFIG
    rc = functools.partial(_round_ch, divisor=divisor)
    cin = rc(32 * width_mult if stem_channels is None else stem_channels)
    stride = (1 if cifar else 2) if stem_stride is None else stem_stride
    self.stem = _conv(in_channels, cin, stem_kernel, stride, dtype=dtype, rngs=rngs, ndim=ndim)
    self.stem_bn = _bn(cin, dtype=dtype, rngs=rngs)
    blocks = []
    for k, (t, c, n, s) in enumerate(config):
      if cifar and k in (1, 2):  # CIFAR: keep resolution in the first stages
        s = 1
      cout = rc(c * width_mult)
      for j in range(n):
        blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, t,
                                       dtype=dtype, rngs=rngs, ndim=ndim))
        cin = cout
    self.blocks = nnx.List(blocks)
    last = last_channels or rc(1280 * max(1.0, width_mult))
    self.last = _conv(cin, last, 1, dtype=dtype, rngs=rngs, padding="VALID", ndim=ndim)
    self.last_bn = _bn(last, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(last, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu6(self.stem_bn(self.stem(x)))
    for b in self.blocks:
      x = b(x)
    x = nnx.relu6(self.last_bn(self.last(x)))
    return self.head(_global_pool(x))


class _PlainCNN(nnx.Module):
  """conv-BN-ReLU layers with 2x2 max-pools after the given layers, GAP, FC."""

  def __init__(self, chans, pool_after, *, num_classes, in_channels, dtype, rngs: nnx.Rngs):
    convs, bns, cin = [], [], in_channels
    for c in chans:
      convs.append(_conv(cin, c, 3, dtype=dtype, rngs=rngs))
      bns.append(_bn(c, dtype=dtype, rngs=rngs))
      cin = c
    self.pool_after = tuple(pool_after)
    self.convs = nnx.List(convs)
    self.bns = nnx.List(bns)
    self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = nnx.relu(bn(conv(x)))
      if i in self.pool_after:
        x = nnx.max_pool(x, (2, 2), (2, 2))
    return self.head(jnp.mean(x, axis=(1, 2)))


class VGGSmall(_PlainCNN):
  """VGG-small: (2C)-MP-(4C)x2-MP-(8C)x2-MP, FC (C = width, 64 -> 128/256/512)."""

  def __init__(self, *, num_classes=10, width=64, in_channels=3, dtype=None,
               rngs: nnx.Rngs):
    super().__init__([2 * width, 2 * width, 4 * width, 4 * width, 8 * width, 8 * width],
                     (1, 3, 5), num_classes=num_classes, in_channels=in_channels,
                     dtype=dtype, rngs=rngs)


class SimpleCNN(_PlainCNN):
  """Three conv-BN-ReLU stages (C, 2C, 4C; 2x2 max-pool after the first two), GAP, FC.

  A quick model for MNIST and for tests (compiles in seconds).
  """

  def __init__(self, *, num_classes=10, width=16, in_channels=1, dtype=None,
               rngs: nnx.Rngs):
    super().__init__([width, 2 * width, 4 * width], (0, 1), num_classes=num_classes,
                     in_channels=in_channels, dtype=dtype, rngs=rngs)


def resnet18(**kw): return ResNet((2, 2, 2, 2), BasicBlock, **kw)
def resnet34(**kw): return ResNet((3, 4, 6, 3), BasicBlock, **kw)
def resnet50(**kw): return ResNet((3, 4, 6, 3), Bottleneck, **kw)
def resnet20(**kw): return CifarResNet(20, **kw)
def resnet56(**kw): return CifarResNet(56, **kw)
def mobilenet_v2(**kw): return MobileNetV2(**kw)
def mobilenet_v2_cifar(**kw): return MobileNetV2(cifar=True, **kw)
def vgg_small(**kw): return VGGSmall(**kw)
def simple_cnn(**kw): return SimpleCNN(**kw)


def resnet1d(*, n=1, width=16, num_classes=10, in_channels=1, dtype=None, rngs):
  """1-D CIFAR-style ResNet: k=5 stem, 3 stages (w, 2w, 4w) of ``n`` basic blocks (NLC)."""
  return CifarResNet(6 * n + 2, width=width, num_classes=num_classes, in_channels=in_channels,
                     stem_kernel=5, ndim=1, dtype=dtype, rngs=rngs)


def mobilenet1d(*, config, stem=16, last=64, num_classes=10, in_channels=1, dtype=None, rngs):
  """1-D MobileNetV2: k=5 stem, inverted residuals ``(t, c, n, s)`` (channels as given),
  1x1 conv to ``last`` channels, GAP, FC (NLC inputs)."""
  return MobileNetV2(config=config, width_mult=1.0, divisor=1, stem_channels=stem,
                     stem_kernel=5, stem_stride=1, last_channels=last, num_classes=num_classes,
                     in_channels=in_channels, ndim=1, dtype=dtype, rngs=rngs)


def _width_kw(name: str, width: int | None) -> dict:
  """Maps the generic ``width`` option onto each family's own argument."""
  if width is None:
    return {}
  if name.startswith("mobilenet"):
    kw = {"width_mult": width / 32.0, "divisor": 4 if width < 32 else 8}
    if width < 32:  # tiny test models: scale the 1280-wide last conv too
      kw["last_channels"] = 40 * width
    return kw
  return {"width": width}


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
    "resnet20": resnet20, "resnet56": resnet56,
    "mobilenet_v2": mobilenet_v2, "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "vgg_small": vgg_small, "simple_cnn": simple_cnn,
}


def create_model(name: str, *, num_classes: int, in_channels: int = 3,
                 width: int | None = None, small_input: bool = False,
                 dtype=None, rngs: nnx.Rngs) -> nnx.Module:
  """Builds a model from ``MODELS`` by name.

  ``width`` is the stem width (ResNets/VGG) or, for MobileNetV2, the stem
  channels out of 32 (so ``width=8`` is ``width_mult=0.25``). ``small_input``
  selects a 3x3/1 stem without max-pool for the ImageNet ResNets, useful for
  tiny images.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name=}; choose from {sorted(MODELS)}")
  kw = dict(num_classes=num_classes, in_channels=in_channels, dtype=dtype,
            rngs=rngs, **_width_kw(name, width))
  if name.startswith("resnet") and name in ("resnet18", "resnet34", "resnet50"):
    kw["small_input"] = small_input
  return MODELS[name](**kw)
