"""Write the model of a run's training checkpoint as a model checkpoint (for inference).

    python examples/export_model.py runs/mnist              # latest checkpoint -> runs/mnist/model
    python examples/export_model.py runs/mnist --step 200 --out /tmp/mnist_step200

A finished run writes ``<workdir>/model`` itself; this is for any other
checkpoint (a run still training, or an earlier step). Load the result with
``examples.load_model(path)``.
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import checkpoint  # pylint: disable=wrong-import-position


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir", help="the run's --workdir (with checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out", default=None, help="where to write (default: WORKDIR/model)")
  args = p.parse_args(argv)
  try:
    path = checkpoint.export_model(args.workdir, args.step, args.out)
  except (FileNotFoundError, ValueError) as e:
    p.error(str(e))
  print(f"model written to {path}")
  return path


if __name__ == "__main__":
  main()
