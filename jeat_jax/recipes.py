"""A training recipe = a perturbation of x, a negative sampler and a loss.

The one train step (`train.train_step`) runs, in order:

  x_perturbed = perturb(cfg.perturbation, logits_fn, x, y, key)
  x_neg, buffer = sample_negatives(cfg.sampler, logits_fn, buffer, batch_size, key)
  loss, (logits, batch_stats, metrics) = step_loss(cfg, model, params, batch_stats, x,
                                                   x_perturbed, y, x_neg, key, x_energy)

`step_loss` composes every recipe's loss (the train-mode forward passes and the loss below);
train.py runs steps, not recipes. x_perturbed is the perturbation's output (the table's
second column), x_neg the sampler's negatives (third column):

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

x_perturbed is an adversarial example (x_adv of Eqs. 3, 15, 19) for at, fast, prejeat, jeat,
trades and weat, noisy x for noise and jem, x itself for natural, and for ebjdat x~ (`x_tilde`),
a NEGATIVE of its energy terms, whose positives are the data x+ (`x_energy`, else x).

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
from jeat_jax.state import make_logits_fn, train_forward

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
  """x_perturbed, the images a recipe trains on in place of (or beside) x: x itself
  ('none', 'free'), noisy x ('gaussian'), an adversarial example x_adv ('pgd', 'energy',
  'trades_kl'), or EB-JDAT's x~ ('logit_direction'), a negative of its energy terms."""
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


def ce_loss(logits, y, weights: Optional[jax.Array] = None):
  """Cross-entropy E(x, y) - E(x) (Eq. 13; Algorithm 2) on the logits of the images trained
  on (e.g. x_perturbed), per-example weighted where `weights` are given."""
  return weighted_mean(energy.cross_entropy(logits, y), weights)


def joint_energy_loss(logits_perturbed, y, logits_neg, energy_weight: float = 1.0,
                      energy_l2: float = 0.0, weights: Optional[jax.Array] = None,
                      logits_data: Optional[jax.Array] = None):
  """-log p(x, y) = -log p(y|x) - log p(x) (Eq. 19), as in Algorithm 1:

  CE(x_adv, y) + [mean E(x_adv) - mean E(x~_K)], whose theta-gradient is Eq. 20
  with the expectation over p_theta(x) estimated by the SGLD samples x~_K.
  `energy_l2` > 0 adds energy_l2 * mean(E(x_adv)^2 + E(x~_K)^2), the energy
  magnitude penalty of Du & Mordatch (2019); not in the paper (default 0).
  `logits_perturbed` are f(x_adv) (noisy x for JEM), the positives of the energy terms
  unless `logits_data` (of a second, unaugmented minibatch, `data.energy_batch_size`)
  replaces them there. `weights` weigh the CE term only (the energy terms estimate log p(x)).
  """
  e_pos = energy.energy_x(logits_perturbed if logits_data is None else logits_data)
  e_neg = energy.energy_x(logits_neg)
  loss = (ce_loss(logits_perturbed, y, weights)
          + energy_weight * (jnp.mean(e_pos) - jnp.mean(e_neg)))
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


def ebjdat_loss(logits_data, logits_lab, y, logits_neg, logits_tilde,
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
          + w_px_adv * (e_data - jnp.mean(energy.energy_x(logits_tilde)))
          + w_pyx_adv * ce_loss(logits_tilde, y))


# ----------------------------------------------------------------------------- the step's loss
# Metric tags: `energy_xy_pos` and `energy_x_pos` are historical names (analysis.py and existing
# runs' event files read them): the energies of x_perturbed (EB-JDAT: of x~, a negative).

