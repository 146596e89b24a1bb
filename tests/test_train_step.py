"""One train step of JEAT, Fast AT and Free AT against hand-written references (issue 15).

Each reference is built from the package's pieces (attacks, sampling, energy, optax)
with the keys `train.train_step` splits: fold_in(state.rng, state.step) -> (augment,
perturbation, negatives, loss). A WRN-10-1 on a batch of 8 random images.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fast, free
from jeat_jax import attacks
from jeat_jax import data as data_lib
from jeat_jax import energy
from jeat_jax import models
from jeat_jax import recipes
from jeat_jax import sampling
from jeat_jax import train
from tests.conftest import smoke_config

BATCH = 8


def tiny_setup(recipe, **overrides):
  """The recipe's smoke config (batch 8), its WRN-10-1, a fresh state and two batches."""
  config = smoke_config(recipe, batch_size=BATCH, **{'model.depth': 4, **overrides})
  model = models.create_model(config.model, 10)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, 10, 10))
  state = train.create_train_state(config, model, jax.random.PRNGKey(0), (32, 32, 3), tx, 1)
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.integers(0, 256, (BATCH, 32, 32, 3), np.uint8)),
              jnp.asarray(rng.permutation(10)[:BATCH], jnp.int32)) for _ in range(2)]
  return config, model, state, batches


def step_keys(state):
  """The keys of one train step: augmentation, perturbation, negatives, loss."""
  return jax.random.split(jax.random.fold_in(state.rng, state.step), 4)


def augmented(state, x_uint8, config):
  return data_lib.augment(step_keys(state)[0], data_lib.to_float(x_uint8),
                          pad_mode=config.data.pad_mode)


