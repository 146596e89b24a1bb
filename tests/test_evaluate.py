"""--mode=evaluate on a briefly trained model: files, keys, and attacks that bite."""
import json
import os

import pytest

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


def test_autoattack_on_a_subset(trained_workdir):
  config, workdir = trained_workdir
  config.eval.attacks = 'pgd20,autoattack'
  config.eval.pgd_steps_scale = 0.05
  config.eval.autoattack_num_examples = 24
  config.eval.audit = False
  result = evaluate.evaluate_run(config, workdir)
  pgd, aa = result['attacks']
  assert pgd['num_examples'] == 96 and aa['num_examples'] == 24
  assert [s['name'] for s in aa['stages']] == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  accs = [s['robust_accuracy'] for s in aa['stages']]
  assert accs == sorted(accs, reverse=True) and accs[-1] == aa['robust_accuracy']
