"""Robustness evaluation: clean and robust accuracy under the shared attacks."""
import functools

import jax
import jax.numpy as jnp

from jeat_jax import attacks
from jeat_jax import data as data_lib
from jeat_jax import energy
from jeat_jax import parallel


def pgd_correct(logits_fn, x_uint8, y, mask, key, *, eps, step_size, num_steps):
  """Number of (unmasked) examples still classified correctly after PGD on CE (Eq. 3)."""
  x = data_lib.to_float(x_uint8)
  x_adv = attacks.pgd(lambda z: energy.cross_entropy(logits_fn(z), y), x, key, eps, step_size,
                      num_steps)
  return jnp.sum((jnp.argmax(logits_fn(x_adv), -1) == y) & mask)


def robust_accuracy_pgd(logits_fn, mesh, x, y, batch_size: int, key, eps=8 / 255,
                        step_size=2 / 255, num_steps=10) -> float:
  """PGD-k robust accuracy (random start, one restart) over (x, y), batched on all devices."""
  fn = jax.jit(functools.partial(pgd_correct, logits_fn, eps=eps, step_size=step_size,
                                 num_steps=num_steps))
  correct = 0
  for i, (xb, yb, mb) in enumerate(data_lib.eval_batches(x, y, batch_size)):
    correct += int(fn(*parallel.global_batch(mesh, xb, yb, mb), jax.random.fold_in(key, i)))
  return correct / x.shape[0]
