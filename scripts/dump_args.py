"""The command line every kernel dump script shares (scripts/dump_*.py, run by
scripts/compile_kernels.sh with mosaic-offline's Python): --out, --batch, --baseline and
--tool; puts the repository and the tool on sys.path and returns mosaic-offline's dump
module with the parsed arguments."""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_HERE = os.path.dirname(os.path.abspath(__file__))


def parse(baseline_help: str, batch_help: str | None = None):
  """``(args, dump)``: the parsed arguments and mosaic-offline's ``dump`` module."""
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--batch", type=int, default=256, help=batch_help)
  p.add_argument("--baseline", action="store_true", help=baseline_help)
  p.add_argument("--tool", default=os.path.join(_HERE, "..", "..", "shared", "tools",
                                                "mosaic-offline"))
  args = p.parse_args()
  sys.path.insert(0, os.path.abspath(os.path.join(_HERE, "..")))
  sys.path.insert(0, os.path.abspath(args.tool))
  import dump  # pylint: disable=import-outside-toplevel  # mosaic-offline's Writer etc.
  return args, dump
