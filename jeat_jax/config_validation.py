"""Checks every config value in one place; each error names its key."""
import os
from typing import Optional

import jax

from jeat_jax import data, models, recipes, sampling
from jeat_jax.errors import ConfigError

ATTACKS = ('fgsm', 'pgd20', 'pgd50', 'energy1', 'energyk', 'cw_l2', 'cw_linf', 'apgd_ce',
           'autoattack', 'autoattack_plus', 'autoattack_rand')
RECIPES = ('natural', 'noise', 'at', 'prejeat', 'jeat', 'jem', 'trades', 'fast', 'free', 'weat',
           'ebjdat')


def _require(ok: bool, key: str, message: str, value) -> None:
  if not ok:
    raise ConfigError(f'config.{key} {message}, got {value!r}')


def _one_of(config, key: str, choices) -> None:
  value = config
  for part in key.split('.'):
    value = value[part]
  _require(value in choices, key, f'must be one of {list(choices)}', value)


def _positive(value, key):
  _require(value > 0, key, 'must be > 0', value)


def _non_negative(value, key):
  _require(value >= 0, key, 'must be >= 0', value)


def _divides_devices(value: int, key: str, devices: int) -> None:
  """A global train batch is split evenly over the devices: refused otherwise, naming the
  nearest sizes that are."""
  if value % devices:
    below, above = value // devices * devices, -(-value // devices) * devices
    nearest = ' or '.join(str(v) for v in (below, above) if v > 0)
    raise ConfigError(f'config.{key}={value} must be divisible by the {devices} devices (each '
                      f'takes an equal share of the batch): nearest valid values {nearest}')


def with_overrides(config, settings):
  """`config` with each {'dotted.key': value} of `settings` set (in place; returned). A key
  the config does not have is refused, naming it."""
  for key, value in settings.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, 'keys') else None
    if not hasattr(node, 'keys') or leaf not in node:
      raise ConfigError(f'unknown config key {key!r}')
    node[leaf] = value
  return config


