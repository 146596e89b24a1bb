"""Subprocess helper of tests/test_parallel.py and tests/test_multihost_modes.py: runs
with its own device count / process group.

The main pytest process has already initialised JAX with one CPU device, so
everything that needs several devices or several processes runs here, in a
fresh interpreter. The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=N
in the environment before this script imports jax.

  --mode=equivalence  one train step of a recipe on a 1-device mesh and on a mesh
                      of every local device (same global batch); writes loss,
                      metrics, parameters and the replay buffer (with its
                      sharding) to --out (.npz).
  --mode=train        train.train_and_evaluate in --workdir; with --num_processes > 1
                      first jax.distributed.initialize (config.distributed.*).
                      --exit_after_checkpoint=S exits hard (os._exit, no cleanup,
                      as a SIGKILL would) right after the step-S checkpoint is
                      written: a crash to resume from. Process 0 writes the
                      results dict and the wall time to --out (.json).
  --mode=command      what `python main.py --mode=COMMAND` runs (main.run: start
                      jax.distributed, validate, run the command) for each of
                      --command (comma-separated: train, evaluate, sample, fid,
                      analyze) in --workdir, in one process group.
                      --fake_inception swaps the FID Inception network for a
                      cheap fixed projection (no weights offline);
                      --record_writes records every path under --workdir that
                      the process creates, writes or renames. Every process
                      writes what the commands returned (and the recorded
                      paths) to --out with `.<process id>` appended (.json).
  --mode=reproduce    `python -m jeat_jax.reproduce --scale=smoke --runs=RECIPE`
                      with --workdir as its root (--distributed with the
                      coordinator flags when --num_processes > 1); --record_writes
                      and --out as for --mode=command.
"""
import argparse
import faulthandler
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
from absl import logging
import jax.numpy as jnp
import numpy as np

KILLED_EXIT_CODE = 17


def smoke_config(recipe, data_path, overrides_json):
  from tests.conftest import smoke_config as make  # pylint: disable=g-import-not-at-top
  return make(recipe, data_path, **json.loads(overrides_json or '{}'))


def flat(tree, prefix):
  """{'prefix/a/b': np.ndarray} of a pytree, for np.savez."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
  return out


def equivalence(args):
  """One jitted train step (as train_and_evaluate builds it) on 1 device and on all of them,
  for each recipe of --recipe (comma-separated)."""
  out = {'num_devices': np.asarray(jax.device_count())}
  for recipe in args.recipe.split(','):
    out.update(equivalence_of(recipe, args, prefix=f'{recipe}/'))
  np.savez(args.out, **out)


def equivalence_of(recipe, args, prefix):
  import functools  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jeat_jax import data as data_lib, models, parallel, train  # pylint: disable=g-import-not-at-top

  config = smoke_config(recipe, args.data, args.overrides)
  ds = data_lib.load_dataset(config)
  image_shape = ds.x_train.shape[1:]
  x_np, y_np = data_lib.train_batch(ds, 0, config.batch_size, config.seed)
  out = {}
  for name, devices in ((prefix + 'one', jax.devices()[:1]), (prefix + 'all', jax.devices())):
    mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
    model = models.create_model(config.model, ds.num_classes, jnp.dtype(config.model.dtype))
    tx = train.create_optimizer(config, train.learning_rate_schedule(config, 16, 4))
    state = train.create_train_state(config, model, jax.random.PRNGKey(config.seed), image_shape,
                                     tx, mesh.size)
    shardings = train.state_shardings(mesh, state)
    state = jax.device_put(state, shardings)
    batch = parallel.sharded_on_first_axis(mesh)
    step = jax.jit(functools.partial(train.train_step, model=model, config=config),
                   in_shardings=(shardings, batch, batch),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    x, y = parallel.global_batch(mesh, x_np, y_np)
    new_state, metrics = step(state, x, y)
    metrics = jax.device_get(metrics)
    out.update({f'{name}/metric/{k}': np.asarray(v) for k, v in metrics.items()})
    out.update(flat(new_state.params, f'{name}/params'))
    out.update(flat(new_state.batch_stats, f'{name}/batch_stats'))
    if 'buffer' in new_state.extra:
      buf = new_state.extra['buffer']
      out[f'{name}/buffer'] = np.asarray(buf)
      out[f'{name}/buffer_spec'] = np.asarray(str(buf.sharding.spec))
      out[f'{name}/buffer_mesh_size'] = np.asarray(buf.sharding.mesh.size)
      # (device id, index of the shard axis it holds, shape of its block) per device.
      shards = sorted((s.device.id, s.index[0].start or 0, *s.data.shape)
                      for s in buf.addressable_shards)
      out[f'{name}/buffer_shards'] = np.asarray(shards)
  return out


def distributed_config(args):
  """The smoke config of --recipe with config.distributed.* set from the flags."""
  config = smoke_config(args.recipe, args.data, args.overrides)
  if args.num_processes > 1:
    config.distributed.enabled = True
    config.distributed.coordinator_address = args.coordinator
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id
  return config


def fake_inception():
  """Replaces the FID Inception network by a fixed random projection of 4x4-subsampled
  pixels (as tests/test_fid.py does): FID's plumbing runs without the weights."""
  from jeat_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  proj = np.random.default_rng(7).normal(size=(8 * 8 * 3, 16))

  def compute_activations(images, variables, include_logits=None, **kwargs):
    del variables, include_logits, kwargs
    x = np.asarray(images, np.float64)[:, ::4, ::4, :].reshape(len(images), -1) / 255
    return {'pool3': (x @ proj).astype(np.float32)}

  inception.load_inception_variables = lambda weights=None, cache_dir=None: {'params': {}}
  inception.compute_activations = compute_activations


