"""Checkpoints of the whole TrainState with orbax, written atomically, and the workdir's guards.

Orbax writes each step to a temporary directory and renames it when complete (on an
object store, which has no rename, it writes a commit marker last), so a run killed
mid-save leaves the previous checkpoint intact. The workdir may be local or a gs:// URI
(every file through `jeat_jax.files`). Around that,
a training Checkpointer guards a week-long run against going silently wrong:

- `run_info.json`: which recipe, dataset and model wrote the workdir; a workdir
  written by another is refused before any restore is tried (also when evaluating).
- `config.json`: the whole config of the first training start; a resume whose
  config differs in anything but the run length, the checkpoint / logging
  periods and the evaluation settings (RESUMABLE_KEYS, RESUMABLE_PREFIXES) is refused,
  naming each key with its saved and new value.
- `.lock`: held by process 0 for the Checkpointer's lifetime (`workdir_lock`: a flock
  locally, a lease object on gs://), so a second training on the same workdir stops at
  once, naming the live holder, instead of colliding with its half-written steps.
- `data.json`: which data the first start trained on (source; TFDS name and version,
  or the npz file's sha256); a resume on other data is refused, naming both.
- A resume that changes the run length under a schedule that is a function of it
  (onecycle, cosine, cosine_onecycle) is refused: the learning rate would jump.
- The image pools of `extra` (the replay buffer, EB-JDAT's re-initialisation pool) are
  saved as one global array of `size` entries padded to a multiple of the device count
  (DEVICE_POOLS); a run resumed, evaluated or sampled on another device count gets the
  same entries in the same order, padded for its own devices (restore_latest). Pools of
  the older layout (devices, entries per device, H, W, C) are read too.
"""
import json
import os
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from jeat_jax import files, workdir_lock
from jeat_jax.errors import WorkdirError
from jeat_jax.files import read_json, write_json_atomic

RUN_INFO = 'run_info.json'
CONFIG_FILE = 'config.json'
DATA_FILE = 'data.json'
WALL_SECONDS = 'wall_seconds'  # custom metadata of a checkpoint: training seconds up to it

# Config keys a resume may change: nothing saved in a checkpoint depends on them.
RESUMABLE_KEYS = frozenset({
    'num_epochs', 'num_train_steps',  # the run length
    'checkpoint_every_steps', 'log_every_steps', 'eval_every_steps', 'dynamics_every_steps',
    'max_checkpoints_to_keep', 'async_checkpoints',
    'data.path', 'data.tfds_data_dir',  # where the same data lives on this machine
})
# divergence.*: a run stopped by the guard may be resumed with a larger budget.
RESUMABLE_PREFIXES = ('eval.', 'sample.', 'fid.', 'analysis.', 'robust_watch.', 'distributed.',
                      'divergence.', 'debug_')

# Entries of TrainState.extra that are pools of images sharded over the devices on their first
# axis, and the key of `config.sampler` that gives their number of entries: `size` entries,
# padded with rows of zeros to a multiple of the device count (sampling.padded_size).
DEVICE_POOLS = {'buffer': 'buffer_size', 'reinit_pool': 'reinit_pool_size'}
# Schedules that are functions of the run's total steps: a resume may not change the length.
LENGTH_DEPENDENT_SCHEDULES = ('onecycle', 'cosine', 'cosine_onecycle')


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
              'optimizer.sam_rho': 0.0, 'optimizer.sam_adaptive': True, 'sample.grad_clamp': 0.0,
              'model.bn_momentum': 0.9, 'data.pad_mode': 'reflect',
              'schedule.cycle_momentum': False, 'schedule.base_momentum': 0.85,
              'schedule.max_momentum': 0.95, 'data.validation_size': 0}


