"""A long run's workdir does not silently go wrong: resuming on another device count,
resuming with a changed config, and two trainings on one workdir.

Work on several devices runs in subprocesses (the pytest process has one CPU
device; XLA_FLAGS must be set before JAX starts): main.py itself, or this file's
`reshard_worker` through `python -c`.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import data as data_lib
from jeat_jax.errors import WorkdirError
from tests.conftest import REPO, smoke_config, write_synthetic_npz
from tests.test_parallel import worker_env

TIMEOUT_S = 600


@pytest.fixture(scope='module')
def module_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('checkpoint_safety')


@pytest.fixture(scope='module')
def data_path(module_dir):
  return write_synthetic_npz(module_dir / 'data.npz', n_train=64, n_test=32)


def env_with_devices(module_dir, num_devices: int) -> dict:
  return worker_env(module_dir / 'jax_cache', num_devices)


def run_main(module_dir, num_devices: int, recipe: str, workdir, data_path, *overrides):
  """python main.py on the :smoke config of `recipe`; returns (exit code, stderr + stdout)."""
  cmd = [sys.executable, 'main.py', f'--config=configs/{recipe}.py:smoke', f'--workdir={workdir}',
         '--config.data.source=npz', f'--config.data.path={data_path}', *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=env_with_devices(module_dir, num_devices),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  return proc.returncode, proc.stderr + proc.stdout


def error_line(output: str) -> str:
  errors = [line for line in output.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in output, output[-3000:]
  return errors[0]


def raw_checkpoint(workdir, step):
  """A checkpoint's arrays as saved (any device layout), on this process's one device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


# ----------------------------------------------------------------------------- (d) device count

@pytest.fixture(scope='module')
def resumed_on_fewer_devices(module_dir, data_path):
  """JEM (SGLD from a replay buffer of 62 images: 64 rows on 4 devices, 62 on 2) trained 2
  steps on 4 devices, then resumed to step 4 on 2. Returns the workdir, the step-2 buffer
  and the second run's output."""
  workdir = module_dir / 'four_then_two'
  rc, first = run_main(module_dir, 4, 'jem', workdir, data_path, '--config.num_train_steps=2',
                       '--config.sampler.buffer_size=62')
  assert rc == 0, first[-3000:]
  saved = raw_checkpoint(workdir, 2)['extra']['buffer']
  rc, second = run_main(module_dir, 2, 'jem', workdir, data_path, '--config.num_train_steps=4',
                        '--config.sampler.buffer_size=62')
  assert rc == 0, second[-3000:]
  return workdir, saved, second


@pytest.mark.slow  # share a 4-device training subprocess
def test_resume_on_fewer_devices_finishes(resumed_on_fewer_devices):
  workdir, saved, log = resumed_on_fewer_devices
  assert saved.shape == (64, 32, 32, 3) and not saved[62:].any()  # 62 entries, 2 rows of padding
  assert "holds extra['buffer'] as (64, 32, 32, 3), this run's devices need (62, 32, 32, 3)" in log, log[-3000:]
  assert json.loads((workdir / 'results.json').read_text())['step'] == 4
  assert raw_checkpoint(workdir, 4)['extra']['buffer'].shape == (62, 32, 32, 3)


class ItemsState:
  """Stands in for a TrainState: `items` are its checkpoint items."""

  def __init__(self, items):
    self.items = items

  def checkpoint_items(self):
    return self.items

  def replace(self, **items):  # as TrainState.replace(**restored)
    return ItemsState(items=items)


@pytest.mark.slow  # share a 4-device training subprocess
def test_restore_onto_one_device_keeps_the_buffer_images(resumed_on_fewer_devices, data_path):
  """The step-2 checkpoint (4 devices, 64 rows) restored by Checkpointer onto this process's
  single device: the same 62 images, in the same order."""
  workdir, saved, _ = resumed_on_fewer_devices
  step2_dir = workdir.parent / 'step2_only'
  os.makedirs(step2_dir, exist_ok=True)
  for name in ('run_info.json', 'config.json', os.path.join('checkpoints', '2')):
    copy = shutil.copytree if os.path.isdir(workdir / name) else shutil.copy
    copy(workdir / name, step2_dir / name)
  items = jax.tree.map(jnp.zeros_like, raw_checkpoint(workdir, 2))
  items['extra']['buffer'] = jnp.zeros((62, 32, 32, 3))  # as create_train_state on 1 device
  config = smoke_config('jem', data_path, num_train_steps=2, **{'sampler.buffer_size': 62})
  with ckpt_lib.Checkpointer(str(step2_dir), config, for_training=False) as checkpointer:
    restored = checkpointer.restore_latest(ItemsState(items=items)).items
  assert int(restored['step']) == 2
  buffer = np.asarray(restored['extra']['buffer'])
  assert buffer.shape == (62, 32, 32, 3)
  np.testing.assert_array_equal(buffer, saved[:62])


