"""EB-JDAT (configs/ebjdat.py) against hand computations: its four loss terms, the
logit-direction objective and one step of its attack, the clamped SGLD step and the
class-Gaussian re-initialisation pool, and one train step: the energy terms see the
second (unaugmented) minibatch, SAM steps with the gradient at the perturbed weights, and
its second pass leaves the BatchNorm running statistics alone. The smoke run of the recipe
is test_recipes' (parametrized over config_validation.RECIPES)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ebjdat
from jeat_jax import attacks
from jeat_jax import data as data_lib
from jeat_jax import energy
from jeat_jax import models
from jeat_jax import recipes
from jeat_jax import sampling
from jeat_jax import state as state_lib
from jeat_jax import train
from jeat_jax.config_validation import validate, with_overrides
from jeat_jax.errors import ConfigError
from tests.conftest import smoke_config

LOGITS_DATA = np.array([[2.0, -1.0, 0.5], [-3.0, -2.5, -4.0]])
LOGITS_LAB = np.array([[1.0, 0.0, 0.5], [-2.0, -3.5, -1.0], [0.3, 0.2, 0.1]])
LOGITS_NEG = np.array([[0.1, 0.2, 0.3], [9.0, 1.0, -2.0], [4.0, 3.0, -2.0], [0.0, 0.0, 0.0]])
LOGITS_ADV = np.array([[0.5, 1.5, -0.5], [-1.0, 2.0, 0.0], [3.0, -3.0, 1.0]])
LABELS = np.array([0, 1, 2])


def energy_by_hand(logits):
  return -np.log(np.exp(logits).sum(-1))


def ce_by_hand(logits, y):
  return np.mean(-logits[np.arange(len(y)), y] - energy_by_hand(logits))


def ebjdat_terms_by_hand(data, lab, y, neg, adv):
  """train_sadajem.py's L, term by term: -(fp - fq) with f = logsumexp, CE(x_lab),
  -(f(x_p_d) - f(x~)), CE(x~)."""
  return np.array([np.mean(energy_by_hand(data)) - np.mean(energy_by_hand(neg)),
                   ce_by_hand(lab, y),
                   np.mean(energy_by_hand(data)) - np.mean(energy_by_hand(adv)),
                   ce_by_hand(adv, y)])


def test_ebjdat_loss_terms_by_hand():
  args = [jnp.asarray(a) for a in (LOGITS_DATA, LOGITS_LAB, LABELS, LOGITS_NEG, LOGITS_ADV)]
  terms = ebjdat_terms_by_hand(LOGITS_DATA, LOGITS_LAB, LABELS, LOGITS_NEG, LOGITS_ADV)
  for i in range(4):  # each weight picks its own term
    weights = tuple(float(j == i) for j in range(4))
    np.testing.assert_allclose(recipes.ebjdat_loss(*args, weights=weights), terms[i], rtol=1e-5)
  weights = ebjdat.get_config().loss.ebjdat_weights
  assert tuple(weights) == (1.0, 1.0, 0.1, 1.0)
  np.testing.assert_allclose(recipes.ebjdat_loss(*args, weights=tuple(weights)),
                             np.dot(weights, terms), rtol=1e-5)


def unit_by_hand(z, eps=1e-10):
  return z / (np.sqrt((z ** 2).sum(-1, keepdims=True)) + eps)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_logit_direction_objective_by_hand(sign):
  clean, adv = LOGITS_LAB, LOGITS_ADV
  expected = (sign * adv[np.arange(3), LABELS]
              + 0.5 * ((unit_by_hand(clean) - unit_by_hand(adv)) ** 2).sum(-1))
  got = attacks.logit_direction(jnp.asarray(adv), jnp.asarray(clean), jnp.asarray(LABELS),
                                class_logit_sign=sign, direction_weight=0.5)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def linear_logits_grad_by_hand(w, z, logits_clean, y, sign, weight, eps=1e-10):
  """d/dz of the objective for logits f = z W (z flattened): W (sign e_y + weight grad_f D),
  grad_f ||u - f/(|f|+eps)||^2 = -2 [(u - g)/(|f|+eps) - f (f.(u - g)) / (|f| (|f|+eps)^2)]."""
  f = z @ w
  n = np.sqrt((f ** 2).sum(-1, keepdims=True))
  diff = unit_by_hand(logits_clean) - f / (n + eps)
  grad_f = -2 * (diff / (n + eps) - f * (f * diff).sum(-1, keepdims=True) / (n * (n + eps) ** 2))
  grad_f = weight * grad_f + sign * np.eye(w.shape[1])[y]
  return grad_f @ w.T


@pytest.mark.parametrize('project', [False, True])
def test_logit_direction_attack_step_by_hand(project):
  """One sign step of the attack on a linear model from x + U(-eps, eps), by hand: clipped
  to [0, 1] only (their code), or also to the eps-ball (`project`). The step (3 eps) leaves
  the ball, so the two differ."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 0.8, (3, 2, 2, 1)).astype(np.float32)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  eps, step, key = 4 / 255, 12 / 255, jax.random.PRNGKey(1)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ jnp.asarray(w)
  got = attacks.logit_direction_attack(logits_fn, jnp.asarray(x), jnp.asarray(LABELS), key, eps,
                                       step, 1, project=project, class_logit_sign=1.0,
                                       direction_weight=0.5)
  start = np.clip(x + np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -eps, eps)), 0, 1)
  z = start.reshape(3, -1)
  grad = linear_logits_grad_by_hand(w.astype(np.float64), z.astype(np.float64),
                                    x.reshape(3, -1) @ w, LABELS, 1.0, 0.5)
  expected = z + step * np.sign(grad)
  if project:
    expected = np.clip(expected, x.reshape(3, -1) - eps, x.reshape(3, -1) + eps)
  expected = np.clip(expected, 0, 1).reshape(x.shape)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert (np.abs(np.asarray(got) - x).max() > eps + 1e-6) != project


