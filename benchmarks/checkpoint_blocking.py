"""How long a checkpoint save blocks the train loop, synchronous against asynchronous.

  python benchmarks/checkpoint_blocking.py                         # jeat :cpu and the paper's
  python benchmarks/checkpoint_blocking.py --configs=configs/jeat.py:cpu --saves=5

For each config, the run's whole TrainState (parameters, optimizer state, replay buffer,
...) is built as train.py builds it and saved `--saves` times through the training
Checkpointer, once with `async_checkpoints=False` and once with True. Printed per mode:
the state's size, the median seconds `Checkpointer.save` blocked the caller (what the loop
waits), and the median seconds until the write was committed (sync: the same; async: the
blocking part plus the background write, measured by `wait_until_finished` right after).
"""
import argparse
import functools
import importlib
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import hardware
from jeat_jax import models
from jeat_jax import parallel
from jeat_jax import state as state_lib


def load_config(spec: str):
  path, _, scale = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f'configs.{name}').get_config(scale or None)


def run_state(config, mesh):
  """The fresh TrainState of `config` on `mesh` (placeholder pools: their size is what counts)."""
  model = models.create_model(config.model, 10, jnp.dtype(config.model.dtype))
  tx = state_lib.create_optimizer(config, state_lib.learning_rate_schedule(config, 100, 100))
  init = functools.partial(state_lib.create_train_state, config, model, image_shape=(32, 32, 3),
                           tx=tx, num_devices=mesh.size,
                           start_images=state_lib.placeholder_starts((32, 32, 3)))
  # Jitted: eager op-by-op init of WRN-28-10 takes minutes on a CPU.
  shardings = state_lib.state_shardings(mesh, jax.eval_shape(init, jax.random.PRNGKey(0)))
  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))


def time_saves(config, state, saves: int, use_async: bool):
  """(median seconds blocked, median seconds until committed) over `saves` saves."""
  config.async_checkpoints = use_async
  blocked, committed = [], []
  with tempfile.TemporaryDirectory() as workdir:
    with ckpt_lib.Checkpointer(workdir, config, max_to_keep=2) as checkpointer:
      for i in range(saves):
        state = state.replace(step=jnp.int32(i + 1))
        start = time.time()
        blocked.append(checkpointer.save(state))
        checkpointer.wait_until_finished()
        committed.append(time.time() - start)
  return statistics.median(blocked), statistics.median(committed)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='configs/jeat.py:cpu,configs/jeat.py')
  parser.add_argument('--saves', type=int, default=3)
  args = parser.parse_args(argv)
  mesh = parallel.make_mesh()
  print(f'machine: {hardware.cpu_description()}; {jax.device_count()} {jax.default_backend()} '
        f'device(s); jax {jax.__version__}')
  print('| config | state MB | mode | blocked s (median) | committed s (median) |')
  print('|---|---|---|---|---|')
  for spec in args.configs.split(','):
    config = load_config(spec)
    state = run_state(config, mesh)
    mb = sum(x.nbytes for x in jax.tree.leaves(state.checkpoint_items())) / 2 ** 20
    for use_async in (False, True):
      blocked, committed = time_saves(config, state, args.saves, use_async)
      print(f'| {spec} | {mb:.0f} | {"async" if use_async else "sync"} | {blocked:.3f} | '
            f'{committed:.3f} |', flush=True)


if __name__ == '__main__':
  main()
