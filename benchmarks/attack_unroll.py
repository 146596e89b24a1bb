"""PGD-20 on XLA:CPU: a fori_loop left with a while loop (unroll 10) against a fully unrolled one.

  PYTHONPATH=. python benchmarks/attack_unroll.py

WRN-10-1 with BatchNorm (the `:cpu` models), batch 100, random weights; prints
compile-plus-first-call and mean seconds per later call for each unroll.
"""
import time

import jax
import jax.numpy as jnp

from jeat_jax import attacks, energy, hardware
from jeat_jax.models import WideResNet


def main():
  model = WideResNet(depth=10, width=1, norm='batch')
  x = jax.random.uniform(jax.random.PRNGKey(0), (100, 32, 32, 3))
  y = jnp.arange(100) % 10
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  logits = lambda z: model.apply(variables, z, train=False)
  print(f'machine: {hardware.cpu_model_name()}; jax {jax.__version__} on {jax.devices()[0].platform}')
  for unroll in (10, 20):
    pgd = jax.jit(lambda xb, k, e, u=unroll: attacks.pgd(
        lambda z: energy.cross_entropy(logits(z), y), xb, k, e, 2 / 255, 20, unroll=u))
    start = time.perf_counter()
    pgd(x, jax.random.PRNGKey(0), 8 / 255).block_until_ready()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(2):
      pgd(x, jax.random.PRNGKey(0), 8 / 255).block_until_ready()
    print(f'unroll {unroll}: compile + first call {first:.1f} s, then {(time.perf_counter() - start) / 2:.2f} s per PGD-20')


if __name__ == '__main__':
  main()
