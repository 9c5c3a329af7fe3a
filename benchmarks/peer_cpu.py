"""CPU training step of ResNet-20 in int8jax against PyTorch, the framework users compare with.

    pip install -e .[peer]                       # PyTorch: an optional benchmark dependency
    .venv/bin/python benchmarks/peer_cpu.py      # both; appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/peer_cpu.py --only jax --steps 10 --out ""

The same model on both sides: the CIFAR ResNet-20 of ``examples/models.py``
(3x3 stem 3->16, three stages of three basic blocks at 16/32/64 channels,
1x1 conv + BN projection shortcuts where the shape changes, BatchNorm with
eps 1e-5 and momentum 0.9 (PyTorch's 0.1), bias-free convs, GAP, a 64->10
linear layer with bias). :func:`torch_resnet20` rebuilds it in PyTorch and
:func:`check_parity` asserts that both have the same parameter count and the
same parameter shapes in the same order.

Training step: SGD with momentum 0.9 (lr 0.05), cross-entropy, on one
random batch (``--batch``, default 128, 32x32x3, 10 classes), repeated.
Variants:

* PyTorch: float32 NCHW (contiguous), float32 ``channels_last``, and bf16
  ``torch.autocast("cpu")`` with ``channels_last`` (oneDNN);
  ``torch.set_num_threads(--threads)``.
* JAX: float32 and UI8's non-measuring step (``"ui8 never"``) -- the steps
  of ``benchmarks/step_time.py`` (``step_time.build``: compiled once, ranges
  and clips seeded, XLA backend on the CPU), timed by its ``time_steps``.
  XLA:CPU uses its default intra-op thread pool (all cores).

Timing: ``--warmup`` untimed steps, then the median (and min / max) of
``--steps`` steps, the variants interleaved round by round (one step of each
per round, so a changing machine load hits all alike), each synchronised
(``jax.block_until_ready``; PyTorch on the CPU returns when done). The table
(machine from ``lscpu``, date, versions, commit, 1-minute load average
before and after) is printed and appended to ``--out`` under the heading
"CPU: int8jax against PyTorch".

On a shared, oversubscribed machine run it with ``OMP_WAIT_POLICY=PASSIVE``
(recorded in the table): PyTorch's OpenMP threads otherwise spin-wait and
lose most of their time to the other processes (2026-12-03, 2 cores at a
load of ~8: PyTorch fp32 7268 ms spinning vs 1319 ms passive, while the JAX
steps moved little).
"""

from __future__ import annotations

import argparse
from collections import Counter
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
HEADING = "## CPU: int8jax against PyTorch (`benchmarks/peer_cpu.py`)"
TORCH_VARIANTS = ("fp32", "fp32 channels_last", "bf16 autocast channels_last")
JAX_VARIANTS = ("float32", "ui8 never")
INSTALL = "pip install -e .[peer]  (or: pip install 'torch>=2.4')"


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


# ---------------------------------------------------------------------------
# The model in PyTorch.


