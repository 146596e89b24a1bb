"""WideResNet: shapes for 10/100 classes, options, dtypes."""
import jax
import jax.numpy as jnp
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