def test_clamped_sgld_step_by_hand():
  """x <- clip(x - step * clamp(grad E, -c, c), 0, 1), no noise: on E(x) = sum a (x - m)^2 the
  gradient 2 a (x - m) exceeds the clamp on some pixels and not on others."""
  rng = np.random.default_rng(0)
  x0 = rng.uniform(0, 1, (2, 3, 3, 1)).astype(np.float32)
  a, m = 3.0, 0.4
  energy_fn = lambda z: a * jnp.sum((z - m) ** 2, axis=(1, 2, 3))
  got = sampling.sgld_chain(energy_fn, jnp.asarray(x0), jax.random.PRNGKey(0), 1, 0.25, 0.0,
                            (0.0, 1.0), grad_clamp=2.0)
  grad = 2 * a * (x0 - m)
  assert (np.abs(grad) > 2).any() and (np.abs(grad) < 2).any()
  np.testing.assert_allclose(got, np.clip(x0 - 0.25 * np.clip(grad, -2, 2), 0, 1), atol=1e-6)
  c = ebjdat.get_config()  # their 1.0 * clamp(grad, -1, 1) on [-1, 1] images, in [0, 1] units
  assert (c.sampler.step_size, c.sampler.grad_clamp, c.sampler.noise_std, c.sampler.num_steps,
          c.sampler.clip) == (0.25, 2.0, 0.0, 10, True)


def test_reinitialised_chains_start_from_the_entries_of_the_pool():
  buffer = jnp.zeros((12, 1, 1, 1))
  pool = jnp.arange(8, dtype=jnp.float32).reshape(8, 1, 1, 1) + 1  # 5 entries, 3 rows of padding
  starts, _ = sampling.draw_from_buffer(buffer, jax.random.PRNGKey(0), 64, 1.0, pool=pool,
                                        pool_size=5)
  assert set(np.asarray(starts).ravel()) == {1, 2, 3, 4, 5}
  kept, _ = sampling.draw_from_buffer(buffer, jax.random.PRNGKey(0), 8, 0.0, pool=pool)
  assert np.all(np.asarray(kept) == 0)


def test_class_gaussian_images_are_of_the_classes_means_under_zero_covariance():
  """Each image is mu_c + L_c z of its class c: with L = 0 the class means."""
  means = np.array([[0.1] * 4, [0.5] * 4, [0.9] * 4], np.float32)
  gaussian = sampling.ClassConditionalGaussian(means, np.zeros((3, 4, 4), np.float32))
  images = np.asarray(sampling.class_gaussian_images(gaussian, jax.random.PRNGKey(0), 30,
                                                     (2, 2, 1)))
  assert images.shape == (30, 2, 2, 1)
  values = np.unique(images.round(5))
  np.testing.assert_allclose(values, [0.1, 0.5, 0.9], atol=1e-5)


# ----------------------------------------------------------------------------- one train step

BATCH = 8