def validate(config, devices: Optional[int] = None) -> None:
  """Raises ConfigError naming the first bad key. The global train batches (batch_size,
  data.energy_batch_size) must be divisible by `devices` (default: JAX's device count; pass
  it to check a config without starting JAX's backend); every other size may be anything."""
  _one_of(config, 'recipe', RECIPES)
  _one_of(config, 'dataset', tuple(data.NUM_CLASSES))
  _one_of(config, 'data.source', ('auto', 'tfds', 'npz'))
  if config.data.source == 'npz':
    _require(bool(config.data.path), 'data.path', 'must name an .npz file for data.source=npz',
             config.data.path)
  _non_negative(config.data.train_subset, 'data.train_subset')
  _non_negative(config.data.validation_size, 'data.validation_size')
  _one_of(config, 'data.pad_mode', ('reflect', 'constant'))
  devices = devices or jax.device_count()
  eb = config.data.energy_batch_size
  _non_negative(eb, 'data.energy_batch_size')
  if eb > 0:
    _divides_devices(eb, 'data.energy_batch_size', devices)
  _non_negative(config.data.energy_noise_std, 'data.energy_noise_std')
  if eb > 0:
    _require(config.loss.name in ('joint_energy', 'ebjdat'), 'data.energy_batch_size',
             'needs an energy loss (loss.name joint_energy or ebjdat) to use its batch', eb)

  m = config.model
  _one_of(config, 'model.arch', models.ARCHS)
  _require(m.depth >= 10 and (m.depth - 4) % 6 == 0, 'model.depth', 'must be 6n + 4 with n >= 1',
           m.depth)
  _positive(m.width, 'model.width')
  _one_of(config, 'model.norm', models.NORMS)
  _one_of(config, 'model.activation', models.ACTIVATIONS)
  _one_of(config, 'model.input_normalization', models.INPUT_NORMALIZATIONS)
  _one_of(config, 'model.dtype', ('float32', 'bfloat16'))
  _require(0 <= m.dropout_rate < 1, 'model.dropout_rate', 'must be in [0, 1)', m.dropout_rate)
  _require(0 <= m.bn_momentum < 1, 'model.bn_momentum',
           "must be in [0, 1) (flax's convention: torch's momentum is 1 - this)", m.bn_momentum)

  _positive(config.batch_size, 'batch_size')
  _divides_devices(config.batch_size, 'batch_size', devices)
  _positive(config.num_epochs, 'num_epochs')

  o = config.optimizer
  _one_of(config, 'optimizer.name', ('sgd', 'adam'))
  _positive(o.lr, 'optimizer.lr')
  _require(0 <= o.momentum < 1, 'optimizer.momentum', 'must be in [0, 1)', o.momentum)
  _non_negative(o.weight_decay, 'optimizer.weight_decay')
  _non_negative(o.grad_clip_norm, 'optimizer.grad_clip_norm')
  _non_negative(o.sam_rho, 'optimizer.sam_rho')
  _require(isinstance(o.sam_adaptive, bool), 'optimizer.sam_adaptive', 'must be True or False',
           o.sam_adaptive)
  if o.sam_rho > 0:
    _require(config.perturbation.name != 'free', 'optimizer.sam_rho',
             'must be 0 with perturbation.name=free (its replays update without a second pass)',
             o.sam_rho)
  _one_of(config, 'schedule.name', ('constant', 'multistep', 'onecycle', 'cosine_onecycle',
                                          'cosine'))
  _positive(config.schedule.decay_factor, 'schedule.decay_factor')
  _require(0 < config.schedule.peak_fraction < 1, 'schedule.peak_fraction', 'must be in (0, 1)',
           config.schedule.peak_fraction)
  _non_negative(config.schedule.warmup_steps, 'schedule.warmup_steps')
  _require(isinstance(config.schedule.cycle_momentum, bool), 'schedule.cycle_momentum',
           'must be True or False', config.schedule.cycle_momentum)
  if config.schedule.cycle_momentum:
    _require(config.schedule.name in ('onecycle', 'cosine_onecycle'), 'schedule.cycle_momentum',
             'needs a one-cycle schedule (schedule.name onecycle or cosine_onecycle)',
             config.schedule.cycle_momentum)
    _require(0 <= config.schedule.base_momentum <= config.schedule.max_momentum < 1,
             'schedule.base_momentum', 'must be in [0, schedule.max_momentum], max_momentum < 1',
             (config.schedule.base_momentum, config.schedule.max_momentum))

  p = config.perturbation
  _one_of(config, 'perturbation.name', recipes.PERTURBATIONS)
  _non_negative(p.eps, 'perturbation.eps')
  _non_negative(p.step_size, 'perturbation.step_size')
  _non_negative(p.sigma, 'perturbation.sigma')
  _positive(p.num_steps, 'perturbation.num_steps')
  _positive(p.free_replays, 'perturbation.free_replays')
  _one_of(config, 'perturbation.bn_mode', ('batch', 'running'))
  _positive(p.unroll, 'perturbation.unroll')
  _require(isinstance(p.project_eps, bool), 'perturbation.project_eps', 'must be True or False',
           p.project_eps)
  _require(p.class_logit_sign in (-1.0, 0.0, 1.0), 'perturbation.class_logit_sign',
           'must be +1 (raise f(x~)[y], their code), -1 (energy ascent, their text) or 0',
           p.class_logit_sign)
  _non_negative(p.direction_weight, 'perturbation.direction_weight')

  s = config.sampler
  _one_of(config, 'sampler.name', recipes.SAMPLERS)
  _one_of(config, 'sampler.parametrization', ('jem', 'paper'))
  _positive(s.num_steps, 'sampler.num_steps')
  _non_negative(s.step_size, 'sampler.step_size')
  _non_negative(s.noise_std, 'sampler.noise_std')
  _non_negative(s.alpha, 'sampler.alpha')
  _require(0 <= s.reinit_prob <= 1, 'sampler.reinit_prob', 'must be in [0, 1]', s.reinit_prob)
  _require(len(s.init_range) == 2 and s.init_range[0] < s.init_range[1], 'sampler.init_range',
           'must be (low, high) with low < high', s.init_range)
  _positive(s.unroll, 'sampler.unroll')
  _non_negative(s.grad_clamp, 'sampler.grad_clamp')
  _one_of(config, 'sampler.reinit', recipes.REINITS)
  _one_of(config, 'sampler.bn_mode', ('batch', 'running'))
  if s.name == 'sgld_buffer' and s.reinit == 'class_gaussian':
    _positive(s.reinit_pool_size, 'sampler.reinit_pool_size')
  if s.name == 'sgld_buffer':
    _positive(s.buffer_size, 'sampler.buffer_size')

  _one_of(config, 'loss.name', recipes.LOSSES)
  if config.loss.name == 'joint_energy':
    _require(s.name != 'none', 'sampler.name', 'must be a sampler for loss.name=joint_energy', s.name)
  _non_negative(config.loss.trades_beta, 'loss.trades_beta')
  _non_negative(config.loss.energy_l2, 'loss.energy_l2')
  _one_of(config, 'loss.weat_variant', ('nat', 'adv'))
  _one_of(config, 'loss.example_weights', recipes.EXAMPLE_WEIGHTS)
  w = config.loss.ebjdat_weights
  _require(len(w) == 4 and all(v >= 0 for v in w), 'loss.ebjdat_weights',
           'must be 4 weights >= 0 ([E(x+) - E(x_q)], CE(x), [E(x+) - E(x~)], CE(x~))', w)
  if config.loss.name == 'ebjdat':
    _require(s.name != 'none', 'sampler.name', 'must be a sampler for loss.name=ebjdat', s.name)
    _require(config.loss.example_weights == 'uniform', 'loss.example_weights',
             'must be uniform for loss.name=ebjdat (its terms are not weighted per example)',
             config.loss.example_weights)

  for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
              'max_checkpoints_to_keep'):
    _positive(config[key], key)
  _require(isinstance(config.async_checkpoints, bool), 'async_checkpoints', 'must be True or False',
           config.async_checkpoints)
  e = config.eval
  _positive(e.batch_size, 'eval.batch_size')  # any size: batches are padded for the devices
  _positive(e.num_examples, 'eval.num_examples')
  _non_negative(e.first_example, 'eval.first_example')
  _non_negative(e.eps, 'eval.eps')
  unknown = [a for a in e.attacks.split(',') if a and a not in ATTACKS]
  _require(not unknown, 'eval.attacks', f'must be a comma list of {list(ATTACKS)}', e.attacks)
  _one_of(config, 'eval.autoattack_version', ('standard', 'plus', 'rand'))
  _non_negative(e.autoattack_num_examples, 'eval.autoattack_num_examples')
  _non_negative(e.autoattack_plus_num_examples, 'eval.autoattack_plus_num_examples')
  _positive(e.pgd_restarts, 'eval.pgd_restarts')
  _positive(e.unroll, 'eval.unroll')
  _non_negative(e.test_noise_std, 'eval.test_noise_std')
  s = config.sample
  _one_of(config, 'sample.objective', sampling.OBJECTIVES)
  _one_of(config, 'sample.start', sampling.STARTS)
  _positive(s.num_samples, 'sample.num_samples')
  _positive(s.num_steps, 'sample.num_steps')
  _non_negative(s.step_size, 'sample.step_size')
  _non_negative(s.grad_clamp, 'sample.grad_clamp')
  _non_negative(s.noise_std, 'sample.noise_std')
  _positive(s.batch_size, 'sample.batch_size')
  _positive(s.unroll, 'sample.unroll')
  _require(s.steps_per_call >= 0 and (s.steps_per_call == 0 or s.num_steps % s.steps_per_call == 0),
           'sample.steps_per_call', f'must be 0 or divide sample.num_steps={s.num_steps}',
           s.steps_per_call)
  _non_negative(s.neighbours, 'sample.neighbours')
  _positive(s.neighbour_queries, 'sample.neighbour_queries')
  _non_negative(s.neighbour_pool, 'sample.neighbour_pool')
  _require(bool(s.subdir) and not os.path.isabs(s.subdir) and '..' not in s.subdir.split('/'),
           'sample.subdir', 'must be a directory name inside the workdir', s.subdir)
  _non_negative(config.analysis.dynamics_period_steps, 'analysis.dynamics_period_steps')
  _non_negative(config.divergence.max_retries, 'divergence.max_retries')
  _positive(config.divergence.max_abs_loss, 'divergence.max_abs_loss')
  _non_negative(config.divergence.window_steps, 'divergence.window_steps')
  w = config.robust_watch
  _positive(w.num_examples, 'robust_watch.num_examples')
  _positive(w.num_steps, 'robust_watch.num_steps')
  _non_negative(w.eps, 'robust_watch.eps')
  _non_negative(w.step_size, 'robust_watch.step_size')
  _require(0 < w.collapse_fraction < 1, 'robust_watch.collapse_fraction', 'must be in (0, 1)',
           w.collapse_fraction)
  _require(not w.enabled or config.data.validation_size > 0, 'robust_watch.enabled',
           'chooses checkpoints on held-out training images, never on test points: it needs '
           'config.data.validation_size > 0 (e.g. 1000)', w.enabled)
  _one_of(config, 'eval.checkpoint', ('latest', 'best'))
