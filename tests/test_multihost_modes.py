"""Every mode on several processes: evaluate, sample, fid, analyze and the reproduction by
2 processes x 2 CPU devices (jax.distributed over gloo) against 1 process with 1 device, on
one JEAT :smoke run.

The workers are tests/multihost_worker.py subprocesses (see tests/test_parallel.py for why).
Process 1 records every path it tries to create, write or rename under the workdir
(`--record_writes`): it must write nothing, while process 0 writes the outputs. The FID
Inception network is replaced by a fixed projection (`--fake_inception`, as in
tests/test_fid.py): no weights offline, and FID's multi-process plumbing (each process
featurises its share, the features are gathered) is what is tested here.
"""
import json
import shutil

import numpy as np
import pytest

from tests.conftest import write_synthetic_npz
from tests import test_parallel
from tests.test_parallel import free_port

pytestmark = pytest.mark.slow  # 2 processes x 2 devices against 1: minutes on 2 cores

# A worker here runs several commands (the reference one trains, evaluates, samples, scores
# and analyses: over 10 minutes on 2 cores shared with other jobs at load 17), longer than
# test_parallel's; a hung collective still ends it, with every thread's stack in its log.
WORKER_TIMEOUT_S = max(1500, test_parallel.WORKER_TIMEOUT_S)

# pgd20, energy1 and AutoAttack on all 64 test points (AutoAttack and energyk/PGD at a tenth
# of their steps, as :smoke does); 20 samples in one batch of 20 chains, which 1 and 4
# devices both divide: the chain noise is drawn for the whole batch, so the samples do not
# depend on the device count.
OVERRIDES = {'eval.attacks': 'pgd20,energy1,autoattack', 'eval.num_examples': 64,
             'eval.autoattack_num_examples': 64, 'sample.num_samples': 20,
             'sample.batch_size': 20}
OUTPUTS = ('eval', 'samples', 'fid.json', 'figures')


def launch(tmp_path, cache_dir, name: str, num_devices: int, *args: str):
  return test_parallel.launch(tmp_path, cache_dir, name, num_devices, *args,
                              f'--timeout={WORKER_TIMEOUT_S}')  # the last --timeout counts