def config_differences(saved: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """(key, saved value, new value) of every key that a resume may not change."""
  saved = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **saved}
  keys = sorted(k for k in set(saved) | set(new) if not is_resumable_key(k))
  return [(k, saved.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
          if saved.get(k, _ABSENT) != new.get(k, _ABSENT)]


def run_length_change(saved: Dict[str, Any], new: Dict[str, Any]) -> Optional[str]:
  """Why a resume may not change the run length (None where it may): under a schedule of the
  total steps (LENGTH_DEPENDENT_SCHEDULES) a longer or shorter run moves every later
  learning rate, so the resumed run would jump to another point of another schedule."""
  schedule = new.get('schedule.name')
  if schedule not in LENGTH_DEPENDENT_SCHEDULES:
    return None
  keys = ['num_train_steps'] if new.get('num_train_steps', 0) > 0 else ['num_epochs']
  if saved.get('num_train_steps', 0) != new.get('num_train_steps', 0):
    keys = ['num_train_steps']
  changed = [(k, saved.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
             if saved.get(k, _ABSENT) != new.get(k, _ABSENT)]
  if not changed:
    return None
  shown = '; '.join(f'{k}: saved {s!r}, now {n!r}' for k, s, n in changed)
  return (f'schedule.name={schedule!r} is a function of the run length, which a resume may not '
          f'change ({shown}): the learning rate would jump. Resume with the saved length, or '
          'start the longer run in another --workdir')


def check_config(workdir: str, config, has_checkpoints: bool) -> None:
  """Refuses to resume `workdir` with a config other than the one it was trained with.

  Before the first checkpoint nothing depends on the config: process 0 (re)writes
  config.json. Afterwards a resume may change only the run length, the checkpoint
  and logging periods and the evaluation settings.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = flat_config(config)
  if not has_checkpoints or not files.exists(path):
    if has_checkpoints:
      logging.warning('%s has checkpoints but no %s (written by an older version): this '
                      "resume's config cannot be checked; it is saved as the run's config",
                      workdir, CONFIG_FILE)
    if jax.process_index() == 0:
      write_json_atomic(path, new)
    return
  saved = read_json(path)
  length = run_length_change(saved, new)
  if length:
    raise WorkdirError(f'workdir {workdir}: {length}.')
  diffs = config_differences(saved, new)
  if diffs:
    shown = '; '.join(f'{k}: saved {s!r}, now {n!r}' for k, s, n in diffs[:20])
    more = f' (and {len(diffs) - 20} more)' if len(diffs) > 20 else ''
    raise WorkdirError(
        f'workdir {workdir} holds a run trained with another config; a resume may change only '
        f'the run length, the checkpoint / logging periods and eval.*, sample.*, fid.*, '
        f'analysis.* settings. Differing keys: {shown}{more}. Resume with the saved values, or '
        f'use another --workdir (the saved config is {path}; delete it to accept the new one).')


def data_identity(provenance: Dict[str, Any]) -> Dict[str, Any]:
  """What a run trained on, from `Dataset.provenance`: the source and the TFDS name and
  version, or the npz file's sha256 (its path may change: data.path is resumable)."""
  return {k: v for k, v in provenance.items() if k != 'path'}


def check_data(workdir: str, provenance: Dict[str, Any], has_checkpoints: bool) -> None:
  """Writes WORKDIR/data.json at the first start; refuses a resume on other data."""
  path = os.path.join(workdir, DATA_FILE)
  mine = data_identity(provenance)
  saved = read_json(path)
  if saved is not None and has_checkpoints:
    saved_identity = data_identity(saved)
    if saved_identity != mine:
      raise WorkdirError(
          f'workdir {workdir} was trained on {saved_identity}; this run loads {mine}. Resume on '
          f'the same data (data.source, data.path, data.tfds_data_dir), or use another --workdir.')
  elif jax.process_index() == 0:
    write_json_atomic(path, provenance)


# ----------------------------------------------------------------------------- the lock

def _lock_for_all_processes(workdir: str) -> Optional[str]:
  """Process 0 takes the lock; the others learn whether it could, and stop with it if not."""
  key, error = None, None
  if jax.process_index() == 0:
    try:
      key = workdir_lock.acquire(workdir)
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


def _repad_pool(saved: jax.Array, size: int, target: jax.ShapeDtypeStruct) -> jax.Array:
  """The first `size` entries of a saved pool (rows, ...) or (devices, rows per device, ...)
  of the older layout, padded with zeros to the target's rows and laid out as it is."""
  def repad(a):
    a = a.reshape((-1, *target.shape[1:]))[:size]
    return jnp.pad(a, [(0, target.shape[0] - size)] + [(0, 0)] * (a.ndim - 1)).astype(target.dtype)
  return jax.jit(repad, out_shardings=getattr(target, 'sharding', None))(saved)


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
    self._pool_sizes = {name: config.sampler[key] for name, key in DEVICE_POOLS.items()}
    self._async = config.async_checkpoints
    self.directory = os.path.join(files.absolute(workdir), subdir)
    guarded = for_training and (subdir == 'checkpoints' if primary is None else primary)
    lock_key = _lock_for_all_processes(workdir) if guarded else None
    self._lock_key = lock_key
    self._release = weakref.finalize(self, workdir_lock.release, lock_key) if lock_key else None
    self._manager = None
    self._saved = False
    try:
      if not for_training and not files.isdir(self.directory):
        raise WorkdirError(f'no checkpoints in {self.directory}: train there first '
                           f'(python main.py --config=... --workdir={workdir})')
      check_run_info(workdir, config)
      keep = config.max_checkpoints_to_keep if max_to_keep is None else max_to_keep
      # Asynchronous: a save copies the state to host memory and returns; orbax writes
      # (and commits by an atomic rename) while the next steps run.
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=config.async_checkpoints)
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

  def save(self, state, wall_seconds: Optional[float] = None, last: bool = False) -> float:
    """Saves `state` (with the run's training seconds so far, if given); returns the seconds
    the caller was blocked. With `async_checkpoints` the write goes on in the background
    (the previous one is waited for first), except for the `last` save, which is complete
    on return. The first save of this Checkpointer and the `last` are logged at INFO."""
    start = time.time()
    step = int(state.step)
    taker = workdir_lock.lost(self._lock_key)
    if taker is not None:
      raise WorkdirError(f'workdir {self.workdir}: the lease of this run was taken over by '
                         f'{workdir_lock.describe_holder(taker)}; step {step} is not saved')
    if step in self._manager.all_steps():
      return 0.0
    metadata = {WALL_SECONDS: round(wall_seconds, 1)} if wall_seconds is not None else None
    self._manager.save(step, args=ocp.args.StandardSave(state.checkpoint_items()),
                       custom_metadata=metadata)
    if last:
      self._manager.wait_until_finished()
    blocked = time.time() - start
    level = logging.INFO if last or not self._saved else logging.DEBUG
    written = 'committed' if last or not self._async else 'written in the background'
    logging.log(level, 'saved checkpoint at step %d in %s (%s; the loop waited %.2f s)', step,
                self.directory, written, blocked)
    self._saved = True
    return blocked

  def wait_until_finished(self) -> None:
    """Returns when every save started has been written and committed."""
    self._manager.wait_until_finished()

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

    Every array gets the shape and sharding of `state`'s. The pools of `extra`
    (DEVICE_POOLS) are re-padded when the checkpoint was written on another number of
    devices: the entries keep their order, so the run continues with the same images.
    """
    self._manager.wait_until_finished()  # a save still being written is the latest
    step = self.latest_step()
    if step is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())
    saved_shapes = self._saved_extra_shapes(step)
    repad = {}
    for name, leaf in dict(target.get('extra') or {}).items():
      saved = saved_shapes.get(name)
      if saved is None or saved == tuple(leaf.shape):
        continue
      size = self._pool_sizes.get(name)
      entries = int(np.prod(saved[:-3])) if len(saved) >= 4 else 0
      same_entries = (name in DEVICE_POOLS and saved[-3:] == tuple(leaf.shape[1:])
                      and (entries == size if len(saved) == 5 else entries >= size))
      if not same_entries:
        raise WorkdirError(
            f'checkpoint {step} in {self.directory} has extra[{name!r}] of shape {saved}; this '
            f'run needs {tuple(leaf.shape)}' + (
                f' (its {entries} rows do not hold the {size} entries of '
                f'sampler.{DEVICE_POOLS[name]}: was it changed?)' if name in DEVICE_POOLS else ''))
      repad[name] = leaf
      # Read whole on every device of the target mesh (every process reads what it holds),
      # then cut and padded anew by one jitted function: safe with any number of processes.
      target['extra'][name] = jax.ShapeDtypeStruct(
          saved, leaf.dtype, sharding=_replicated_like(getattr(leaf, 'sharding', None)))
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except ValueError as e:
      raise WorkdirError(f'checkpoint {step} in {self.directory} does not fit this run: {e}') from e
    for name, leaf in repad.items():
      restored['extra'][name] = _repad_pool(restored['extra'][name], self._pool_sizes[name], leaf)
      logging.info("checkpoint %d holds extra[%r] as %s, this run's devices need %s: the same "
                   '%d entries, in order', step, name, saved_shapes[name], tuple(leaf.shape),
                   self._pool_sizes[name])
    logging.info('restored checkpoint at step %d', step)
    return state.replace(**restored)