def assert_trees_close(a, b, **tol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for u, v in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


# ----------------------------------------------------------------------------- JEAT

def jeat_reference(config, model, state, x_uint8, y):
  """Algorithm 1, one step, written out: the energy attack on E(x, y) (Eq. 18), SGLD on
  E(x) from the replay buffer, loss CE(x_adv, y) + mean E(x_adv) - mean E(x~) (Eq. 19)
  with the same x_adv in both terms, and plain SGD. Returns what the step should give."""
  p, s = config.perturbation, config.sampler
  _, k_pos, k_neg, _ = step_keys(state)
  x = augmented(state, x_uint8, config)
  f = lambda params: lambda z: model.apply({'params': params}, z)  # no BatchNorm here
  logits = f(state.params)
  x_adv = attacks.energy_attack(lambda z: energy.energy_xy(logits(z), y), x, k_pos, p.eps,
                                p.step_size, p.num_steps, grad_at_start=p.grad_at_start)
  k_draw, k_chain = jax.random.split(k_neg)
  x0, slots = sampling.draw_from_buffer(state.extra['buffer'], k_draw, BATCH, s.reinit_prob,
                                        *s.init_range)
  x_neg = sampling.sgld_chain(lambda z: energy.energy_x(logits(z)), x0, k_chain, s.num_steps,
                              s.step_size, s.noise_std)

  def loss_fn(params):
    logits_adv, logits_neg = f(params)(x_adv), f(params)(x_neg)
    return (jnp.mean(energy.cross_entropy(logits_adv, y)) + jnp.mean(energy.energy_x(logits_adv))
            - jnp.mean(energy.energy_x(logits_neg)))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  params = jax.tree.map(lambda w, g: w - config.optimizer.lr * g, state.params, grads)
  return dict(x_neg=x_neg, slots=slots, loss=loss, params=params, logits_clean=logits(x),
              logits_adv=logits(x_adv), logits_new_adv=f(params)(x_adv))


def test_jeat_step_matches_a_hand_written_reference():
  """SGLD descends E(x) (not E(x, y)); the same x_adv feeds CE and E(x); the chain ends
  are written back to the slots they started from; Eq. 15's changes are those of the step."""
  # Plain SGD: the update is -lr * grad, so the parameters show the loss's gradient
  # (Adam's first step is lr * sign(grad), blind to most wiring mistakes). An SGLD step
  # of 50: an untrained model's grad_x E is ~1e-4 per pixel, and the chain must move by
  # its gradient (~1e-2), not only by its noise, for the energy it descends to show.
  config, model, state, [(x_uint8, y), _] = tiny_setup(
      'jeat', **{'optimizer.name': 'sgd', 'optimizer.momentum': 0.0, 'optimizer.lr': 0.05,
                 'sampler.step_size': 50.0})
  assert config.perturbation.name == 'energy' and config.sampler.name == 'sgld_buffer'
  assert config.loss.name == 'joint_energy' and config.model.norm == 'none'
  step = jax.jit(functools.partial(train.train_step, model=model, config=config,
                                   with_dynamics=True))
  new_state, metrics = step(state, x_uint8, y)
  ref = jax.jit(functools.partial(jeat_reference, config, model))(state, x_uint8, y)

  np.testing.assert_allclose(metrics['loss'], ref['loss'], rtol=1e-5)
  assert_trees_close(new_state.params, ref['params'], rtol=1e-4, atol=1e-6)
  old, new = np.asarray(state.extra['buffer']), np.asarray(new_state.extra['buffer'])
  slots, counts = np.unique(np.asarray(ref['slots']), return_counts=True)
  assert len(slots) >= BATCH - 2
  for i, slot in enumerate(np.asarray(ref['slots'])):
    if counts[slots == slot][0] == 1:   # a slot drawn twice keeps one of its two chain ends
      np.testing.assert_allclose(new[slot], ref['x_neg'][i], rtol=0, atol=1e-5)
  untouched = np.setdiff1d(np.arange(old.shape[0]), slots)
  np.testing.assert_array_equal(new[untouched], old[untouched])
  assert not np.allclose(ref['x_neg'], old[np.asarray(ref['slots'])], atol=1e-3)  # chains moved

  # Eq. 15 of this step: Dx = E_t(x_adv) - E_t(x), Dtheta = E_t+1(x_adv) - E_t(x_adv).
  e_clean, e_adv, e_new = ref['logits_clean'], ref['logits_adv'], ref['logits_new_adv']
  for e, suffix in ((lambda l: energy.energy_xy(l, y), 'energy_xy'), (energy.energy_x, 'energy_x')):
    np.testing.assert_allclose(metrics[f'dx_{suffix}_mean'], jnp.mean(e(e_adv) - e(e_clean)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics[f'dtheta_{suffix}_mean'], jnp.mean(e(e_new) - e(e_adv)),
                               rtol=1e-3, atol=1e-6)


def test_energy_dynamics_by_hand():
  """Eq. 15 on fixed logits: E(x, y) = -f[y], E(x) = -log sum exp f; mean and std of the
  change by the attack (dx: adversarial minus clean) and by the update (dtheta: new
  parameters minus old, on the adversarial images)."""
  clean = np.array([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]], np.float32)
  adv = np.array([[1.0, 0.5, -1.0], [0.5, 0.0, 2.0]], np.float32)
  new = np.array([[1.5, 0.0, -2.0], [1.0, 0.0, 1.0]], np.float32)
  y = np.array([0, 1])
  e_xy = lambda l: -l[np.arange(2), y]
  e_x = lambda l: -np.log(np.exp(l).sum(-1))
  out = train.energy_dynamics(jnp.asarray(clean), jnp.asarray(adv), jnp.asarray(new),
                              jnp.asarray(y))
  expected = {'dx_energy_xy': e_xy(adv) - e_xy(clean), 'dtheta_energy_xy': e_xy(new) - e_xy(adv),
              'dx_energy_x': e_x(adv) - e_x(clean), 'dtheta_energy_x': e_x(new) - e_x(adv)}
  np.testing.assert_allclose(expected['dx_energy_xy'], [1.0, 1.0])  # the hand values
  np.testing.assert_allclose(expected['dtheta_energy_xy'], [-0.5, 0.0])
  assert set(out) == {f'{k}_{s}' for k in expected for s in ('mean', 'std')}
  for k, v in expected.items():
    np.testing.assert_allclose(out[f'{k}_mean'], v.mean(), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(out[f'{k}_std'], v.std(), rtol=1e-5, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- Fast AT

def test_fast_at_is_fgsm_from_a_uniform_start():
  """Wong et al. (2020): delta ~ U(-eps, eps), one signed step of 1.25 eps on CE at x + delta,
  projected to the eps-ball and [0, 1]; the step trains on CE of that image."""
  p = fast.get_config().perturbation
  assert p.name == 'pgd' and p.num_steps == 1 and p.random_start
  assert p.eps == pytest.approx(8 / 255) and p.step_size == pytest.approx(1.25 * p.eps)
  config, model, state, [(x_uint8, y), _] = tiny_setup('fast')
  assert config.model.norm == 'batch' and all(
      config.perturbation[k] == p[k] for k in ('name', 'eps', 'step_size', 'num_steps',
                                                  'random_start'))

  def fgsm_rs(state, x_uint8, y):
    _, k_pos, _, k_loss = step_keys(state)
    x = augmented(state, x_uint8, config)
    logits_fn = train.make_logits_fn(model, state.params, state.batch_stats, p.bn_mode)
    start = jnp.clip(x + jax.random.uniform(k_pos, x.shape, x.dtype, -p.eps, p.eps), 0.0, 1.0)
    grad = jax.grad(lambda z: jnp.sum(energy.cross_entropy(logits_fn(z), y)))(start)
    x_fast = jnp.clip(jnp.clip(start + 1.25 * p.eps * jnp.sign(grad), x - p.eps, x + p.eps), 0, 1)
    logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x_fast,
                            train=True, rngs={'dropout': jax.random.split(k_loss)[0]},
                            mutable=['batch_stats'])
    from_recipe = recipes.perturb(config.perturbation, logits_fn, x, y, k_pos)
    return x, x_fast, from_recipe, jnp.mean(energy.cross_entropy(logits, y))

  x, x_fast, from_recipe, loss = jax.jit(fgsm_rs)(state, x_uint8, y)
  np.testing.assert_allclose(from_recipe, x_fast, rtol=0, atol=1e-6)
  assert np.abs(np.asarray(x_fast - x)).max() == pytest.approx(p.eps, abs=1e-6)
  _, metrics = jax.jit(functools.partial(train.train_step, model=model, config=config))(
      state, x_uint8, y)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)


# ----------------------------------------------------------------------------- Free AT

def test_free_at_replays_each_minibatch_and_carries_delta():
  """Shafahi et al. (2019): each minibatch replayed m times; every replay takes one gradient
  of CE(x + delta, y), makes one parameter update with it and one signed step of eps on
  delta; delta is carried across replays and on to the next minibatch."""
  assert free.get_config().perturbation.free_replays == 8
  m = 3
  config, model, state, batches = tiny_setup('free', **{'perturbation.free_replays': m})
  eps = config.perturbation.eps
  step = jax.jit(functools.partial(train.train_step, model=model, config=config))
  states = [state]
  for x_uint8, y in batches:
    states.append(step(states[-1], x_uint8, y)[0])

  @jax.jit
  def replays(state_before, params, opt_state, batch_stats, delta, x_uint8, y):
    x = augmented(state_before, x_uint8, config)
    for k in jax.random.split(step_keys(state_before)[3], m):
      def loss_fn(w, d):
        logits, bs = model.apply({'params': w, 'batch_stats': batch_stats},
                                 jnp.clip(x + d, 0.0, 1.0), train=True, rngs={'dropout': k},
                                 mutable=['batch_stats'])
        return jnp.mean(energy.cross_entropy(logits, y)), bs['batch_stats']
      (_, batch_stats), (g_w, g_d) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(params,
                                                                                      delta)
      updates, opt_state = state.tx.update(g_w, opt_state, params)
      params = optax.apply_updates(params, updates)
      delta = jnp.clip(delta + eps * jnp.sign(g_d), -eps, eps)
    return params, opt_state, batch_stats, delta

  carry = (state.params, state.opt_state, state.batch_stats, jnp.zeros((BATCH, 32, 32, 3)))
  for before, after, (x_uint8, y) in zip(states, states[1:], batches):
    carry = replays(before, *carry, x_uint8, y)
    params, opt_state, batch_stats, delta = carry
    assert int(optax.tree_utils.tree_get(after.opt_state, 'count')) == m * int(after.step)
    assert_trees_close(after.params, params, rtol=1e-4, atol=1e-6)
    assert_trees_close(after.opt_state, opt_state, rtol=1e-4, atol=1e-6)
    assert_trees_close(after.batch_stats, batch_stats, rtol=1e-4, atol=1e-6)
    # delta moves by +-eps per replay: a sign flipped by rounding would show as 2 eps.
    diff = np.abs(np.asarray(after.extra['free_delta']) - np.asarray(delta))
    assert (diff > 1e-6).mean() < 1e-3, (diff > 1e-6).mean()
    assert np.abs(np.asarray(delta)).max() == pytest.approx(eps)
