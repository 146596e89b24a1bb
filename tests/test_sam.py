"""SAM / ASAM (jeat_jax.sam) on a quadratic, against the closed form of one step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jeat_jax import sam as sam_lib

A = np.array([[3.0, 0.5, 0.0], [0.5, 2.0, -0.4], [0.0, -0.4, 1.0]])


def quadratic_loss(params):
  """0.5 w^T A w with w split over two leaves (so the norm must span leaves)."""
  w = jnp.concatenate([params['a'], params['b']])
  return 0.5 * w @ jnp.asarray(A, jnp.float32) @ w


def closed_form_step(w, rho, adaptive, lr, weight_decay):
  g = A @ w
  t = np.abs(w) if adaptive else np.ones_like(w)
  e = rho * t ** 2 * g / np.linalg.norm(t * g)
  return w - lr * (A @ (w + e) + weight_decay * w)


@pytest.mark.parametrize('adaptive', [False, True])
def test_one_sam_step_matches_closed_form(adaptive):
  w = np.array([1.0, -2.0, 0.5])
  params = {'a': jnp.asarray(w[:1], jnp.float32), 'b': jnp.asarray(w[1:], jnp.float32)}
  rho, lr, wd = 0.3, 0.1, 0.01
  tx = sam_lib.sam(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)), rho, adaptive)
  state = tx.init(params)
  grads = jax.grad(quadratic_loss)(params)
  updates, _ = tx.update(grads, state, params, grad_fn=jax.grad(quadratic_loss))
  new = optax.apply_updates(params, updates)
  got = np.concatenate([new['a'], new['b']])
  np.testing.assert_allclose(got, closed_form_step(w, rho, adaptive, lr, wd), rtol=1e-5)
  # SAM is not plain gradient descent: the step differs from sgd's.
  assert np.abs(got - (w - lr * (A @ w + wd * w))).max() > 1e-3


def test_sam_needs_a_gradient_function():
  params = {'a': jnp.ones(1), 'b': jnp.ones(2)}
  tx = sam_lib.sam(optax.sgd(0.1), rho=0.1)
  with pytest.raises(ValueError, match='grad_fn'):
    tx.update(jax.grad(quadratic_loss)(params), tx.init(params), params)
