"""WEAT (configs/weat.py): its weights and loss against a hand computation, its attack's
BatchNorm mode, and ResNet-18, the architecture of its paper-scale runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import weat
from jeat_jax import models, recipes, state as state_lib

LOGITS_CLEAN = np.array([[2.0, -1.0, 0.5], [-3.0, -2.5, -4.0], [0.1, 0.2, 0.3], [9.0, 1.0, -2.0]])
LOGITS_ADV = np.array([[1.0, 0.0, 0.5], [-2.0, -3.5, -1.0], [0.3, 0.2, 0.1], [4.0, 3.0, -2.0]])
LABELS = np.array([0, 1, 2, 0])


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def weat_loss_by_hand(logits_clean, logits_adv, y, beta, variant):
  """WEAT_loss.py in numpy: w = 1 / log(1 + exp(|E(x)|)), E(x) = -logsumexp f(x)."""
  e_x = -np.log(np.exp(logits_clean).sum(-1))
  w = 1.0 / np.log1p(np.exp(np.abs(e_x)))
  ce_logits = logits_adv if variant == 'adv' else logits_clean
  ce = -log_softmax(ce_logits)[np.arange(len(y)), y]
  p_clean = np.exp(log_softmax(logits_clean))
  kl = (p_clean * (log_softmax(logits_clean) - log_softmax(logits_adv))).sum(-1)
  return np.mean(w * ce) + beta * np.mean(w * kl), w


def test_weights_are_inverse_softplus_of_the_energy_and_constant():
  weights = recipes.example_weights('inverse_softplus_energy', jnp.asarray(LOGITS_CLEAN))
  _, expected = weat_loss_by_hand(LOGITS_CLEAN, LOGITS_ADV, LABELS, 6.0, 'nat')
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  assert np.all(weights <= 1 / np.log(2) + 1e-6)
  # Held constant: no gradient flows through the weights into the logits.
  grad = jax.grad(lambda z: jnp.sum(recipes.example_weights('inverse_softplus_energy', z)))(
      jnp.asarray(LOGITS_CLEAN))
  assert np.all(grad == 0)
  assert recipes.example_weights('uniform', jnp.asarray(LOGITS_CLEAN)) is None


@pytest.mark.parametrize('variant', ['nat', 'adv'])
def test_weat_loss_by_hand(variant):
  clean, adv = jnp.asarray(LOGITS_CLEAN), jnp.asarray(LOGITS_ADV)
  weights = recipes.example_weights('inverse_softplus_energy', clean)
  got = recipes.trades_loss(clean, adv, jnp.asarray(LABELS), 6.0, weights,
                            ce_on_adv=variant == 'adv')
  expected, _ = weat_loss_by_hand(LOGITS_CLEAN, LOGITS_ADV, LABELS, 6.0, variant)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Unweighted, it is TRADES.
  np.testing.assert_allclose(recipes.trades_loss(clean, adv, jnp.asarray(LABELS), 6.0),
                             recipes.trades_loss(clean, adv, jnp.asarray(LABELS), 6.0,
                                                 jnp.ones(4)), rtol=1e-6)


def test_weights_reach_any_loss():
  """The mechanism is general: plain CE weighted per example."""
  clean = jnp.asarray(LOGITS_CLEAN)
  weights = recipes.example_weights('inverse_softplus_energy', clean)
  ce = -log_softmax(LOGITS_CLEAN)[np.arange(4), LABELS]
  np.testing.assert_allclose(recipes.ce_loss(clean, jnp.asarray(LABELS), weights),
                             np.mean(np.asarray(weights) * ce), rtol=1e-5)


def test_config_follows_their_code():
  c = weat.get_config()
  assert (c.perturbation.name, c.perturbation.bn_mode) == ('trades_kl', 'running')
  assert (c.perturbation.eps, c.perturbation.step_size, c.perturbation.num_steps) == (
      8 / 255, 2 / 255, 10)
  assert (c.loss.trades_beta, c.loss.weat_variant, c.loss.example_weights) == (
      6.0, 'nat', 'inverse_softplus_energy')
  assert (c.model.arch, c.model.norm, c.num_epochs, c.batch_size) == ('resnet18', 'batch', 100, 128)
  assert (c.sample.objective, c.sample.num_steps, c.sample.step_size) == ('eq17', 20, 0.5)


@pytest.mark.parametrize('variant', ['nat', 'adv'])
def test_weat_train_step_loss_is_the_weighted_objective(variant):
  """recipes.step_loss of the weat config on a tiny model against the hand computation on the
  same train-mode logits."""
  config = weat.get_config('smoke')
  config.loss.weat_variant = variant
  model = models.create_model(config.model, 10)
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3))
  x_adv = jnp.clip(x + 0.03 * jnp.sign(jax.random.normal(jax.random.PRNGKey(1), x.shape)), 0, 1)
  y = jnp.arange(8) % 10
  variables = model.init(jax.random.PRNGKey(2), x, train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  loss, _ = recipes.step_loss(config, model, params, batch_stats, x, x_adv, y, None,
                              jax.random.PRNGKey(3))
  clean, bs = state_lib.train_forward(model, params, batch_stats, x, jax.random.PRNGKey(4))
  adv, _ = state_lib.train_forward(model, params, bs, x_adv, jax.random.PRNGKey(5))
  expected, _ = weat_loss_by_hand(np.asarray(clean, np.float64), np.asarray(adv, np.float64),
                                  np.asarray(y), config.loss.trades_beta, variant)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_resnet18_has_the_reference_parameter_count():
  """torchvision-style CIFAR ResNet-18 (kuangliu, TRADES, WEAT): 11,173,962 parameters."""
  config = weat.get_config()
  model = models.create_model(config.model, 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 32, 32, 3)), train=False))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params']))
  assert count == 11_173_962
  assert models.model_name(config.model) == 'ResNet-18 (norm batch, relu)'
