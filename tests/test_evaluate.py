"""--mode=evaluate on a briefly trained model: files, keys, and attacks that bite."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeat_jax import data as data_lib
from jeat_jax import evaluate, train
from tests.conftest import smoke_config


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, standin_path):
  config = smoke_config('natural', standin_path, num_train_steps=80, **{
      'data.train_subset': 4096, 'batch_size': 32, 'optimizer.name': 'adam', 'optimizer.lr': 2e-3,
      'optimizer.weight_decay': 0.0, 'eval.num_examples': 96,
      'checkpoint_every_steps': 80, 'eval_every_steps': 80, 'log_every_steps': 40})
  workdir = str(tmp_path_factory.mktemp('eval'))
  results = train.train_and_evaluate(config, workdir)
  assert results['test_accuracy'] > 0.15  # learned something: attacks have accuracy to remove
  return config, workdir


def test_evaluate_writes_json_and_table(trained_workdir):
  config, workdir = trained_workdir
  config.eval.attacks = 'fgsm,pgd20,energyk'
  config.eval.pgd_steps_scale = 0.5
  config.eval.audit_num_examples = 16
  result = evaluate.evaluate_run(config, workdir)
  on_disk = json.load(open(os.path.join(workdir, 'eval', 'robustness.json')))
  assert on_disk['clean_accuracy'] == result['clean_accuracy'] > 0.15
  data = on_disk['data']  # the dataset, named
  assert data['source'] == 'npz' and data['path'] == os.path.abspath(config.data.path)
  assert len(data['sha256']) == 64 and data['train_subset'] == 4096
  for record in on_disk['attacks']:
    assert set(record) >= {'name', 'eps', 'num_examples', 'robust_accuracy', 'seconds'}
    assert record['robust_accuracy'] <= on_disk['clean_accuracy']
  acc = {r['name']: r['robust_accuracy'] for r in on_disk['attacks']}
  # Table 1 at toy scale: CE-PGD and the energy attack both break a natural model.
  assert acc['pgd20'] < 0.5 * on_disk['clean_accuracy']
  assert acc['energyk'] < 0.5 * on_disk['clean_accuracy']
  table = open(os.path.join(workdir, 'eval', 'robustness.md')).read()
  assert '| MODELS | METHODS | ACCURACY |' in table and 'PGD-20 (CE)' in table
  assert on_disk['audit']['eps_sweep_pgd20']['128'] <= 0.05  # a natural model falls to ~0


def _evaluate_reduced(trained_workdir, attacks: str, autoattack_points: int):
  """--mode=evaluate with AutoAttack's iterations cut to 0.05x, on its first points, no audit."""
  config, workdir = trained_workdir
  config.eval.attacks = attacks
  config.eval.pgd_steps_scale = 0.05
  config.eval.autoattack_num_examples = autoattack_points
  config.eval.audit = False
  return evaluate.evaluate_run(config, workdir)['attacks'], workdir


def test_autoattack_on_a_subset(trained_workdir):
  (pgd, apgd, aa), workdir = _evaluate_reduced(trained_workdir, 'pgd20,apgd_ce,autoattack', 24)
  assert pgd['num_examples'] == 96 and aa['num_examples'] == 24
  # APGD-CE alone: AutoAttack's first stage, on every point, filed with its cut iterations.
  assert apgd['name'] == 'apgd_ce (0.05x)' and apgd['num_examples'] == 96
  assert [s['name'] for s in apgd['stages']] == ['clean', 'apgd-ce']
  assert aa['name'] == 'autoattack (0.05x)'  # cut iterations: not filed as AutoAttack
  table = open(os.path.join(workdir, 'eval', 'robustness.md')).read()
  assert '| AutoAttack (0.05x, reduced strength) | 8/255 | 24 |' in table
  assert [s['name'] for s in aa['stages']] == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  accs = [s['robust_accuracy'] for s in aa['stages']]
  assert accs == sorted(accs, reverse=True) and accs[-1] == aa['robust_accuracy']
  points = np.load(os.path.join(workdir, 'eval', 'robust_points.npz'))
  assert points['clean'].shape == (96,) and points['autoattack (0.05x)'].shape == (24,)
  assert points['pgd20'].mean() == pgd['robust_accuracy']
  assert points['autoattack (0.05x)'].mean() == aa['robust_accuracy']
  assert not np.any(points['autoattack (0.05x)'] & ~points['clean'][:24])


def test_autoattack_plus_and_rand_by_name(trained_workdir):
  (plus, rand), workdir = _evaluate_reduced(trained_workdir, 'autoattack_plus,autoattack_rand', 16)
  assert plus['name'] == 'autoattack_plus (0.05x)' and rand['name'] == 'autoattack_rand (0.05x)'
  assert [s['name'] for s in plus['stages']] == ['clean', 'apgd-ce', 'apgd-dlr', 'fab', 'square',
                                                 'apgd-t', 'fab-t']
  assert [s['name'] for s in rand['stages']] == ['clean', 'apgd-ce', 'apgd-dlr']
  table = open(os.path.join(workdir, 'eval', 'robustness.md')).read()
  assert '| AutoAttack+ (0.05x, reduced strength) | 8/255 | 16 |' in table
  assert '| AutoAttack rand (0.05x, reduced strength) | 8/255 | 16 |' in table


# ----------------------------------------------------------------------------- the audit

AUDIT_IMAGES = np.full((16, 8, 8, 3), 128, np.uint8)   # mid-grey, as uint8 like the test set


