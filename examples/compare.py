"""The README's main job: float32 vs UI8 on the bundled MNIST subset, side by side.

    python examples/compare.py                       # float32 and ui8, MNIST defaults
    python examples/compare.py --modes float32,ui8,naive --epochs 4
    python examples/compare.py --modes ui8 --model resnet20 --width 8

Runs examples/mnist_flax.py's job once per mode (same seed, data and
hyper-parameters; every other flag of ``examples/train.py`` is passed
through, see ``python examples/mnist_flax.py --help``), each in
``<workdir>/<mode>`` (rerunning resumes or re-reports a finished run), then
prints held-out accuracy and loss per mode and writes
``<workdir>/compare.json``.
"""

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import mnist_flax, train  # pylint: disable=wrong-import-position


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--modes", default="float32,ui8",
                 help="comma-separated modes of examples/train.py (default: float32,ui8)")
  p.add_argument("--workdir", default="runs/compare", help="one sub-directory per mode")
  args, rest = p.parse_known_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if not modes:
    p.error(f"--modes needs at least one mode, got {args.modes!r}")
  summaries = {}
  for mode in modes:
    print(f"=== {mode} ===", flush=True)
    cfg = train.parse_config(rest + ["--mode", mode, "--workdir", os.path.join(args.workdir, mode)],
                             defaults=mnist_flax.DEFAULTS)
    summaries[mode] = train.train(cfg).summary
  first = summaries[modes[0]]
  print(f"\n{first['dataset']} ({first['eval_examples']} held-out images), model "
        f"{first['model']}, {first['steps']} steps of batch {first['batch_size']}:")
  print(f"{'mode':10s} {'test accuracy':>14s} {'test loss':>10s} {'train loss':>11s} {'wall s':>8s}")
  for mode, s in summaries.items():
    print(f"{mode:10s} {100 * s['eval_accuracy']:13.2f}% {s['eval_loss']:10.4f} "
          f"{s['train_loss']:11.4f} {s['wall_s']:8.1f}")
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "compare.json"), "w") as f:
    json.dump(summaries, f, indent=2)
  return summaries


if __name__ == "__main__":
  main()
