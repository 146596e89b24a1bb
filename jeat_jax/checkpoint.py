"""Checkpoints of the whole TrainState with orbax, written atomically, and the workdir's guards.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. Around that,
a training Checkpointer guards a week-long run against going silently wrong:

- `run_info.json`: which recipe, dataset and model wrote the workdir; a workdir
  written by another is refused before any restore is tried (also when evaluating).
- `config.json`: the whole config of the first training start; a resume whose
  config differs in anything but the run length, the checkpoint / logging
  periods and the evaluation settings (RESUMABLE_KEYS, RESUMABLE_PREFIXES) is refused,
  naming each key with its saved and new value.
- `.lock`: an exclusive `flock` held by process 0 for the Checkpointer's lifetime,
  so a second training on the same workdir stops at once, naming the live
  holder, instead of colliding with its half-written steps. The OS drops the
  lock when the holder dies, even by SIGKILL.
- The replay buffer is saved as (shards, slots per shard, H, W, C), one shard per
  device; a run resumed on another device count gets the same images, in the same
  order, re-split over its own devices (restore_latest).
"""
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from jeat_jax.errors import WorkdirError
from jeat_jax.files import read_json, write_json_atomic

RUN_INFO = 'run_info.json'
CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
WALL_SECONDS = 'wall_seconds'  # custom metadata of a checkpoint: training seconds up to it

# Config keys a resume may change: nothing saved in a checkpoint depends on them.
RESUMABLE_KEYS = frozenset({
    'num_epochs', 'num_train_steps',  # the run length
    'checkpoint_every_steps', 'log_every_steps', 'eval_every_steps', 'dynamics_every_steps',
    'max_checkpoints_to_keep',
    'data.path', 'data.tfds_data_dir',  # where the same data lives on this machine
})
# divergence.*: a run stopped by the guard may be resumed with a larger budget.
RESUMABLE_PREFIXES = ('eval.', 'sample.', 'fid.', 'analysis.', 'robust_watch.', 'distributed.',
                      'divergence.', 'debug_')

# Entries of TrainState.extra laid out as (shards, slots per shard, ...), one shard per device.
PER_DEVICE_POOLS = ('buffer',)


def run_identity(config) -> dict:
  """What a checkpoint's arrays depend on: the recipe, the dataset and the model."""
  m = config.model
  model = {'depth': m.depth, 'width': m.width, 'norm': m.norm}
  if m.arch != 'wrn':  # run_info.json of WRN runs written before model.arch existed stay valid
    model = {'arch': m.arch, 'norm': m.norm}
  return {'recipe': config.recipe, 'dataset': config.dataset, 'model': model}


def check_run_info(workdir: str, config) -> None:
  """Writes run_info.json on a new workdir; refuses one written by another run."""
  path = os.path.join(workdir, RUN_INFO)
  mine = run_identity(config)
  theirs = read_json(path)
  if theirs is not None:
    if theirs != mine:
      raise WorkdirError(
          f'workdir {workdir} holds a run of recipe {theirs.get("recipe")!r} with '
          f'{theirs.get("dataset")} / {theirs.get("model")}; this config is recipe '
          f'{mine["recipe"]!r} with {mine["dataset"]} / {mine["model"]}. Use another --workdir.')
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(path, mine)


# ----------------------------------------------------------------------------- config.json

def flat_config(config, prefix: str = '') -> Dict[str, Any]:
  """{'optimizer.lr': 0.1, ...}: every leaf of `config`, as JSON would give it back."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(flat_config(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = json.loads(json.dumps(value, default=str))  # tuples -> lists
  return out


def is_resumable_key(key: str) -> bool:
  return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


_ABSENT = '<absent>'

# Keys added to the configs after config.json existed, with the value that behaves as the code
# did before them: a config.json without the key saved that value (as JSON gives it back).
ADDED_KEYS = {'model.arch': 'wrn', 'loss.weat_variant': 'nat', 'loss.example_weights': 'uniform',
              'data.energy_batch_size': 0, 'data.energy_noise_std': 0.0,
              'perturbation.project_eps': True, 'perturbation.class_logit_sign': 1.0,
              'perturbation.direction_weight': 1.0, 'sampler.grad_clamp': 0.0,
              'sampler.reinit': 'uniform', 'sampler.reinit_pool_size': 10000,
              'sampler.bn_mode': 'batch', 'loss.ebjdat_weights': [1.0, 1.0, 0.1, 1.0],
              'optimizer.sam_rho': 0.0, 'optimizer.sam_adaptive': True, 'sample.grad_clamp': 0.0}


def config_differences(saved: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """(key, saved value, new value) of every key that a resume may not change."""
  saved = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **saved}
  keys = sorted(k for k in set(saved) | set(new) if not is_resumable_key(k))
  return [(k, saved.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
          if saved.get(k, _ABSENT) != new.get(k, _ABSENT)]


def check_config(workdir: str, config, has_checkpoints: bool) -> None:
  """Refuses to resume `workdir` with a config other than the one it was trained with.

  Before the first checkpoint nothing depends on the config: process 0 (re)writes
  config.json. Afterwards a resume may change only the run length, the checkpoint
  and logging periods and the evaluation settings.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = flat_config(config)
  if not has_checkpoints or not os.path.exists(path):
    if has_checkpoints:
      logging.warning('%s has checkpoints but no %s (written by an older version): this '
                      "resume's config cannot be checked; it is saved as the run's config",
                      workdir, CONFIG_FILE)
    if jax.process_index() == 0:
      write_json_atomic(path, new)
    return
  diffs = config_differences(read_json(path), new)
  if diffs:
    shown = '; '.join(f'{k}: saved {s!r}, now {n!r}' for k, s, n in diffs[:20])
    more = f' (and {len(diffs) - 20} more)' if len(diffs) > 20 else ''
    raise WorkdirError(
        f'workdir {workdir} holds a run trained with another config; a resume may change only '
        f'the run length, the checkpoint / logging periods and eval.*, sample.*, fid.*, '
        f'analysis.* settings. Differing keys: {shown}{more}. Resume with the saved values, or '
        f'use another --workdir (the saved config is {path}; delete it to accept the new one).')