def record_writes_under(directory: str) -> list:
  """Makes every attempt of this process to create, write or rename a file or directory
  under `directory` append the path to the returned list (the write still happens)."""
  import builtins  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  root = os.path.realpath(directory) + os.sep
  attempts = []

  def note(path):
    if isinstance(path, (str, bytes, os.PathLike)):
      full = os.path.realpath(os.fsdecode(path))
      if (full + os.sep).startswith(root):
        attempts.append(full)

  def wrap(fn, is_write=lambda *a, **k: True):
    def wrapped(path, *args, **kwargs):
      if is_write(*args, **kwargs):
        note(path)
      return fn(path, *args, **kwargs)
    return wrapped

  writing = lambda mode='r', *a, **k: any(c in mode for c in 'wax+')
  builtins.open = io.open = wrap(builtins.open, writing)
  for name in ('makedirs', 'mkdir', 'remove'):
    setattr(os, name, wrap(getattr(os, name)))
  for name in ('replace', 'rename'):  # both ends: an atomic write renames its temporary file
    setattr(os, name, renaming(getattr(os, name), note))
  return attempts


def renaming(fn, note):
  def wrapped(src, dst, *args, **kwargs):
    note(src)
    note(dst)
    return fn(src, dst, *args, **kwargs)
  return wrapped


def command_run(args):
  """What `python main.py --mode=COMMAND` runs (main.run) for each command of --command, in
  one process group; keeps what each returned, and with --record_writes the paths this
  process tried to write under --workdir."""
  from jeat_jax import analysis, config_validation, evaluate, generation, parallel  # pylint: disable=g-import-not-at-top
  from jeat_jax import train  # pylint: disable=g-import-not-at-top
  if args.fake_inception:
    fake_inception()
  config = distributed_config(args)
  parallel.initialize_distributed(config)
  config_validation.validate(config)
  attempts = record_writes_under(args.workdir) if args.record_writes else None
  commands = {'train': train.train_and_evaluate, 'evaluate': evaluate.evaluate_run,
              'sample': generation.sample_run, 'fid': generation.fid_run,
              'analyze': analysis.analyze_run}
  returned = {}
  for command in args.command.split(','):
    start = time.time()
    returned[command] = commands[command](config, args.workdir)
    print(f'process {jax.process_index()}: {command} took {time.time() - start:.1f}s', flush=True)
  with open(f'{args.out}.{jax.process_index()}', 'w') as f:
    json.dump({'returned': returned, 'process_index': jax.process_index(),
               'process_count': jax.process_count(), 'device_count': jax.device_count(),
               'writes_under_workdir': attempts}, f, default=str)


