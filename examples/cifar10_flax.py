"""Train ResNet-20 / ResNet-56 / MobileNetV2 on CIFAR-10 (paper §5.1 setup).

  python -m examples.cifar10_flax --data-dir /data/cifar-10-batches-py --mode ui8 \\
      --workdir runs/cifar_r20_ui8

The paper's CIFAR-10 numbers (top-1, FP32 -> UI8): ResNet-20 92.32 -> 91.95,
MobileNetV2 94.39 -> 93.38. Every option: ``--help`` (the options that apply to
this job; all of them: examples/config.py).
"""

import sys

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.cifar10_flax [ARGS]")

from examples import train  # pylint: disable=wrong-import-position

DEFAULTS = dict(dataset="cifar10", model="resnet20", batch_size=128, epochs=200,
                optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                schedule="cosine", warmup_epochs=1, period=100, log_every=50,
                checkpoint_every=1000, workdir="runs/cifar10")

if __name__ == "__main__":
  train.main(defaults=DEFAULTS, description=__doc__.split("\n\n")[0])
