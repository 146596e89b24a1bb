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


def _finite_difference(f, x, eps):
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    dx = np.zeros_like(x)
    dx[i] = eps
    grad[i] = (f(x + dx) - f(x - dx)) / (2 * eps)
  return grad


def test_energy_gradients_match_finite_differences():
  # Energies are float32 by design, so central differences in float64 inputs with
  # a step of 1e-3 carry ~1e-4 rounding error; the tolerance allows for that.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  x = rng.normal(size=(3, 6))
  y = jnp.array([0, 3, 1])
  logits_fn = lambda z: jnp.tanh(z @ w) * 3.0  # a small nonlinear "model"
  for f in (lambda z: jnp.sum(energy.energy_xy_of(logits_fn, z, y)),
            lambda z: jnp.sum(energy.energy_x_of(logits_fn, z)),
            lambda z: jnp.sum(energy.cross_entropy_of(logits_fn, z, y))):
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
