"""Eq. 11-13: energies against hand-computed values, CE identity, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jeat_jax import energy


def test_energies_against_hand_computed_logits():
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([2, 0])
  np.testing.assert_allclose(energy.energy_xy(logits, labels), [-3.0, 0.0])
  lse = np.log(np.exp(1) + np.exp(2) + np.exp(3))
  np.testing.assert_allclose(energy.energy_x(logits), [-lse, -np.log(3.0)], rtol=1e-6)
  np.testing.assert_allclose(energy.cross_entropy(logits, labels), [lse - 3.0, np.log(3.0)],
                             rtol=1e-6)


def test_cross_entropy_is_energy_difference_on_random_logits():
  key = jax.random.PRNGKey(0)
  logits = 5.0 * jax.random.normal(key, (256, 100))
  labels = jax.random.randint(jax.random.PRNGKey(1), (256,), 0, 100)
  ce_ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  diff = energy.energy_xy(logits, labels) - energy.energy_x(logits)
  np.testing.assert_allclose(energy.cross_entropy(logits, labels), ce_ref, atol=1e-6 * 20)
  np.testing.assert_allclose(diff, ce_ref, rtol=1e-6, atol=5e-6)


def test_energies_stay_float32_under_bfloat16_logits():
  logits = jnp.ones((4, 10), jnp.bfloat16)
  assert energy.energy_x(logits).dtype == jnp.float32
  assert energy.energy_xy(logits, jnp.zeros((4,), jnp.int32)).dtype == jnp.float32


# A linear "model" f(x) = x W: logits, energies and their x-gradients in closed form.
W = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 0.5, 1.5], [-1.0, 0.0, 3.0]])


def _linear_energies_by_hand(x, y):
  """E(x, y) = -(xW)_y, E(x) = -log sum_k exp (xW)_k and their x-gradients (float64)."""
  logits = x @ W
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  e_xy = -logits[np.arange(len(y)), y]
  e_x = -np.log(np.sum(np.exp(logits), -1))
  return dict(e_xy=(e_xy, -W[:, y].T), e_x=(e_x, -p @ W.T),
              ce=(e_xy - e_x, -W[:, y].T + p @ W.T))


def test_energies_and_gradients_of_a_linear_model_by_hand():
  x = np.array([[0.3, -0.2, 0.8, 0.1], [1.0, 0.5, -0.4, 0.2], [0.0, 0.0, 0.0, 0.0]])
  y = np.array([2, 0, 1])
  logits_fn = lambda z: z @ jnp.asarray(W, jnp.float32)
  fns = dict(e_xy=lambda z: energy.energy_xy(logits_fn(z), jnp.asarray(y)),
             e_x=lambda z: energy.energy_x(logits_fn(z)),
             ce=lambda z: energy.cross_entropy(logits_fn(z), jnp.asarray(y)))
  xj = jnp.asarray(x, jnp.float32)
  for name, (values, grads) in _linear_energies_by_hand(x, y).items():
    f = fns[name]
    np.testing.assert_allclose(f(xj), values, rtol=1e-6, atol=1e-6, err_msg=name)
    analytic = np.asarray(jax.grad(lambda z: jnp.sum(f(z)))(xj))
    np.testing.assert_allclose(analytic, grads, rtol=1e-5, atol=1e-6, err_msg=name)
    numeric = _finite_difference(lambda z: float(jnp.sum(f(jnp.asarray(z, jnp.float32)))), x, 1e-2)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=2e-3, err_msg=name)


def _finite_difference(f, x, eps):
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    dx = np.zeros_like(x)
    dx[i] = eps
    grad[i] = (f(x + dx) - f(x - dx)) / (2 * eps)
  return grad


def test_energy_gradients_match_finite_differences():
  # Energies are float32 by design, so central differences in float64 inputs with
  # a step of 1e-2 carry ~1e-4 rounding error; the tolerance allows for that.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  x = rng.normal(size=(3, 6))
  y = jnp.array([0, 3, 1])
  logits_fn = lambda z: jnp.tanh(z @ w) * 3.0  # a small nonlinear "model"
  for f in (lambda z: jnp.sum(energy.energy_xy(logits_fn(z), y)),
            lambda z: jnp.sum(energy.energy_x(logits_fn(z))),
            lambda z: jnp.sum(energy.cross_entropy(logits_fn(z), y))):
    analytic = np.asarray(jax.grad(f)(jnp.asarray(x, jnp.float32)))
    numeric = _finite_difference(lambda z: float(f(jnp.asarray(z, jnp.float32))), x, 1e-2)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=2e-3)
    assert np.abs(analytic).max() > 0.1  # a real, non-vanishing gradient was compared


def test_joint_energy_loss_by_hand():
  from jeat_jax import recipes
  pos = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
  neg = jnp.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0]])
  y = jnp.array([0, 1])
  lse = lambda v: np.log(np.sum(np.exp(np.asarray(v, np.float64)), -1))
  ce = np.mean(lse(pos) - np.asarray(pos)[[0, 1], [0, 1]])
  e_pos, e_neg = -lse(pos), -lse(neg)
  expected = ce + e_pos.mean() - e_neg.mean()
  np.testing.assert_allclose(recipes.joint_energy_loss(pos, y, neg), expected, rtol=1e-6)
  np.testing.assert_allclose(recipes.joint_energy_loss(pos, y, neg, energy_l2=0.1),
                             expected + 0.1 * np.mean(e_pos ** 2 + e_neg ** 2), rtol=1e-6)


def test_trades_loss_by_hand():
  """TRADES: mean CE(f(x), y) + beta * mean KL(p(.|x) || p(.|x_adv)), in float64 by hand."""
  from jeat_jax import recipes
  clean = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
  adv = np.array([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
  y = np.array([0, 2])
  softmax = lambda v: np.exp(v) / np.sum(np.exp(v), -1, keepdims=True)
  ce = -np.log(softmax(clean)[[0, 1], y])
  kl = np.sum(softmax(clean) * (np.log(softmax(clean)) - np.log(softmax(adv))), -1)
  assert kl.min() > 0.1  # the two terms are both present and distinct
  for beta in (1.0, 6.0):
    np.testing.assert_allclose(recipes.trades_loss(jnp.asarray(clean), jnp.asarray(adv),
                                                   jnp.asarray(y), beta),
                               ce.mean() + beta * kl.mean(), rtol=1e-6)
