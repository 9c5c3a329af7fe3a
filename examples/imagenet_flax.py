"""Train ResNet-18/34/50 or MobileNetV2 on ImageNet (train/ val/ class folders).

  python -m examples.imagenet_flax --data-dir /data/imagenet --model resnet50 \\
      --mode ui8 --workers 8 --workdir runs/r50_ui8

The data directory holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``.
Multi-host: launch one process per host with the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables set (or under SLURM); the batch is
sharded over every device. Every option: ``--help`` (the options that apply to
this job; all of them: examples/config.py).
"""

import sys

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.imagenet_flax [ARGS]")

from examples import train  # pylint: disable=wrong-import-position

DEFAULTS = dict(dataset="imagenet", model="resnet50", image_size=224, batch_size=256,
                epochs=90, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                weight_decay=1e-4, schedule="cosine", warmup_epochs=5,
                label_smoothing=0.1, period=100, workers=8, log_every=100,
                checkpoint_every=2000, eval_every_epochs=1, workdir="runs/imagenet")

if __name__ == "__main__":
  train.main(defaults=DEFAULTS, description=__doc__.split("\n\n")[0])
