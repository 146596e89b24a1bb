"""SGLD generation images/s: `jeat_jax.sampling.generate` beside a PyTorch eager loop.

  PYTHONPATH=. python benchmarks/sampling.py --models=16-4,28-10 --steps=20

Both sides run the same chain on the same WRN (the JEAT architecture: no
normalisation, leaky ReLU; weights ported with tests/torch_reference): K steps
of x <- clip(x - step * grad_x E(x, y) + noise * N(0, I)) on E(x, y) (Eq. 17),
a batch of --batch chains from U(0, 1). images/s = batch / seconds per chain
(K steps). MFU = XLA's FLOP count of the compiled chain / time / --peak_gflops
(default as benchmarks/train_step.py: 2 cores x 2.0 GHz x 64 FLOP/cycle).
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import images_per_second, start_torch_and_print_machine
from configs import jeat as jeat_config
from jeat_jax import models, sampling
from tests import torch_reference


def time_jax(model, variables, batch, steps, unroll, repeats):
  logits_fn = lambda x: model.apply(variables, x, train=False)
  gen = jax.jit(functools.partial(sampling.generate, logits_fn, objective='eq17',
                                  num_steps=steps, step_size=1.0, noise_std=0.01,
                                  clip=(0.0, 1.0), unroll=unroll))
  x0 = sampling.uniform_images(jax.random.PRNGKey(0), batch, (32, 32, 3))
  y = jnp.arange(batch, dtype=jnp.int32) % 10
  compiled = gen.lower(x0, y, jax.random.PRNGKey(1)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  jax.block_until_ready(compiled(x0, y, jax.random.PRNGKey(1)))
  start = time.perf_counter()
  for r in range(repeats):
    out = compiled(x0, y, jax.random.PRNGKey(2 + r))
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / repeats
  return batch / seconds, flops / seconds


def time_torch(model, variables, batch, steps, repeats):
  torch = torch_reference._torch()  # pylint: disable=protected-access
  net = torch_reference.port_wideresnet(jax.device_get(variables), model)
  net.eval()
  y = torch.arange(batch) % 10

  def chain():
    x = torch.rand(batch, 3, 32, 32)
    for _ in range(steps):
      x.requires_grad_(True)
      e_xy = -net(x).gather(1, y[:, None]).sum()
      g, = torch.autograd.grad(e_xy, x)
      x = (x - 1.0 * g + 0.01 * torch.randn_like(x)).clamp(0, 1).detach()
    return x

  return images_per_second(chain, batch, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--models', default='16-4,28-10')
  parser.add_argument('--batch', type=int, default=100)
  parser.add_argument('--steps', type=int, default=20, help='K, SGLD steps per chain')
  parser.add_argument('--unroll', type=int, default=20, help='fori_loop unroll (CPU: unroll fully)')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--peak_gflops', type=float, default=2 * 2.0 * 64)
  args = parser.parse_args()
  start_torch_and_print_machine()
  print('| model | batch | K | unroll | JAX img/s | PyTorch eager img/s | JAX/PyTorch | '
        'JAX GFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|---|')
  for spec in args.models.split(','):
    depth, width = map(int, spec.split('-'))
    c = jeat_config.get_config().model
    c.depth, c.width, c.dtype = depth, width, 'float32'
    model = models.create_model(c, 10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    repeats = 1 if depth * width >= 280 else args.repeats
    jax_ips, flops_per_s = time_jax(model, variables, args.batch, args.steps, args.unroll, repeats)
    torch_ips = time_torch(model, variables, args.batch, args.steps, repeats)
    print(f'| WRN-{depth}-{width} | {args.batch} | {args.steps} | {args.unroll} | {jax_ips:.1f} | '
          f'{torch_ips:.1f} | {jax_ips / torch_ips:.2f}x | {flops_per_s / 1e9:.1f} | '
          f'{flops_per_s / 1e9 / args.peak_gflops:.1%} |', flush=True)


if __name__ == '__main__':
  main()
