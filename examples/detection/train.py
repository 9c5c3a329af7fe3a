"""Train and evaluate the RetinaNet example: float32 / bf16 / UI8 and the ablations.

    python -m examples.detection.make_dataset --out data/mnist_det
    python -m examples.detection.train --data-dir data/mnist_det --mode ui8 \\
        --workdir runs/det_ui8
    python -m examples.detection.train --help      # every option

The job is :class:`examples.detection.task.DetectionTask` on the shared loop
(:func:`examples.train.train`), the one every example uses: progress (tqdm),
a ``SUMMARY ...`` line and ``<workdir>/summary.json`` (COCO ``eval_mAP`` =
AP@[.5:.95], ``eval_mAP50``, ``quant_layers``: per-layer cosine distances),
TensorBoard events in ``<workdir>/tensorboard``, Orbax checkpoints in
``<workdir>/checkpoints`` (rerunning the same command resumes and sees the
same batches; a finished run is re-reported) and the trained model in
``<workdir>/model`` (``examples.load_model(workdir)``). A run stopped by
SIGTERM / SIGINT saves a checkpoint and exits with status 75.
"""

from __future__ import annotations

import sys

if not __package__:  # run as a file: the `examples` package is not importable
  sys.exit("run it from the repository root as: python -m examples.detection.train [ARGS]")

# pylint: disable=wrong-import-position
from examples import train as train_lib
from examples.config import parse_config
from examples.detection.task import DetectionConfig, DetectionTask
# pylint: enable=wrong-import-position

__all__ = ["run", "main"]


def run(cfg: DetectionConfig) -> train_lib.Result:
  """Trains, resumes or re-reports the detection job ``cfg`` (the shared loop)."""
  return train_lib.train(cfg, DetectionTask())


def main(argv=None) -> dict:
  """Parse flags, run the detection job, return the summary (exit 75 when stopped)."""
  train_lib.setup_logging()
  cfg = parse_config(argv, description=__doc__.split("\n\n")[0], config_cls=DetectionConfig)
  summary = run(cfg).summary
  if train_lib.stopped_by_signal(summary):
    raise SystemExit(train_lib.EXIT_STOPPED)
  return summary


if __name__ == "__main__":
  main()
