"""Energies of a classifier (paper Sec. 3.1, Eq. 11-13).

A classifier f with logits f(x) defines two energies:

  E(x, y) = -f(x)[y]                       (Eq. 12, first line)
  E(x)    = -logsumexp_k f(x)[k]           (Eq. 12, second line)

and the cross-entropy is their difference, CE(x, y) = E(x, y) - E(x) (Eq. 13).

The functions of logits are the definitions; the `*_of` wrappers take a
logits function `logits_fn(x) -> logits` (a model with its variables bound).
Energies are always computed in float32, whatever the compute dtype.
"""
from typing import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array], jax.Array]


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


def energy_xy_of(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
  """E(x, y) of the model `logits_fn` at images x (Eq. 12)."""
  return energy_xy(logits_fn(x), y)


def energy_x_of(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
  """E(x) of the model `logits_fn` at images x (Eq. 12)."""
  return energy_x(logits_fn(x))


def cross_entropy_of(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
  """CE(x, y) of the model `logits_fn` at images x (Eq. 13)."""
  return cross_entropy(logits_fn(x), y)
