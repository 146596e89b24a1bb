"""Energies of a classifier (paper Sec. 3.1, Eq. 11-13).

A classifier f with logits f(x) defines two energies:

  E(x, y) = -f(x)[y]                       (Eq. 12, first line)
  E(x)    = -logsumexp_k f(x)[k]           (Eq. 12, second line)

and the cross-entropy is their difference, CE(x, y) = E(x, y) - E(x) (Eq. 13).

They are functions of logits: an energy of images is `energy_xy(logits_fn(x), y)`
for a model `logits_fn` with its variables bound. Energies are always computed
in float32, whatever the compute dtype.
"""
import jax
import jax.numpy as jnp


def energy_xy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """E(x, y) = -f(x)[y] (Eq. 12), one value per example."""
  logits = logits.astype(jnp.float32)
  return -jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def energy_x(logits: jax.Array) -> jax.Array:
  """E(x) = -logsumexp_k f(x)[k] (Eq. 12), one value per example."""
  return -jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CE(x, y) = -log p(y|x) = E(x, y) - E(x) (Eq. 11 and 13), per example."""
  return energy_xy(logits, labels) - energy_x(logits)
