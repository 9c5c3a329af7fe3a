"""Test helper: the tags of a run's TensorBoard event files (scalars and histograms)."""

from examples.metrics import event_tags


def scalar_tags(logdir) -> set[str]:
  return event_tags(logdir)