def reproduce_run(args):
  """`python -m jeat_jax.reproduce --scale=smoke --runs=RECIPE` with --workdir as its root
  (and --distributed with the coordinator flags when --num_processes > 1); writes to
  --out.<process id> the paths this process tried to write under the root (--record_writes)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jeat_jax.reproduce import cli  # pylint: disable=g-import-not-at-top
  argv = ['reproduce', '--scale=smoke', f'--workdir={args.workdir}', f'--data_path={args.data}',
          f'--runs={args.recipe}']
  if args.num_processes > 1:
    argv += ['--distributed', f'--coordinator_address={args.coordinator}',
             f'--num_processes={args.num_processes}', f'--process_id={args.process_id}']
  flags.FLAGS(argv)
  attempts = record_writes_under(args.workdir) if args.record_writes else None
  cli.main([])
  with open(f'{args.out}.{args.process_id}', 'w') as f:
    json.dump({'process_index': jax.process_index(), 'process_count': jax.process_count(),
               'writes_under_workdir': attempts}, f)


def train_run(args):
  from jeat_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jeat_jax.errors import Preempted  # pylint: disable=g-import-not-at-top
  from jeat_jax import config_validation, parallel, train  # pylint: disable=g-import-not-at-top

  config = distributed_config(args)
  parallel.initialize_distributed(config)  # before anything asks JAX for its devices
  config_validation.validate(config)

  if args.exit_after_checkpoint > 0:
    save = ckpt_lib.Checkpointer.save

    def save_then_die(self, state, **kwargs):
      save(self, state, **kwargs)
      if int(state.step) == args.exit_after_checkpoint:
        self.wait_until_finished()  # committed, as a checkpoint from an earlier period is
        print(f'process {jax.process_index()}: checkpoint {args.exit_after_checkpoint} '
              'written, exiting hard', flush=True)
        # The other processes go first: process 0 hosts the coordination service, and
        # a process still inside orbax's last barrier when it vanishes aborts (SIGABRT)
        # instead of exiting with our code. Each process drops a marker once its save
        # has returned; process 0 waits for them.
        marker_dir = os.path.dirname(os.path.abspath(args.out))
        if jax.process_index() > 0:
          open(os.path.join(marker_dir, f'exited.{jax.process_index()}'), 'w').close()
        else:
          deadline = time.time() + 60
          while time.time() < deadline and not all(
              os.path.exists(os.path.join(marker_dir, f'exited.{i}'))
              for i in range(1, jax.process_count())):
            time.sleep(0.1)
        os._exit(KILLED_EXIT_CODE)  # pylint: disable=protected-access

    ckpt_lib.Checkpointer.save = save_then_die

  start = time.time()
  try:
    results = train.train_and_evaluate(config, args.workdir)
  except Preempted as e:  # as main.py: the checkpoint is saved, a clean exit
    print(f'process {jax.process_index()}: {e}', flush=True)
    return
  if jax.process_index() == 0:
    with open(args.out, 'w') as f:
      json.dump(dict(results=results, seconds=time.time() - start,
                     process_count=jax.process_count(), device_count=jax.device_count()), f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', choices=('equivalence', 'train', 'command', 'reproduce'),
                      required=True)
  parser.add_argument('--command', help='comma-separated: train, evaluate, sample, fid, analyze')
  parser.add_argument('--fake_inception', action='store_true')
  parser.add_argument('--record_writes', action='store_true')
  parser.add_argument('--recipe', default='jeat')
  parser.add_argument('--data', required=True)
  parser.add_argument('--overrides', default='{}', help='JSON {dotted.key: value}')
  parser.add_argument('--out', required=True)
  parser.add_argument('--workdir')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--exit_after_checkpoint', type=int, default=0)
  parser.add_argument('--timeout', type=float, default=0,
                      help='> 0: print every thread\'s stack and exit after this many seconds')
  args = parser.parse_args()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  if args.timeout > 0:  # a hung collective shows where it hangs instead of blocking the test
    faulthandler.dump_traceback_later(args.timeout, exit=True)
  if args.mode == 'equivalence':
    equivalence(args)
  elif args.mode == 'command':
    command_run(args)
  elif args.mode == 'reproduce':
    reproduce_run(args)
  else:
    train_run(args)


if __name__ == '__main__':
  main()
