"""JEAT :cpu in float32 and in bfloat16 compute, side by side (issue 13, item 4).

One run per invocation, with the reproduction's `cpu` settings (jeat_jax.reproduce: its
config, overrides and stages, so the numbers compare with docs/reproduction-cpu/REPORT.md),
except that evaluation is PGD-20 on 1000 points only (no AutoAttack, no audit), the
SSIM neighbours of Fig. 7 are skipped, and `model.dtype` and `seed` are set here:

  PYTHONPATH=. python benchmarks/precision.py --workdir=/tmp/prec/runs/bf16_s0 \\
      --dtype=bfloat16 --seed=0 --data_path=../shared/data/cifar10-jpeg-standin.npz
  PYTHONPATH=. python benchmarks/precision.py --summary /tmp/prec/runs/*  # the table

Stages: train, evaluate (PGD-20 on 1000), sample (500 by Eq. 17), fid (vs 2000 training
images); each skipped when its output exists; wall seconds in WORKDIR/timings.json.
"""
import glob
import json
import math
import os
import re
import statistics
import sys

from absl import app, flags

from jeat_jax.reproduce import cli  # pylint: disable=unused-import
from jeat_jax.reproduce import runs, stages

# --workdir (the run directory here) and --data_path are jeat_jax.reproduce's flags (cli.py).
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'config.model.dtype')
flags.DEFINE_integer('seed', 0, 'config.seed (training randomness; eval and sampling seeds fixed)')
flags.DEFINE_integer('num_train_steps', 0, '> 0: train this many steps (cosine schedule over them) '
                     'and log no energy dynamics, instead of the :cpu config\'s 1171 steps')
flags.DEFINE_bool('summary', False, 'Print the table of the run directories given as arguments.')
FLAGS = flags.FLAGS

STAGES = ('train', 'evaluate', 'sample', 'fid')


def make_config(dtype: str, seed: int, data_path: str, num_train_steps: int = 0):
  run = runs.RUNS_BY_NAME['jeat']
  config = runs.make_config(run, 'cpu', data_path)
  config.model.dtype = dtype
  config.seed = seed
  config.eval.attacks = 'pgd20'
  config.eval.audit = False
  config.sample.neighbours = 0
  if num_train_steps > 0:
    config.num_train_steps = num_train_steps
    config.dynamics_every_steps = 0
  return run, config


def _json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def summarize(run_dir: str) -> dict:
  """The numbers of one run directory (None where a stage has not written them)."""
  meta = _json(os.path.join(run_dir, 'precision.json')) or {}
  results = _json(os.path.join(run_dir, 'results.json')) or {}
  ev = _json(os.path.join(run_dir, 'eval', 'robustness.json')) or {}
  fid = _json(os.path.join(run_dir, 'fid.json')) or {}
  timings = _json(os.path.join(run_dir, 'timings.json')) or {}
  pgd = {a['name']: a for a in ev.get('attacks', [])}.get('pgd20', {})
  rates = []
  log = os.path.join(run_dir, 'precision.log')
  if os.path.exists(log):
    with open(log) as f:
      rates = [float(m) for m in re.findall(r'step \d+/\d+ .*?\| ([\d.]+) img/s', f.read())]
  return {'run': os.path.basename(run_dir.rstrip('/')), 'dtype': meta.get('dtype'),
          'seed': meta.get('seed'), 'clean': ev.get('clean_accuracy'),
          'n': ev.get('num_examples') or pgd.get('num_examples'),
          'pgd20': pgd.get('robust_accuracy'), 'fid': fid.get('fid'),
          'train_min': timings.get('train', 0) / 60 or None,
          'median_img_s': statistics.median(rates[1:]) if len(rates) > 1 else None,
          'steps': results.get('step'), 'rollbacks': results.get('divergence_rollbacks'),
          'timings': timings}


def binomial_se(p, n) -> float:
  return math.sqrt(p * (1 - p) / n)


def print_summary(dirs) -> None:
  rows = [summarize(d) for d in dirs]
  fmt = lambda v, f='{:.1f}': '-' if v is None else f.format(v)
  print('| run | dtype | seed | clean | PGD-20 | FID (500 vs 2000) | train min | img/s (median) |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['run']} | {r['dtype']} | {r['seed']} | {fmt(r['clean'] and 100 * r['clean'])}% "
          f"| {fmt(r['pgd20'] and 100 * r['pgd20'])}% | {fmt(r['fid'])} | {fmt(r['train_min'])} "
          f"| {fmt(r['median_img_s'])} |")
  for r in rows:
    extra = []
    for key in ('clean', 'pgd20'):
      if r[key] is not None:
        extra.append(f"{key} SE {100 * binomial_se(r[key], r['n'] or 1000):.1f} pts")
    print(f"{r['run']}: steps {r['steps']}, rollbacks {r['rollbacks']}, {', '.join(extra)}, "
          f"timings {r['timings']}")


def main(argv):
  if FLAGS.summary:
    print_summary(sorted(set(d for a in argv[1:] for d in glob.glob(a))))
    return
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'precision.json'), 'w') as f:
    json.dump({'dtype': FLAGS.dtype, 'seed': FLAGS.seed, 'argv': sys.argv}, f)
  run, config = make_config(FLAGS.dtype, FLAGS.seed, FLAGS.data_path, FLAGS.num_train_steps)
  stages.run_stages(run, config, FLAGS.workdir, STAGES)


if __name__ == '__main__':
  app.run(main)
