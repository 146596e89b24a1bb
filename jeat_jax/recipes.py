"""A training recipe = a perturbation of x, a negative sampler and a loss.

The one train step (`train.train_step`) calls, in order:

  x_pos = perturb(cfg.perturbation, logits_fn, x, y, key)
  x_neg, buffer = sample_negatives(cfg.sampler, energy_fn, buffer, key)
  loss = recipe_loss(cfg.loss, ...)

| recipe   | perturbation          | negatives          | loss          |
|----------|-----------------------|--------------------|---------------|
| natural  | none                  | none               | ce            |
| noise    | gaussian (Sec. 3.2)   | none               | ce            |
| at       | pgd on CE (Eq. 3)     | none               | ce            |
| fast     | pgd, 1 step (FGSM-RS) | none               | ce            |
| free     | free (minibatch replay, see train.py) | none | ce           |
| prejeat  | energy (Eq. 18)       | none               | ce (Alg. 2)   |
| jeat     | energy (Eq. 18)       | sgld_buffer on E(x)| joint_energy (Alg. 1, Eq. 19) |
| jem      | gaussian (data noise) | sgld_buffer on E(x)| joint_energy  |
| trades   | trades_kl             | none               | trades        |
| weat     | trades_kl, BN running | none               | trades, weighted by 1/softplus(|E(x)|) |
| ebjdat   | logit_direction, BN running | sgld_buffer on E(x), clamped gradient, class-Gaussian re-init | ebjdat (+ SAM) |

EB-JDAT also trains with two minibatches per step (`data.energy_batch_size`: the energy
terms see an unaugmented batch of their own) and SAM (`optimizer.sam_rho`): both are
mechanisms of the one train step, usable by any recipe.

Any loss can weight its per-example classification terms (`loss.example_weights`,
`example_weights`): WEAT is TRADES with its weights, not a loss of its own.
"""
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from jeat_jax import attacks
from jeat_jax import energy
from jeat_jax import sampling

LogitsFn = Callable[[jax.Array], jax.Array]

PERTURBATIONS = ('none', 'gaussian', 'pgd', 'energy', 'trades_kl', 'free', 'logit_direction')
SAMPLERS = ('none', 'sgld_buffer')
LOSSES = ('ce', 'joint_energy', 'trades', 'ebjdat')
REINITS = ('uniform', 'class_gaussian')
EXAMPLE_WEIGHTS = ('uniform', 'inverse_softplus_energy')


def gaussian_noise(x: jax.Array, key: jax.Array, sigma: float) -> jax.Array:
  """Noise injection (Sec. 3.2, Fig. 5): clip(x + N(0, sigma^2), 0, 1)."""
  return jnp.clip(x + sigma * jax.random.normal(key, x.shape, x.dtype), 0.0, 1.0)