def torch_resnet20(num_classes: int = 10, width: int = 16):
  """``examples.models.resnet20`` in PyTorch (NCHW), same layers in the same order."""
  import torch
  from torch import nn

  def bn(c, zero=False):
    m = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # PyTorch's 0.1 == Flax's 0.9
    if zero:
      nn.init.zeros_(m.weight)
    return m

  def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout)
      self.conv2, self.bn2 = conv(cout, cout, 3), bn(cout, zero=True)
      if stride != 1 or cin != cout:
        self.proj, self.proj_bn = nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout)
      else:
        self.proj = self.proj_bn = None

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      sc = x if self.proj is None else self.proj_bn(self.proj(x))
      return torch.relu(y + sc)

  class ResNet20(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem, self.stem_bn = conv(3, width, 3), bn(width)
      blocks, cin = [], width
      for i in range(3):
        cout = width * 2**i
        for j in range(3):
          blocks.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
      x = torch.relu(self.stem_bn(self.stem(x)))
      x = self.blocks(x)
      return self.head(x.mean(dim=(2, 3)))

  return ResNet20()


def torch_param_shapes(model) -> list[tuple[int, ...]]:
  """Parameter shapes in definition order, in the JAX layouts (conv HWIO,
  linear (in, out)) so they compare with :func:`jax_param_shapes`."""
  out = []
  for p in model.parameters():
    s = tuple(p.shape)
    if len(s) == 4:  # OIHW -> HWIO
      s = (s[2], s[3], s[1], s[0])
    elif len(s) == 2:  # (out, in) -> (in, out)
      s = (s[1], s[0])
    out.append(s)
  return out


def jax_model(num_classes: int = 10):
  from flax import nnx
  from examples import models
  return models.create_model("resnet20", num_classes=num_classes, rngs=nnx.Rngs(0))


def jax_param_shapes(model) -> list[tuple[int, ...]]:
  """Shapes of the ``nnx.Param`` leaves in definition order (kernel before
  bias / scale before bias, as PyTorch's weight before bias)."""
  from flax import nnx
  out = []
  for _, m in nnx.iter_modules(model):
    if isinstance(m, (nnx.Conv, nnx.Linear)):
      out.append(tuple(m.kernel[...].shape))
      if getattr(m, "bias", None) is not None:
        out.append(tuple(m.bias[...].shape))
    elif isinstance(m, nnx.BatchNorm):
      out.extend([tuple(m.scale[...].shape), tuple(m.bias[...].shape)])
  return out


def check_parity(tmodel, jmodel) -> int:
  """Asserts equal parameter counts and shapes; returns the count."""
  import math
  from flax import nnx
  tn = sum(p.numel() for p in tmodel.parameters())
  jn = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(jmodel, nnx.Param)))
  ts_, js = Counter(torch_param_shapes(tmodel)), Counter(jax_param_shapes(jmodel))
  if tn != jn or ts_ != js:
    raise AssertionError(f"ResNet-20 differs: PyTorch {tn} parameters, JAX {jn}; "
                         f"shapes only in PyTorch {sorted((ts_ - js).elements())}, "
                         f"only in JAX {sorted((js - ts_).elements())}")
  return tn


# ---------------------------------------------------------------------------
# Steps.


def torch_stepper(variant: str, batch: int):
  """A function running one PyTorch training step of ``variant``, returning the loss."""
  import torch
  torch.manual_seed(0)
  model = torch_resnet20()
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))
  if "channels_last" in variant:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  bf16 = variant.startswith("bf16")
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step


def jax_stepper(variant: str, batch: int):
  """The same for a ``benchmarks/step_time.py`` variant (its ``build``: compiled
  once, stored ranges and clips seeded); each call is synchronised."""
  from benchmarks import step_time
  compiled, state, x, y, _, _ = step_time.build("resnet20", variant, batch, 4.0, 1e-3)
  box = [state]

  def step():
    box[0], loss = jax.block_until_ready(compiled(box[0], x, y))
    return float(loss)

  return step


def time_interleaved(steppers: dict, warmup: int, steps: int) -> dict:
  """``{label: (median, min, max seconds, last loss)}``; the variants run round
  by round (one step of each per round), so a changing load hits all alike."""
  for f in steppers.values():
    for _ in range(warmup):
      f()
  times = {k: [] for k in steppers}
  loss = {}
  for _ in range(steps):
    for k, f in steppers.items():
      t = time.perf_counter()
      loss[k] = f()
      times[k].append(time.perf_counter() - t)
  return {k: (statistics.median(v), min(v), max(v), loss[k]) for k, v in times.items()}


# ---------------------------------------------------------------------------
# Report.


def lscpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    out = ""
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def commit() -> str:
  try:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, timeout=10).stdout.strip() or "?"
  except (OSError, subprocess.SubprocessError):
    return "?"


