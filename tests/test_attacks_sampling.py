"""Attack building blocks and SGLD: invariants and behaviour on fixed models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeat_jax import attacks, energy, sampling
from jeat_jax.models import WideResNet

EPS = 8 / 255


@pytest.fixture(scope='module')
def model_and_batch():
  model = WideResNet(depth=10, width=1, norm='none', activation='leaky_relu')
  x = jax.random.uniform(jax.random.PRNGKey(0), (16, 32, 32, 3))
  y = jax.random.randint(jax.random.PRNGKey(1), (16,), 0, 10)
  variables = model.init(jax.random.PRNGKey(2), x)
  return (lambda z: model.apply(variables, z)), x, y


def _inside(x_adv, x, eps=EPS):
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_projection_stays_in_ball_and_box():
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3))
  wild = x + jax.random.normal(jax.random.PRNGKey(1), x.shape)
  _inside(attacks.project_linf(wild, x, EPS), x)
  _inside(attacks.uniform_start(jax.random.PRNGKey(2), x, EPS), x)


def test_every_attack_stays_inside(model_and_batch):
  logits_fn, x, y = model_and_batch
  key = jax.random.PRNGKey(3)
  ce = lambda z: energy.cross_entropy(logits_fn(z), y)
  _inside(attacks.fgsm(ce, x, EPS), x)
  _inside(attacks.pgd(ce, x, key, EPS, 2 / 255, 5), x)
  _inside(attacks.energy_attack(lambda z: energy.energy_xy(logits_fn(z), y), x, key, EPS, EPS), x)
  _inside(attacks.trades_attack(logits_fn, x, key, EPS, 2 / 255, 3), x)
  cw = lambda z: attacks.cw_margin(logits_fn(z), y)
  _inside(attacks.pgd(cw, x, key, EPS, 2 / 255, 3), x)


def test_energy_attack_raises_energy_xy(model_and_batch):
  logits_fn, x, y = model_and_batch
  e_xy = lambda z: energy.energy_xy(logits_fn(z), y)
  for grad_at_start in (True, False):
    x_adv = attacks.energy_attack(e_xy, x, jax.random.PRNGKey(4), EPS, 2 / 255, num_steps=5,
                                  grad_at_start=grad_at_start)
    assert float(jnp.mean(e_xy(x_adv))) > float(jnp.mean(e_xy(x)))
  assert float(jnp.mean(e_xy(x_adv) - e_xy(x))) > 0


def _quadratic_logits(centres):
  """f_k(z) = -|z - c_k|^2 / 2: E(z, y) = |z - c_y|^2 / 2, whose x-gradient z - c_y is
  known in closed form."""
  return lambda z: -0.5 * jnp.sum((z[:, None] - centres[None]) ** 2, axis=(2, 3, 4))


def test_one_step_energy_attack_by_hand():
  """Eq. 18, num_steps=1, step eps: delta ~ U(-eps, eps) (the same key), the start
  clip(x + delta, 0, 1) (FGSM-RS), one sign step of grad E(., y) taken at the start
  or at x, then clipped to the eps-ball around x and to [0, 1]."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0.0, 1.0, (4, 5, 5, 3)).astype(np.float32)
  x[0, 0], x[1, 0] = 0.0, 1.0                                   # pixels on the box's faces
  y = np.array([2, 0, 3, 1])
  c_y = x + rng.uniform(-EPS / 2, EPS / 2, x.shape).astype(np.float32)  # sign changes in the ball
  logits_fn = _quadratic_logits(jnp.asarray(c_y)[jnp.argsort(jnp.asarray(y))])  # c_k, k = y_i
  key = jax.random.PRNGKey(7)
  delta = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -EPS, EPS))
  start = np.clip(x + delta, 0.0, 1.0)
  e_xy = lambda z: energy.energy_xy(logits_fn(z), jnp.asarray(y))
  results = {}
  for grad_at_start, grad_point in ((True, start), (False, x)):
    expected = np.clip(np.clip(start + EPS * np.sign(grad_point - c_y), x - EPS, x + EPS), 0, 1)
    results[grad_at_start] = np.asarray(attacks.energy_attack(
        e_xy, jnp.asarray(x), key, EPS, EPS, num_steps=1, grad_at_start=grad_at_start))
    np.testing.assert_allclose(results[grad_at_start], expected, rtol=0, atol=1e-6,
                               err_msg=f'grad_at_start={grad_at_start}')
  assert np.mean(results[True] != results[False]) > 0.2   # the two settings are distinguished
  assert np.any(results[True][0, 0] == 0.0) and np.any(results[True][1, 0] == 1.0)


