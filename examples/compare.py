"""The README's main job: float32 vs UI8 on the bundled MNIST subset, side by side.

    python -m examples.compare                       # float32 and ui8, MNIST defaults
    python -m examples.compare --modes float32,ui8,naive --epochs 4
    python -m examples.compare --modes ui8 --model resnet20 --width 8

Runs the job of ``python -m examples.mnist_flax`` once per mode (same seed, data and
hyper-parameters; every other flag of the MNIST job is passed through, see
``python -m examples.mnist_flax --help``), each in ``<workdir>/<mode>``
(rerunning resumes an interrupted run and re-reports a finished one without
training), then prints held-out accuracy and loss per mode and writes
``<workdir>/compare.json``. Each mode's trained model is in
``<workdir>/<mode>/model`` (``examples.load_model``).
"""

import argparse
import json
import os
import sys

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.compare [ARGS]")

# pylint: disable=wrong-import-position
from int8jax import modes

from examples import mnist_flax, train
from examples.config import parse_config
# pylint: enable=wrong-import-position


def _modes(text: str) -> list[str]:
  names = [m.strip() for m in text.split(",") if m.strip()]
  bad = [m for m in names if m not in modes.MODE_NAMES]
  if not names or bad:
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected a comma-separated list of {', '.join(modes.MODE_NAMES)}")
  return names


def _cell(v, fmt: str) -> str:
  return "n/a" if v is None else format(v, fmt)


def main(argv=None) -> dict:
  train.setup_logging()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--modes", type=_modes, default="float32,ui8",
                 help=f"comma-separated modes of int8jax.modes ({', '.join(modes.MODE_NAMES)})")
  p.add_argument("--workdir", default="runs/compare", help="one sub-directory per mode")
  args, rest = p.parse_known_args(argv)
  summaries = {}
  for mode in args.modes:
    print(f"=== {mode} ===", flush=True)
    cfg = parse_config(rest + ["--mode", mode, "--workdir", os.path.join(args.workdir, mode)],
                       defaults=mnist_flax.DEFAULTS)
    summaries[mode] = train.train(cfg).summary
    if "stopped" in summaries[mode]:
      print(f"{mode}: stopped at step {summaries[mode]['step']} "
            f"({summaries[mode]['stopped']}); rerun the same command to resume", flush=True)
      raise SystemExit(train.EXIT_STOPPED if train.stopped_by_signal(summaries[mode]) else 1)
  first = summaries[args.modes[0]]
  print(f"\n{first['dataset']} ({first['eval_examples']} held-out images), model "
        f"{first['model']}, {first['steps']} steps of batch {first['batch_size']}:")
  print(f"{'mode':10s} {'test accuracy':>14s} {'test loss':>10s} {'train loss':>11s} "
        f"{'wall s':>8s}")
  for mode, s in summaries.items():
    print(f"{mode:10s} {100 * s['eval_accuracy']:13.2f}% {s['eval_loss']:10.4f} "
          f"{_cell(s.get('train_loss'), '11.4f'):>11s} {s['wall_s']:8.1f}")
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "compare.json"), "w") as f:
    json.dump(summaries, f, indent=2)
  return summaries


if __name__ == "__main__":
  main()
