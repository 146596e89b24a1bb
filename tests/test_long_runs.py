"""Week-long runs that cannot silently go wrong (issue 13, 5a-c): the divergence guard's
budget per window of steps, saved in the checkpoint; decay boundaries where the config
puts them; the robust watch and its best state in WORKDIR/best/."""
import glob
import json
import os

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from configs import jeat, jem, prejeat
from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import train
from tests.conftest import smoke_config, write_synthetic_npz


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  return write_synthetic_npz(tmp_path_factory.mktemp('d') / 'data.npz', n_train=256, n_test=32)


# ----------------------------------------------------------------------------- (b) schedule

@pytest.mark.parametrize('name', ['multistep', 'constant'])
def test_decay_boundaries_do_not_move_with_warmup(name):
  config = smoke_config('natural')
  config.optimizer.lr = 0.2
  config.schedule.name = name
  config.schedule.decay_epochs = (2, 5)
  config.schedule.warmup_steps = 5
  sched = train.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  lr = lambda t: float(sched(t))
  assert lr(0) == 0.0 and lr(2) == pytest.approx(0.2 * 2 / 5) and lr(5) == pytest.approx(0.2)
  if name == 'multistep':  # boundaries at steps 20 and 50, as without warm-up
    assert np.allclose([lr(19), lr(20), lr(21), lr(49), lr(51)], [0.2, 0.02, 0.02, 0.02, 0.002])
  else:
    assert lr(99) == pytest.approx(0.2)


def test_cosine_with_warmup_ends_at_zero():
  config = smoke_config('natural')
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = 10
  sched = train.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- (a) the guard

def test_rollback_budget_counts_per_window():
  b = np.zeros(3, np.int32)
  b = train.count_rollback(b, step=120, window_steps=100)
  assert b.tolist() == [1, 1, 1]
  b = train.count_rollback(b, step=150, window_steps=100)
  assert b.tolist() == [1, 2, 2]
  b = train.count_rollback(b, step=230, window_steps=100)   # a new window: the budget restarts
  assert b.tolist() == [2, 1, 3]
  assert train.count_rollback(b, step=10_000, window_steps=0).tolist() == [0, 1, 4]


@pytest.mark.parametrize('recipe_module', [jeat, jem, prejeat])
@pytest.mark.parametrize('scale', [None, 'cpu'])
def test_energy_recipes_are_guarded_at_every_scale(recipe_module, scale):
  """A healthy energy-recipe loss is a few units; a run-away one is in the hundreds."""
  assert recipe_module.get_config(scale).divergence.max_abs_loss <= 100


def _saved_budget(workdir, config):
  manager = ckpt_lib.Checkpointer(workdir, config, for_training=False)._manager
  return np.asarray(manager.restore(manager.latest_step())['divergence']).tolist()


def test_rollback_budget_is_saved_and_restored(tmp_path, data_path):
  workdir = str(tmp_path / 'w')
  config = smoke_config('natural', data_path, log_every_steps=1, debug_inject_nan_at_steps=(2,))
  assert train.train_and_evaluate(config, workdir)['divergence_rollbacks'] == 1
  assert _saved_budget(workdir, config) == [0, 1, 1]
  # Resumed with a longer run: the rollback of the first session still counts.
  longer = smoke_config('natural', data_path, log_every_steps=1, num_train_steps=6)
  assert train.train_and_evaluate(longer, workdir)['divergence_rollbacks'] == 1


def test_budget_is_per_window_in_the_loop(tmp_path, data_path):
  """NaNs before steps 2 and 4 (found at steps 3 and 5), one rollback allowed per window."""
  overrides = dict(log_every_steps=1, num_train_steps=6, debug_inject_nan_at_steps=(2, 4),
                   **{'divergence.max_retries': 1})
  per_window = smoke_config('natural', data_path, **overrides, **{'divergence.window_steps': 2})
  results = train.train_and_evaluate(per_window, str(tmp_path / 'a'))
  assert results['step'] == 6 and results['divergence_rollbacks'] == 2
  whole_run = smoke_config('natural', data_path, **overrides, **{'divergence.window_steps': 0})
  with pytest.raises(train.TrainingDiverged, match='after 1 rollbacks'):
    train.train_and_evaluate(whole_run, str(tmp_path / 'b'))


def test_no_checkpoint_from_a_diverged_state(tmp_path, data_path):
  """Checked only where a checkpoint is due (logging every 1000 steps): still caught."""
  workdir = str(tmp_path / 'w')
  config = smoke_config('natural', data_path, log_every_steps=1000, eval_every_steps=1000,
                        debug_inject_nan_at_steps=(1, 3))
  train.train_and_evaluate(config, workdir)
  manager = ckpt_lib.Checkpointer(workdir, config, for_training=False)._manager
  assert manager.all_steps()
  for step in manager.all_steps():
    params = manager.restore(step)['params']
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params)), step


