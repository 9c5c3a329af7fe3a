"""Independent int64 numpy references for the quantized GEMMs (tests only).

Written from the definition of a convolution (loops over window offsets on a
dilated, padded input), not from the library's code paths.
"""

import itertools

import numpy as np


def _positions(n, lo, ld):
  return lo + np.arange(n) * ld


def _index_maps(spec):
  """Per spatial dim: (indices into x, positions in the dilated, padded input)."""
  xs, ps = [], []
  for n, (lo, _), ld, size in zip(spec.lhs_shape[1:-1], spec.padding, spec.lhs_dilation,
                                  spec.padded_spatial):
    pos = _positions(n, lo, ld)
    keep = (pos >= 0) & (pos < size)
    xs.append(np.nonzero(keep)[0])
    ps.append(pos[keep])
  return (slice(None), *np.ix_(*xs), slice(None)), (slice(None), *np.ix_(*ps), slice(None))


def pad_input(x, spec):
  """Dilate by lhs_dilation and pad (lo, hi); negative padding crops."""
  x = np.asarray(x, np.int64)
  out = np.zeros((x.shape[0], *spec.padded_spatial, x.shape[-1]), np.int64)
  xi, pi = _index_maps(spec)
  out[pi] = x[xi]
  return out


def unpad_input(dxp, spec):
  """Transpose of pad_input."""
  out = np.zeros(spec.lhs_shape, np.int64)
  xi, pi = _index_maps(spec)
  out[xi] = dxp[pi]
  return out


def _window_slices(spec, offs):
  sl = []
  for o, d, m, s in zip(offs, spec.rhs_dilation, spec.out_spatial, spec.window_strides):
    sl.append(slice(o * d, o * d + (m - 1) * s + 1, s))
  return tuple(sl)


def conv(xq, wq, spec):
  """int64 forward conv in channel-last form."""
  g = spec.feature_group_count
  xp = pad_input(xq, spec)
  w = np.asarray(wq, np.int64)
  cg, o = w.shape[-2], w.shape[-1]
  og = o // g
  out = np.zeros(spec.out_shape, np.int64)
  for offs in itertools.product(*[range(k) for k in spec.window]):
    xs = xp[(slice(None), *_window_slices(spec, offs), slice(None))]
    for gi in range(g):
      out[..., gi * og:(gi + 1) * og] += (
          xs[..., gi * cg:(gi + 1) * cg] @ w[offs][:, gi * og:(gi + 1) * og])
  return out


def conv_dgrad(gq, wq, spec):
  g = spec.feature_group_count
  w = np.asarray(wq, np.int64)
  gg = np.asarray(gq, np.int64)
  cg, o = w.shape[-2], w.shape[-1]
  og = o // g
  dxp = np.zeros((spec.lhs_shape[0], *spec.padded_spatial, spec.lhs_shape[-1]), np.int64)
  for offs in itertools.product(*[range(k) for k in spec.window]):
    idx = (slice(None), *_window_slices(spec, offs))
    for gi in range(g):
      dxp[idx + (slice(gi * cg, (gi + 1) * cg),)] += (
          gg[..., gi * og:(gi + 1) * og] @ w[offs][:, gi * og:(gi + 1) * og].T)
  return unpad_input(dxp, spec)


def conv_wgrad(xq, gq, spec):
  g = spec.feature_group_count
  xp = pad_input(xq, spec)
  gg = np.asarray(gq, np.int64)
  cg, o = spec.rhs_shape[-2], spec.rhs_shape[-1]
  og = o // g
  dw = np.zeros(spec.rhs_shape, np.int64)
  n_out = int(np.prod(spec.out_shape[:-1]))
  for offs in itertools.product(*[range(k) for k in spec.window]):
    xs = xp[(slice(None), *_window_slices(spec, offs), slice(None))].reshape(n_out, -1)
    g2 = gg.reshape(n_out, -1)
    for gi in range(g):
      dw[offs][:, gi * og:(gi + 1) * og] = (
          xs[:, gi * cg:(gi + 1) * cg].T @ g2[:, gi * og:(gi + 1) * og])
  return dw


#: The GPU cases of the direct-addressing kernels' tests (tests/test_conv_direct*.py):
#: name -> (x shape, kernel shape, padding); a name ending in "_s2" runs at stride 2.
DIRECT_GPU_CASES = {
    "conv2_3x3": ((8, 56, 56, 64), (3, 3, 64, 64), "SAME"),
    "conv3_3x3_s2": ((8, 56, 56, 128), (3, 3, 128, 128), "SAME"),
    "conv5_3x3": ((8, 7, 7, 512), (3, 3, 512, 512), "SAME"),
    "ragged": ((3, 9, 13, 24), (3, 3, 24, 40), ((2, 0), (1, 3))),
    "1x1": ((4, 14, 14, 256), (1, 1, 256, 64), "VALID"),
}


def saturated_int8(shape, seed):
  """Random int8 in [-127, 127] (a jax array) with a run of saturated +127 rows."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  a = rng.integers(-127, 128, shape).astype(np.int8)
  flat = a.reshape(-1, shape[-1])
  flat[: max(1, len(flat) // 5)] = 127
  return jnp.asarray(a)


def kernel_int8_operands(fn, *args):
  """On the traced ``fn(*args)``: (the int8 operand shapes of every Mosaic GPU kernel launch,
  ``(primitive name, shape)`` of every other int8 array the computation makes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.extend  # pylint: disable=g-import-not-at-top
  closed = jax.make_jaxpr(fn)(*args)
  operands, made = [], []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "custom_vmap_call":  # a kernel launch (interpret mode)
        operands.extend(v.aval.shape for v in eqn.invars if v.aval.dtype == np.int8)
        continue
      made.extend((eqn.primitive.name, v.aval.shape) for v in eqn.outvars
                  if v.aval.dtype == np.int8)
      for param in eqn.params.values():
        if isinstance(param, jax.extend.core.ClosedJaxpr):
          walk(param.jaxpr)
        elif isinstance(param, jax.extend.core.Jaxpr):
          walk(param)
  walk(closed.jaxpr)
  return operands, made
