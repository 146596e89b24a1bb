"""The train loop on smoke configs: it trains, checkpoints, and resumes exactly."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import data as data_lib
from jeat_jax import train
from jeat_jax.errors import WorkdirError
from tests.conftest import smoke_config, write_synthetic_npz


def _final_state(workdir, config):
  """The parameters and extra state of the latest checkpoint in `workdir`."""
  manager = ckpt_lib.Checkpointer(workdir, config)._manager
  restored = manager.restore(manager.latest_step())
  return restored


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def data_path(tmp_path):
  return write_synthetic_npz(tmp_path / 'data.npz', n_train=256, n_test=40)


def test_smoke_run_writes_results(tmp_path, data_path):
  config = smoke_config('natural', data_path)
  results = train.train_and_evaluate(config, str(tmp_path / 'w'))
  on_disk = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert on_disk['step'] == 4 and on_disk['config'] == 'natural' and on_disk == results
  # The accuracy is that of the saved final state, BatchNorm on its running statistics,
  # over the 40 test images (two batches of 32, the second padded: the padding is not counted).
  model, state, ds, _ = train.load_trained(config, str(tmp_path / 'w'))
  assert int(state.step) == 4 and results['test_examples'] == ds.x_test.shape[0] == 40
  logits = train.make_logits_fn(model, state.params, state.batch_stats, 'running')(
      data_lib.to_float(ds.x_test))
  correct = int(np.sum(np.argmax(logits, -1) == ds.y_test))
  assert results['test_accuracy'] * 40 == pytest.approx(correct, abs=1e-6)


def resume_matches_uninterrupted(tmp_path, data_path, recipe, **overrides):
  """Trains 4 steps straight; then trains again, 'crashing' after the step-2 checkpoint
  (the step-4 checkpoint is removed, as a SIGKILL would leave it), and resumes."""
  config = smoke_config(recipe, data_path, **overrides)
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, interrupted)
  shutil.rmtree(os.path.join(interrupted, 'checkpoints', '4'))
  os.remove(os.path.join(interrupted, 'results.json'))
  assert ckpt_lib.Checkpointer(interrupted, config).latest_step() == 2
  results = train.train_and_evaluate(config, interrupted)
  assert results['step'] == 4
  a, b = _final_state(straight, config), _final_state(interrupted, config)
  assert set(a) == set(b) >= {'step', 'params', 'batch_stats', 'opt_state', 'rng', 'extra',
                              'divergence'}
  for part in a:  # BatchNorm statistics too: train-mode BatchNorm never reads them
    if jax.tree.leaves(a[part]) or jax.tree.leaves(b[part]):
      _assert_trees_equal(a[part], b[part])
  assert int(a['step']) == 4
  return a, b


def test_resume_is_bitwise_identical(tmp_path, data_path):
  a, _ = resume_matches_uninterrupted(tmp_path, data_path, 'natural')
  assert jax.tree.leaves(a['batch_stats'])   # the natural recipe's WRN has BatchNorm


def test_workdir_of_another_recipe_is_refused(tmp_path, data_path):
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(smoke_config('natural', data_path), workdir)
  with pytest.raises(WorkdirError, match="recipe 'natural'"):
    train.train_and_evaluate(smoke_config('noise', data_path), workdir)
  with pytest.raises(WorkdirError, match='WRN|width'):
    train.train_and_evaluate(smoke_config('natural', data_path, **{'model.width': 2}), workdir)


def test_noise_recipe_trains(tmp_path, data_path):
  results = train.train_and_evaluate(smoke_config('noise', data_path), str(tmp_path / 'w'))
  assert results['step'] == 4


def test_learning_rate_schedules():
  config = smoke_config('natural')
  config.optimizer.lr = 0.2
  config.schedule.name = 'onecycle'
  sched = train.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(sched(0)) == 0.0 and abs(float(sched(40)) - 0.2) < 1e-6 and float(sched(100)) < 1e-6
  config.schedule.name = 'multistep'
  config.schedule.decay_epochs = (2, 5)
  sched = train.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  assert np.allclose([sched(19), sched(21), sched(51)], [0.2, 0.02, 0.002])