@pytest.fixture(scope='module')
def step_setup():
  """ebjdat's smoke config on a WRN-4-1 with BatchNorm (batch 8, energy batch 4, plain SGD
  inside SAM), a fresh state (buffer and pool uniform stand-ins for the class Gaussians),
  the step's inputs and its output."""
  config = smoke_config('ebjdat', batch_size=BATCH, **{
      'model.depth': 4, 'data.energy_batch_size': BATCH // 2, 'optimizer.momentum': 0.0,
      'optimizer.lr': 0.05, 'sampler.step_size': 50.0})
  assert config.optimizer.sam_rho == 2.0 and config.model.norm == 'batch'
  model = models.create_model(config.model, 10)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, 10, 10))
  starts = lambda key, n: jax.random.uniform(key, (n, 32, 32, 3))
  state = train.create_train_state(config, model, jax.random.PRNGKey(0), (32, 32, 3), tx, 1,
                                   starts)
  rng = np.random.default_rng(0)
  x_u8, xe_u8 = (jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), np.uint8))
                 for n in (BATCH, BATCH // 2))
  y = jnp.asarray(rng.permutation(10)[:BATCH], jnp.int32)
  step = jax.jit(functools.partial(train.train_step, model=model, config=config))
  new_state, metrics = step(state, x_u8, y, xe_u8)
  return config, model, state, (x_u8, y, xe_u8), new_state, metrics


def step_inputs(config, model, state, x_u8, y, xe_u8):
  """The step's images, written out: the augmented batch, the energy batch (unaugmented, plus
  noise), x~ (BatchNorm running) and x_q (batch statistics) with the step's keys."""
  key = jax.random.fold_in(state.rng, state.step)
  k_aug, k_pos, k_neg, k_loss = jax.random.split(key, 4)
  x = data_lib.augment(k_aug, data_lib.to_float(x_u8))
  noise = jax.random.normal(jax.random.fold_in(key, 1), xe_u8.shape, jnp.float32)
  x_energy = data_lib.to_float(xe_u8) + config.data.energy_noise_std * noise
  running = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'running')
  batch = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'batch')
  x_tilde = recipes.perturb(config.perturbation, running, x, y, k_pos)
  # as many negatives as energy data
  x_neg, _ = recipes.sample_negatives(config.sampler, batch, state.extra['buffer'],
                                      xe_u8.shape[0], k_neg, pool=state.extra['reinit_pool'])
  return dict(x=x, x_energy=x_energy, x_tilde=x_tilde, x_neg=x_neg, k_loss=k_loss)


def test_energy_terms_see_the_unaugmented_batch(step_setup):
  """The step's loss is the four terms by hand on train-mode logits of (x+ = the second
  batch, unaugmented, plus noise; x_q; the augmented batch; x~); E(x+) is not that of the
  augmented batch; there are as many negatives as x+."""
  config, model, state, (x_u8, y, xe_u8), new_state, metrics = step_setup
  inp = step_inputs(config, model, state, x_u8, y, xe_u8)
  logits = {}
  bs = state.batch_stats
  for name in ('x_energy', 'x_neg', 'x', 'x_tilde'):
    logits[name], bs = state_lib.train_forward(model, state.params, bs, inp[name],
                                               jax.random.PRNGKey(0))
  as_np = {k: np.asarray(v, np.float64) for k, v in logits.items()}
  terms = ebjdat_terms_by_hand(as_np['x_energy'], as_np['x'], np.asarray(y), as_np['x_neg'],
                               as_np['x_tilde'])
  np.testing.assert_allclose(metrics['loss'], np.dot(config.loss.ebjdat_weights, terms), rtol=1e-4)
  np.testing.assert_allclose(metrics['energy_x_data'], np.mean(energy_by_hand(as_np['x_energy'])),
                             rtol=1e-5)
  assert abs(float(metrics['energy_x_data']) - np.mean(energy_by_hand(as_np['x']))) > 1e-4
  # As many SGLD chains as energy data (their sample_q draws batch_size = |x+| chains): the
  # step writes back at most that many buffer entries.
  changed = np.any(np.asarray(new_state.extra['buffer'] != state.extra['buffer']), axis=(1, 2, 3))
  assert 0 < changed.sum() <= xe_u8.shape[0] < x_u8.shape[0]
  # Train accuracy of the labelled (augmented) batch, not of x~ (pushed towards its class).
  np.testing.assert_allclose(metrics['train_accuracy'],
                             np.mean(np.argmax(as_np['x'], -1) == np.asarray(y)))