class PoolState(flax.struct.PyTreeNode):
  """The parts of a TrainState whose layout depends on the device count."""
  step: jax.Array
  extra: dict

  def checkpoint_items(self):
    return dict(step=self.step, extra=self.extra)


def pool_state(devices, rows, step=0, fill=False, entries=None):
  """A replay buffer and an EB-JDAT re-initialisation pool of `entries` (default: their
  rows) images, entry i filled with i + 1 (their padding with 0), laid out as `rows`, and a
  Free AT delta (8 images); all sharded on axis 0 over a mesh of `devices`."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(devices), ('data',))
  shard = NamedSharding(mesh, P('data'))

  def pool(shape, n):
    values = np.zeros((int(np.prod(shape[:-3])), 2, 2, 3), np.float32)
    if fill:
      values[:n] += np.arange(1, n + 1, dtype=np.float32)[:, None, None, None]
    return jax.device_put(values.reshape(shape), shard)

  buffer_rows, pool_rows = rows
  buffer_entries, pool_entries = entries or (buffer_rows[0], pool_rows[0])
  delta = np.zeros((8, 2, 2, 3), np.float32) + fill * np.arange(8.0)[:, None, None, None] / 10
  return PoolState(step=jax.device_put(jnp.int32(step), NamedSharding(mesh, P())),
                   extra={'buffer': pool((*buffer_rows, 2, 2, 3), buffer_entries),
                          'reinit_pool': pool((*pool_rows, 2, 2, 3), pool_entries),
                          'free_delta': jax.device_put(delta, shard)})


def reshard_worker(workdir: str, data_path: str) -> None:
  """Run in a subprocess with 4 CPU devices: saves a state of 4 devices (a buffer of 10
  entries in 12 rows, a pool of 6 in 8), restores it on 2, 1 and 4 devices; then a buffer
  of the older layout (devices, entries per device, ...)."""
  assert jax.device_count() == 4
  config = smoke_config('ebjdat', data_path, **{'sampler.buffer_size': 10,
                                                 'sampler.reinit_pool_size': 6})
  saved = pool_state(jax.devices(), ((12,), (8,)), step=2, fill=True, entries=(10, 6))
  with ckpt_lib.Checkpointer(workdir, config) as saver:  # closing waits for the write
    saver.save(saved)
  for n in (2, 1, 4):
    rows = (-(-10 // n) * n, -(-6 // n) * n)
    target = pool_state(jax.devices()[:n], ((rows[0],), (rows[1],)))
    restored = ckpt_lib.Checkpointer(workdir, config, for_training=False).restore_latest(target)
    for name, size in (('buffer', 10), ('reinit_pool', 6), ('free_delta', 8)):
      got, want = np.asarray(restored.extra[name]), np.asarray(saved.extra[name])
      assert got.shape == target.extra[name].shape, (n, name, got.shape)
      assert restored.extra[name].sharding == target.extra[name].sharding, (n, name)
      # Entry i of the saved pool is entry i of the restored one; the padding is zeros.
      np.testing.assert_array_equal(got[:size], want[:size], err_msg=f'{n} devices, {name}')
      assert not got[size:].any(), (n, name)
    print(f'{n} devices: buffer {restored.extra["buffer"].shape}', flush=True)
  bad = smoke_config('ebjdat', data_path, **{'sampler.buffer_size': 15,
                                             'sampler.reinit_pool_size': 6})
  try:
    ckpt_lib.Checkpointer(workdir, bad, for_training=False).restore_latest(
        pool_state(jax.devices()[:1], ((15,), (6,))))
    raise AssertionError('a buffer of another size was restored')
  except WorkdirError as e:
    assert 'sampler.buffer_size' in str(e) and '(12, 2, 2, 3)' in str(e), e
  # The layout of the checkpoints written before the global pools: (devices, per device, ...).
  old = pool_state(jax.devices(), ((4, 4), (4, 2)), step=3, fill=True, entries=(16, 8))
  old_config = smoke_config('ebjdat', data_path, **{'sampler.buffer_size': 16,
                                                     'sampler.reinit_pool_size': 8})
  with ckpt_lib.Checkpointer(workdir + '_old', old_config) as saver:
    saver.save(old)
  restored = ckpt_lib.Checkpointer(workdir + '_old', old_config, for_training=False).restore_latest(
      pool_state(jax.devices()[:1], ((16,), (8,))))
  np.testing.assert_array_equal(np.asarray(restored.extra['buffer']).ravel()[::12],
                                np.arange(1, 17))
  print('reshard ok', flush=True)


def test_checkpointer_repads_the_pools_for_any_device_count(tmp_path, module_dir, data_path):
  """A buffer (10 entries) and a pool (6) saved from 4 devices are restored onto 2, 1 and 4
  devices (entries in order, padding zeros), with a Free AT delta of 8 images; a buffer of
  another size is refused; a buffer of the older per-device layout is read in order."""
  code = ('import sys; from tests.test_checkpoint_safety import reshard_worker; '
          'reshard_worker(sys.argv[1], sys.argv[2])')
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'w'), data_path], cwd=REPO,
                        env=env_with_devices(module_dir, 4), capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0 and 'reshard ok' in proc.stdout, proc.stdout + proc.stderr[-3000:]


# ----------------------------------------------------------------------------- (e) config

def test_config_differences_ignore_run_length_and_eval():
  saved = {'optimizer.lr': 0.1, 'num_train_steps': 2, 'eval.num_examples': 64,
           'sample.num_steps': 3, 'data.path': 'a.npz', 'debug_inject_nan_at_step': -1,
           'schedule.decay_epochs': [100, 150], 'loss.gone': 1}
  new = dict(saved, **{'optimizer.lr': 0.05, 'num_train_steps': 8, 'eval.num_examples': 16,
                       'sample.num_steps': 5, 'data.path': 'b.npz', 'debug_inject_nan_at_step': 3,
                       'robust_watch.enabled': True, 'loss.new': 2})
  del new['loss.gone']
  assert ckpt_lib.config_differences(saved, new) == [
      ('loss.gone', 1, '<absent>'), ('loss.new', '<absent>', 2), ('optimizer.lr', 0.1, 0.05)]


def test_keys_added_since_a_config_json_default_to_the_old_behaviour(tmp_path):
  """A config.json written before `model.arch` and `loss.example_weights` existed resumes with
  their old-behaviour values, and not with others."""
  from configs import at
  new = ckpt_lib.flat_config(at.get_config('smoke'))
  saved = {k: v for k, v in new.items() if k not in ckpt_lib.ADDED_KEYS}
  assert ckpt_lib.config_differences(saved, new) == []
  new['model.arch'], new['loss.example_weights'] = 'resnet18', 'inverse_softplus_energy'
  assert ckpt_lib.config_differences(saved, new) == [
      ('loss.example_weights', 'uniform', 'inverse_softplus_energy'),
      ('model.arch', 'wrn', 'resnet18')]


@pytest.mark.slow  # share a 4-device training subprocess
def test_resume_with_changed_hyperparameter_is_refused(resumed_on_fewer_devices, module_dir,
                                                       data_path):
  workdir, _, _ = resumed_on_fewer_devices
  saved_lr = json.loads((workdir / 'config.json').read_text())['optimizer.lr']
  assert saved_lr == smoke_config('jem', data_path).optimizer.lr != 0.05
  rc, out = run_main(module_dir, 2, 'jem', workdir, data_path, '--config.optimizer.lr=0.05',
                     '--config.sampler.num_steps=3', '--config.sampler.buffer_size=62')
  assert rc == 2, out[-3000:]
  line = error_line(out)
  assert f'optimizer.lr: saved {saved_lr!r}, now 0.05' in line and 'sampler.num_steps: saved 2, now 3' in line, line
  assert str(workdir) in line and 'num_train_steps' not in line

  # The run length, the eval settings and the data path may change on a resume; evaluation
  # modes check only which recipe and model wrote the workdir.
  longer = smoke_config('jem', str(module_dir / 'moved.npz'), num_train_steps=8, num_epochs=3,
                        checkpoint_every_steps=4, **{'eval.num_examples': 16,
                                                     'sample.num_steps': 7,
                                                     'sampler.buffer_size': 62})
  with ckpt_lib.Checkpointer(str(workdir), longer) as checkpointer:
    assert checkpointer.latest_step() == 4
  other_lr = smoke_config('jem', data_path, **{'optimizer.lr': 0.05, 'eval.num_examples': 16,
                                               'sampler.buffer_size': 62})
  with ckpt_lib.Checkpointer(str(workdir), other_lr, for_training=False) as checkpointer:
    assert checkpointer.latest_step() == 4
  with pytest.raises(WorkdirError, match='optimizer.lr'):
    ckpt_lib.Checkpointer(str(workdir), other_lr)


# ----------------------------------------------------------------------------- (f) the lock

HOLDER = ('import sys, time; from jeat_jax import checkpoint; from tests.conftest import '
          'smoke_config; c = checkpoint.Checkpointer(sys.argv[1], smoke_config("natural", '
          'sys.argv[2])); print("locked", flush=True); time.sleep(600)')


def test_second_training_on_a_workdir_is_refused_until_the_holder_dies(tmp_path, module_dir,
                                                                       data_path):
  workdir = tmp_path / 'w'
  holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir), data_path], cwd=REPO,
                            env=env_with_devices(module_dir, 1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked', holder.stderr.read()
    rc, out = run_main(module_dir, 1, 'natural', workdir, data_path)
    assert rc == 2, out[-3000:]
    line = error_line(out)
    assert 'in use by another training run' in line, line
    assert f'pid {holder.pid} on host {socket.gethostname()}' in line, line
    # A second Checkpointer of the holder's kind (WORKDIR/best/) takes no lock.
    with ckpt_lib.Checkpointer(str(workdir), smoke_config('natural', data_path), subdir='best',
                               max_to_keep=1):
      pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    holder.stdout.close()
    holder.stderr.close()
  assert holder.returncode == -signal.SIGKILL
  # The killed holder left its lock file behind, but not its lock.
  with ckpt_lib.Checkpointer(str(workdir), smoke_config('natural', data_path)) as checkpointer:
    assert checkpointer.latest_step() is None
    info = json.loads((workdir / '.lock').read_text())
    assert info['pid'] == os.getpid()
  # Released on close: another process can take it.
  code = ('import sys; from jeat_jax import workdir_lock; workdir_lock.acquire(sys.argv[1]);'
          ' print("taken")')
  proc = subprocess.run([sys.executable, '-c', code, str(workdir)], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=env_with_devices(module_dir, 1))
  assert proc.stdout.strip() == 'taken', proc.stderr[-2000:]


# ----------------------------------------------------------------------------- (g) resume rules

def test_run_length_may_change_only_under_schedules_that_do_not_depend_on_it():
  saved = {'schedule.name': 'onecycle', 'num_epochs': 15, 'num_train_steps': 0}
  for schedule in ('onecycle', 'cosine', 'cosine_onecycle'):
    longer = dict(saved, **{'schedule.name': schedule, 'num_epochs': 30})
    message = ckpt_lib.run_length_change(dict(saved, **{'schedule.name': schedule}), longer)
    assert 'num_epochs: saved 15, now 30' in message and schedule in message, message
  # num_train_steps > 0 sets the length: num_epochs is then not part of it.
  by_steps = dict(saved, num_train_steps=100)
  assert ckpt_lib.run_length_change(by_steps, dict(by_steps, num_epochs=30)) is None
  assert 'num_train_steps: saved 100, now 200' in ckpt_lib.run_length_change(
      by_steps, dict(by_steps, num_train_steps=200))
  for schedule in ('constant', 'multistep'):  # boundaries in epochs: a longer run extends it
    same = dict(saved, **{'schedule.name': schedule})
    assert ckpt_lib.run_length_change(same, dict(same, num_epochs=30)) is None


@pytest.mark.slow  # three main.py runs: a minute on 2 cores
def test_resume_refuses_a_new_run_length_under_cosine_and_other_data(module_dir, data_path):
  """The one line a user sees when a resume would make the learning rate jump, and when it
  would train on other data (data.json, written at the first start)."""
  workdir = module_dir / 'resume_rules'
  cosine = '--config.schedule.name=cosine'
  rc, out = run_main(module_dir, 1, 'natural', workdir, data_path, cosine,
                     '--config.num_train_steps=2')
  assert rc == 0, out[-3000:]
  data = json.loads((workdir / 'data.json').read_text())
  assert data['source'] == 'npz' and len(data['sha256']) == 64
  rc, out = run_main(module_dir, 1, 'natural', workdir, data_path, cosine,
                     '--config.num_train_steps=4')
  assert rc == 2
  line = error_line(out)
  assert "schedule.name='cosine'" in line and 'num_train_steps: saved 2, now 4' in line, line
  print(line)
  other = write_synthetic_npz(module_dir / 'other.npz', n_train=64, n_test=32, seed=1)
  rc, out = run_main(module_dir, 1, 'natural', workdir, other, cosine,
                     '--config.num_train_steps=2')
  assert rc == 2
  line = error_line(out)
  assert data["sha256"] in line and data_lib.file_sha256(other) in line, line
  print(line)
