"""Size of the compiled PGD-20 attack of `--mode=evaluate` for a WRN-16-4, in this checkout
and (with --before) in another one, e.g. a worktree of an older commit:

  git worktree add /tmp/old HEAD && python benchmarks/eval_executable_size.py --before=/tmp/old

Until evaluate.py passed the model as `evaluate.model_logits` (variables as arguments of the
jitted step), every attack executable embedded the weights as constants (~146 MB for a
WRN-28-10). Prints, per checkout: the length of the compiled HLO text and the size of the
serialized executable (`jax.experimental.serialize_executable`), for a batch of --batch.
"""
import argparse
import functools
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(repo: str, depth: int, width: int, batch: int) -> dict:
  """The PGD-20 check of `evaluate.make_attack_check` in `repo`, compiled; its sizes."""
  sys.path.insert(0, repo)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  from jeat_jax import evaluate, models  # pylint: disable=g-import-not-at-top
  from tests.conftest import smoke_config  # pylint: disable=g-import-not-at-top
  config = smoke_config('natural')
  config.model.depth, config.model.width = depth, width
  model = models.create_model(config.model, 10, jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  if hasattr(evaluate, 'model_logits'):
    logits_fn = evaluate.model_logits(model, params, batch_stats)
  else:  # before: a closure over the variables
    from jeat_jax import state as state_lib  # pylint: disable=g-import-not-at-top
    logits_fn = state_lib.make_logits_fn(model, params, batch_stats, 'running')
  config.eval.pgd_steps_scale = 1.0
  check = evaluate.make_attack_check('pgd20', config.eval, logits_fn)
  fn, bound = (check.func, check.args) if isinstance(check, functools.partial) else (check, ())
  x, y = jnp.zeros((batch, 32, 32, 3), jnp.uint8), jnp.zeros((batch,), jnp.int32)
  compiled = fn.lower(*bound, x, y, jax.random.PRNGKey(0), jnp.float32(8 / 255)).compile()
  serialized, _, _ = serialize_executable.serialize(compiled)
  weights = sum(leaf.nbytes for leaf in jax.tree.leaves(variables))
  return dict(repo=os.path.dirname(os.path.dirname(evaluate.__file__)),
              model=f'WRN-{depth}-{width}', batch=batch, weights_bytes=weights,
              hlo_text_chars=len(compiled.as_text()), serialized_bytes=len(serialized))


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.machine()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--before', help='another checkout to measure too (its own process)')
  parser.add_argument('--repo', default=HERE, help=argparse.SUPPRESS)
  parser.add_argument('--depth', type=int, default=16)
  parser.add_argument('--width', type=int, default=4)
  parser.add_argument('--batch', type=int, default=100)
  parser.add_argument('--json', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.json:
    print('JSON', json.dumps(measure(args.repo, args.depth, args.width, args.batch)))
    return
  print(f'machine: {cpu_name()}, {os.cpu_count()} cores')
  repos = ([('before', args.before)] if args.before else []) + [('after', HERE)]
  for label, repo in repos:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--repo={repo}', '--json',
                          f'--depth={args.depth}', f'--width={args.width}',
                          f'--batch={args.batch}'], check=True, capture_output=True, text=True,
                         cwd=repo).stdout
    r = json.loads(out.split('JSON ', 1)[1])
    print(f'{label} ({r["repo"]}): {r["model"]}, batch {r["batch"]}, weights '
          f'{r["weights_bytes"] / 1e6:.1f} MB: compiled HLO text {r["hlo_text_chars"]:,} chars, '
          f'serialized executable {r["serialized_bytes"] / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
