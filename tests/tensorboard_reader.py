"""Test helper: scalar tags of tensorboardX event files (no TensorFlow needed)."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def scalar_tags(logdir) -> set[str]:
  tags = set()
  for path in glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*")):
    with open(path, "rb") as f:
      buf = f.read()
    pos = 0
    while pos + 12 <= len(buf):
      (length,) = struct.unpack("<Q", buf[pos:pos + 8])
      payload = buf[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      ev = event_pb2.Event()
      ev.ParseFromString(payload)
      for v in ev.summary.value:
        tags.add(v.tag)
  return tags
