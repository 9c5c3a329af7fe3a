"""Write the model of a run's training checkpoint as a model checkpoint (for inference).

    python -m examples.export_model runs/mnist              # latest checkpoint -> runs/mnist/model
    python -m examples.export_model runs/mnist --step 200 --out /tmp/mnist_step200
    python -m examples.export_model runs/mnist --serving runs/mnist/serving   # int8 program

A finished run writes ``<workdir>/model`` itself; this is for any other
checkpoint (a run still training, or an earlier step). Load the result with
``examples.load_model(path)``.

``--serving OUT`` also writes the model as an int8 inference program for
plain JAX (``OUT/model.jaxexport`` + ``OUT/signature.json``, see
:mod:`examples.serving`): from ``WORKDIR/model`` when it exists and neither
``--step`` nor ``--out`` is given, else from the model checkpoint written first.
"""

import argparse
import os
import sys

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.export_model [ARGS]")

from examples import checkpoint  # pylint: disable=wrong-import-position


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir", help="the run's --workdir (with checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out", default=None, help="where to write (default: WORKDIR/model)")
  p.add_argument("--serving", default=None, metavar="OUT",
                 help="also write the int8 inference program (OUT/model.jaxexport, "
                      "OUT/signature.json) that plain JAX runs")
  args = p.parse_args(argv)
  try:
    if (args.serving and args.step is None and args.out is None
        and os.path.isdir(os.path.join(args.workdir, checkpoint.MODEL_DIR))):
      path = os.path.join(args.workdir, checkpoint.MODEL_DIR)
    else:
      path = checkpoint.export_model(args.workdir, args.step, args.out)
      print(f"model written to {path}")
    if args.serving:
      from examples import serving  # pylint: disable=import-outside-toplevel
      sig = serving.write_serving(path, args.serving)
      print(f"int8 serving program written to {args.serving} ({sig['program_bytes']} bytes, "
            f"{sig['int8_layers']} int8 layers, {sig['float_layers']} float layers)")
  except (FileNotFoundError, ValueError, NotImplementedError) as e:
    p.error(str(e))
  return path


if __name__ == "__main__":
  main()
