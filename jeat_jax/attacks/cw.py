"""The Carlini-Wagner L2 attack with a fixed constant (Carlini & Wagner 2017).

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
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jeat_jax.attacks.autoattack.apgd import iterate, jit_call, use_host_loop
from jeat_jax.attacks.core import as_argument, cw_margin

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


class CwSettings(NamedTuple):
  c: float = 0.2
  kappa: float = 0.0
  steps: int = 50
  lr: float = 0.01
  abort_early: bool = True


def _cw_init(s: CwSettings, x):
  w = to_tanh_space(x)
  batch = x.shape[0]
  return dict(w=w, opt_state=optax.adam(s.lr).init(w), best_adv=x,
              best_l2=jnp.full((batch,), jnp.inf, jnp.float32),
              prev_cost=jnp.full((batch,), jnp.inf, jnp.float32),
              active=jnp.ones((batch,), bool))


def _cw_body(s: CwSettings, x, y, logits_fn, i, state):
  """One Adam step on w; tracks the smallest misclassified iterate; early-abort check."""
  def total(w):
    cost, aux = cw_objective(logits_fn, w, x, y, s.c, s.kappa)
    return jnp.sum(cost), (cost, aux)

  (_, (cost, (sq_l2, logits, x_adv))), grad = jax.value_and_grad(total, has_aux=True)(state['w'])
  better = (jnp.argmax(logits, -1) != y) & (sq_l2 < state['best_l2'])
  updates, opt_state = optax.adam(s.lr).update(grad, state['opt_state'], state['w'])
  check = i % max(s.steps // 10, 1) == 0
  rose = check & (cost > state['prev_cost']) & s.abort_early
  return dict(
      w=state['w'] + updates * state['active'][:, None, None, None], opt_state=opt_state,
      best_adv=jnp.where(better[:, None, None, None], x_adv, state['best_adv']),
      best_l2=jnp.where(better, sq_l2, state['best_l2']),
      prev_cost=jnp.where(check, cost, state['prev_cost']),
      active=state['active'] & ~rose)


def _cw_done(_, state):
  return ~jnp.any(state['active'])


def cw_l2(logits_fn: Callable, x: jax.Array, y: jax.Array, key: jax.Array = None, c: float = 0.2,
          kappa: float = 0.0, steps: int = 50, lr: float = 0.01, abort_early: bool = True,
          host_loop: Optional[bool] = None) -> jax.Array:
  """C&W L2 with fixed c: the smallest-L2 misclassified iterate per example, else x.

  Defaults are torchattacks.CW's (kappa 0, 50 Adam steps of lr 0.01) with the
  JEAT paper's c = 0.2. `key` is unused (the attack is deterministic) and
  accepted for the common attack interface. `host_loop`: see
  `autoattack.apgd.use_host_loop`. `logits_fn` is an argument of the jitted steps
  (`core.as_argument`); x and y may be split over devices, and the steps with them.
  """
  del key
  s = CwSettings(c, kappa, steps, lr, abort_early)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  state = jit_call(_cw_init, s, x)
  state = iterate(_cw_body, s, (x, y, as_argument(logits_fn)), state, steps,
                  use_host_loop(host_loop), until=_cw_done)
  return jax.lax.stop_gradient(state['best_adv'])
