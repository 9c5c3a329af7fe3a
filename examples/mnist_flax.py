"""Train a small CNN on the bundled 5,000-digit MNIST subset (no download).

  python -m examples.mnist_flax --mode float32 --workdir runs/mnist_fp32
  python -m examples.mnist_flax --mode ui8 --workdir runs/mnist_ui8

Every option: ``--help`` (the options that apply to this job; all of them:
examples/config.py).
"""

import sys

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.mnist_flax [ARGS]")

from examples import train  # pylint: disable=wrong-import-position

DEFAULTS = dict(dataset="mnist", model="simple_cnn", width=16, batch_size=128, epochs=10,
                lr=0.1, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
                period=10, log_every=10, checkpoint_every=100, workdir="runs/mnist")

if __name__ == "__main__":
  train.main(defaults=DEFAULTS, description=__doc__.split("\n\n")[0])
