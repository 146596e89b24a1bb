"""Fast Adaptive Boundary attack, l_inf (FAB, and its targeted form FAB-T): Croce & Hein
2019, "Minimally distorted adversarial examples with a fast adaptive boundary attack"
(arXiv:1907.02044, ICML 2020); the targeted form from Croce & Hein 2020 (AutoAttack).

FAB looks for the adversarial example of smallest l_inf norm. For a target
class t it linearises the decision boundary between the true class y and t at
the current iterate x_k,

  f(z) = z_t(x) - z_y(x) ~ f(x_k) + <grad f(x_k), z - x_k> = 0,

projects both x_k and the original point x_0 onto that hyperplane within the
[0, 1] box (`linf_hyperplane_projection`), and steps towards a convex
combination of the two projections, biased towards x_0 by
alpha = min(|d_k| / (|d_k| + |d_0|), alpha_max), with overshoot eta.
Whenever the iterate is misclassified it is kept if it is the smallest
perturbation so far and pulled back towards x_0 by beta (the backward step).
AutoAttack's FAB-T uses the classes with the 2nd..10th largest clean logits
as targets, one restart, no random start, 100 iterations. Untargeted FAB (in
AutoAttack+, 5 restarts) linearises every boundary z_k - z_y at each step and
takes the closest in l_inf (`closest_boundary`); restarts after the first start
at a random point at half of eps (`fab_start`).
"""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jeat_jax.attacks.autoattack.apgd import (iterate, jit_call, ranked_class, use_host_loop,
                                              where_per_example)
from jeat_jax.attacks.core import as_argument, example_keys


def linf_hyperplane_projection(t: jax.Array, w: jax.Array, b: jax.Array,
                               n_bisect: int = 30) -> jax.Array:
  """Smallest-l_inf step d with <w, t + d> = b and t + d in [0, 1], per row (FAB's projection).

  t, w: [N, D]; b: [N]. Moving coordinate i by lambda towards the box face that
  changes <w, z> in the needed direction changes <w, z> by
  g(lambda) = sum_i |w_i| min(lambda, room_i), room_i being the distance to that
  face; g is increasing and piecewise linear. The crossing g(lambda*) = c of the
  required change c is bracketed by bisection on [0, max room] and then solved
  exactly on its linear piece (coordinates with room above the bracket move
  freely, the others sit on their face). No sort: XLA:CPU sorts slowly. If the
  box does not allow the change, every coordinate moves to its face (the
  closest point of the box to the hyperplane). Coordinates with w_i = 0 stay.
  """
  c = jnp.sum(w * t, axis=1) - b                         # <w, t> - b
  w = jnp.where((c < 0)[:, None], -w, w)                 # orient so that <w, z> must decrease by c
  c = jnp.abs(c)[:, None]
  direction = -jnp.sign(w)
  room = jnp.where(w < 0, 1.0 - t, t)
  abs_w = jnp.abs(w)
  saturated = abs_w * room
  feasible = c <= jnp.sum(saturated, axis=1, keepdims=True)

  def bisect(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    above = jnp.sum(jnp.minimum(abs_w * mid, saturated), axis=1, keepdims=True) >= c
    return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

  lo, hi = jax.lax.fori_loop(0, n_bisect, bisect,
                             (jnp.zeros_like(c), jnp.max(room, axis=1, keepdims=True)))
  free = room > lo
  lam = (c - jnp.sum(jnp.where(free, 0.0, saturated), axis=1, keepdims=True)) / jnp.maximum(
      jnp.sum(jnp.where(free, abs_w, 0.0), axis=1, keepdims=True), 1e-12)
  lam = jnp.where(feasible, jnp.clip(lam, lo, hi), jnp.inf)
  return direction * jnp.minimum(lam, room) * (w != 0)


def _linf_norm(d: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(d.reshape(d.shape[0], -1)), axis=1)


class FabSettings(NamedTuple):
  targeted: bool = True
  alpha_max: float = 0.1
  eta: float = 1.05
  beta: float = 0.9
  stop_norm: float = float('inf')   # examples with an adversarial image this close stop


def fab_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """x + (eps / 2) t / max|t|, t ~ U(-1, 1) per coordinate, clipped to [0, 1]: FAB's random
  start for its restarts after the first (Croce & Hein 2019, l_inf; the first starts at x).
  x: [B, D]; each example draws from its own key (`example_keys`)."""
  t = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0))(
      example_keys(key, x.shape[0]))
  return jnp.clip(x + 0.5 * eps * t / jnp.max(jnp.abs(t), axis=1, keepdims=True), 0.0, 1.0)


def _fab_init(s: FabSettings, logits_fn, x, target_rank, key, start_eps):
  """Targets, and the loop state: the iterate, the best adversarial image and its norm."""
  del s
  batch = x.shape[0]
  x0 = x.reshape(batch, -1)
  target = ranked_class(logits_fn(x), target_rank)
  x1 = jnp.where(start_eps > 0, fab_start(key, x0, start_eps), x0)
  return target, (x1, x0, jnp.full((batch,), jnp.inf, jnp.float32))


def closest_boundary(logits: jax.Array, jacobian: jax.Array, y: jax.Array):
  """(w, gap) of the class boundary closest in l_inf under linearisation: untargeted FAB.

  logits [B, C], jacobian [C, B, D]. For each class k != y the boundary
  z_k - z_y = 0 is at l_inf distance |z_k - z_y| / ||grad (z_k - z_y)||_1;
  the closest gives w = grad (z_k - z_y) and gap = z_k - z_y.
  """
  batch = logits.shape[0]
  rows = jnp.arange(batch)
  gaps = logits - logits[rows, y][:, None]                          # [B, C]
  grads = jnp.swapaxes(jacobian, 0, 1) - jacobian[y, rows][:, None]  # [B, C, D]
  dist = jnp.abs(gaps) / (jnp.sum(jnp.abs(grads), axis=-1) + 1e-12)
  k = jnp.argmin(jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), jnp.inf, dist), axis=1)
  return grads[rows, k], gaps[rows, k]


