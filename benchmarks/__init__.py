"""Speed and accuracy benchmarks of int8jax, with their recorded results (see docs/README.md)."""
