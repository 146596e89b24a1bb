"""Every recipe's smoke config trains on the one loop; JEAT resumes exactly; NaNs roll back."""
import jax
import numpy as np
import pytest

from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import evaluate
from jeat_jax import train
from jeat_jax.config_validation import RECIPES
from tests.conftest import smoke_config, write_synthetic_npz
from tests.test_long_runs import tensorboard_scalars
from tests.test_train import _assert_trees_equal, resume_matches_uninterrupted

DYNAMICS = ('dx_energy_xy', 'dtheta_energy_xy', 'dx_energy_x', 'dtheta_energy_x')


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  return write_synthetic_npz(tmp_path_factory.mktemp('d') / 'data.npz', n_train=256, n_test=32)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_path):
  """recipe -> (config, workdir, results) of its smoke run, trained once per module, with
  the Eq. 15 energy changes logged every 2 steps."""
  runs = {}

  def get(recipe):
    if recipe not in runs:
      config = smoke_config(recipe, data_path, dynamics_every_steps=2)
      workdir = str(tmp_path_factory.mktemp(recipe))
      runs[recipe] = config, workdir, train.train_and_evaluate(config, workdir)
    return runs[recipe]
  return get


def _checkpoint(workdir, config, step=None):
  checkpointer = ckpt_lib.Checkpointer(workdir, config, for_training=False)
  manager = checkpointer._manager  # pylint: disable=protected-access
  return manager.restore(step or manager.latest_step())


# Behind the slow marker for a 15-minute default suite: EB-JDAT fits the 10 x 3072^2 class
# Gaussians of its buffer first (~40 s more); WEAT's step is TRADES' with weights (test_weat
# checks its loss in the step) and Fast AT's is PGD-1 (test_train_step checks it).
SLOW_SMOKE_RECIPES = ('ebjdat', 'weat', 'fast')
@pytest.mark.parametrize('recipe', [
    pytest.param(r, marks=pytest.mark.slow) if r in SLOW_SMOKE_RECIPES else r
    for r in RECIPES if r not in ('natural', 'noise')])
def test_recipe_smoke_trains(trained, recipe):
  config, workdir, results = trained(recipe)
  assert results['step'] == 4 and results['config'] == recipe
  # Steps 3 and 4 moved the parameters and left them finite.
  at_2, at_4 = _checkpoint(workdir, config, 2)['params'], _checkpoint(workdir, config, 4)['params']
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(at_4))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(at_2), jax.tree.leaves(at_4)))
  if recipe == 'jem':
    return
  # Adversarial recipes report PGD-10 robustness over the test examples; for one recipe
  # with BatchNorm and one without, it is recomputed from the saved final state.
  n = results['test_examples']
  correct = results['robust_accuracy_pgd10'] * n
  assert correct == pytest.approx(round(correct))
  if recipe in ('at', 'jeat'):
    model, state, ds, mesh = train.load_trained(config, workdir)
    logits_fn = evaluate.model_logits(model, state.params, state.batch_stats)
    robust = evaluate.robust_accuracy_pgd(logits_fn, mesh, ds.x_test[:n], ds.y_test[:n],
                                          config.eval.batch_size, jax.random.PRNGKey(config.seed))
    assert results['robust_accuracy_pgd10'] == robust


def test_energy_dynamics_are_logged(trained):
  """Eq. 15's Delta_x and Delta_theta of E(x, y) and E(x) (mean and std over the batch),
  every `dynamics_every_steps` = 2 steps of the 4, finite; the attack changes the energies."""
  _, workdir, _ = trained('at')
  logged = tensorboard_scalars(workdir)
  for name in DYNAMICS:
    for stat in ('mean', 'std'):
      values = logged[f'{name}_{stat}']
      assert sorted(values) == [2, 4], (name, stat, values)
      assert all(np.isfinite(v) for v in values.values())
      if stat == 'std':
        assert all(v >= 0 for v in values.values())
  assert all(abs(v) > 1e-6 for v in logged['dx_energy_xy_mean'].values())


@pytest.mark.slow  # ~40 s: two JEAT trainings with a replay buffer
def test_jeat_resume_is_bitwise_identical_with_buffer(tmp_path, data_path):
  a, b = resume_matches_uninterrupted(tmp_path, data_path, 'jeat')
  _assert_trees_equal(a['extra']['buffer'], b['extra']['buffer'])


def _recording_rollbacks(monkeypatch):
  """train.rollback, recording (as numpy: the train step donates it) each state it returns."""
  states, rollback = [], train.rollback

  def recorded(*args):
    state = rollback(*args)
    states.append(jax.tree.map(np.array, dict(step=state.step, params=state.params,
                                              extra=state.extra, rng=state.rng)))
    return state
  monkeypatch.setattr(train, 'rollback', recorded)
  return states


def test_nan_is_rolled_back_and_run_finishes(tmp_path, data_path, monkeypatch):
  """NaN parameters before step 2 (found at step 3): the state goes back to the step-2
  checkpoint with a new random stream, and the run finishes with finite losses."""
  rollbacks = _recording_rollbacks(monkeypatch)
  config = smoke_config('jeat', data_path, debug_inject_nan_at_steps=(2,), log_every_steps=1)
  workdir = str(tmp_path / 'w')
  results = train.train_and_evaluate(config, workdir)
  assert results['step'] == 4 and results['divergence_rollbacks'] == 1
  assert np.isfinite(results['test_accuracy'])
  [state] = rollbacks
  saved, final = _checkpoint(workdir, config, 2), _checkpoint(workdir, config, 4)
  assert int(state['step']) == 2
  _assert_trees_equal(state['params'], saved['params'])
  _assert_trees_equal(state['extra'], saved['extra'])
  assert not np.array_equal(state['rng'], np.asarray(saved['rng']))   # a new stream,
  np.testing.assert_array_equal(np.asarray(final['rng']), state['rng'])  # kept to the end
  assert np.asarray(final['divergence']).tolist() == [0, 1, 1]
  logged = tensorboard_scalars(workdir)
  assert logged['divergence_rollbacks'] == {3: 1.0}
  assert sorted(logged['loss']) == [1, 2, 3, 4] and np.isfinite(list(logged['loss'].values())).all()
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(final['params']))


def test_divergence_gives_up_after_max_retries(tmp_path, data_path, monkeypatch):
  rollbacks = _recording_rollbacks(monkeypatch)
  config = smoke_config('natural', data_path, log_every_steps=1, **{'optimizer.lr': 1e30,
                                                                   'divergence.max_retries': 1})
  with pytest.raises(train.TrainingDiverged,
                     match=r'training diverged at step \d+ .* after 1 rollbacks'):
    train.train_and_evaluate(config, str(tmp_path))
  assert len(rollbacks) == 1 and not (tmp_path / 'results.json').exists()


def test_free_replays_unrolled_equal_scanned():
  """`perturbation.unroll` > 1 unrolls Free AT's m replays; the update is the same."""
  import jax.numpy as jnp
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