def _boundary(s: FabSettings, logits_fn, x_shape, y, target, x1):
  """The linearised boundary at x1, as (w, gap): towards `target`, or the closest one."""
  def logits_of(z):
    return logits_fn(z.reshape(x_shape)).astype(jnp.float32)

  if s.targeted:
    def gap_sum(z):
      logits = logits_of(z)
      gap = (jnp.take_along_axis(logits, target[:, None], 1)
             - jnp.take_along_axis(logits, y[:, None], 1))[:, 0]
      return jnp.sum(gap), gap
    return jax.grad(gap_sum, has_aux=True)(x1)
  logits, pullback = jax.vjp(logits_of, x1)
  eye = jnp.eye(logits.shape[1], dtype=logits.dtype)
  jacobian = jax.vmap(lambda e: pullback(jnp.broadcast_to(e, logits.shape))[0])(eye)
  return closest_boundary(logits, jacobian, y)


def step_towards_boundary(s: FabSettings, x0, x1, w, gap):
  """FAB's step from x1 towards the linearised boundary <w, z> = <w, x1> - gap: both x1 and x0
  projected onto it within the box, combined with weight alpha on x0's projection, overshoot eta."""
  b = jnp.sum(w * x1, axis=1) - gap
  d1 = linf_hyperplane_projection(x1, w, b)
  d0 = linf_hyperplane_projection(x0, w, b)
  a1 = jnp.maximum(_linf_norm(d1), 1e-8)[:, None]
  a0 = jnp.maximum(_linf_norm(d0), 1e-8)[:, None]
  alpha = jnp.clip(a1 / (a1 + a0), 0.0, s.alpha_max)
  return jnp.clip((x1 + s.eta * d1) * (1.0 - alpha) + (x0 + s.eta * d0) * alpha, 0.0, 1.0)


def _check(s: FabSettings, x0, y, logits, carry):
  """FAB's check of an iterate x1 (with its logits): kept if misclassified and the smallest
  perturbation so far, then pulled back towards x0 by beta (the backward step)."""
  x1, adv, best = carry
  is_adv = jnp.argmax(logits, -1) != y
  norm = _linf_norm(x1 - x0)
  better = is_adv & (norm < best)
  adv = where_per_example(better, x1, adv)
  best = jnp.where(better, norm, best)
  x1 = where_per_example(is_adv, x0 + (x1 - x0) * s.beta, x1)
  return x1, adv, best


def _fab_body(s: FabSettings, x, y, target, logits_fn, _, carry):
  """One FAB step (Croce & Hein 2019) with the hyperplane of the target (FAB-T) or the closest
  one, then the check of the new iterate with a forward pass, as the reference orders them.

  (Checking each iterate with the next step's linearisation pass instead, and recomputing it
  under `lax.cond` where a check moved the iterate, ran 1.6x slower on XLA:CPU.)
  """
  x0 = x.reshape(x.shape[0], -1)
  x1, adv, best = carry
  w, gap = _boundary(s, logits_fn, x.shape, y, target, x1)
  x1 = step_towards_boundary(s, x0, x1, w, gap)
  logits = logits_fn(x1.reshape(x.shape)).astype(jnp.float32)
  return _check(s, x0, y, logits, (x1, adv, best))


def _fab_searching(s: FabSettings, carry):
  return carry[2] > s.stop_norm


def fab_run(logits_fn: Callable, x: jax.Array, y: jax.Array, target_rank=None,
            n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
            host_loop: Optional[bool] = None, stop_norm: Optional[float] = None,
            key: Optional[jax.Array] = None, start_eps: float = 0.0,
            sharding: Optional[NamedSharding] = None):
  """One FAB run: FAB-T towards the class of clean rank `target_rank`, or untargeted FAB
  (`target_rank` None: each step the closest linearised boundary, from the full Jacobian).

  Starts at x, or with `key` (one, or one per example) and `start_eps` > 0 at `fab_start`
  (FAB's later restarts).
  Returns (smallest adversarial image found, its l_inf norm); the norm is +inf
  (and the image x) where none was found. `host_loop`: see `apgd.use_host_loop`.
  `stop_norm` (host loop only): an example stops being iterated once its image is
  within this norm (AutoAttack's eps: the verdict is final, the norm no longer matters).
  `sharding`: as `apgd.apgd_run`.
  """
  s = FabSettings(target_rank is not None, alpha_max, eta, beta,
                  float('inf') if stop_norm is None else float(stop_norm))
  logits_fn = as_argument(logits_fn)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  keys = example_keys(jax.random.PRNGKey(0) if key is None else jnp.asarray(key), x.shape[0])
  target, carry = jit_call(_fab_init, s, logits_fn, x, jnp.asarray(target_rank or 2, jnp.int32),
                           keys, jnp.asarray(start_eps, jnp.float32))
  _, adv, best = iterate(_fab_body, s, (x, y, target, logits_fn), carry, n_iter,
                         use_host_loop(host_loop),
                         active=None if stop_norm is None else _fab_searching,
                         per_example_args=3, sharding=sharding)
  return jax.lax.stop_gradient(adv.reshape(x.shape)), best