def wait_all(procs, expected_codes):
  test_parallel.wait_all(procs, expected_codes, timeout=WORKER_TIMEOUT_S + 30)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One JEAT :smoke run trained, evaluated, sampled, scored and analysed by one process
  with one device (ROOT/single/jeat), then a copy of its checkpoints evaluated, sampled
  and scored by 2 processes with 2 devices each (ROOT/multi/jeat)."""
  root = tmp_path_factory.mktemp('modes')
  cache = root / 'jax_cache'  # shared by every worker: compiled once, reused by the others
  data = write_synthetic_npz(root / 'data.npz', n_train=256, n_test=64)
  common = [f'--data={data}', f'--overrides={json.dumps(OVERRIDES)}', '--mode=command',
            '--fake_inception']
  single, multi = root / 'single' / 'jeat', root / 'multi' / 'jeat'
  proc = launch(root, cache, 'single', 1, *common, f'--workdir={single}',
                '--command=train,evaluate,sample,fid,analyze', f'--out={root / "single.json"}')
  wait_all([proc], [0])
  shutil.copytree(single, multi, ignore=lambda d, names: [n for n in names if n in OUTPUTS]
                  if d == str(single) else [])
  port = free_port()
  pair = [launch(root, cache, f'multi{i}', 2, *common, f'--workdir={multi}',
                 '--command=evaluate,sample,fid', '--record_writes',
                 f'--out={root / "multi.json"}', f'--coordinator=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}') for i in range(2)]
  wait_all(pair, [0, 0])
  returned = [json.loads((root / f'multi.json.{i}').read_text()) for i in range(2)]
  return {'root': root, 'data': data, 'single': single, 'multi': multi, 'cache': cache,
          'returned': returned}


def without_seconds(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != 'seconds'}


def test_two_processes_evaluate_like_one(runs):
  """robustness.json: clean accuracy, every attack's robust accuracy and AutoAttack's stages
  exactly equal (per-example masks gathered from every process, compared with the global
  labels); every process returned the same result; the dataset is named."""
  single = json.loads((runs['single'] / 'eval' / 'robustness.json').read_text())
  multi = json.loads((runs['multi'] / 'eval' / 'robustness.json').read_text())
  assert runs['returned'][0]['process_count'] == 2
  assert runs['returned'][0]['device_count'] == 4
  assert [a['name'] for a in multi['attacks']] == ['pgd20', 'energy1', 'autoattack (0.1x)']
  assert multi['data'] == single['data'] and multi['data']['source'] == 'npz'
  assert multi['data']['path'] == runs['data'] and len(multi['data']['sha256']) == 64
  for key in ('clean_accuracy', 'num_examples', 'step', 'audit'):
    assert multi[key] == single[key], key
  assert [without_seconds(a) for a in multi['attacks']] == [
      without_seconds(a) for a in single['attacks']]
  assert [s['name'] for s in multi['attacks'][2]['stages']] == [
      'clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  for process in runs['returned']:
    returned = process['returned']['evaluate']
    assert returned['clean_accuracy'] == single['clean_accuracy']
    assert [without_seconds(a) for a in returned['attacks']] == [
        without_seconds(a) for a in single['attacks']]


def test_two_processes_sample_and_score_like_one(runs):
  """samples.npz bitwise equal (the chains sharded over 4 devices in 2 processes against 1
  device); gradient norms (means over the sharded batch) to round-off; fid.json equal."""
  with np.load(runs['single'] / 'samples' / 'samples.npz') as a, \
       np.load(runs['multi'] / 'samples' / 'samples.npz') as b:
    assert a['x'].shape == (20, 32, 32, 3) and a['x'].dtype == np.uint8
    np.testing.assert_array_equal(b['x'], a['x'])
    np.testing.assert_array_equal(b['y'], a['y'])
  with np.load(runs['single'] / 'samples' / 'gradient_norms.npz') as a, \
       np.load(runs['multi'] / 'samples' / 'gradient_norms.npz') as b:
    np.testing.assert_allclose(b['norms'], a['norms'], rtol=1e-5)
  single = json.loads((runs['single'] / 'fid.json').read_text())
  multi = json.loads((runs['multi'] / 'fid.json').read_text())
  assert np.isfinite(single['fid']) and single['fid'] > 0
  assert multi['fid'] == single['fid'] and multi['num_samples'] == 20
  assert multi['data'] == single['data'] == json.loads(
      (runs['single'] / 'eval' / 'robustness.json').read_text())['data']
  assert runs['returned'][1]['returned']['fid']['fid'] == single['fid']


def test_only_process_0_writes(runs):
  """Process 1 tried to write nothing under the workdir; process 0 wrote every output
  (which shows that the recording sees the writes)."""
  writes = [set(r['writes_under_workdir']) for r in runs['returned']]
  assert not writes[1], sorted(writes[1])
  multi = str(runs['multi'])
  for rel in ('eval/robustness.json', 'eval/robustness.md', 'samples/samples.npz',
              'samples/grid.png', 'samples/gradient_norms.npz', 'samples/neighbours.npz',
              'fid.json'):
    assert any(w.startswith(f'{multi}/{rel}') for w in writes[0]), (rel, sorted(writes[0]))


def test_two_processes_reproduce(runs):
  """`python -m jeat_jax.reproduce --distributed` by 2 processes on the multi-process run:
  the stages done are skipped alike by both, the analysis runs on both (its energy
  landscape equal to the 1-process one), process 0 alone writes REPORT.md, the figures and
  the timings, and the report names the dataset."""
  root = runs['multi'].parent
  port = free_port()
  pair = [launch(runs['root'], runs['cache'], f'reproduce{i}', 2, '--mode=reproduce',
                 f'--data={runs["data"]}', f'--workdir={root}', '--record_writes',
                 f'--out={runs["root"] / "reproduce.json"}', f'--coordinator=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}') for i in range(2)]
  wait_all(pair, [0, 0])
  writes = [json.loads((runs['root'] / f'reproduce.json.{i}').read_text())['writes_under_workdir']
            for i in range(2)]
  assert not writes[1], sorted(set(writes[1]))
  assert any(w.endswith('REPORT.md') for w in writes[0])
  timings = json.loads((runs['multi'] / 'timings.json').read_text())
  assert set(timings) == {'analyze'}, timings  # train, evaluate, sample and fid were done
  with np.load(runs['single'] / 'figures' / 'energy_landscape.npz') as a, \
       np.load(runs['multi'] / 'figures' / 'energy_landscape.npz') as b:
    np.testing.assert_array_equal(b['energy'], a['energy'])
  report = (root / 'REPORT.md').read_text()
  data = json.loads((runs['multi'] / 'eval' / 'robustness.json').read_text())['data']
  assert f'Data: `{data["path"]}` (sha256 `{data["sha256"]}`).' in report
  assert '(4 devices in 2 processes)' in report
  assert (root / 'figures' / 'energy_landscapes.png').exists()
