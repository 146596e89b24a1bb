"""Building blocks of l_inf attacks and the one loop that composes them (paper Eq. 2, 3, 14, 18).

An attack is a composition of: a start (`uniform_start`, x itself, or TRADES'
x + 0.001 N(0, I)), an objective to ascend (a function `objective(x_adv) ->
per-example values`), a step (`sign_ascent_step`) and a projection
(`project_linf`: the eps-ball around the clean image intersected with the
[0, 1] pixel box). `projected_ascent` is the one loop (`lax.fori_loop`);
gradients are taken with `jax.grad` with respect to the images only, and the
result is wrapped in `stop_gradient` so training never differentiates through
an attack. Every attack below is a start, an objective and settings of it:

| attack            | start              | objective            | steps, step size | first gradient |
|-------------------|--------------------|----------------------|------------------|----------------|
| `fgsm` (Eq. 2)    | x                  | CE                   | 1, eps           | at x           |
| `pgd` (Eq. 3)     | U(-eps, eps) or x  | CE                   | k, alpha         | at the start   |
| CW-inf            | U(-eps, eps)       | `cw_margin`          | k, alpha         | at the start   |
| `energy_attack`   | U(-eps, eps)       | E(x, y) (Eq. 18)     | 1 or k, alpha    | start, or x    |
| `trades_attack`   | x + 0.001 N(0, I)  | `trades_kl`          | k, alpha         | at the start   |
| `logit_direction_attack` | U(-eps, eps) | `logit_direction` | k, alpha; ball optional | at the start |

Objectives are functions of logits (and labels) so that evaluation and
training share them: `energy.cross_entropy` (Eq. 13/14), `energy.energy_xy`
(Eq. 18), `trades_kl` and `cw_margin` below.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

Objective = Callable[[jax.Array], jax.Array]   # x_adv -> per-example value to ascend
LogitsFn = Callable[[jax.Array], jax.Array]


def as_argument(logits_fn: Callable) -> Partial:
  """`logits_fn` as a pytree that jitted code takes as an argument.

  A `jax.tree_util.Partial` (`evaluate.model_logits`: the model's apply with its
  variables bound) passes its bound arrays as arguments of the compiled computation, so
  they are not compiled in as constants and keep their sharding; its function is static.
  Any other callable is wrapped with no arrays bound (what it closes over is compiled in).
  """
  return logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)


def is_key_batch(key: jax.Array) -> bool:
  """Whether `key` holds one key per example ([B] typed keys, [B, 2] raw ones)."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)


def example_keys(key: jax.Array, n: int) -> jax.Array:
  """One key per example: fold_in(key, j) for the j-th of n, or `key` where it already holds
  one per example. An example's draws from its own key do not depend on the size of its
  batch (padding) or on the devices the batch is split over."""
  return key if is_key_batch(key) else jax.vmap(lambda j: jax.random.fold_in(key, j))(
      jnp.arange(n))


def uniform_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """x + U(-eps, eps), clipped to [0, 1]: the random start of PGD and Alg. 1-2.

  `key`: one key for the batch, or one per example (`example_keys`; evaluation), each
  example's start then drawn from its own key.
  """
  if is_key_batch(key):
    delta = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -eps, eps))(key)
  else:
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  return jnp.clip(x + delta, 0.0, 1.0)


