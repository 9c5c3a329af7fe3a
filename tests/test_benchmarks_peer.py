"""benchmarks/peer_cpu.py: the same ResNet-20 in PyTorch and JAX, and its CLI.

PyTorch is an optional benchmark dependency (``pip install -e .[peer]``, not
in ``dev``), so the parity tests skip where it is not installed
(``pytest.importorskip("torch")``); the CLI-error tests need no PyTorch.
"""

import jax
import pytest

from benchmarks import peer_cpu


def test_cli_argument_errors(capsys):
  for argv, match in [(["--steps", "0"], "--steps must be >= 1, got 0"),
                      (["--batch", "-1"], "--batch must be >= 1, got -1"),
                      (["--warmup", "-2"], "--warmup must be >= 0, got -2"),
                      (["--threads", "0"], "--threads must be >= 1, got 0"),
                      (["--only", "mxnet"], "invalid choice: 'mxnet'")]:
    with pytest.raises(SystemExit):
      peer_cpu.parse_args(argv)
    assert match in capsys.readouterr().err, argv


def test_missing_torch_names_the_install_command(monkeypatch, capsys):
  monkeypatch.setattr(peer_cpu, "torch_available", lambda: False)
  with pytest.raises(SystemExit):
    peer_cpu.parse_args(["--steps", "1"])
  err = capsys.readouterr().err
  assert "PyTorch is not installed" in err and "pip install -e .[peer]" in err
  assert "--only jax" in err
  assert peer_cpu.parse_args(["--only", "jax"]).only == "jax"  # no torch needed


def test_resnet20_parity_with_examples_models():
  """Same parameter count (272,474) and shapes on both sides; a mismatch
  (e.g. a missing projection shortcut) raises naming the differing shapes."""
  torch = pytest.importorskip("torch")
  tmodel, jmodel = peer_cpu.torch_resnet20(), peer_cpu.jax_model()
  assert peer_cpu.check_parity(tmodel, jmodel) == 272_474
  tmodel.blocks[3].proj = torch.nn.Conv2d(16, 32, 3, 2, bias=False)  # 1x1 -> 3x3
  with pytest.raises(AssertionError, match=r"only in PyTorch \[\(3, 3, 16, 32\)\]"):
    peer_cpu.check_parity(tmodel, jmodel)


def test_one_step_each_side_tiny_batch():
  """One training step of each variant at batch 2 runs and gives a finite loss
  (the JAX side through benchmarks/step_time.py's build)."""
  pytest.importorskip("torch")
  steppers = {v: peer_cpu.torch_stepper(v, 2) for v in peer_cpu.TORCH_VARIANTS}
  steppers["jax float32"] = peer_cpu.jax_stepper("float32", 2)
  timed = peer_cpu.time_interleaved(steppers, warmup=0, steps=1)
  for k, (med, lo, hi, loss) in timed.items():
    assert lo <= med <= hi and jax.numpy.isfinite(loss), (k, loss)