def test_pgd_raises_cross_entropy_more_than_random_noise(model_and_batch):
  logits_fn, x, y = model_and_batch
  ce = lambda z: energy.cross_entropy(logits_fn(z), y)
  x_adv = attacks.pgd(ce, x, jax.random.PRNGKey(5), EPS, 2 / 255, 5)
  x_rand = attacks.uniform_start(jax.random.PRNGKey(5), x, EPS)
  assert float(jnp.mean(ce(x_adv))) > float(jnp.mean(ce(x_rand))) > 0


def test_per_example_starts_do_not_depend_on_the_batch():
  """With one key per example (evaluation), an example's random start is the same in a batch
  of 5 as in that batch padded to 8 (its padding for 8 devices)."""
  x = jnp.full((8, 4, 4, 3), 0.5)
  keys = attacks.example_keys(jax.random.PRNGKey(0), 8)
  padded = attacks.uniform_start(keys, x, EPS)
  np.testing.assert_array_equal(attacks.uniform_start(keys[:5], x[:5], EPS), padded[:5])
  np.testing.assert_array_equal(attacks.example_keys(jax.random.PRNGKey(0), 5), keys[:5])
  assert len({float(v) for v in padded[:, 0, 0, 0]}) == 8   # a draw of its own per example
  _inside(padded, x)


def test_cw_margin_and_trades_kl_by_hand():
  logits = jnp.array([[3.0, 1.0, 2.0]])
  np.testing.assert_allclose(attacks.cw_margin(logits, jnp.array([0])), [-1.0])
  np.testing.assert_allclose(attacks.cw_margin(logits, jnp.array([1])), [2.0])
  np.testing.assert_allclose(attacks.trades_kl(logits, logits), [0.0], atol=1e-7)
  assert float(attacks.trades_kl(jnp.array([[0.0, 0.0, 0.0]]), logits)[0]) > 0


def test_sgld_without_noise_descends_a_convex_energy():
  target = jnp.full((8, 4), 0.3)
  quad = lambda z: 0.5 * jnp.sum((z - target) ** 2, axis=-1)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (8, 4))
  x1 = sampling.sgld_chain(quad, x0, jax.random.PRNGKey(1), 1, 0.1, 0.0)
  x50 = sampling.sgld_chain(quad, x0, jax.random.PRNGKey(1), 50, 0.1, 0.0)
  assert float(quad(x1).sum()) < float(quad(x0).sum())
  np.testing.assert_allclose(x50, target, atol=1e-2)
  unrolled = sampling.sgld_chain(quad, x0, jax.random.PRNGKey(1), 50, 0.1, 0.0, unroll=5)
  np.testing.assert_allclose(unrolled, x50, atol=1e-6)


def test_sgld_noise_and_parametrizations():
  assert sampling.sgld_parameters('paper', 0.25, 0.005, 0.04) == (0.02, 0.2)
  assert sampling.sgld_parameters('jem', 0.25, 0.005, 0.04) == (0.25, 0.005)
  flat = lambda z: jnp.zeros(z.shape[0])
  x = sampling.sgld_chain(flat, jnp.zeros((2000, 4)), jax.random.PRNGKey(0), 4, 0.1, 0.5)
  assert abs(float(jnp.std(x)) - 0.5 * 2) < 0.05  # 4 steps of N(0, 0.5^2): std 1.0
  clipped = sampling.sgld_chain(flat, jnp.zeros((8, 4)), jax.random.PRNGKey(0), 4, 0.1, 0.5,
                                clip=(0.0, 1.0))
  assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0


def test_buffer_reinitialisation_rate_is_rho():
  rho, n = 0.05, 20000
  buffer = jnp.full((1000, 2, 2, 1), 5.0)  # entries far outside U(0, 1)
  starts, slots = sampling.draw_from_buffer(buffer, jax.random.PRNGKey(0), n, rho, size=500)
  fresh = float(jnp.mean(jnp.all(starts <= 1.0, axis=(1, 2, 3))))
  assert abs(fresh - rho) < 4 * np.sqrt(rho * (1 - rho) / n)
  # Slots of the `size` entries only: the rows past it pad the buffer for the devices.
  assert slots.shape == (n,) and int(slots.max()) == 499


