"""Images/s of a train step, JAX (the package's jitted step) beside PyTorch eager.

  python benchmarks/train_step.py --models=10-2,16-4,28-10 --recipes=natural,jeat
  python benchmarks/train_step.py --models=16-4 --recipes=all

JAX runs the package's jitted train step of any recipe (its paper config, the
model and batch overridden). PyTorch eager runs the same pre-activation WRN
(ported weights), batch and step for two of them:
  natural: CE on the batch, one SGD update;
  jeat:    the energy attack (Eq. 18), K SGLD steps on E(x) from a replay buffer,
           CE(x_adv) + E(x_adv) - E(x_sgld), one Adam update (Algorithm 1).
MFU = XLA's FLOP count of the compiled step / time / --peak_gflops (the machine's
float32 peak; the default assumes 2 cores x 2.0 GHz x 64 FLOP/cycle: two AVX-512 FMA units, as
on the avx512_fp16/bf16 Xeons of the CPU machines here; PyTorch's JEAT step at WRN-16-4 runs
~200 GFLOP/s there, more than a one-unit peak of 128).
"""
import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from jeat_jax import hardware, models, train
from jeat_jax import state as state_lib
from benchmarks import paper_scale
from tests import torch_reference


def images_per_second(fn, batch: int, repeats: int) -> float:
  """batch / mean seconds of fn(), after one warm-up call (eager PyTorch loops)."""
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return batch / ((time.perf_counter() - start) / repeats)


def start_torch_and_print_machine():
  """torch on every core; prints the machine line of every benchmark table."""
  torch = torch_reference._torch()  # pylint: disable=protected-access
  torch.set_num_threads(os.cpu_count())
  print(f'machine: {hardware.cpu_description()}; jax {jax.__version__} on '
        f'{jax.devices()[0].platform}; torch {torch.__version__}')
  return torch


RECIPES = ('natural', 'noise', 'at', 'prejeat', 'jeat', 'jem', 'trades', 'fast', 'free', 'weat',
           'ebjdat')
TORCH_RECIPES = ('natural', 'jeat')


def make_config(recipe, depth, width, batch, sgld_steps, unroll, dtype):
  c = importlib.import_module(f'configs.{recipe}').get_config()
  c.model.arch = 'wrn'  # --models names WRN-depth-width, for every recipe
  c.model.depth, c.model.width = depth, width
  c.model.dtype = dtype
  c.batch_size = batch or c.batch_size
  c.data.augment = False
  if c.sampler.name != 'none':
    c.sampler.num_steps = sgld_steps
  c.sampler.unroll = unroll
  c.perturbation.unroll = unroll
  c.sampler.buffer_size = 1000
  return c


def time_jax(config, steps):
  model = models.create_model(config.model, 10)
  steps_per_epoch = 100
  tx = state_lib.create_optimizer(
      config, state_lib.learning_rate_schedule(config, steps_per_epoch, 1000))
  state = state_lib.create_train_state(config, model, jax.random.PRNGKey(0), (32, 32, 3), tx, 1,
                                       paper_scale.chain_starts(config))
  images = lambda n, seed: jnp.asarray(
      np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8))
  batch = (images(config.batch_size, 0),
           jnp.asarray(np.random.default_rng(1).integers(0, 10, config.batch_size).astype(np.int32)))
  if config.data.energy_batch_size > 0:  # EB-JDAT's second, unaugmented batch
    batch += (images(config.data.energy_batch_size, 2),)
  step = jax.jit(lambda s, *b: train.train_step(s, *b, model=model, config=config),
                 donate_argnums=0)
  compiled = step.lower(state, *batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  state, m = compiled(state, *batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, *batch)
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - start) / steps
  return config.batch_size / seconds, flops / seconds, state, model


def time_torch(config, variables_model, steps):
  torch = torch_reference._torch()  # pylint: disable=protected-access
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  state, model = variables_model
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  net = torch_reference.port_wideresnet(jax.device_get(variables), model)
  net.train()
  b = config.batch_size
  x = torch.rand(b, 3, 32, 32)
  y = torch.randint(0, 10, (b,))
  if config.optimizer.name == 'sgd':
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  else:
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  buffer = torch.rand(1000, 3, 32, 32)
  eps, s_cfg = config.perturbation.eps, config.sampler

  def energy_attack(x, y):
    delta = torch.empty_like(x).uniform_(-eps, eps)
    xs = (x + delta).clamp(0, 1).requires_grad_(True)
    e_xy = -net(xs).gather(1, y[:, None]).sum()
    g, = torch.autograd.grad(e_xy, xs)
    delta = (delta + eps * g.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()

  def sgld(idx):
    xk = buffer[idx].clone()
    reinit = torch.rand(len(idx)) < s_cfg.reinit_prob
    xk[reinit] = torch.rand_like(xk[reinit])
    for _ in range(s_cfg.num_steps):
      xk.requires_grad_(True)
      e_x = -torch.logsumexp(net(xk), 1).sum()
      g, = torch.autograd.grad(e_x, xk)
      xk = (xk - s_cfg.step_size * g + s_cfg.noise_std * torch.randn_like(xk)).detach()
    buffer[idx] = xk
    return xk

  def one_step():
    if config.recipe == 'natural':
      loss = F.cross_entropy(net(x), y)
    else:
      x_adv = energy_attack(x, y)
      x_neg = sgld(torch.randint(0, 1000, (b,)))
      logits, logits_neg = net(x_adv), net(x_neg)
      loss = (F.cross_entropy(logits, y) - torch.logsumexp(logits, 1).mean()
              + torch.logsumexp(logits_neg, 1).mean())
    opt.zero_grad()
    loss.backward()
    opt.step()

  return images_per_second(one_step, b, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--models', default='10-2,16-4,28-10')
  parser.add_argument('--recipes', default='natural', help=f'comma-separated, or all: {RECIPES}')
  parser.add_argument('--batch', type=int, default=0, help="0: the recipe's paper batch size")
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--sgld_steps', type=int, default=20)
  parser.add_argument('--unroll', type=int, default=1)
  parser.add_argument('--dtype', default='float32',
                      help='model compute dtype (bfloat16 is emulated, hence slow, on most CPUs)')
  parser.add_argument('--peak_gflops', type=float, default=2 * 2.0 * 64)
  args = parser.parse_args()
  start_torch_and_print_machine()
  print('| recipe | model | batch | JAX img/s | PyTorch eager img/s | JAX/PyTorch | JAX GFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|')
  recipes = RECIPES if args.recipes == 'all' else args.recipes.split(',')
  for recipe in recipes:
    for spec in args.models.split(','):
      depth, width = map(int, spec.split('-'))
      config = make_config(recipe, depth, width, args.batch, args.sgld_steps, args.unroll,
                           args.dtype)
      steps = 1 if depth * width >= 280 else args.steps
      jax_ips, flops_per_s, state, model = time_jax(config, steps)
      if recipe in TORCH_RECIPES:
        torch_ips = time_torch(config, (state, model), steps)
        torch_cols = f'{torch_ips:.1f} | {jax_ips / torch_ips:.2f}x'
      else:
        torch_cols = '- | -'
      print(f'| {recipe} | WRN-{depth}-{width} | {config.batch_size} | {jax_ips:.1f} | '
            f'{torch_cols} | {flops_per_s / 1e9:.1f} | '
            f'{flops_per_s / 1e9 / args.peak_gflops:.1%} |', flush=True)


if __name__ == '__main__':
  main()
