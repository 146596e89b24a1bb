"""The Carlini-Wagner L2 attack with a fixed constant (Carlini & Wagner 2017, Sec. V.A).

  minimise_w  || x'(w) - x ||_2^2 + c * max(z_y(x') - max_{k!=y} z_k(x'), -kappa),
  x'(w) = (tanh(w) + 1) / 2,

by Adam on the unconstrained tanh-space variable w (the change of variables
keeps x' in [0, 1]). The paper's binary search over c is left out: c is fixed
(the JEAT paper's "C&W, c = 0.2"), as in torchattacks.CW. Each example keeps
its misclassified iterate of smallest L2 distance (the clean image where none
is found). With `abort_early`, every steps // 10 steps an example whose
objective rose since the last check stops moving (torchattacks stops the whole
batch when the batch's summed objective rises). The margin is `core.cw_margin`.

This is the L2 optimisation attack; "C&W" in many robustness tables is instead
l_inf PGD on the CW margin (`core.pgd` with `core.cw_margin`), a different attack.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jeat_jax.attacks.core import cw_margin

TANH_SHRINK = 0.999999   # keeps arctanh finite at pixels equal to 0 or 1 (as Carlini's code)


def tanh_space(w: jax.Array) -> jax.Array:
  """x'(w) = (tanh(w) + 1) / 2, in [0, 1]."""
  return 0.5 * (jnp.tanh(w) + 1.0)


def to_tanh_space(x: jax.Array) -> jax.Array:
  """The w with tanh_space(w) = x (up to TANH_SHRINK)."""
  return jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1.0, 1.0) * TANH_SHRINK)


def cw_objective(logits_fn: Callable, w: jax.Array, x: jax.Array, y: jax.Array, c: float,
                 kappa: float):
  """Per-example C&W objective at w, with (squared L2, logits, image) as auxiliaries."""
  x_adv = tanh_space(w)
  sq_l2 = jnp.sum(jnp.square(x_adv - x).reshape(x.shape[0], -1), axis=1)
  logits = logits_fn(x_adv)
  margin_term = -cw_margin(logits, y, kappa)           # max(z_y - max_{k!=y} z_k, -kappa)
  return sq_l2 + c * margin_term, (sq_l2, logits, x_adv)


@functools.partial(jax.jit, static_argnames=('logits_fn', 'steps', 'abort_early'))
def cw_l2(logits_fn: Callable, x: jax.Array, y: jax.Array, key: jax.Array = None, c: float = 0.2,
          kappa: float = 0.0, steps: int = 50, lr: float = 0.01,
          abort_early: bool = True) -> jax.Array:
  """C&W L2 with fixed c: the smallest-L2 misclassified iterate per example, else x.

  Defaults are torchattacks.CW's (kappa 0, 50 Adam steps of lr 0.01) with the
  JEAT paper's c = 0.2. `key` is unused (the attack is deterministic) and
  accepted for the common attack interface.
  """
  del key
  tx = optax.adam(lr)
  w0 = to_tanh_space(x)
  check_every = max(steps // 10, 1)
  batch = x.shape[0]

  def total(w):
    cost, aux = cw_objective(logits_fn, w, x, y, c, kappa)
    return jnp.sum(cost), (cost, aux)

  def cond(s):
    return (s['step'] < steps) & jnp.any(s['active'])

  def body(s):
    (_, (cost, (sq_l2, logits, x_adv))), grad = jax.value_and_grad(total, has_aux=True)(s['w'])
    better = (jnp.argmax(logits, -1) != y) & (sq_l2 < s['best_l2'])
    updates, opt_state = tx.update(grad, s['opt_state'], s['w'])
    w = s['w'] + updates * s['active'][:, None, None, None]
    check = s['step'] % check_every == 0
    rose = check & (cost > s['prev_cost'])
    return dict(
        step=s['step'] + 1, w=w, opt_state=opt_state,
        best_adv=jnp.where(better[:, None, None, None], x_adv, s['best_adv']),
        best_l2=jnp.where(better, sq_l2, s['best_l2']),
        prev_cost=jnp.where(check, cost, s['prev_cost']),
        active=s['active'] & ~rose if abort_early else s['active'])

  init = dict(step=jnp.asarray(0), w=w0, opt_state=tx.init(w0), best_adv=x,
              best_l2=jnp.full((batch,), jnp.inf, jnp.float32),
              prev_cost=jnp.full((batch,), jnp.inf, jnp.float32),
              active=jnp.ones((batch,), bool))
  return jax.lax.stop_gradient(jax.lax.while_loop(cond, body, init)['best_adv'])
