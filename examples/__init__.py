"""Runnable INT8-training examples for int8jax (models, data, the shared training loop).

Run a job as a module from the repository root, e.g. ``python -m examples.mnist_flax
--help`` or ``python -m examples.compare``. See docs/examples.md.

A trained model, in a fresh process::

    import examples
    model = examples.load_model("runs/mnist")   # a run's workdir or its model/ directory
    info = examples.model_info("runs/mnist")    # its config, task, step and summary
"""

from examples.checkpoint import export_model, load_model, model_info

__all__ = ["load_model", "model_info", "export_model"]
