"""Run by tests/test_data_parallel.py in a fresh process with 2 simulated CPU
devices: the examples' UI8 training step on the Pallas kernels (Mosaic GPU
interpret mode), compiled for the 2-device mesh as the training loop builds
it -- with the quantized layers told the batch axis
(examples.steps.shard_quantized_layers, which the loop calls) and without.
Prints one JSON line: per case, the int8 all-gathers in the compiled HLO
(activation-sized operands XLA gathers because it cannot partition a kernel).
"""

import json
import re
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from examples import data as data_lib
from examples import steps as steps_lib
from examples import tasks
from examples.classification import ClassificationTask
from examples.config import Config
from examples.optimizers import create_optimizer, make_schedule


def compiled_step(shard: bool) -> tuple[int, str]:
  cfg = Config(dataset="mnist", model="simple_cnn", width=4, batch_size=8, mode="ui8",
               backend="pallas_interpret", progress=False)
  task = ClassificationTask()
  model = tasks.build_model(task, cfg, data_lib.load_dataset("mnist"))
  mesh = steps_lib.make_mesh(None)
  changed = steps_lib.shard_quantized_layers(model, mesh) if shard else 0
  graphdef, state = nnx.split((model, create_optimizer(cfg, model, make_schedule(cfg, 10, 10))))
  ss, ds = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  train, _ = steps_lib.make_steps(task, cfg, graphdef, ss, ds)
  batch = steps_lib.to_global({
      "image": np.zeros((8, 28, 28, 1), np.uint8), "label": np.zeros(8, np.int32),
      "valid": np.ones(8, np.float32)}, ds)
  txt = train.lower(steps_lib.place(state, ss), batch).compile().as_text()
  return changed, txt


def main():
  assert len(jax.devices()) == 2, jax.devices()
  out = {}
  for shard in (True, False):
    changed, txt = compiled_step(shard)
    gathers = re.findall(r"= (\S+) all-gather\(", txt)
    out["sharded" if shard else "unsharded"] = {
        "layers": changed, "int8_all_gathers": [g for g in gathers if g.startswith("s8[")],
        "kernels": txt.count("io_callback") + txt.count("custom-call")}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
