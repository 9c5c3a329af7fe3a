"""Smoke test of every kernel configuration, each under its own time limit.

    python benchmarks/gpu_smoke.py [--json smoke.json] [--timeout 30]   # GPU
    python benchmarks/gpu_smoke.py --interpret                          # CPU dry run

For every config in ``pallas_kernels``' tables (read at run time, so new
configs are picked up):

* ``CONV_CONFIGS``: a tiny 3x3 forward (``int8_conv``, float32 epilogue) and
  input gradient (``int8_conv_dgrad``, int32 and a stride-2 float32 one);
* ``WGRAD_CONFIGS``: a tiny weight gradient (``int8_conv_wgrad``, float32,
  the exact sum rounded once; stride 1 and 2);
* ``LIBRARY_CONFIGS``: an ``int8_matmul`` (float32 with a per-column scale
  and int32);
* ``CONV_CONFIGS`` again as ``direct:NAME`` (last): the direct-addressing
  kernels of :mod:`pallas_kernels.conv_direct` (not yet run on a GPU), a 3x3
  SAME forward at stride 1 (float32; the low padding read as TMA's
  out-of-bounds zeros) and 2 (int32; phase split), the input gradient
  (``int8_conv_direct_dgrad``, int32) at stride 1 and 2 (one launch per output
  phase, each storing into dx in place), and the weight gradient of
  :mod:`pallas_kernels.conv_direct_wgrad` (float32, the exact sum rounded
  once) at stride 1 (the low padding read as TMA's out-of-bounds zeros) and 2
  (phase split) -- its tiles those of the ``WGRAD_CONFIGS`` entry at the same
  table position (the four select_wgrad_config picks), tile_k = swizzle the
  entry's (64 or 128) at stride 1 and 32 at stride 2: every swizzle
  direct_wgrad_config picks;
* ``WS_CONFIGS`` as ``ws:NAME`` (after the direct ones): the persistent,
  warp-specialised GEMM of :mod:`pallas_kernels.int8_matmul_ws` (not yet run
  on a GPU) on a ragged 300x136x400 GEMM with two blocks, so each block loops
  over several tiles and the TMA ring wraps across them: float32 with row and
  column scales, int32, and float32 with ``k_chunk = 2 * tile_k`` (several
  int32 chunks a tile, summed in float32: exact);
* ``DIRECT_WGRAD_WS_CONFIGS`` as ``direct_ws:NAME`` (last): the persistent,
  warp-specialised direct weight gradient of
  :mod:`pallas_kernels.conv_direct_wgrad_ws` (not yet run on a GPU; float32,
  the exact sum rounded once) at stride 1 SAME with the entry's swizzle (128)
  on 2 blocks (many work items a block: the ring wraps across items; the low
  padding read as TMA's out-of-bounds zeros), at stride 2 with swizzle 64 on
  one block per SM, and at stride 1 with swizzle 32 on 3 blocks.

Each result must equal the XLA integer reference computed on the CPU bit for
bit (the integers are exact; the float outputs carry no scale except the
matmul's, whose epilogue matches within 1 float32 ulp on a GPU and bit for bit
in interpret mode).

The configs run in a child process, one after another; the parent gives
each config ``--timeout`` seconds from its start line. A config that hangs
or crashes the child is marked ``HANG``/``CRASH``, the child is killed (its
process group) and a new child resumes at the next config, so one bad
barrier costs one time limit, not the run. The parent prints one line per
config, writes the ``--json`` gate file after every config, and exits 0 when
every config passed, 1 otherwise. ``implicit_ok`` in the gate file is true
when every CONV/WGRAD config passed: ``scripts/gpu_session.sh`` runs its
later phases with ``INT8JAX_IMPLICIT_GEMM=0`` when it is not. ``direct_ok``
(independent of it) is true when every ``direct`` config passed:
``scripts/gpu_session.sh`` times the ResNet-50 step with
``INT8JAX_DIRECT_CONV=1`` only then. ``ws_ok`` (independent too) is true
when every ``ws`` config passed: ``scripts/gpu_session.sh`` runs the
int8_matmul_ws GPU tests and timings only then. ``direct_ws_ok`` (independent
as well) is true when every ``direct_ws`` config passed: the GPU session runs
the conv_direct_wgrad_ws GPU tests and timings only then.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
  """The modules pallas_kernels.int8_conv / .int8_matmul / .int8_matmul_ws (the
  package's attributes of those names are the functions)."""
  return (importlib.import_module("pallas_kernels.int8_conv"),
          importlib.import_module("pallas_kernels.int8_matmul"),
          importlib.import_module("pallas_kernels.int8_matmul_ws"))


def _direct_ws_module():
  return importlib.import_module("pallas_kernels.conv_direct_wgrad_ws")


def config_names() -> list[str]:
  """``KIND:NAME`` of every config in the kernel tables, in table order."""
  import pallas_kernels as pk
  int8_conv, int8_matmul, int8_matmul_ws = _modules()
  dws = _direct_ws_module()

  def named(module, table, kind):
    names = {id(v): k for k, v in vars(module).items() if k[:1].isupper() and
             any(v is c for c in table)}
    return [f"{kind}:{names.get(id(c), i)}" for i, c in enumerate(table)]

  return (named(int8_conv, pk.CONV_CONFIGS, "conv")
          + named(int8_conv, pk.WGRAD_CONFIGS, "wgrad")
          + named(int8_matmul, pk.LIBRARY_CONFIGS, "matmul")
          + named(int8_conv, pk.CONV_CONFIGS, "direct")
          + named(int8_matmul_ws, int8_matmul_ws.WS_CONFIGS, "ws")
          + named(dws, dws.DIRECT_WGRAD_WS_CONFIGS, "direct_ws"))


def _config(name: str):
  import pallas_kernels as pk
  int8_conv, int8_matmul, int8_matmul_ws = _modules()
  kind, ident = name.split(":", 1)
  module, table = {"conv": (int8_conv, pk.CONV_CONFIGS),
                   "direct": (int8_conv, pk.CONV_CONFIGS),
                   "wgrad": (int8_conv, pk.WGRAD_CONFIGS),
                   "matmul": (int8_matmul, pk.LIBRARY_CONFIGS),
                   "ws": (int8_matmul_ws, int8_matmul_ws.WS_CONFIGS),
                   "direct_ws": (_direct_ws_module(),
                                 _direct_ws_module().DIRECT_WGRAD_WS_CONFIGS)}[kind]
  return kind, table[int(ident)] if ident.isdigit() else getattr(module, ident)


def _check(name: str, interpret: bool) -> str:
  """Runs one config's cases; '' when all equal the CPU reference, else what differed."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pallas_kernels as pk

  kind, config = _config(name)
  cpu = jax.devices("cpu")[0]
  keys = iter(jax.random.split(jax.random.key(zlib.crc32(name.encode())), 8))

  def int8(shape):
    return jax.random.randint(next(keys), shape, -127, 128, jnp.int32).astype(jnp.int8)

  def reference(fn, *args, **kw):
    with jax.default_device(cpu):
      return np.asarray(fn(*jax.device_put(args, cpu), **kw))

  cases = []  # (label, got, want, exact)
  x = int8((2, 7, 9, 40))
  w = int8((3, 3, 40, 72))
  if kind == "conv":
    for strides, out in (((1, 1), jnp.float32), ((2, 2), jnp.int32)):
      kw = dict(window_strides=strides, padding="SAME", out_dtype=out)
      g = int8(pk.conv_output_shape(x.shape, w.shape, strides, ((1, 1), (1, 1))))
      cases.append((f"fwd s{strides[0]} {jnp.dtype(out).name}",
                    jax.jit(lambda x, w, kw=kw: pk.int8_conv(
                        x, w, config=config, interpret=interpret, **kw))(x, w),
                    reference(pk.int8_conv_reference, x, w, **kw), True))
      cases.append((f"dgrad s{strides[0]} {jnp.dtype(out).name}",
                    jax.jit(lambda g, w, kw=kw: pk.int8_conv_dgrad(
                        g, w, input_shape=x.shape, config=config, interpret=interpret,
                        **kw))(g, w),
                    reference(pk.int8_conv_dgrad_reference, g, w, input_shape=x.shape,
                              **kw), True))
  elif kind == "direct":
    from pallas_kernels import conv_direct as cd
    for strides, out in (((1, 1), jnp.float32), ((2, 2), jnp.int32)):
      kw = dict(window_strides=strides, padding="SAME", out_dtype=out)
      cases.append((f"direct fwd s{strides[0]} {jnp.dtype(out).name}",
                    jax.jit(lambda x, w, kw=kw: cd.int8_conv_direct(
                        x, w, config=config, interpret=interpret, **kw))(x, w),
                    reference(pk.int8_conv_reference, x, w, **kw), True))
    for strides in ((1, 1), (2, 2)):  # stride 2: one launch per output phase, in place
      kw = dict(window_strides=strides, padding="SAME", out_dtype=jnp.int32)
      g = int8(pk.conv_output_shape(x.shape, w.shape, strides, "SAME"))
      cases.append((f"direct dgrad s{strides[0]} int32",
                    jax.jit(lambda g, w, kw=kw: cd.int8_conv_direct_dgrad(
                        g, w, input_shape=x.shape, config=config, interpret=interpret,
                        **kw))(g, w),
                    reference(pk.int8_conv_dgrad_reference, g, w, input_shape=x.shape, **kw),
                    True))
    from pallas_kernels import conv_direct_wgrad as cdw
    # CONV_CONFIGS[i] <-> WGRAD_CONFIGS[i]: 64x64, 64x128, 128x64, 128x128
    tiles = pk.WGRAD_CONFIGS[list(pk.CONV_CONFIGS).index(config)]
    for strides, sw in (((1, 1), config.swizzle), ((2, 2), 32)):
      wcfg = pk.Int8ConvConfig(tile_m=tiles.tile_m, tile_n=tiles.tile_n, tile_k=sw, swizzle=sw,
                               max_concurrent_steps=4 if sw == 128 else 6)
      kw = dict(kernel_shape=w.shape, window_strides=strides, padding="SAME")
      g = int8(pk.conv_output_shape(x.shape, w.shape, strides, "SAME"))
      cases.append((f"direct wgrad s{strides[0]} float32",
                    jax.jit(lambda x, g, kw=kw, wcfg=wcfg: cdw.int8_conv_wgrad_direct(
                        x, g, config=wcfg, interpret=interpret, **kw))(x, g),
                    reference(pk.int8_conv_wgrad_reference, x, g, **kw), True))
  elif kind == "wgrad":
    for strides in ((1, 1), (2, 2)):
      kw = dict(kernel_shape=w.shape, window_strides=strides, padding="SAME")
      g = int8(pk.conv_output_shape(x.shape, w.shape, strides, ((1, 1), (1, 1))))
      cases.append((f"wgrad s{strides[0]}",
                    jax.jit(lambda x, g, kw=kw: pk.int8_conv_wgrad(
                        x, g, config=config, interpret=interpret, **kw))(x, g),
                    reference(pk.int8_conv_wgrad_reference, x, g, **kw), True))
  elif kind == "ws":
    a, b = int8((300, 400)), int8((136, 400))
    a_scale = jnp.linspace(0.25, 1.5, 300, dtype=jnp.float32)
    b_scale = jnp.linspace(0.5, 2.0, 136, dtype=jnp.float32)
    several = dataclasses.replace(config, num_ctas=2)  # several tiles a block
    chunks = dataclasses.replace(several, k_chunk=2 * config.tile_k)
    for label, cfg, out, kw, exact in (
        ("ws float32", several, jnp.float32, dict(a_scale=a_scale, b_scale=b_scale),
         interpret),
        ("ws int32", several, jnp.int32, {}, True),
        ("ws chunks float32", chunks, jnp.float32, {}, True)):
      cases.append((label,
                    jax.jit(lambda a, b, kw=kw, out=out, cfg=cfg: pk.int8_matmul_ws(
                        a, b, out_dtype=out, config=cfg, interpret=interpret, **kw))(a, b),
                    reference(pk.int8_matmul_reference, a, b, out_dtype=out,
                              k_chunk=cfg.k_chunk, **kw), exact))
  elif kind == "direct_ws":
    dws = _direct_ws_module()
    for label, strides, sw, num_ctas in (("s1 2 blocks", (1, 1), config.swizzle, 2),
                                         ("s2", (2, 2), 64, None),
                                         ("s1 sw32 3 blocks", (1, 1), 32, 3)):
      cfg = dataclasses.replace(config, tile_k=sw, swizzle=sw, num_ctas=num_ctas,
                                max_concurrent_steps=4 if sw == 128 else 6)
      kw = dict(kernel_shape=w.shape, window_strides=strides, padding="SAME")
      g = int8(pk.conv_output_shape(x.shape, w.shape, strides, "SAME"))
      cases.append((f"direct_ws wgrad {label} float32",
                    jax.jit(lambda x, g, kw=kw, cfg=cfg: dws.int8_conv_wgrad_direct_ws(
                        x, g, config=cfg, interpret=interpret, **kw))(x, g),
                    reference(pk.int8_conv_wgrad_reference, x, g, **kw), True))
  else:
    a, b = int8((200, 300)), int8((136, 300))
    scale = jnp.linspace(0.5, 2.0, 136, dtype=jnp.float32)
    for out, kw in ((jnp.float32, dict(b_scale=scale)), (jnp.int32, {})):
      cases.append((f"matmul {jnp.dtype(out).name}",
                    jax.jit(lambda a, b, kw=kw, out=out: pk.int8_matmul(
                        a, b, out_dtype=out, config=config, interpret=interpret, **kw))(a, b),
                    reference(pk.int8_matmul_reference, a, b, out_dtype=out, **kw),
                    interpret or out == jnp.int32))
  bad = []
  for label, got, want, exact in cases:
    got = np.asarray(jax.block_until_ready(got))
    if got.shape != want.shape or got.dtype != want.dtype:
      bad.append(f"{label}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}")
    elif exact and not np.array_equal(got, want):
      bad.append(f"{label}: {int(np.sum(got != want))} of {got.size} differ")
    elif not exact and not np.allclose(got, want, rtol=2.4e-7, atol=0):
      bad.append(f"{label}: not within 1 ulp (max rel "
                 f"{float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))):.2e})")
  return "; ".join(bad)


FAKE_STATUSES = ("ok", "mismatch", "hang", "crash")


def child(names: list[str], interpret: bool, fake: dict[str, str]) -> None:
  """Runs the configs in order, one START and one RESULT line each; a config
  in ``fake`` is not run but acts out its status (dry runs and tests of the
  gate: a hang sleeps, a crash exits)."""
  for name in names:
    print(f"START {name}", flush=True)
    t = time.perf_counter()
    try:
      if name in fake:
        if fake[name] == "hang":
          time.sleep(10**6)
        if fake[name] == "crash":
          os._exit(3)
      why = ("fake mismatch" if fake[name] == "mismatch" else "") if name in fake else \
          _check(name, interpret)
      status = "MISMATCH" if why else "ok"
    except Exception as e:  # pylint: disable=broad-except
      status, why = "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    print("RESULT " + json.dumps(dict(name=name, status=status, detail=why,
                                      seconds=round(time.perf_counter() - t, 2))), flush=True)


def _reader(stream, q):
  for line in stream:
    q.put(line)
  q.put(None)


def run(names: list[str], interpret: bool, timeout: float, gate: str | None,
        fake: str = "", log=sys.stdout) -> list[dict]:
  results: list[dict] = []

  def write_gate():
    if gate:
      by_kind = lambda k: [r for r in results if r["name"].startswith(k + ":")]  # noqa: E731
      def all_ok(kinds):  # every config of these kinds asked for has run and passed
        got = [r for k in kinds for r in by_kind(k)]
        return (all(r["status"] == "ok" for r in got)
                and len(got) == sum(n.split(":")[0] in kinds for n in names))

      doc = dict(ok=len(results) == len(names) and all(r["status"] == "ok" for r in results),
                 implicit_ok=all_ok(("conv", "wgrad")),
                 direct_ok=all_ok(("direct",)) and any(n.startswith("direct:") for n in names),
                 ws_ok=all_ok(("ws",)) and any(n.startswith("ws:") for n in names),
                 direct_ws_ok=(all_ok(("direct_ws",))
                               and any(n.startswith("direct_ws:") for n in names)),
                 interpret=interpret, timeout_s=timeout, results=results)
      tmp = gate + ".tmp"
      with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
      os.replace(tmp, gate)

  def record(r):
    results.append(r)
    todo.remove(r["name"])
    print(f"smoke {r['name']:22s} {r['status']:8s} {r['seconds']:6.1f} s  {r['detail']}",
          file=log, flush=True)
    write_gate()

  children = []

  def stop(signum, frame):  # `timeout` signals this process only: take the child along
    for c in children:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(c.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  todo = list(names)
  while todo:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(todo)]
    cmd += (["--interpret"] if interpret else []) + (["--fake", fake] if fake else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [ROOT, os.environ.get("PYTHONPATH", "")])))
    children.append(proc)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    # the first config's limit includes the child's start (imports, device init)
    current, started, tail = todo[0], time.monotonic(), []
    while todo:
      try:
        line = q.get(timeout=max(0.1, started + timeout - time.monotonic()))
      except queue.Empty:
        line = "TIMEOUT"
      if line == "TIMEOUT" or line is None:  # hung, or the child died
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        record(dict(name=current, status="HANG" if line == "TIMEOUT" else "CRASH",
                    detail=(f"no result within {timeout:.0f} s" if line == "TIMEOUT" else
                            f"child exited rc={proc.returncode}: "
                            + " | ".join(tail[-3:])[-300:]),
                    seconds=round(time.monotonic() - started, 2)))
        break  # a new child resumes at the next config
      line = line.rstrip("\n")
      if line.startswith("START "):
        current, started = line[6:], time.monotonic()
      elif line.startswith("RESULT "):
        record(json.loads(line[7:]))
      else:
        tail.append(line)
    else:
      proc.wait()
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--interpret", action="store_true",
                 help="Mosaic GPU interpret mode on the CPU (dry run, no GPU)")
  p.add_argument("--timeout", type=float, default=30.0,
                 help="seconds per config, from its start (the first also covers the "
                 "child's imports); default 30")
  p.add_argument("--json", default=None, help="gate file, rewritten after every config")
  p.add_argument("--only", default="",
                 help="comma list of KIND:NAME configs (default: every config)")
  p.add_argument("--fake", default="",
                 help="dry runs and tests: comma list of KIND:NAME=STATUS, STATUS one of "
                 f"{', '.join(FAKE_STATUSES)}: that config is not run but acts it out")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  fake = {}
  for item in filter(None, (i.strip() for i in args.fake.split(","))):
    name, _, status = item.partition("=")
    if status not in FAKE_STATUSES:
      p.error(f"--fake: {item!r} is not KIND:NAME=STATUS with STATUS in {FAKE_STATUSES}")
    fake[name] = status
  if args.child is not None:
    child(args.child.split(","), args.interpret, fake)
    return 0
  if args.timeout <= 0:
    p.error(f"--timeout must be > 0 seconds, got {args.timeout}")
  names = config_names()
  if args.only:
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in names]
    if bad:
      p.error(f"--only: unknown config(s) {bad}; choose from {names}")
    names = only
  bad = [n for n in fake if n not in names]
  if bad:
    p.error(f"--fake: unknown config(s) {bad}; choose from {names}")
  t = time.monotonic()
  results = run(names, args.interpret, args.timeout, args.json, args.fake)
  failed = [r["name"] for r in results if r["status"] != "ok"]
  print(f"smoke: {len(results) - len(failed)} of {len(names)} configs ok"
        f"{' (interpret mode)' if args.interpret else ''} in {time.monotonic() - t:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