def _linear(x):
  """An honest model: logits linear in the pixels, so PGD's sign steps break it."""
  w = jax.random.normal(jax.random.PRNGKey(0), (8 * 8 * 3, 10))
  return x.reshape(x.shape[0], -1) @ w


def _masked(x):
  """Gradient masking: no gradient, and class 0 only for images of pixel std below 1/255
  or above 0.2. PGD stays at its random start, so only a large eps (std eps / sqrt(3))
  is 'robust' again: robust accuracy 0 at eps 8..64/255 and 1 at 128/255."""
  std = jnp.std(x.reshape(x.shape[0], -1), axis=-1)
  is_zero = (std < 1 / 255) | (std > 0.2)
  return jax.lax.stop_gradient(jnp.stack([10.0 * is_zero] + [jnp.full_like(std, 5.0)] * 9, -1))


def _noisy(x):
  """Random at test time: a new constant on every eager call (traced once under jit)."""
  return _linear(x) + float(np.random.default_rng().normal())


def _softmax(x):
  return jax.nn.softmax(_linear(x))


def _autoattack_record(square):
  stages = [('clean', 1.0), ('apgd-ce', 0.5), ('apgd-t', 0.5), ('fab-t', 0.5), ('square', square)]
  return {'name': 'autoattack', 'stages': [{'name': n, 'robust_accuracy': a} for n, a in stages]}


def _audit(logits_fn, records=(), masks=None):
  from jeat_jax import parallel  # pylint: disable=g-import-not-at-top
  cfg = smoke_config('natural').eval
  cfg.pgd_steps_scale, cfg.batch_size, cfg.audit_num_examples = 1.0, 16, 16
  y = np.asarray(jnp.argmax(logits_fn(data_lib.to_float(jnp.asarray(AUDIT_IMAGES))), -1))
  warnings, sweep = evaluate.audit(cfg, logits_fn, parallel.make_mesh(), AUDIT_IMAGES, y,
                                   list(records), jax.random.PRNGKey(0), masks)[:2]
  return warnings, sweep


def test_audit_is_quiet_on_an_honest_model():
  warnings, sweep = _audit(_linear, [_autoattack_record(square=0.499)])  # Square: -0.001
  assert warnings == [] and list(sweep) == [8, 16, 32, 64, 128]
  assert sweep[128] == 0.0


def test_audit_warns_when_autoattack_plus_finds_what_standard_missed():
  standard = dict(_autoattack_record(square=0.5), robust_accuracy=0.5, num_examples=16)
  for plus_accuracy, warned in ((0.495, False), (0.48, True)):
    plus = {'name': 'autoattack_plus', 'robust_accuracy': plus_accuracy, 'num_examples': 16}
    warnings, _ = _audit(_linear, [standard, plus])
    assert sum('AutoAttack+ lowered robust accuracy from 0.5000' in w for w in warnings) == warned


def test_audit_compares_autoattack_plus_on_the_points_both_ran_on():
  # AA on 16 points (robust: the first 8), AA+ on the first 8 (robust: 7 of them). On the
  # common points AA+ is 12.5 points lower; over each one's own points it looks higher.
  standard = dict(_autoattack_record(square=0.5), robust_accuracy=0.5, num_examples=16)
  plus = {'name': 'autoattack_plus', 'robust_accuracy': 0.875, 'num_examples': 8}
  masks = {'autoattack': np.arange(16) < 8, 'autoattack_plus': np.arange(8) < 7}
  warnings, _ = _audit(_linear, [standard, plus], masks)
  assert sum('from 1.0000 (standard AutoAttack) to 0.8750 on the same 8 points' in w
             for w in warnings) == 1, warnings
  assert not any('AutoAttack+' in w for w in _audit(_linear, [standard, plus])[0])  # no masks


def test_autoattack_points():
  cfg = smoke_config('natural').eval
  cfg.autoattack_num_examples, cfg.autoattack_plus_num_examples = 0, 0
  assert [evaluate.autoattack_points(a, cfg, 96) for a in ('autoattack', 'autoattack_plus')] == [96, 96]
  cfg.autoattack_num_examples = 24
  assert [evaluate.autoattack_points(a, cfg, 96) for a in ('autoattack', 'autoattack_plus')] == [24, 24]
  cfg.autoattack_plus_num_examples = 8
  assert [evaluate.autoattack_points(a, cfg, 96)
          for a in ('autoattack', 'autoattack_rand', 'autoattack_plus')] == [24, 24, 8]
  cfg.autoattack_plus_num_examples = 200
  assert evaluate.autoattack_points('autoattack_plus', cfg, 96) == 96


@pytest.mark.parametrize('logits_fn,square,needles', [
    (_linear, 0.45, ['the black-box Square attack lowered robust accuracy from 0.5000 to 0.4500']),
    (_masked, None, ['PGD-20 robust accuracy is still 1.000 at eps 128/255',
                     'robust accuracy rises with eps']),
    (_noisy, None, ['the model output is not deterministic']),
    (_softmax, None, ['the model returns probabilities instead of logits']),
], ids=['square_beats_white_box', 'masked_gradient', 'random_output', 'probabilities'])
def test_audit_warns_on_each_sign_of_masking(logits_fn, square, needles):
  records = [_autoattack_record(square)] if square is not None else []
  warnings, sweep = _audit(logits_fn, records)
  for needle in needles:
    assert sum(needle in w for w in warnings) == 1, (needle, warnings)
  if logits_fn is _masked:
    assert sweep == {8: 0.0, 16: 0.0, 32: 0.0, 64: 0.0, 128: 1.0}