def versions(with_torch: bool) -> str:
  import jaxlib
  v = f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}"
  if with_torch:
    import torch
    v += f", torch {torch.__version__}"
  return v + f", commit {commit()}"


def load() -> str:
  try:
    return f"{os.getloadavg()[0]:.1f}"
  except OSError:
    return "?"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=20, help="timed steps per variant (median)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--only", choices=("torch", "jax"), default=None,
                 help="time one framework only")
  p.add_argument("--threads", type=int, default=None,
                 help="torch.set_num_threads (default: all cores, as XLA:CPU)")
  p.add_argument("--out", default=RESULTS,
                 help="markdown file to append the table to ('' for none)")
  p.add_argument("--note", default="", help="a sentence printed under the table (e.g. load)")
  args = p.parse_args(argv)
  for opt in ("steps", "batch"):
    if getattr(args, opt) < 1:
      p.error(f"--{opt} must be >= 1, got {getattr(args, opt)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  if args.threads is not None and args.threads < 1:
    p.error(f"--threads must be >= 1, got {args.threads}")
  if args.only != "jax" and not torch_available():
    p.error(f"PyTorch is not installed (an optional benchmark dependency): {INSTALL}; "
            "or time the JAX side alone with --only jax")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  with_torch = args.only != "jax"
  threads = args.threads or os.cpu_count()
  if with_torch:
    import torch
    torch.set_num_threads(threads)
  if with_torch and args.only is None:
    n = check_parity(torch_resnet20(), jax_model())
    parity = f"parameters: {n:,} on both sides (shapes equal)"
  elif with_torch:
    parity = f"parameters: {sum(p.numel() for p in torch_resnet20().parameters()):,}"
  else:
    from flax import nnx
    parity = ("parameters: "
              f"{sum(v.size for v in jax.tree.leaves(nnx.state(jax_model(), nnx.Param))):,}")
  load_before = load()
  steppers = {}
  if args.only != "torch":
    steppers.update({("JAX (int8jax)", v): jax_stepper(v, args.batch) for v in JAX_VARIANTS})
  if with_torch:
    steppers.update({("PyTorch", v): torch_stepper(v, args.batch) for v in TORCH_VARIANTS})
  timed = time_interleaved(steppers, args.warmup, args.steps)
  rows = [(fw, v, *timed[(fw, v)]) for fw, v in steppers]
  base = next((r[2] for r in rows if r[1] == "float32"), None)
  lines = [
      f"\n### ResNet-20 training step, batch {args.batch}, SGD momentum "
      f"({datetime.date.today().isoformat()})\n",
      f"{lscpu_model()}, {os.cpu_count()} cores; {versions(with_torch)}; "
      f"torch.set_num_threads({threads}) (OMP_WAIT_POLICY="
      f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}) / XLA:CPU default thread pool; {parity}; "
      f"median of {args.steps} steps after {args.warmup} warm-up, variants interleaved "
      f"round by round; 1-min load average "
      f"{load_before} before, {load()} after; "
      f"`python benchmarks/peer_cpu.py {shlex.join(sys.argv[1:] if argv is None else argv)}`."
      "\n",
      "| framework | variant | ms / step (median) | min / max ms | vs JAX float32 | last loss |",
      "| --- | --- | ---: | ---: | ---: | ---: |"]
  for fw, v, med, lo, hi, loss in rows:
    rel = f"{base / med:.2f}x faster" if base and med < base else (
        f"{med / base:.2f}x slower" if base and med > base else ("1.00x" if base else ""))
    lines.append(f"| {fw} | {v} | {med * 1e3:.0f} | {lo * 1e3:.0f} / {hi * 1e3:.0f} | {rel} "
                 f"| {loss:.4g} |")
  if args.note:
    lines.append(f"\n{args.note}")
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  if args.out:
    exists = os.path.exists(args.out) and HEADING in open(args.out, encoding="utf-8").read()
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(("" if exists else f"\n{HEADING}\n") + text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
