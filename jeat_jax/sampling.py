"""SGLD chains (Eq. 9, 10, 16, 17) and the on-device replay buffer of Algorithm 1.

One chain function serves training (negatives on E(x) for JEM/JEAT) and
generation (conditional samples on E(x, y)):

  x_{t+1} = x_t - step_size * grad_x E(x_t) + noise_std * N(0, I).

The paper writes step_size = alpha / 2 and noise_std = sqrt(alpha) (Eq. 9);
JEM decouples them. `sgld_parameters` maps a config to the pair.

The replay buffer is an array of shape (num_shards, size_per_shard, H, W, C):
one shard per device, and each device draws its chain starts from its own
shard and writes the chain ends back there.
"""
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

EnergyFn = Callable[[jax.Array], jax.Array]  # images -> per-example energy


def sgld_parameters(parametrization: str, step_size: float, noise_std: float,
                    alpha: float) -> Tuple[float, float]:
  """(step on the gradient, noise std) for 'jem' (decoupled) or 'paper' (Eq. 9: alpha/2, sqrt(alpha))."""
  if parametrization == 'paper':
    return alpha / 2.0, math.sqrt(alpha)
  return step_size, noise_std


def sgld_step(energy_fn: EnergyFn, x: jax.Array, key: jax.Array, step_size: float,
              noise_std: float, clip: Optional[Tuple[float, float]] = None) -> jax.Array:
  """One Langevin step on E (Eq. 10): x - step_size * grad E(x) + noise_std * N(0, I)."""
  grad = jax.grad(lambda z: jnp.sum(energy_fn(z)))(x)
  x = x - step_size * grad + noise_std * jax.random.normal(key, x.shape, x.dtype)
  return x if clip is None else jnp.clip(x, *clip)


def sgld_chain(energy_fn: EnergyFn, x0: jax.Array, key: jax.Array, num_steps: int,
               step_size: float, noise_std: float, clip: Optional[Tuple[float, float]] = None,
               unroll: int = 1) -> jax.Array:
  """`num_steps` SGLD steps from x0 (Eq. 9/10; the second block of Algorithm 1).

  A `lax.fori_loop`; `unroll` > 1 unrolls it (faster on XLA:CPU). The result is
  wrapped in stop_gradient: training never differentiates through a chain.
  """
  def body(t, x):
    return sgld_step(energy_fn, x, jax.random.fold_in(key, t), step_size, noise_std, clip)

  return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_steps, body, x0, unroll=unroll))


def init_replay_buffer(key: jax.Array, num_shards: int, size: int, image_shape,
                       low: float = 0.0, high: float = 1.0) -> jax.Array:
  """A buffer of `size` images drawn from U(low, high), split in `num_shards` shards."""
  if size % num_shards:
    raise ValueError(f'replay buffer size {size} is not divisible by {num_shards} shards')
  return jax.random.uniform(key, (num_shards, size // num_shards, *image_shape), jnp.float32,
                            low, high)


def draw_from_buffer(buffer: jax.Array, key: jax.Array, batch_size: int, reinit_prob: float,
                     low: float = 0.0, high: float = 1.0) -> Tuple[jax.Array, jax.Array]:
  """Chain starts for Algorithm 1: a uniformly drawn buffer entry, or U(low, high) with prob. rho.

  Each shard serves batch_size / num_shards chains. Returns the starts, shape
  (batch_size, H, W, C), and the slot of each within its shard,
  shape (num_shards, batch_size / num_shards).
  """
  num_shards, per_shard = buffer.shape[:2]
  per_device = batch_size // num_shards
  k_idx, k_reinit, k_noise = jax.random.split(key, 3)
  slots = jax.random.randint(k_idx, (num_shards, per_device), 0, per_shard)
  starts = jax.vmap(lambda shard, idx: shard[idx])(buffer, slots)
  starts = starts.reshape((batch_size,) + buffer.shape[2:])
  reinit = jax.random.bernoulli(k_reinit, reinit_prob, (batch_size,))
  fresh = jax.random.uniform(k_noise, starts.shape, starts.dtype, low, high)
  return jnp.where(reinit[:, None, None, None], fresh, starts), slots


def write_to_buffer(buffer: jax.Array, slots: jax.Array, x: jax.Array) -> jax.Array:
  """Writes chain ends back to the slots they started from (each in its own shard)."""
  num_shards = buffer.shape[0]
  x = x.reshape((num_shards, -1) + buffer.shape[2:])
  return jax.vmap(lambda shard, idx, v: shard.at[idx].set(v))(buffer, slots, x)
