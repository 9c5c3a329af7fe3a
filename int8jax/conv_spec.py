"""Argument checking and normalisation for quantized convolutions.

Every quantized conv is reduced to one channel-last form the backends share:
input ``(N, *spatial, C)``, kernel ``(*window, C // G, O)``, output
``(N, *out_spatial, O)``, explicit ``(lo, hi)`` padding — the Flax layout
(NHWC / HWIO) with no transposes. :class:`ConvSpec` is frozen and hashable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A convolution in channel-last form (see the module doc).

  Attributes:
    lhs_shape: ``(N, *spatial, C)``.
    rhs_shape: ``(*window, C // G, O)``.
    window_strides, padding, lhs_dilation, rhs_dilation: per spatial dim;
      padding is explicit ``(lo, hi)`` pairs (may be negative, like lax).
    feature_group_count: ``G``; ``G == C`` is a depthwise conv.
    lhs_perm, rhs_perm: transposes taking the caller's layout to channel-last.
    out_perm: transpose taking the channel-last output to the caller's layout.
  """

  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  feature_group_count: int
  lhs_perm: tuple[int, ...]
  rhs_perm: tuple[int, ...]
  out_perm: tuple[int, ...]

  @property
  def nspatial(self) -> int:
    return len(self.window_strides)

  @property
  def window(self) -> tuple[int, ...]:
    return self.rhs_shape[:-2]

  @property
  def in_features(self) -> int:
    return self.lhs_shape[-1]

  @property
  def out_features(self) -> int:
    return self.rhs_shape[-1]

  @property
  def padded_spatial(self) -> tuple[int, ...]:
    """Spatial size after lhs dilation and padding."""
    out = []
    for n, d, (lo, hi) in zip(self.lhs_shape[1:-1], self.lhs_dilation, self.padding):
      out.append((n - 1) * d + 1 + lo + hi if n > 0 else lo + hi)
    return tuple(out)

  @property
  def out_spatial(self) -> tuple[int, ...]:
    out = []
    for n, k, s, rd in zip(self.padded_spatial, self.window, self.window_strides,
                           self.rhs_dilation):
      eff = (k - 1) * rd + 1
      out.append(max(0, (n - eff) // s + 1))
    return tuple(out)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return (self.lhs_shape[0], *self.out_spatial, self.out_features)

  @property
  def group_dims(self) -> tuple[int, int, int, int]:
    """``(G, prod(window), C // G, O // G)``: groups, window size, and the
    input / output features of one group."""
    g = self.feature_group_count
    return g, math.prod(self.window), self.rhs_shape[-2], self.out_features // g

  @property
  def lax_dimension_numbers(self) -> lax.ConvDimensionNumbers:
    n = self.nspatial
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1, *range(1, n + 1)),
        rhs_spec=(n + 1, n, *range(n)),
        out_spec=(0, n + 1, *range(1, n + 1)))


def _tuple(name: str, value, n: int, default: int = 1) -> tuple[int, ...]:
  if value is None:
    return (default,) * n
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (int(value),) * n
  try:
    value = tuple(value)
  except TypeError:
    raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}") from None
  if len(value) != n or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                for v in value):
    raise ValueError(f"{name} must be a sequence of {n} ints, got {value!r}")
  if any(v < 1 for v in value):
    raise ValueError(f"{name} must be positive, got {value!r}")
  return tuple(int(v) for v in value)


def make_conv_spec(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                   window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count: int = 1) -> ConvSpec:
  """Check ``lax.conv_general_dilated``-style arguments and normalise them.

  ``dimension_numbers`` follows lax: ``None`` means NCHW/OIHW like lax; Flax
  users pass ``("NHWC", "HWIO", "NHWC")`` (what :class:`int8jax.nn.QuantConv`
  does). Raises ``ValueError``/``TypeError`` naming the offending argument.
  """
  lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
  if len(lhs_shape) < 3:
    raise ValueError(f"lhs must have rank >= 3 (batch, feature, spatial...), got shape {lhs_shape}")
  if len(rhs_shape) != len(lhs_shape):
    raise ValueError(f"rhs rank {len(rhs_shape)} (shape {rhs_shape}) must equal lhs rank "
                     f"{len(lhs_shape)} (shape {lhs_shape})")
  n = len(lhs_shape) - 2
  try:
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  except (TypeError, ValueError) as e:
    raise ValueError(f"invalid dimension_numbers={dimension_numbers!r}: {e}") from None
  if (not isinstance(feature_group_count, (int, np.integer))
      or isinstance(feature_group_count, bool) or feature_group_count < 1):
    raise ValueError(f"feature_group_count must be a positive int, got {feature_group_count!r}")
  g = int(feature_group_count)
  lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
  rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  nlhs = tuple(lhs_shape[i] for i in lhs_perm)
  nrhs = tuple(rhs_shape[i] for i in rhs_perm)
  c, o = nlhs[-1], nrhs[-1]
  if c % g:
    raise ValueError(f"input features {c} must be divisible by feature_group_count={g}")
  if nrhs[-2] * g != c:
    raise ValueError(f"kernel input features {nrhs[-2]} * feature_group_count={g} must equal "
                     f"the input's features {c} (lhs shape {lhs_shape}, rhs shape {rhs_shape})")
  if o % g:
    raise ValueError(f"kernel output features {o} must be divisible by feature_group_count={g}")
  strides = _tuple("window_strides", window_strides, n)
  ld = _tuple("lhs_dilation", lhs_dilation, n)
  rd = _tuple("rhs_dilation", rhs_dilation, n)
  if isinstance(padding, str):
    if any(d != 1 for d in ld):
      raise ValueError(f"padding={padding!r} with lhs_dilation={ld}: string padding is not "
                       "defined for input-dilated (transposed) convolutions, as in "
                       "lax.conv_general_dilated; give explicit (lo, hi) pairs")
    if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError(f"padding must be 'SAME', 'SAME_LOWER', 'VALID' or (lo, hi) pairs, "
                       f"got {padding!r}")
    in_sp = [(d - 1) * l + 1 if d > 0 else 0 for d, l in zip(nlhs[1:-1], ld)]
    win = [(k - 1) * r + 1 for k, r in zip(nrhs[:-2], rd)]
    pads = tuple(tuple(int(v) for v in p)
                 for p in lax.padtype_to_pads(in_sp, win, strides, padding.upper()))
  else:
    try:
      pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
      raise ValueError(f"padding must be a string or a sequence of {n} (lo, hi) pairs, "
                       f"got {padding!r}") from None
    if len(pads) != n:
      raise ValueError(f"padding must have {n} (lo, hi) pairs, got {padding!r}")
  out_spec = dn.out_spec
  out_perm = [0] * (n + 2)
  out_perm[out_spec[0]] = 0
  out_perm[out_spec[1]] = n + 1
  for i in range(n):
    out_perm[out_spec[2 + i]] = 1 + i
  return ConvSpec(nlhs, nrhs, strides, pads, ld, rd, g, tuple(lhs_perm), tuple(rhs_perm),
                  tuple(out_perm))
