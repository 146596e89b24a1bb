"""The jeat_jax.sampling generation API and --mode=sample."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeat_jax import generation, sampling, train
from jeat_jax import state as state_lib
from tests.conftest import smoke_config, write_synthetic_npz


def test_langevin_on_a_quadratic_energy_reaches_its_mean_and_variance():
  mu, step, noise = 0.7, 0.1, 0.1
  quad = lambda z: 0.5 * jnp.sum((z - mu) ** 2, axis=-1)
  x = sampling.sgld_chain(quad, jnp.zeros((4000, 2)), jax.random.PRNGKey(0), 200, step, noise)
  # x' = (1 - s) x + s mu + n: stationary mean mu, variance n^2 / (1 - (1 - s)^2).
  assert abs(float(x.mean()) - mu) < 0.01
  np.testing.assert_allclose(float(x.var()), noise ** 2 / (1 - (1 - step) ** 2), rtol=0.1)


def _linear_logits(num_classes=3):
  w = jax.random.normal(jax.random.PRNGKey(0), (12, num_classes))
  return lambda x: x.reshape(x.shape[0], -1) @ w


@pytest.mark.parametrize('objective', sampling.OBJECTIVES)
def test_generate_shapes_ranges_determinism(objective):
  logits_fn = _linear_logits()
  y = jnp.asarray(sampling.class_labels(6, 3))
  x0 = sampling.uniform_images(jax.random.PRNGKey(1), 6, (2, 2, 3))
  run = lambda k: sampling.generate(logits_fn, x0, y, k, objective=objective, num_steps=5,
                                    step_size=0.5, noise_std=0.05)
  a, b, c = run(jax.random.PRNGKey(2)), run(jax.random.PRNGKey(2)), run(jax.random.PRNGKey(3))
  assert a.shape == x0.shape and float(a.min()) >= 0 and float(a.max()) <= 1
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  x, norms = sampling.generate(logits_fn, x0, y, jax.random.PRNGKey(2), objective=objective,
                               num_steps=5, step_size=0.5, noise_std=0.05,
                               record_gradient_norms=True)
  np.testing.assert_allclose(x, a, atol=1e-6)  # recording does not change the chain
  assert norms.shape == (5, 2) and bool(jnp.all(norms > 0))


def test_eq17_descends_energy_xy_and_raises_class_probability():
  logits_fn = _linear_logits()
  y = jnp.asarray(sampling.class_labels(30, 3))
  x0 = sampling.uniform_images(jax.random.PRNGKey(1), 30, (2, 2, 3))
  x = sampling.generate(logits_fn, x0, y, jax.random.PRNGKey(2), num_steps=20, step_size=0.05,
                        noise_std=0.0)
  e = lambda z: -jnp.take_along_axis(logits_fn(z), y[:, None], 1)
  assert float(e(x).mean()) < float(e(x0).mean())
  assert float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y)) > 0.9


def test_class_conditional_gaussian(tmp_path):
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(2), 400)
  x = np.where(y[:, None, None, None] == 0, 60, 190) + rng.integers(-20, 21, (800, 2, 2, 1))
  x = x.astype(np.uint8)
  path = str(tmp_path / 'g.npz')
  g = sampling.ClassConditionalGaussian.cached(path, x, y, 2)
  assert os.path.exists(path)
  g2 = sampling.ClassConditionalGaussian.cached(path, x, y, 2)
  np.testing.assert_array_equal(g.cholesky, g2.cholesky)
  samples = g.sample(jax.random.PRNGKey(0), jnp.asarray(np.repeat([0, 1], 2000)), (2, 2, 1))
  np.testing.assert_allclose(samples[:2000].mean(), 60 / 255, atol=0.01)
  np.testing.assert_allclose(samples[2000:].mean(), 190 / 255, atol=0.01)
  np.testing.assert_allclose(samples[:2000].std(), x[y == 0].std() / 255, rtol=0.1)
  # the full covariance: pixel 1 copies pixel 0 (plus a little noise)
  x1 = rng.normal(0.5, 0.1, (400, 1))
  x_corr = np.concatenate([x1, x1 + rng.normal(0, 0.01, (400, 1))], 1).reshape(400, 1, 2, 1)
  g = sampling.ClassConditionalGaussian.fit((x_corr * 255).astype(np.uint8),
                                            np.zeros(400, np.int64), 1)
  s = np.asarray(g.sample(jax.random.PRNGKey(1), np.zeros(4000, np.int64), (1, 2, 1))).reshape(4000, 2)
  assert np.corrcoef(s.T)[0, 1] > 0.95


def test_sample_mode_writes_grid_and_npz(tmp_path):
  data = write_synthetic_npz(tmp_path / 'd.npz', n_train=256, n_test=32)
  config = smoke_config('jeat', data)
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(config, workdir)
  config.sample.start = 'buffer'
  out = generation.sample_run(config, workdir)
  with np.load(out['samples']) as f:
    assert f['x'].dtype == np.uint8 and f['x'].shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(f['y'], np.arange(20) % 10)
  from PIL import Image
  assert Image.open(out['grid']).size == (2 * 10 * 32, 2 * 10 * 32)
  neighbours = os.path.join(workdir, 'samples', 'neighbours')
  with np.load(neighbours + '.npz') as f:
    assert f['indices'].shape == f['ssim'].shape == (10, config.sample.neighbours)
    assert np.all(np.diff(f['ssim'], axis=1) <= 0)  # best first
    assert f['indices'].max() < config.sample.neighbour_pool
  assert Image.open(neighbours + '.png').format == 'PNG'


def test_a_chain_in_pieces_is_the_whole_chain():
  """Pieces of k steps, each told the index of its first step, make the one chain."""
  logits_fn = _linear_logits()
  y = jnp.asarray(sampling.class_labels(6, 3))
  x0 = sampling.uniform_images(jax.random.PRNGKey(1), 6, (2, 2, 3))
  settings = dict(objective='eq16', step_size=0.5, noise_std=0.05, record_gradient_norms=True)
  key = jax.random.PRNGKey(2)
  whole, whole_norms = sampling.generate(logits_fn, x0, y, key, num_steps=6, **settings)
  piece = jax.jit(functools.partial(sampling.generate, logits_fn, num_steps=2, unroll=2,
                                    **settings))
  x, norms = x0, []
  for first_step in (0, 2, 4):
    x, n = piece(x, y, key, first_step=first_step)
    norms.append(n)
  np.testing.assert_allclose(x, whole, atol=1e-6)
  np.testing.assert_allclose(np.concatenate(norms), whole_norms, rtol=1e-5)


def test_sampling_in_jitted_pieces_is_one_chain(tmp_path):
  """sample_run with `sample.steps_per_call` (jitted pieces of 2 steps) writes the images
  and gradient norms of ONE whole chain per batch: `sampling.generate` over all 4 steps
  from the same starts with the same key stream."""
  data = write_synthetic_npz(tmp_path / 'd.npz', n_train=256, n_test=32)
  config = smoke_config('natural', data)
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(config, workdir)
  s = config.sample
  s.num_steps, s.steps_per_call, s.subdir, s.neighbours = 4, 2, 'pieces', 0
  assert s.start == 'uniform' and s.record_gradient_norms and s.num_samples % s.batch_size == 0
  out = generation.sample_run(config, workdir)

  model, state, ds, _ = state_lib.load_trained(config, workdir)
  logits_fn = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'running')
  chain = jax.jit(functools.partial(
      sampling.generate, logits_fn, objective=s.objective, num_steps=s.num_steps,
      step_size=s.step_size, noise_std=s.noise_std, record_gradient_norms=True))
  key, xs, norms = jax.random.PRNGKey(s.seed), [], []
  labels = sampling.class_labels(s.num_samples, ds.num_classes)
  for i in range(0, s.num_samples, s.batch_size):   # sample_run's keys for batch i
    k_start, k_chain = jax.random.split(jax.random.fold_in(key, i))
    x0 = sampling.uniform_images(k_start, s.batch_size, ds.x_train.shape[1:])
    x, n = chain(x0, jnp.asarray(labels[i:i + s.batch_size]), k_chain)
    xs.append(np.asarray(x))
    norms.append(np.asarray(n))
  whole = np.round(np.concatenate(xs) * 255).clip(0, 255).astype(np.uint8)
  with np.load(out['samples']) as f:
    np.testing.assert_array_equal(f['y'], labels)
    assert np.abs(f['x'].astype(int) - whole).max() <= 1   # a pixel may round the other way
    assert np.mean(f['x'] == whole) > 0.999
  with np.load(os.path.join(workdir, 'pieces', 'gradient_norms.npz')) as f:
    np.testing.assert_allclose(f['norms'], np.mean(norms, axis=0), rtol=1e-5)


def test_recorded_gradient_norms_match_jax_grad():
  from jeat_jax import energy
  w = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
  logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1)) @ w
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (6, 2, 2, 3))
  y = jnp.arange(6) % 5
  _, norms = sampling.generate(logits_fn, x0, y, jax.random.PRNGKey(2), objective='eq16',
                              num_steps=1, step_size=0.1, noise_std=0.0, clip=None,
                              record_gradient_norms=True)
  norm = lambda g: jnp.mean(jnp.sqrt(jnp.sum(g.reshape(6, -1) ** 2, -1)))
  g_xy = jax.grad(lambda z: jnp.sum(energy.energy_xy(logits_fn(z), y)))(x0)
  g_x = jax.grad(lambda z: jnp.sum(energy.energy_x(logits_fn(z))))(x0)
  np.testing.assert_allclose(norms[0], [norm(g_xy), norm(g_x)], rtol=1e-5)