def test_sam_step_uses_the_perturbed_gradient_and_keeps_first_pass_batch_stats(step_setup):
  """ASAM by hand: e = rho |w|^2 g / || |w| g ||, the SGD (+ weight decay) step at w with the
  gradient of the same loss (same batches, x_q, x~) at w + e. BatchNorm running statistics
  after the step are those of the first pass, not of the second."""
  config, model, state, (x_u8, y, xe_u8), new_state, _ = step_setup
  inp = step_inputs(config, model, state, x_u8, y, xe_u8)
  loss_fn = lambda params: recipes.step_loss(config, model, params, state.batch_stats, inp['x'],
                                             inp['x_tilde'], y, inp['x_neg'], inp['k_loss'],
                                             inp['x_energy'])
  (_, (_, bs_first, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  rho = config.optimizer.sam_rho
  norm = np.sqrt(sum(np.sum((np.abs(w) * gw) ** 2) for w, gw in
                     zip(jax.tree.leaves(state.params), jax.tree.leaves(g))))
  perturbed = jax.tree.map(lambda w, gw: w + rho * w * w * gw / norm, state.params, g)
  (_, (_, bs_second, _)), g2 = jax.value_and_grad(loss_fn, has_aux=True)(perturbed)
  lr, wd = config.optimizer.lr, config.optimizer.weight_decay
  expected = jax.tree.map(lambda w, gw: w - lr * (gw + wd * w), state.params, g2)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for got, first, second in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(bs_first),
                                jax.tree.leaves(bs_second)):
    np.testing.assert_allclose(got, first, rtol=1e-5, atol=1e-7)
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4 for a, b in
             zip(jax.tree.leaves(bs_first), jax.tree.leaves(bs_second)))


def test_config_follows_their_code():
  c = ebjdat.get_config()
  assert (c.batch_size, c.data.energy_batch_size, c.data.energy_noise_std) == (128, 64, 0.015)
  p = c.perturbation
  assert (p.name, p.bn_mode, p.eps, p.step_size, p.num_steps, p.project_eps, p.class_logit_sign,
          p.direction_weight) == ('logit_direction', 'running', 4 / 255, 1 / 255, 5, False, 1.0, 1.0)
  assert (c.sampler.reinit, c.sampler.reinit_prob, c.sampler.buffer_size) == (
      'class_gaussian', 0.05, 10000)
  o, s = c.optimizer, c.schedule
  assert (o.name, o.lr, o.momentum, o.weight_decay, o.sam_rho, o.sam_adaptive) == (
      'sgd', 0.01, 0.9, 5e-4, 2.0, True)
  assert (s.decay_epochs, s.decay_factor, s.warmup_steps, c.num_epochs) == ((50, 100, 150), 0.2,
                                                                            1000, 200)
  assert (c.model.depth, c.model.width, c.model.norm) == (28, 10, 'batch')
  cpu = ebjdat.get_config('cpu')
  assert (cpu.model.depth, cpu.model.width, cpu.model.activation,
          cpu.model.input_normalization) == (10, 1, 'relu', 'meanstd')


@pytest.mark.parametrize('key,value', [
    ('data.energy_batch_size', -8), ('data.energy_noise_std', -0.1), ('sampler.reinit', 'pca'),
    ('sampler.grad_clamp', -1.0), ('sampler.bn_mode', 'eval'), ('sampler.reinit_pool_size', 0),
    ('perturbation.class_logit_sign', 2.0), ('perturbation.direction_weight', -1.0),
    ('loss.ebjdat_weights', (1.0, 1.0)), ('optimizer.sam_rho', -0.5), ('sample.grad_clamp', -2.0),
    ('loss.example_weights', 'inverse_softplus_energy')])
def test_bad_values_are_refused_naming_the_key(key, value):
  config = with_overrides(ebjdat.get_config('smoke'), {key: value})
  with pytest.raises(ConfigError, match=re.escape(f'config.{key} ')):
    validate(config)


def test_sam_with_free_at_and_an_energy_batch_without_energy_loss_are_refused():
  from configs import at, free  # pylint: disable=g-import-not-at-top
  config = with_overrides(free.get_config('smoke'), {'optimizer.sam_rho': 0.5})
  with pytest.raises(ConfigError, match=re.escape('config.optimizer.sam_rho ')):
    validate(config)
  config = with_overrides(at.get_config('smoke'), {'data.energy_batch_size': 8})
  with pytest.raises(ConfigError, match=re.escape('config.data.energy_batch_size ')):
    validate(config)
