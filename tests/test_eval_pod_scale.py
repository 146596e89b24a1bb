"""Evaluation at pod scale: the same per-point verdicts on 8 devices as on 1, and attack
executables that take the model's variables as arguments instead of embedding them.

The attacks run on a random WRN-10-1 (`:smoke`) with labels its own predictions (every
point starts correct), on 45 points in batches of 20: neither is a multiple of 8, so every
batch is padded (`data.eval_batches`) and AutoAttack's chunks too. Each device count runs in
its own subprocess (this file run as a script): XLA_FLAGS must name the device count before
JAX is imported, and the pytest process has imported it with one device.
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import REPO, smoke_config  # pylint: disable=wrong-import-position

NUM_EXAMPLES, BATCH_SIZE = 45, 20
ATTACKS = ('fgsm', 'pgd20', 'energy1', 'cw_linf', 'cw_l2')
EPS = 2 / 255                  # the random network keeps some points, loses others
WORKER_TIMEOUT_S = 900


def eval_config():
  config = smoke_config('natural', **{
      'eval.batch_size': BATCH_SIZE, 'eval.num_examples': NUM_EXAMPLES, 'eval.eps': EPS,
      'eval.pgd_steps_scale': 0.05, 'eval.pgd_restarts': 1})
  return config


def random_model(config, width: int = 1):
  """A WRN-10-`width` at its random initialisation, and its `evaluate.model_logits`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jeat_jax import evaluate, models  # pylint: disable=g-import-not-at-top
  config.model.width = width
  model = models.create_model(config.model, 10, jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  return evaluate.model_logits(model, variables['params'], variables.get('batch_stats', {}))


def robust_masks() -> dict:
  """Per-point robust masks of every attack of ATTACKS and of AutoAttack, on this process's
  devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jeat_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from jeat_jax import evaluate, parallel  # pylint: disable=g-import-not-at-top
  config = eval_config()
  cfg = config.eval
  logits_fn = random_model(config)
  x = np.random.default_rng(0).integers(0, 256, (NUM_EXAMPLES, 32, 32, 3), dtype=np.uint8)
  y = np.asarray(jnp.argmax(logits_fn(data_lib.to_float(jnp.asarray(x))), -1))
  mesh, key = parallel.make_mesh(), jax.random.PRNGKey(cfg.seed)
  masks = {'clean': evaluate.clean_mask(logits_fn, mesh, x, y, cfg.batch_size)}
  for i, name in enumerate(ATTACKS):
    masks[name] = evaluate.robust_mask(name, cfg, logits_fn, mesh, x, y, cfg.eps,
                                       jax.random.fold_in(key, i), cfg.pgd_restarts)
  out = evaluate.run_autoattack(cfg, logits_fn, x, y, cfg.eps, key, 'standard', mesh)
  masks['autoattack'] = out['robust']
  for record in out['records']:
    masks[f'autoattack after {record["name"]}'] = np.asarray(record['robust_accuracy'])
  return masks


def run_worker(tmp_path, num_devices: int) -> subprocess.Popen:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env.update(XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}']),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  log = open(tmp_path / f'{num_devices}.log', 'w')  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, __file__, f'--out={tmp_path / f"{num_devices}.npz"}',
                           f'--devices={num_devices}'], cwd=str(REPO), env=env, stdout=log,
                          stderr=subprocess.STDOUT)


@pytest.mark.slow  # two subprocesses on simulated devices: minutes on 2 cores
def test_eight_devices_give_the_verdicts_of_one(tmp_path):
  procs = {n: run_worker(tmp_path, n) for n in (8, 1)}
  for n, proc in procs.items():
    assert proc.wait(WORKER_TIMEOUT_S) == 0, (tmp_path / f'{n}.log').read_text()[-4000:]
  eight, one = (np.load(tmp_path / f'{n}.npz') for n in (8, 1))
  assert sorted(eight.files) == sorted(one.files)
  for name in ('clean',) + ATTACKS + ('autoattack',):
    assert one[name].shape == (NUM_EXAMPLES,), name
    np.testing.assert_array_equal(eight[name], one[name], err_msg=name)
  assert one['clean'].all()  # labels are the model's predictions
  # The attacks bite, and leave points: the masks compare real verdicts.
  assert 0 < one['pgd20'].sum() < NUM_EXAMPLES and 0 < one['autoattack'].sum() < NUM_EXAMPLES
  for name in eight.files:
    np.testing.assert_array_equal(eight[name], one[name], err_msg=name)


def lowered_pgd20(width: int):
  """The PGD-20 check of `evaluate.make_attack_check` lowered for a WRN-10-`width`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jeat_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = eval_config()
  logits_fn = random_model(config, width)
  check = evaluate.make_attack_check('pgd20', config.eval, logits_fn)
  x = jnp.zeros((8, 32, 32, 3), jnp.uint8)
  lowered = check.func.lower(*check.args, x, jnp.zeros((8,), jnp.int32), jax.random.PRNGKey(0),
                             jnp.float32(EPS))
  return lowered, jax.tree.leaves(logits_fn)


def test_pgd_executable_takes_the_weights_as_arguments():
  """The variables are parameters of the lowered computation, and its text does not grow
  with the network's width (16x the weights at width 4): none is compiled in as a constant."""
  texts = {}
  for width in (1, 4):
    lowered, leaves = lowered_pgd20(width)
    args = jax_leaves(lowered.in_avals)
    assert len(args) == len(leaves) + 4, (len(args), len(leaves))
    assert sum(int(np.prod(a.shape)) for a in args) >= sum(leaf.size for leaf in leaves)
    texts[width] = lowered.as_text()
  assert len(texts[4]) < 1.05 * len(texts[1]), {w: len(t) for w, t in texts.items()}


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--devices', type=int, required=True)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == args.devices, (jax.device_count(), args.devices)
  np.savez(args.out, **robust_masks())
