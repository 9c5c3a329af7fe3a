"""Test helper: the scalar tags of a run's TensorBoard event files."""

from examples.metrics import read_scalars


def scalar_tags(logdir) -> set[str]:
  return set(read_scalars(logdir))
