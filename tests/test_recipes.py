"""Every recipe's smoke config trains on the one loop; JEAT resumes exactly; NaNs roll back."""
import jax
import numpy as np
import pytest

from jeat_jax import train
from jeat_jax.config_validation import RECIPES
from tests.conftest import smoke_config, write_synthetic_npz
from tests.test_train import _assert_trees_equal, resume_matches_uninterrupted


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  return write_synthetic_npz(tmp_path_factory.mktemp('d') / 'data.npz', n_train=256, n_test=32)


@pytest.mark.parametrize('recipe', [r for r in RECIPES if r not in ('natural', 'noise')])
def test_recipe_smoke_trains(tmp_path, data_path, recipe):
  results = train.train_and_evaluate(smoke_config(recipe, data_path), str(tmp_path))
  assert results['step'] == 4 and results['config'] == recipe
  if recipe != 'jem':  # adversarial recipes report PGD-10 robustness
    assert 0.0 <= results['robust_accuracy_pgd10'] <= 1.0


def test_jeat_resume_is_bitwise_identical_with_buffer(tmp_path, data_path):
  a, b = resume_matches_uninterrupted(tmp_path, data_path, 'jeat')
  _assert_trees_equal(a['extra']['buffer'], b['extra']['buffer'])


def test_nan_is_rolled_back_and_run_finishes(tmp_path, data_path):
  config = smoke_config('jeat', data_path, debug_inject_nan_at_step=2, log_every_steps=1)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 4 and results['divergence_rollbacks'] == 1
  assert np.isfinite(results['test_accuracy'])


def test_divergence_gives_up_after_max_retries(tmp_path, data_path):
  config = smoke_config('natural', data_path, log_every_steps=1, **{'optimizer.lr': 1e30,
                                                                   'divergence.max_retries': 1})
  with pytest.raises(train.TrainingDiverged, match='after 1 rollbacks'):
    train.train_and_evaluate(config, str(tmp_path))


def test_energy_dynamics_are_logged(tmp_path, data_path):
  config = smoke_config('at', data_path, dynamics_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  # clu's logging writer echoes scalars to the log; the TensorBoard file holds them too.
  import glob
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
