"""Each recipe's settings against its reference's definitions (docs/recipes.md): the
one-cycle lr and momentum of torch's OneCycleLR, BatchNorm running statistics of
torch.nn.BatchNorm2d, the per-recipe attack BatchNorm mode, crop padding and BatchNorm
momentum, and EB-JDAT's class-balanced initial buffer."""
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import weat
from jeat_jax import data as data_lib
from jeat_jax import models, sampling
from jeat_jax import state as state_lib

STEPS = 40


def torch_onecycle(steps: int, peak_lr: float, pct_start: float):
  """(lr, momentum) of each step's optimizer.step() under WEAT's OneCycleLR (main.py)."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=peak_lr, momentum=0.9, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak_lr, total_steps=steps,
                                              pct_start=pct_start)
  values = []
  for _ in range(steps):
    values.append((opt.param_groups[0]['lr'], opt.param_groups[0]['momentum']))
    opt.step()
    sched.step()
  return np.array(values)


def optax_onecycle(config, steps: int):
  """(lr, momentum) our optimizer applies at each update (read from its injected state)."""
  schedule = state_lib.learning_rate_schedule(config, steps, steps)
  tx = state_lib.create_optimizer(config, schedule)
  params = jnp.zeros(1)
  opt_state = tx.init(params)
  values = []
  for count in range(steps):
    _, opt_state = tx.update(jnp.ones(1), opt_state, params)
    injected = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'hyperparams'))
                if hasattr(s, 'hyperparams')]
    momentum = injected[0].hyperparams['decay'] if injected else config.optimizer.momentum
    values.append((float(schedule(count)), float(momentum)))
  return np.array(values)


def test_weat_lr_and_momentum_follow_torch_onecycle():
  """WEAT: lr and SGD momentum at every step as torch's OneCycleLR(pct_start=0.25) with
  its defaults (cos, div 25, final div 1e4, cycle_momentum 0.85 / 0.95)."""
  config = weat.get_config()
  config.num_train_steps = STEPS
  ours = optax_onecycle(config, STEPS)
  theirs = torch_onecycle(STEPS, config.optimizer.lr, config.schedule.peak_fraction)
  np.testing.assert_allclose(ours[:, 0], theirs[:, 0], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(ours[:, 1], theirs[:, 1], rtol=1e-6)


def bn_config(bn_momentum: float):
  return ml_collections.ConfigDict(dict(
      arch='wrn', depth=10, width=1, norm='batch', activation='relu', dropout_rate=0.0,
      input_normalization='none', bn_momentum=bn_momentum))


@pytest.mark.parametrize('recipe,torch_momentum', [('ebjdat', 0.9), ('at', 0.1)])
def test_batchnorm_running_statistics_follow_torch(recipe, torch_momentum):
  """3 train-mode passes of the recipe's model (its `model.bn_momentum`) on 3 batches: the
  first BatchNorm's running mean is that of torch's BatchNorm2d(momentum=m) (EB-JDAT's 0.9,
  torch's default 0.1) fed the same features; the running variance agrees up to torch's
  n / (n - 1) correction of each batch variance (flax keeps the biased one)."""
  bn_momentum = importlib.import_module(f'configs.{recipe}').get_config().model.bn_momentum
  model = models.create_model(bn_config(bn_momentum), 10)
  batches = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), batches[0], train=False)
  stats, features = variables['batch_stats'], []
  for x in batches:
    _, updates = model.apply({'params': variables['params'], 'batch_stats': stats}, x,
                             train=True, mutable=['batch_stats', 'intermediates'],
                             capture_intermediates=lambda mdl, _: mdl.name == 'stem')
    stats = updates['batch_stats']
    features.append(np.asarray(updates['intermediates']['stem']['__call__'][0]))
  ours = stats['group0_block0']['BatchNorm_0']
  bn = torch.nn.BatchNorm2d(features[0].shape[-1], momentum=torch_momentum)
  for f in features:
    bn(torch.tensor(f).permute(0, 3, 1, 2))
  n = features[0].size // features[0].shape[-1]
  np.testing.assert_allclose(ours['mean'], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours['var'], bn.running_var.numpy(), rtol=1.0 / (n - 1))
  assert not np.allclose(ours['var'], bn.running_var.numpy(), rtol=1e-6)  # the correction


# recipe: (perturbation.bn_mode, data.pad_mode, model.bn_momentum), from each reference
# (docs/recipes.md): TRADES trades.py / train_trades_cifar10.py; Rice et al. train_cifar.py;
# fast_adversarial train_fgsm.py, train_free.py; WEAT WEAT_loss.py, main.py; EB-JDAT
# train_sadajem.py, utils.get_data, models/norms.py; JEM train_wrn_ebm.py.
REFERENCE = {
    'trades': ('running', 'constant', 0.9),
    'at': ('batch', 'reflect', 0.9),
    'fast': ('batch', 'constant', 0.9),
    'free': ('batch', 'constant', 0.9),
    'weat': ('running', 'constant', 0.9),
    'ebjdat': ('running', 'reflect', 0.1),
    'jem': ('batch', 'reflect', 0.9),
    'jeat': ('batch', 'reflect', 0.9),
    'prejeat': ('batch', 'reflect', 0.9),
}


@pytest.mark.parametrize('recipe', sorted(REFERENCE))
def test_shipped_configs_follow_their_reference(recipe):
  c = importlib.import_module(f'configs.{recipe}').get_config()
  assert (c.perturbation.bn_mode, c.data.pad_mode, c.model.bn_momentum) == REFERENCE[recipe]


@pytest.mark.parametrize('recipe,cycle', [('weat', (0.85, 0.95)), ('fast', (0.8, 0.9)),
                                          ('trades', None), ('ebjdat', None)])
def test_momentum_cycling_follows_the_reference_scheduler(recipe, cycle):
  """OneCycleLR (WEAT) and CyclicLR (Fast AT) cycle the momentum by default; step and
  multistep schedules leave it at optimizer.momentum."""
  s = importlib.import_module(f'configs.{recipe}').get_config().schedule
  assert ((s.base_momentum, s.max_momentum) if s.cycle_momentum else None) == cycle


def test_constant_padding_pads_with_zeros():
  """torchvision's RandomCrop(32, padding=4): a crop at offset (0, 0) of ones shows a
  4-pixel zero border."""
  x = jnp.ones((64, 8, 8, 1))
  out = np.asarray(data_lib.augment(jax.random.PRNGKey(0), x, pad=4, pad_mode='constant'))
  assert out.min() == 0.0 and set(np.unique(out)) == {0.0, 1.0}
  reflected = np.asarray(data_lib.augment(jax.random.PRNGKey(0), x, pad=4))
  assert reflected.min() == 1.0


def test_initial_buffer_is_class_balanced():
  """EB-JDAT's init_from_centers: buffer_size / n_classes draws of each class (with zero
  covariance each image is its class mean), in class blocks."""
  num_classes, size = 10, 1000
  means = np.linspace(0.05, 0.95, num_classes, dtype=np.float32)[:, None].repeat(4, 1)
  gaussian = sampling.ClassConditionalGaussian(means, np.zeros((num_classes, 4, 4), np.float32))
  images = np.asarray(sampling.class_gaussian_images(gaussian, jax.random.PRNGKey(0), size,
                                                     (2, 2, 1)))
  classes = np.abs(images[:, 0, 0, 0, None] - means[None, :, 0]).argmin(1)
  np.testing.assert_array_equal(np.bincount(classes, minlength=num_classes),
                                [size // num_classes] * num_classes)
  np.testing.assert_array_equal(classes, np.repeat(np.arange(num_classes), size // num_classes))


def test_gaussian_jitter_is_ebjdats_in_our_units():
  """Their Sigma + 1e-4 I on [-1, 1] images is Sigma / 4 + 2.5e-5 I on [0, 1] images:
  the fit of constant images (Sigma = 0) is the jitter alone."""
  x = np.full((5, 2, 2, 1), 128, np.uint8)
  fit = sampling.ClassConditionalGaussian.fit(x, np.zeros(5, np.int64), 1)
  theirs = 1e-4 / 2.0 ** 2
  np.testing.assert_allclose(fit.cholesky[0] @ fit.cholesky[0].T, theirs * np.eye(4), rtol=1e-5)
