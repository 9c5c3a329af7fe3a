"""What a run needs from its process: log output, stop signals and the exit status.

* :func:`setup_logging` -- the examples' INFO messages and every warning on
  stderr, formatted.
* :class:`StopSignals` -- SIGTERM / SIGINT (Ctrl-C) noted, so that the loop
  stops at the next step boundary with a checkpoint; a second Ctrl-C
  interrupts at once.
* :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``: "temporary failure, run again")
  -- the entry points' exit status after such a stop, which a scheduler can
  requeue on (rerunning resumes); :func:`stopped_by_signal` tells it from a
  summary.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "STOP_CODES", "StopSignals", "setup_logging",
           "stopped_by_signal"]

#: Exit status of an entry point stopped by SIGTERM / SIGINT after saving
#: (sysexits ``EX_TEMPFAIL``): rerun the same command to resume.
EXIT_STOPPED = 75
STOP_SIGNALS = ("SIGTERM", "SIGINT")
#: What a process votes each step (examples.distributed.AnyProcess): the largest wins.
STOP_CODES = {None: 0, "SIGINT": 1, "SIGTERM": 2}
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
  """A handler writing to the current ``sys.stderr`` (tests and notebooks replace it)."""

  def __init__(self):
    super().__init__()
    self.setFormatter(logging.Formatter(_LOG_FORMAT))

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def setup_logging(level: int = logging.INFO) -> None:
  """Shows the examples' messages (INFO and up) and every warning on stderr, formatted.

  absl runs ``logging.basicConfig()`` when orbax logs at import time, which
  leaves the root logger a bare handler: then ``basicConfig`` here would do
  nothing and INFO messages would be dropped. That bare handler is replaced;
  handlers someone configured are kept. The ``examples`` logger's level is set
  unless it was set already.
  """
  root = logging.getLogger()
  for h in list(root.handlers):
    if (type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)
        and getattr(h.formatter, "_fmt", None) in (None, logging.BASIC_FORMAT)):
      root.removeHandler(h)
  if not root.handlers:
    root.addHandler(_StderrHandler())
  examples_log = logging.getLogger("examples")
  if examples_log.level == logging.NOTSET:
    examples_log.setLevel(level)


class StopSignals:
  """Notes SIGTERM / SIGINT; the loop stops at the next step boundary."""

  def __init__(self):
    self.received: str | None = None
    self._old = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: now
    self.received = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for name in STOP_SIGNALS:
        sig = getattr(signal, name)
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def stopped_by_signal(summary: dict) -> bool:
  """Whether a run was stopped by SIGTERM / SIGINT (its entry point exits 75)."""
  return summary.get("stopped") in STOP_SIGNALS
