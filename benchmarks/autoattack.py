"""Standard AutoAttack: jeat_jax (JAX) against torchattacks 3.5.1 on the same weights and points.

A WideResNet (default WRN-16-4, the JEAT architecture: no normalisation, leaky
ReLU, [-1, 1] input) is briefly trained with Adam on the CIFAR-10 stand-in (or
left at its random initialisation with --train-steps 0), ported to PyTorch
with `tests/torch_reference.port_wideresnet`, and both AutoAttacks run at the
same strength on the same test points: APGD-CE and APGD-T with 100 iterations,
9 target classes, FAB-T with 100 iterations, Square with 5000 queries
(torchattacks' own `AutoAttack` would run APGD and FAB with 10 steps, so its
MultiAttack is built with the reference counts instead).

Prints the machine, the seconds and robust accuracy of each, the speed ratio,
and a JSON line. The JAX time is given for the first run (with compilation)
and for a second run on the same points (compiled code reused).

  PYTHONPATH=. python benchmarks/autoattack.py --n 100 --depth 16 --width 4
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import torch_reference as tr  # pylint: disable=wrong-import-position
from jeat_jax.attacks.autoattack import run_autoattack  # pylint: disable=wrong-import-position
from jeat_jax import hardware  # pylint: disable=wrong-import-position
from jeat_jax.models import WideResNet  # pylint: disable=wrong-import-position


def machine() -> str:
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  return (f'{hardware.cpu_description()}, jax {jax.__version__} ({jax.default_backend()}), '
          f'load average {load:.1f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=100, help='test points')
  parser.add_argument('--depth', type=int, default=16)
  parser.add_argument('--width', type=int, default=4)
  parser.add_argument('--norm', default='none')
  parser.add_argument('--activation', default='leaky_relu')
  parser.add_argument('--input-normalization', default='minus_one_one')
  parser.add_argument('--train-steps', type=int, default=100, help='Adam steps; 0 = random init')
  parser.add_argument('--eps', type=float, default=8.0, help='l_inf radius in 1/255')
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--n-iter', type=int, default=100)
  parser.add_argument('--n-target-classes', type=int, default=9)
  parser.add_argument('--n-queries', type=int, default=5000)
  parser.add_argument('--jax-runs', type=int, default=2, help='1: with compilation only')
  parser.add_argument('--skip-torch', action='store_true')
  parser.add_argument('--torch-threads', default='0',
                      help='comma-separated torch thread counts to time, 0 = torch default')
  args = parser.parse_args()
  eps = args.eps / 255

  x_train, y_train, x_test, y_test, source = tr.load_data(5000, args.n, seed=0)
  model = WideResNet(depth=args.depth, width=args.width, norm=args.norm,
                     activation=args.activation, input_normalization=args.input_normalization)
  t0 = time.time()
  if args.train_steps:
    variables = tr.train_classifier(model, x_train, y_train, steps=args.train_steps, batch_size=32,
                                    learning_rate=1e-3, has_batch_stats=args.norm == 'batch')
  else:
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  train_seconds = time.time() - t0
  logits_fn = jax.jit(lambda z: model.apply(variables, z))
  name = f'WRN-{args.depth}-{args.width} ({args.norm}, {args.activation}, {args.input_normalization})'
  print(f'machine: {machine()}')
  print(f'model: {name}, {"random init" if not args.train_steps else f"{args.train_steps} Adam steps"}'
        f' ({train_seconds:.0f} s); data: {source}, {args.n} test points; eps {args.eps}/255')
  print(f'strength: APGD {args.n_iter} it, {args.n_target_classes} targets, FAB-T {args.n_iter} it,'
        f' Square {args.n_queries} queries', flush=True)

  jax_runs = []
  for run in range(args.jax_runs):
    t = time.time()
    result = run_autoattack(logits_fn, x_test, y_test, eps=eps, key=jax.random.PRNGKey(run),
                            batch_size=args.batch_size, log_fn=print, n_iter=args.n_iter,
                            n_target_classes=args.n_target_classes, fab_n_iter=args.n_iter,
                            n_queries=args.n_queries)
    jax_runs.append(dict(seconds=time.time() - t, clean=result['clean_accuracy'],
                         robust=result['robust_accuracy'],
                         per_attack={r['name']: [round(r['robust_accuracy'], 4), round(r['seconds'], 1)]
                                     for r in result['records']}))
    print(f'jax run {run + 1}: robust accuracy {result["robust_accuracy"]:.2%} in '
          f'{jax_runs[-1]["seconds"]:.1f} s', flush=True)

  out = dict(date=datetime.date.today().isoformat(), machine=machine(), model=name,
             train_steps=args.train_steps, n=args.n, eps_255=args.eps, n_iter=args.n_iter,
             n_target_classes=args.n_target_classes, n_queries=args.n_queries, jax=jax_runs)
  if not args.skip_torch:
    import torch  # pylint: disable=import-outside-toplevel
    net = tr.port_wideresnet(variables, model)
    clean_torch = tr.torch_accuracy(net, x_test, y_test)
    out['torch'] = []
    for threads in [int(t) for t in args.torch_threads.split(',')]:
      if threads:
        torch.set_num_threads(threads)
      attack = tr.torch_autoattack(net, eps, apgd_steps=args.n_iter, fab_steps=args.n_iter,
                                            square_queries=args.n_queries,
                                            n_target_classes=args.n_target_classes)
      t = time.time()
      robust_torch, _ = tr.torch_robust_accuracy(net, attack, x_test, y_test)
      torch_seconds = time.time() - t
      print(f'torchattacks ({torch.get_num_threads()} threads): clean {clean_torch:.2%}, robust '
            f'accuracy {robust_torch:.2%} in {torch_seconds:.1f} s', flush=True)
      out['torch'].append(dict(seconds=torch_seconds, clean=clean_torch, robust=robust_torch,
                               threads=torch.get_num_threads()))
      for i, run in enumerate(jax_runs):
        print(f'speed ratio torch ({torch.get_num_threads()} threads) / jax run {i + 1}: '
              f'{torch_seconds / run["seconds"]:.2f}x')
  print('machine at end:', machine())
  print('JSON', json.dumps(out))


if __name__ == '__main__':
  main()