# ----------------------------------------------------------------------------- (c) robust watch

def test_single_step_recipes_watch_robustness_by_default():
  for module in (jeat, prejeat):
    assert module.get_config().robust_watch.enabled
  from configs import at, fast, natural
  assert fast.get_config().robust_watch.enabled
  assert not natural.get_config().robust_watch.enabled and not at.get_config().robust_watch.enabled
  assert jeat.get_config().robust_watch.num_examples == 512
  # The watch chooses on 1000 held-out training images (Rice et al.), never on test points.
  for module in (jeat, prejeat, fast):
    for scale in (None, 'cpu'):
      assert module.get_config(scale).data.validation_size == 1000
  from jeat_jax import config_validation  # pylint: disable=g-import-not-at-top
  from jeat_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r'robust_watch.enabled .*data.validation_size > 0'):
    config_validation.validate(config_validation.with_overrides(
        jeat.get_config('smoke'), {'robust_watch.enabled': True}))


def tensorboard_scalars(workdir):
  """{tag: {step: value}} of every scalar in the TensorBoard files of `workdir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        value = tf.make_ndarray(v.tensor) if v.HasField('tensor') else np.float32(v.simple_value)
        if value.dtype.kind == 'f' and value.size == 1:   # not images, nor hparams
          values.setdefault(v.tag, {})[event.step] = float(value)
  return values


def test_robust_watch_logs_and_keeps_the_best_state(tmp_path, data_path, monkeypatch):
  workdir = str(tmp_path / 'w')
  config = smoke_config('fast', data_path, eval_every_steps=2,
                        **{'robust_watch.enabled': True, 'data.validation_size': 40})
  results = train.train_and_evaluate(config, workdir)
  split = json.loads((tmp_path / 'w' / 'validation.json').read_text())
  assert split['size'] == 40 and len(set(split['indices'])) == 40
  assert json.loads((tmp_path / 'w' / 'data.json').read_text())['validation_sha256'] == split['sha256']
  logged = tensorboard_scalars(workdir)['robust_watch_accuracy']
  assert sorted(logged) == [2, 4]
  best = json.loads((tmp_path / 'w' / 'best' / 'robust_watch.json').read_text())
  assert best == results['robust_watch_best']
  assert (best['split'], best['num_examples']) == ('validation', 32)  # 32 of the 40 held out
  assert best['robust_accuracy'] == max(logged.values())
  assert best['step'] == min(s for s, v in logged.items() if v == best['robust_accuracy'])
  # The state in best/ is the one of that step, and --mode=evaluate can read it.
  config.eval.checkpoint = 'best'
  closed, close = [], ckpt_lib.Checkpointer.close
  monkeypatch.setattr(ckpt_lib.Checkpointer, 'close',
                      lambda self: (closed.append(self.subdir), close(self))[-1])
  _, state, _, _ = train.load_trained(config, workdir)
  assert int(state.step) == best['step']
  assert closed == ['best']   # load_trained closes the Checkpointer it read with


def test_robust_watch_warns_once_on_collapse(tmp_path, data_path, monkeypatch):
  config = smoke_config('fast', data_path, **{'data.validation_size': 40})
  workdir = str(tmp_path / 'w')
  ckpt_lib.Checkpointer(workdir, config)  # a training workdir, as the loop makes it
  from jeat_jax import data as data_lib, models, parallel  # pylint: disable=g-import-not-at-top
  ds = data_lib.load_dataset(config)
  model = models.create_model(config.model, ds.num_classes)
  watch = train.RobustWatch(config, workdir, model, parallel.make_mesh(), ds)
  # It measures the first validation points (robust_watch.num_examples = 32 of the 40).
  np.testing.assert_array_equal(watch._x, ds.x_val[:32])  # pylint: disable=protected-access
  accuracies = iter([0.40, 0.30, 0.19, 0.10, 0.25, 0.15])
  monkeypatch.setattr(watch, 'measure', lambda state: next(accuracies))
  saved = []
  monkeypatch.setattr(watch._checkpointer, 'save',  # pylint: disable=protected-access
                      lambda state, **kwargs: saved.append(state))
  warnings = []
  monkeypatch.setattr(absl_logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  for step in range(1, 7):
    watch(f'state{step}', step)
  assert saved == ['state1'] and watch.best['step'] == 1
  # Below half of 0.40 at steps 3-4 (one warning), above at 5, below again at 6 (a second).
  assert len(warnings) == 2 and 'step 3' in warnings[0] and 'step 6' in warnings[1]