def project_linf(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """Projection onto {|x_adv - x|_inf <= eps} intersected with [0, 1] (Eq. 3, 2nd line)."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def objective_grad(objective: Objective, x_adv: jax.Array) -> jax.Array:
  """Gradient of sum(objective) with respect to the images only."""
  return jax.grad(lambda z: jnp.sum(objective(z)))(x_adv)


def sign_ascent_step(x_adv: jax.Array, grad: jax.Array, step_size: float) -> jax.Array:
  """x + step * sign(grad): the update of FGSM (Eq. 2), PGD (Eq. 3) and Eq. 14/18."""
  return x_adv + step_size * jnp.sign(grad)


def trades_kl(logits_adv: jax.Array, logits_clean: jax.Array) -> jax.Array:
  """KL(p(.|x) || p(.|x_adv)) per example, the TRADES robustness term."""
  logp_clean = jax.nn.log_softmax(logits_clean.astype(jnp.float32))
  logp_adv = jax.nn.log_softmax(logits_adv.astype(jnp.float32))
  return jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_adv), axis=-1)


def cw_margin(logits: jax.Array, labels: jax.Array, kappa: float = 50.0) -> jax.Array:
  """Carlini-Wagner margin max_{k != y} f_k - f_y, clamped at kappa, per example."""
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  correct = jnp.sum(onehot * logits, axis=-1)
  other = jnp.max(logits - 1e9 * onehot, axis=-1)
  return jnp.minimum(other - correct, kappa)


def logit_direction(logits_adv: jax.Array, logits_clean: jax.Array, labels: jax.Array,
                    class_logit_sign: float = 1.0, direction_weight: float = 1.0,
                    norm_eps: float = 1e-10) -> jax.Array:
  """EB-JDAT's objective for its adversarial negatives x~ (SADA-JEM `sampleXadv`), per example:

  sign * f(x~)[y] + weight * || f(x)/(||f(x)|| + eps) - f(x~)/(||f(x~)|| + eps) ||_2^2,

  the class logit (sign +1, their code: raises f[y], i.e. lowers E(x~, y)) plus the squared
  distance between the directions of the clean and the perturbed logits.
  """
  logits_adv = logits_adv.astype(jnp.float32)
  logits_clean = logits_clean.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits_adv.shape[-1], dtype=logits_adv.dtype)
  unit = lambda z: z / (jnp.sqrt(jnp.sum(z ** 2, axis=-1, keepdims=True)) + norm_eps)
  distance = jnp.sum((unit(logits_clean) - unit(logits_adv)) ** 2, axis=-1)
  return class_logit_sign * jnp.sum(onehot * logits_adv, axis=-1) + direction_weight * distance


def projected_ascent(objective: Objective, x: jax.Array, x_start: jax.Array, eps: float,
                     step_size: float, num_steps: int, first_grad_at: Optional[jax.Array] = None,
                     unroll: int = 1) -> jax.Array:
  """The one attack loop: `num_steps` projected sign-ascent steps (Eq. 3) from `x_start`.

  z <- project_linf(z + step_size * sign(grad objective(g)), x, eps), where the
  gradient point g is the current z, except that the first step takes it at
  `first_grad_at` where that is given (FGSM and the energy attack's "gradient
  at x", Eq. 2 and 18). `unroll` > 1 unrolls the `lax.fori_loop`: XLA:CPU runs
  convolution gradients inside a while loop on a slow path.
  """
  def step(z, grad_point):
    return project_linf(sign_ascent_step(z, objective_grad(objective, grad_point), step_size),
                        x, eps)

  if first_grad_at is not None:
    x_start, num_steps = step(x_start, first_grad_at), num_steps - 1
  x_adv = jax.lax.fori_loop(0, num_steps, lambda _, z: step(z, z), x_start, unroll=unroll)
  return jax.lax.stop_gradient(x_adv)


def fgsm(objective: Objective, x: jax.Array, eps: float) -> jax.Array:
  """FGSM (Eq. 2): x + eps * sign(grad_x L(x, y)), clipped to [0, 1]."""
  return projected_ascent(objective, x, x, eps, eps, 1, first_grad_at=x)


def pgd(objective: Objective, x: jax.Array, key: jax.Array, eps: float, step_size: float,
        num_steps: int, random_start: bool = True, unroll: int = 1) -> jax.Array:
  """PGD (Eq. 3): `num_steps` projected sign-ascent steps of size `step_size`.

  Starts from `uniform_start` (`key`: one, or one per example) when `random_start`, else
  from x. Also serves as
  Fast AT's FGSM-RS (one step from a random start) and, on `cw_margin`, as
  CW-inf.
  """
  x_start = uniform_start(key, x, eps) if random_start else x
  return projected_ascent(objective, x, x_start, eps, step_size, num_steps, unroll=unroll)


def energy_attack(energy_xy_fn: Objective, x: jax.Array, key: jax.Array, eps: float,
                  step_size: float, num_steps: int = 1, grad_at_start: bool = True,
                  unroll: int = 1) -> jax.Array:
  """The energy attack (Eq. 18; first block of Algorithms 1 and 2).

  delta ~ U(-eps, eps), with the start x + delta clipped to [0, 1]; delta +=
  step * sign(grad E(., y)); delta = clip(delta, -eps, eps); x_adv = clip(x +
  delta, 0, 1). `energy_xy_fn(x) -> E(x, y)`. The paper writes the gradient at
  x; FGSM-RS (Wong et al.), which this one-step form follows (start clipped to
  the pixel box as there), takes it at the start: `grad_at_start=True` (the
  default) does that, False takes the first gradient at x. More steps repeat
  the ascent, each from the current point (PGD on E(x, y)).
  """
  x_start = uniform_start(key, x, eps)
  return projected_ascent(energy_xy_fn, x, x_start, eps, step_size, num_steps,
                          first_grad_at=x_start if grad_at_start else x, unroll=unroll)


def trades_attack(logits_fn: LogitsFn, x: jax.Array, key: jax.Array, eps: float,
                  step_size: float, num_steps: int, unroll: int = 1) -> jax.Array:
  """TRADES inner maximisation: PGD on KL(f(x) || f(x')) from x + 0.001 N(0, I),
  the clean logits held constant."""
  logits_clean = jax.lax.stop_gradient(logits_fn(x))
  x_start = x + 0.001 * jax.random.normal(key, x.shape, x.dtype)
  return projected_ascent(lambda z: trades_kl(logits_fn(z), logits_clean), x, x_start, eps,
                          step_size, num_steps, unroll=unroll)


def logit_direction_attack(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array,
                           eps: float, step_size: float, num_steps: int, project: bool = False,
                           class_logit_sign: float = 1.0, direction_weight: float = 1.0,
                           unroll: int = 1) -> jax.Array:
  """EB-JDAT's adversarial negatives x~: sign ascent on `logit_direction` from
  x + U(-eps, eps) (clipped to [0, 1]), the clean logits held constant. Their code clips
  to the image box only (`project=False`: the ball's radius is infinite); `project=True`
  also projects onto the eps-ball, as their text's PGD would."""
  logits_clean = jax.lax.stop_gradient(logits_fn(x))
  objective = lambda z: logit_direction(logits_fn(z), logits_clean, y, class_logit_sign,
                                        direction_weight)
  return projected_ascent(objective, x, uniform_start(key, x, eps), eps if project else jnp.inf,
                          step_size, num_steps, unroll=unroll)
