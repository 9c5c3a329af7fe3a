"""Train a small CNN on the bundled 5,000-digit MNIST subset (no download).

  python examples/mnist_flax.py --mode float32 --workdir runs/mnist_fp32
  python examples/mnist_flax.py --mode ui8 --workdir runs/mnist_ui8

Every option: ``--help`` (the options that apply to this job; all of them:
examples/config.py).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import train  # pylint: disable=wrong-import-position

DEFAULTS = dict(dataset="mnist", model="simple_cnn", width=16, batch_size=128, epochs=10,
                lr=0.1, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
                period=10, log_every=10, checkpoint_every=100, workdir="runs/mnist")

if __name__ == "__main__":
  train.main(defaults=DEFAULTS, description=__doc__.split("\n\n")[0])