def perturb(cfg, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
  """The positive (training) images of a recipe: x itself, noisy x, or an attack on x."""
  name = cfg.name
  if name in ('none', 'free'):  # Free AT perturbs inside its replay loop (train.py).
    return x
  if name == 'gaussian':
    return gaussian_noise(x, key, cfg.sigma)
  if name == 'pgd':
    return attacks.pgd(lambda z: energy.cross_entropy(logits_fn(z), y), x, key, cfg.eps,
                       cfg.step_size, cfg.num_steps, random_start=cfg.random_start,
                       unroll=cfg.unroll)
  if name == 'energy':
    return attacks.energy_attack(lambda z: energy.energy_xy(logits_fn(z), y), x, key, cfg.eps,
                                 cfg.step_size, cfg.num_steps, grad_at_start=cfg.grad_at_start,
                                 unroll=cfg.unroll)
  if name == 'trades_kl':
    return attacks.trades_attack(logits_fn, x, key, cfg.eps, cfg.step_size, cfg.num_steps,
                                 unroll=cfg.unroll)
  if name == 'logit_direction':
    return attacks.logit_direction_attack(logits_fn, x, y, key, cfg.eps, cfg.step_size,
                                          cfg.num_steps, project=cfg.project_eps,
                                          class_logit_sign=cfg.class_logit_sign,
                                          direction_weight=cfg.direction_weight, unroll=cfg.unroll)
  raise ValueError(f'unknown perturbation {name!r}')


def sample_negatives(cfg, logits_fn: LogitsFn, buffer: Optional[jax.Array], batch_size: int,
                     key: jax.Array, pool: Optional[jax.Array] = None
                     ) -> Tuple[Optional[jax.Array], Optional[jax.Array]]:
  """Negatives x~ for the p(x) term: SGLD on E(x) from the replay buffer (Algorithm 1).

  Re-initialised chains start from U(init_range), or from `pool` (pre-drawn class-Gaussian
  images, `sampler.reinit = class_gaussian`); `sampler.grad_clamp` > 0 clamps the gradient.
  """
  if cfg.name == 'none':
    return None, buffer
  k_draw, k_chain = jax.random.split(key)
  x0, slots = sampling.draw_from_buffer(buffer, k_draw, batch_size, cfg.reinit_prob,
                                        *cfg.init_range, pool=pool, size=cfg.buffer_size,
                                        pool_size=cfg.reinit_pool_size)
  step_size, noise_std = sampling.sgld_parameters(cfg.parametrization, cfg.step_size,
                                                  cfg.noise_std, cfg.alpha)
  clip = tuple(cfg.init_range) if cfg.clip else None
  x_neg = sampling.sgld_chain(lambda z: energy.energy_x(logits_fn(z)), x0, k_chain,
                              cfg.num_steps, step_size, noise_std, clip, unroll=cfg.unroll,
                              grad_clamp=cfg.grad_clamp)
  return x_neg, sampling.write_to_buffer(buffer, slots, x_neg)


def example_weights(name: str, logits_clean: jax.Array) -> Optional[jax.Array]:
  """Per-example weights of the classification terms, constant in theta (stop-gradient).

  'uniform': none (every example weighs 1). 'inverse_softplus_energy': WEAT's
  w_i = 1 / softplus(|E(x_i)|) on the natural logits (Mirza et al., ECCV 2024), not
  normalised: at most 1/ln 2 at E = 0, small for examples of large |E(x)|.
  """
  if name == 'uniform':
    return None
  e_x = energy.energy_x(jax.lax.stop_gradient(logits_clean))
  return 1.0 / jax.nn.softplus(jnp.abs(e_x))


def weighted_mean(values: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
  """(1/B) sum_i w_i values_i (WEAT's normalisation), or the mean without weights."""
  return jnp.mean(values if weights is None else weights * values)


def ce_loss(logits_pos, y, weights: Optional[jax.Array] = None):
  """Cross-entropy E(x, y) - E(x) on the positives (Eq. 13; Algorithm 2), per-example
  weighted where `weights` are given."""
  return weighted_mean(energy.cross_entropy(logits_pos, y), weights)


def joint_energy_loss(logits_pos, y, logits_neg, energy_weight: float = 1.0,
                      energy_l2: float = 0.0, weights: Optional[jax.Array] = None,
                      logits_data: Optional[jax.Array] = None):
  """-log p(x, y) = -log p(y|x) - log p(x) (Eq. 19), as in Algorithm 1:

  CE(x_adv, y) + [mean E(x_adv) - mean E(x~_K)], whose theta-gradient is Eq. 20
  with the expectation over p_theta(x) estimated by the SGLD samples x~_K.
  `energy_l2` > 0 adds energy_l2 * mean(E(x_adv)^2 + E(x~_K)^2), the energy
  magnitude penalty of Du & Mordatch (2019); not in the paper (default 0).
  `weights` weigh the CE term only (the energy terms estimate log p(x)). `logits_data`
  (of a second, unaugmented minibatch, `data.energy_batch_size`) replaces the positives
  in the energy terms where given.
  """
  e_pos = energy.energy_x(logits_pos if logits_data is None else logits_data)
  e_neg = energy.energy_x(logits_neg)
  loss = ce_loss(logits_pos, y, weights) + energy_weight * (jnp.mean(e_pos) - jnp.mean(e_neg))
  if energy_l2:
    loss = loss + energy_l2 * jnp.mean(e_pos ** 2 + e_neg ** 2)
  return loss


def trades_loss(logits_clean, logits_adv, y, beta: float, weights: Optional[jax.Array] = None,
                ce_on_adv: bool = False):
  """TRADES: CE(x, y) + beta * KL(f(x) || f(x_adv)), beta = 1/lambda.

  With `weights` and `ce_on_adv` this is WEAT's objective (Mirza et al. 2024):
  (1/B) sum w_i CE(f(x_i), y_i) + beta (1/B) sum w_i KL_i ('nat' variant), or the
  CE on f(x_adv_i) ('adv' variant, `ce_on_adv`).
  """
  ce = ce_loss(logits_adv if ce_on_adv else logits_clean, y, weights)
  return ce + beta * weighted_mean(attacks.trades_kl(logits_adv, logits_clean), weights)


def ebjdat_loss(logits_data, logits_lab, y, logits_neg, logits_adv,
                weights=(1.0, 1.0, 0.1, 1.0)):
  """EB-JDAT (Jiang et al., SADA-JEM `train_sadajem.py`): four weighted terms,

  w_px [mean E(x+) - mean E(x_q)] + w_pyx CE(f(x_lab), y)
    + w_px_adv [mean E(x+) - mean E(x~)] + w_pyx_adv CE(f(x~), y),

  x+ the (unaugmented, noisy) data of the energy terms, x_q the SGLD negatives, x_lab the
  augmented labelled batch, x~ the logit-direction negatives; E = -logsumexp f.
  """
  w_px, w_pyx, w_px_adv, w_pyx_adv = weights
  e_data = jnp.mean(energy.energy_x(logits_data))
  return (w_px * (e_data - jnp.mean(energy.energy_x(logits_neg)))
          + w_pyx * ce_loss(logits_lab, y)
          + w_px_adv * (e_data - jnp.mean(energy.energy_x(logits_adv)))
          + w_pyx_adv * ce_loss(logits_adv, y))
