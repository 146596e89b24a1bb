"""WideResNet: shapes for 10/100 classes, options, dtypes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jeat_jax import models


@pytest.mark.parametrize('num_classes', [10, 100])
@pytest.mark.parametrize('norm', ['none', 'batch', 'group'])
def test_output_shape(num_classes, norm):
  model = models.WideResNet(depth=10, width=1, num_classes=num_classes, norm=norm)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert ('batch_stats' in variables) == (norm == 'batch')
  logits = model.apply(variables, x)
  assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32


def test_wrn_28_10_parameter_count():
  model = models.WideResNet(depth=28, width=10, norm='batch')
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  n = sum(x.size for x in jax.tree.leaves(shapes['params']))
  assert 36.4e6 < n < 36.6e6  # the well-known 36.5M of WRN-28-10


@pytest.mark.parametrize('activation', models.ACTIVATIONS)
def test_activations_and_bfloat16(activation):
  model = models.WideResNet(depth=10, width=1, activation=activation, dtype=jnp.bfloat16,
                            dropout_rate=0.3)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_input_normalization():
  x = jnp.full((1, 2, 2, 3), 0.5)
  assert jnp.allclose(models.normalize_input(x, 'minus_one_one'), 0.0)
  mean = jnp.asarray(models.CIFAR10_MEAN)
  assert jnp.allclose(models.normalize_input(jnp.broadcast_to(mean, (1, 2, 2, 3)), 'meanstd'), 0.0,
                      atol=1e-6)


def bfloat16_collision(how: str) -> float:
  """A pixel value x whose normalised x and x + 0.001 round to the same bfloat16 in every
  channel: two images a network fed in bfloat16 cannot tell apart."""
  for x in np.arange(0.6, 1.0, 0.01):
    a, b = (models.normalize_input(jnp.full((3,), v, jnp.float32), how).astype(jnp.bfloat16)
            for v in (x, x + 0.001))
    if bool(jnp.all(a == b)):
      return float(x)
  raise AssertionError(f'no bfloat16 collision for {how}')


@pytest.mark.parametrize('how', models.INPUT_NORMALIZATIONS)
@pytest.mark.parametrize('arch', models.ARCHS)
def test_bfloat16_model_sees_float32_input(arch, how):
  """Under model.dtype=bfloat16 the input normalisation and the stem run in float32: a 0.001
  perturbation (TRADES' and WEAT's start noise, a part of SGLD's noise) changes the logits even
  where a bfloat16 input would round it away."""
  config = ml_collections.ConfigDict(dict(
      arch=arch, depth=10, width=1, norm='none', activation='relu', dropout_rate=0.0,
      input_normalization=how))
  model = models.create_model(config, 10, jnp.bfloat16)
  x = bfloat16_collision(how)
  images = jnp.stack([jnp.full((32, 32, 3), v, jnp.float32) for v in (x, x + 0.001)])
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  logits = model.apply(variables, images)
  assert logits.dtype == jnp.float32
  assert not bool(jnp.all(logits[0] == logits[1])), (arch, how, x)