def test_buffer_write_back_goes_to_the_drawn_slots_and_the_later_duplicate_wins():
  buffer = jnp.zeros((10, 1, 1, 1))
  slots = jnp.array([3, 5, 3, 0])
  values = jnp.arange(1.0, 5.0).reshape(4, 1, 1, 1)
  new = np.asarray(sampling.write_to_buffer(buffer, slots, values))[:, 0, 0, 0]
  np.testing.assert_array_equal(new, [4, 0, 0, 3, 0, 2, 0, 0, 0, 0])


def test_replay_buffer_is_the_same_on_any_device_count():
  """The `size` images of a seed, padded with zeros to a multiple of the device count."""
  one = sampling.init_replay_buffer(jax.random.PRNGKey(0), 10, (2, 2, 3), num_devices=1)
  eight = sampling.init_replay_buffer(jax.random.PRNGKey(0), 10, (2, 2, 3), num_devices=8)
  assert one.shape == (10, 2, 2, 3) and eight.shape == (16, 2, 2, 3)
  np.testing.assert_array_equal(eight[:10], one)
  assert not np.any(np.asarray(eight[10:]))


def test_padding_a_chain_batch_changes_none_of_its_chains():
  """Generation on a batch padded for the devices: the noise of the logical chains is
  drawn for them alone (`num_valid`), so the padded run gives the unpadded run's chains."""
  energy_fn = lambda z: jnp.sum(jnp.sin(z) * z, axis=(1, 2, 3))
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (5, 4, 4, 3))
  key = jax.random.PRNGKey(1)
  plain = sampling.sgld_chain(energy_fn, x0, key, 4, 0.1, 0.05)
  padded = sampling.langevin_chain(sampling.energy_gradient(energy_fn), sampling.pad_rows(x0, 8),
                                   key, 4, 0.1, 0.05, num_valid=5)[0]
  np.testing.assert_allclose(np.asarray(padded[:5]), np.asarray(plain), atol=1e-6)


def test_attacks_and_sgld_leave_batchnorm_statistics_untouched():
  """Training's perturbations (PGD, the energy attack, TRADES' attack) and its SGLD
  negatives, through the train step's logits function (`perturbation.bn_mode` 'batch'),
  leave the running BatchNorm statistics as they were; they normalise with the batch's
  own statistics, so their result does not depend on the running ones either."""
  import copy
  from jeat_jax import recipes
  from jeat_jax import state as state_lib
  from tests.conftest import smoke_config
  model = WideResNet(depth=4, width=1, norm='batch')   # WRN-4-1: stem, BatchNorm, head
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  variables = model.init(jax.random.PRNGKey(1), x)
  params = variables['params']
  running = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.PRNGKey(2), v.shape),
                         variables['batch_stats'])
  config = smoke_config('jeat', None)
  assert config.perturbation.bn_mode == 'batch'
  cfgs = {name: copy.deepcopy(config.perturbation) for name in ('pgd', 'energy', 'trades_kl')}
  for name, cfg in cfgs.items():
    cfg.name = name
  buffer = sampling.init_replay_buffer(jax.random.PRNGKey(3), 16, x.shape[1:])

  @jax.jit
  def attacks_and_chain(batch_stats):
    logits_fn = state_lib.make_logits_fn(model, params, batch_stats, config.perturbation.bn_mode)
    key = jax.random.PRNGKey(4)
    out = [recipes.perturb(cfg, logits_fn, x, y, key) for cfg in cfgs.values()]
    return out + list(recipes.sample_negatives(config.sampler, logits_fn, buffer, 8, key))

  before = jax.tree.map(np.array, running)
  results = attacks_and_chain(running)
  jax.tree.map(np.testing.assert_array_equal, running, before)
  other_running = jax.tree.map(lambda v: 100.0 + 0.0 * v, running)
  for a, b in zip(results, attacks_and_chain(other_running)):
    np.testing.assert_array_equal(a, b)
  # Not vacuous: a train-mode pass (the loss's) does move these statistics.
  _, moved = state_lib.train_forward(model, params, running, x, jax.random.PRNGKey(5))
  assert not any(np.allclose(a, b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(before)))