# ----------------------------------------------------------------------------- the lock

# Locks this process holds: lock file path -> [fd, number of Checkpointers using it]. A
# flock belongs to an open file, so a second open in the same process would conflict with
# the first: Checkpointers of one process on one workdir share the lock instead.
_HELD: Dict[str, list] = {}


def _lock_holder(fd: int) -> str:
  """Who holds the lock, from what it wrote into the lock file."""
  info = {}
  for _ in range(10):  # the holder writes right after locking: it may not have yet
    try:
      info = json.loads(os.pread(fd, 65536, 0).decode() or '{}')
    except (ValueError, OSError):
      info = {}
    if info:
      break
    time.sleep(0.1)
  if not info:
    return 'an unknown process (it has not written its name into the lock file)'
  return (f'pid {info.get("pid")} on host {info.get("host")}, running since '
          f'{info.get("started")} ({info.get("command")})')


def acquire_workdir_lock(workdir: str) -> Optional[str]:
  """Takes the exclusive lock of `workdir` (or shares this process's); returns its key
  (None where the filesystem has no locks)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  if path in _HELD:
    _HELD[path][1] += 1
    return path
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _lock_holder(fd)
    os.close(fd)
    raise WorkdirError(  # pylint: disable=raise-missing-from
        f'workdir {workdir} is in use by another training run: {holder}. Wait for it to end or '
        f'stop it, or use another --workdir (a run that was killed releases {path} by itself).')
  except OSError as e:  # a filesystem without locks (ENOLCK, EOPNOTSUPP)
    os.close(fd)
    logging.warning('cannot lock %s (%s): a second training started on this workdir would not '
                    'be stopped', path, e)
    return None
  info = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'command': ' '.join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(info).encode(), 0)
  _HELD[path] = [fd, 1]
  return path


def release_workdir_lock(key: Optional[str]) -> None:
  held = _HELD.get(key)
  if held is None:
    return
  held[1] -= 1
  if held[1] == 0:
    del _HELD[key]
    os.close(held[0])  # drops the flock; the file stays (removing it would race a new holder)


def _lock_for_all_processes(workdir: str) -> Optional[str]:
  """Process 0 takes the lock; the others learn whether it could, and stop with it if not."""
  key, error = None, None
  if jax.process_index() == 0:
    try:
      key = acquire_workdir_lock(workdir)
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirError(f'workdir {workdir} is in use by another training run '
                           '(see the error of process 0)')
  if error is not None:
    raise error
  return key


# ----------------------------------------------------------------------------- restore

def _replicated_like(sharding):
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return sharding


def _reshard_pool(saved: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
  """(S1, n / S1, ...) -> (S2, n / S2, ...): the same n entries in the same order."""
  return jax.jit(lambda a: a.reshape(target.shape).astype(target.dtype),
                 out_shardings=getattr(target, 'sharding', None))(saved)


class Checkpointer:
  """Saves every `checkpoint_every_steps` (called by the loop) and restores the latest.

  Args:
    workdir: the run's directory.
    config: the run's config.
    for_training: a training (True) writes run_info.json / config.json on a new workdir
      and refuses another run's; an evaluation (False) needs checkpoints there and checks
      only run_info.json.
    subdir: the checkpoint directory inside the workdir.
    max_to_keep: checkpoints kept (default config.max_checkpoints_to_keep).
    primary: whether this is the training's main Checkpointer, which takes the workdir lock
      and checks config.json; default: subdir == 'checkpoints'. A second one of the same
      training (e.g. subdir='best') is not.

  Close it (or use it as a context manager) to release the workdir lock; it is also
  released when the Checkpointer is garbage-collected, at exit, and when the process dies.
  """

  def __init__(self, workdir: str, config, for_training: bool = True,
               subdir: str = 'checkpoints', max_to_keep: Optional[int] = None,
               primary: Optional[bool] = None):
    self.workdir, self.subdir = workdir, subdir
    self.directory = os.path.join(os.path.abspath(workdir), subdir)
    guarded = for_training and (subdir == 'checkpoints' if primary is None else primary)
    lock_key = _lock_for_all_processes(workdir) if guarded else None
    self._release = weakref.finalize(self, release_workdir_lock, lock_key) if lock_key else None
    self._manager = None
    self._saved = False
    try:
      if not for_training and not os.path.isdir(self.directory):
        raise WorkdirError(f'no checkpoints in {self.directory}: train there first '
                           f'(python main.py --config=... --workdir={workdir})')
      check_run_info(workdir, config)
      keep = config.max_checkpoints_to_keep if max_to_keep is None else max_to_keep
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False)
      # The handler named up front, so that item_metadata can read a step before any restore.
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_handlers=ocp.StandardCheckpointHandler())
      if guarded:
        check_config(workdir, config, has_checkpoints=self.latest_step() is not None)
    except BaseException:
      self.close()
      raise

  def close(self) -> None:
    """Releases the workdir lock (if this Checkpointer holds it) and the checkpoint manager."""
    if self._release is not None:
      self._release()
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, state, wall_seconds: Optional[float] = None, last: bool = False) -> None:
    """Saves `state` (with the run's training seconds so far, if given). The first save of
    this Checkpointer and the `last` are logged at INFO, the others at DEBUG."""
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    metadata = {WALL_SECONDS: round(wall_seconds, 1)} if wall_seconds is not None else None
    self._manager.save(step, args=ocp.args.StandardSave(state.checkpoint_items()),
                       custom_metadata=metadata)
    self._manager.wait_until_finished()
    level = logging.INFO if last or not self._saved else logging.DEBUG
    logging.log(level, 'saved checkpoint at step %d in %s', step, self.directory)
    self._saved = True

  def wall_seconds(self, step: int) -> Optional[float]:
    """The training seconds recorded with checkpoint `step` (None: not recorded)."""
    try:
      return self._manager.metadata(step).custom_metadata.get(WALL_SECONDS)
    except Exception:  # pylint: disable=broad-except  (written by an older version)
      return None

  def _saved_extra_shapes(self, step: int) -> Dict[str, Tuple[int, ...]]:
    """The shapes of TrainState.extra as saved at `step` (from the checkpoint's metadata)."""
    try:
      metadata = self._manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('cannot read the metadata of checkpoint %d (%s): restoring with this '
                      "run's shapes", step, e)
      return {}
    tree = getattr(metadata, 'tree', metadata)
    extra = tree.get('extra') if hasattr(tree, 'get') else None
    if extra is None:
      logging.warning('checkpoint %d has no readable metadata of `extra`: restoring with this '
                      "run's shapes", step)
    return {k: tuple(v.shape) for k, v in (extra or {}).items() if hasattr(v, 'shape')}

  def restore_latest(self, state):
    """`state` with the latest checkpoint's values, or None if there is none.

    Every array gets the shape and sharding of `state`'s. The per-device pools of
    `extra` (the replay buffer, one shard per device) are re-split when the
    checkpoint was written on another number of devices: the entries keep their
    order, so the run continues with the same set of images.
    """
    step = self.latest_step()
    if step is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())
    saved_shapes = self._saved_extra_shapes(step)
    resplit = {}
    for name, leaf in dict(target.get('extra') or {}).items():
      saved = saved_shapes.get(name)
      if saved is None or saved == tuple(leaf.shape):
        continue
      same_entries = (name in PER_DEVICE_POOLS and len(saved) == len(leaf.shape) >= 2
                      and saved[2:] == tuple(leaf.shape[2:])
                      and saved[0] * saved[1] == leaf.shape[0] * leaf.shape[1])
      if not same_entries:
        raise WorkdirError(
            f'checkpoint {step} in {self.directory} has extra[{name!r}] of shape {saved}; this '
            f'run needs {tuple(leaf.shape)}' + (
                f' ({saved[0] * saved[1]} vs {leaf.shape[0] * leaf.shape[1]} entries: '
                'was sampler.buffer_size changed?)' if name in PER_DEVICE_POOLS else ''))
      resplit[name] = leaf
      # Read whole on every device of the target mesh (every process reads what it holds),
      # then split anew by one jitted reshape: safe with any number of processes.
      target['extra'][name] = jax.ShapeDtypeStruct(
          saved, leaf.dtype, sharding=_replicated_like(getattr(leaf, 'sharding', None)))
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except ValueError as e:
      raise WorkdirError(f'checkpoint {step} in {self.directory} does not fit this run: {e}') from e
    for name, leaf in resplit.items():
      restored['extra'][name] = _reshard_pool(restored['extra'][name], leaf)
      logging.info('checkpoint %d was written on %d devices, this run has %d: re-split '
                   "extra[%r] from %s to %s (the same %d entries, in order)", step,
                   saved_shapes[name][0], leaf.shape[0], name, saved_shapes[name],
                   tuple(leaf.shape), leaf.shape[0] * leaf.shape[1])
    logging.info('restored checkpoint at step %d', step)
    return state.replace(**restored)
