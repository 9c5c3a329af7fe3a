"""Runnable INT8-training examples for int8jax (models, data, training loop).

Run a job from the repository root, e.g. ``python examples/mnist_flax.py --help``
or ``python -m examples.mnist_flax``. See docs/examples.md.
"""