def ebjdat_step_loss(config, model, params, batch_stats, x, x_tilde, y, x_neg, key, x_energy):
  """EB-JDAT's four terms (`ebjdat_loss`): train-mode passes over the energy data x+
  (x_energy, or x without a second batch), the SGLD negatives x_q, the labelled batch and the
  logit-direction negatives x~ (x_tilde), in the order of their code."""
  keys = jax.random.split(key, 4)
  logits = []
  for x_i, k in zip((x if x_energy is None else x_energy, x_neg, x, x_tilde), keys):
    out, batch_stats = train_forward(model, params, batch_stats, x_i, k)
    logits.append(out)
  logits_data, logits_neg, logits_lab, logits_tilde = logits
  loss = ebjdat_loss(logits_data, logits_lab, y, logits_neg, logits_tilde,
                     tuple(config.loss.ebjdat_weights))
  metrics = {'energy_x_data': jnp.mean(energy.energy_x(logits_data)),
             'energy_x_neg': jnp.mean(energy.energy_x(logits_neg)),
             'ce_clean': jnp.mean(energy.cross_entropy(logits_lab, y)),
             'energy_xy_pos': jnp.mean(energy.energy_xy(logits_tilde, y)),  # tags: see above
             'energy_x_pos': jnp.mean(energy.energy_x(logits_tilde))}
  # Train accuracy on the labelled batch: x~ is pushed towards its class (a negative of the
  # energy terms, not an attack on the classifier), so accuracy on it says little.
  return loss, (logits_lab, batch_stats, metrics)


def step_loss(config, model, params, batch_stats, x, x_perturbed, y, x_neg, key,
              x_energy=None):
  """The recipe's loss on one step's batches (`config.loss`); returns (loss, (logits,
  batch_stats, metrics)), the logits those of the batch the train accuracy is measured on
  (x_perturbed; EB-JDAT: the labelled batch x).

  `x_perturbed`: `perturb`'s output; `x_neg`: `sample_negatives`' (None without a sampler).
  `x_energy`: the second (unaugmented) minibatch where `data.energy_batch_size` > 0; the
  positive energy terms see it instead of x_perturbed."""
  if config.loss.name == 'ebjdat':
    return ebjdat_step_loss(config, model, params, batch_stats, x, x_perturbed, y, x_neg, key,
                            x_energy)
  k1, k2 = jax.random.split(key)
  metrics = {}
  weighting = config.loss.example_weights
  if config.loss.name == 'trades':
    logits_clean, batch_stats = train_forward(model, params, batch_stats, x, k1)
    logits_perturbed, batch_stats = train_forward(model, params, batch_stats, x_perturbed, k2)
    weights = example_weights(weighting, logits_clean)
    loss = trades_loss(logits_clean, logits_perturbed, y, config.loss.trades_beta, weights,
                       ce_on_adv=config.loss.weat_variant == 'adv')
  else:
    weights = None
    if weighting != 'uniform':  # natural logits; BatchNorm's statistics are not updated by them
      weights = example_weights(weighting, make_logits_fn(model, params, batch_stats)(x))
    logits_perturbed, batch_stats = train_forward(model, params, batch_stats, x_perturbed, k1)
    if config.loss.name == 'joint_energy':
      logits_neg, batch_stats = train_forward(model, params, batch_stats, x_neg, k2)
      logits_data = None
      if x_energy is not None:
        logits_data, batch_stats = train_forward(model, params, batch_stats, x_energy,
                                                 jax.random.fold_in(k2, 1))
      loss = joint_energy_loss(logits_perturbed, y, logits_neg, config.loss.energy_weight,
                               config.loss.energy_l2, weights, logits_data)
      metrics['energy_x_neg'] = jnp.mean(energy.energy_x(logits_neg))
    else:
      loss = ce_loss(logits_perturbed, y, weights)
  if weights is not None:
    metrics['example_weight_mean'] = jnp.mean(weights)
  # Tags: see above.
  metrics['energy_xy_pos'] = jnp.mean(energy.energy_xy(logits_perturbed, y))
  metrics['energy_x_pos'] = jnp.mean(energy.energy_x(logits_perturbed))
  return loss, (logits_perturbed, batch_stats, metrics)
