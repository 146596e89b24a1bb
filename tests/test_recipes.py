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
  config = smoke_config('jeat', data_path, debug_inject_nan_at_steps=(2,), log_every_steps=1)
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


def test_free_replays_unrolled_equal_scanned():
  """`perturbation.unroll` > 1 unrolls Free AT's m replays; the update is the same."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jeat_jax import models

  def one_step(unroll):
    config = smoke_config('free', None, **{'perturbation.unroll': unroll})
    model = models.create_model(config.model, 10)
    tx = train.create_optimizer(config, train.learning_rate_schedule(config, 10, 1))
    state = train.create_train_state(config, model, jax.random.PRNGKey(0), (32, 32, 3), tx, 1)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8))
    y = jnp.arange(16) % 10
    state, _ = jax.jit(lambda s: train.train_step(s, x, y, model=model, config=config))(state)
    return state

  scanned, unrolled = one_step(1), one_step(4)
  assert int(scanned.step) == 1
  for a, b in zip(jax.tree.leaves((scanned.params, scanned.extra['free_delta'])),
                  jax.tree.leaves((unrolled.params, unrolled.extra['free_delta']))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(unrolled.extra['free_delta']).max()) > 0   # delta was carried
