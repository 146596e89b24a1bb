"""The reproduction command at smoke scale: stages, resume, and the report."""
import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest
from absl import app

from tests.conftest import write_synthetic_npz
from configs import at as at_config
from jeat_jax.reproduce import paper_report, results
from jeat_jax.reproduce import runs as runs_lib
from jeat_jax.reproduce import stages as stages_lib


@pytest.mark.slow  # every stage of two runs
def test_reproduce_smoke_writes_report_and_resumes(tmp_path):
  data = write_synthetic_npz(tmp_path / 'd.npz', n_train=256, n_test=32)
  root = str(tmp_path / 'repro')
  runs = [r for r in runs_lib.RUNS if r.name in ('natural', 'at')]
  stages = ('train', 'evaluate', 'sample', 'analyze')
  for run in runs:
    stages_lib.run_stages(run, runs_lib.make_config(run, 'smoke', data),
                          os.path.join(root, run.name), stages)
  for name in ('natural', 'at'):
    for out in ('results.json', 'eval/robustness.json', 'samples/samples.npz',
                'figures/energy_landscape.npz', 'timings.json'):
      assert os.path.exists(os.path.join(root, name, out)), (name, out)
  assert os.path.exists(os.path.join(root, 'at', 'samples_eq16', 'samples.npz'))
  with open(os.path.join(root, 'at', 'timings.json')) as f:
    assert set(json.load(f)) == {'train', 'evaluate', 'sample', 'analyze'}
  # A second pass finds every stage done: nothing is trained again.
  before = os.path.getmtime(os.path.join(root, 'at', 'results.json'))
  stages_lib.run_stages(runs[1], runs_lib.make_config(runs[1], 'smoke', data),
                        os.path.join(root, 'at'), stages)
  assert os.path.getmtime(os.path.join(root, 'at', 'results.json')) == before

  path = paper_report.write_report(root, 'smoke', data, time.time() - 12.0)
  report = open(path).read()
  with open(os.path.join(root, 'natural', 'eval', 'robustness.json')) as f:
    natural = json.load(f)
  clean = f'{100 * natural["clean_accuracy"]:.2f}%'
  assert '## Table 1' in report and f'| No attack | {clean} | 94.39% |' in report
  assert '| at |' in report and '| natural |' in report
  assert 'stand-in' in report                       # the data caveat, with an npz source
  assert f'Data: `{os.path.abspath(data)}` (sha256 `' in report  # as the runs recorded it
  for rel in ('figures/energy_landscapes.png', 'figures/at_samples_eq16.png'):
    assert f']({rel})' in report and os.path.exists(os.path.join(root, rel))
  assert 'Fig. 2, adversarial training flattens' in report
  assert '## Compute time' in report and '| at |' in report.split('## Compute time')[1]


def test_cpu_scale_is_sized_per_run():
  at = runs_lib.make_config(runs_lib.RUNS_BY_NAME['at'], 'cpu', '')
  noise = runs_lib.make_config(runs_lib.RUNS_BY_NAME['noise16'], 'cpu', '')
  natural = runs_lib.make_config(runs_lib.RUNS_BY_NAME['natural'], 'cpu', '')
  assert 'autoattack' in at.eval.attacks and at.eval.num_examples == 1000
  assert at.eval.autoattack_num_examples == 0   # AutoAttack on all 1000 points
  assert at.dynamics_every_steps == 50                 # Fig. 3 needs the logged energy changes
  assert noise.num_epochs == 1 and abs(noise.perturbation.sigma - 16 / 255) < 1e-9
  assert 'energyk' in natural.eval.attacks            # Table 1
  assert natural.sample.neighbours == 0 and runs_lib.make_config(   # Fig. 7 is JEAT's only
      runs_lib.RUNS_BY_NAME['jeat'], 'cpu', '').sample.neighbours > 0
  assert at.num_epochs == at_config.get_config('cpu').num_epochs  # else the :cpu config itself


def test_verdicts_follow_the_numbers():
  def run(clean, **acc):
    return {'clean': clean, 'attacks': {k: {'robust_accuracy': v} for k, v in acc.items()},
            'fid': None, 'fid_eq16': None, 'audit': [], 'results': None}
  runs = {'natural': run(0.7, pgd20=0.0, energyk=0.01), 'at': run(0.4, pgd20=0.3),
          'jeat': run(0.4, pgd20=0.2)}
  runs['at']['fid'], runs['natural']['fid'] = {'fid': 80.0}, {'fid': 120.0}
  runs['at']['fid_eq16'] = {'fid': 70.0}
  runs['at']['dynamics'] = {'dx_energy_xy_mean': 0.5, 'dtheta_energy_xy_mean': -0.4,
                            'dx_energy_x_mean': 0.1, 'dtheta_energy_x_mean': 0.6}
  runs['at']['gradient_norms'] = {'objective': 'eq16', 'columns': ['grad_energy_xy', 'grad_energy_x'],
                                  'norms': np.array([[2.0, 0.5]] * 10 + [[1.0, 0.9]] * 10)}
  text = '\n'.join(paper_report.verdicts(runs, {'natural': 1.0, 'at': 0.5}))
  assert 'as strong as PGD on a natural model: holds' in text
  assert 'JEAT is the most robust method: does not hold' in text
  assert 'better images than a natural one: holds' in text
  assert 'beats Eq. 16 on the AT model: does not hold' in text
  assert 'flatter than natural for at' in text
  assert 'the update lowers it again: holds' in text
  assert 'E(x) is left alone (Delta_theta E(x) near zero): does not hold' in text
  assert 'dominates at first and the two gradients come closer later: holds' in text
  runs['at']['gradient_norms']['norms'] = np.array([[0.5, 2.0]] * 20)   # E(x) dominates
  assert 'come closer later: does not hold' in '\n'.join(paper_report.verdicts(runs, {}))


def test_a_failed_run_is_skipped_and_reported(tmp_path):
  run_dir = tmp_path / 'jem'
  run_dir.mkdir()
  with open(run_dir / 'failed.json', 'w') as f:
    json.dump({'stage': 'train', 'error': 'training diverged at step 9'}, f)
  run = runs_lib.RUNS_BY_NAME['jem']
  stages_lib.run_stages(run, runs_lib.make_config(run, 'smoke', str(tmp_path / 'absent.npz')),
                        str(run_dir), runs_lib.STAGES)
  assert sorted(os.listdir(run_dir)) == ['failed.json']      # nothing was trained or evaluated
  report = open(paper_report.write_report(str(tmp_path), 'smoke', '', time.time())).read()
  assert '**jem** failed in its train stage: training diverged at step 9' in report


def test_stage_time_is_recorded_even_when_the_stage_fails(tmp_path):
  def diverges():
    raise RuntimeError('diverged')
  with pytest.raises(RuntimeError, match='^diverged$'):   # the stage's error goes on up
    stages_lib._timed(str(tmp_path), 'train', diverges)  # pylint: disable=protected-access
  stages_lib._timed(str(tmp_path), 'evaluate', lambda: None)  # pylint: disable=protected-access
  with open(tmp_path / 'timings.json') as f:
    assert set(json.load(f)) == {'train', 'evaluate'}


def test_runs_side_by_side_in_subprocesses(tmp_path):
  # jem failed before (its process skips it and exits 0); natural has no data (its process
  # fails, names the file in its log, and does not stop the other).
  (tmp_path / 'jem').mkdir()
  with open(tmp_path / 'jem' / 'failed.json', 'w') as f:
    json.dump({'stage': 'train', 'error': 'diverged'}, f)
  missing = str(tmp_path / 'absent.npz')
  failed = stages_lib.run_in_subprocesses(str(tmp_path), 'smoke', missing, ['natural', 'jem'],
                                          ['train', 'evaluate'], jobs=2)
  assert failed == ['natural']
  assert missing in (tmp_path / 'natural' / 'reproduce.log').read_text()
  assert 'skipped, it failed before' in (tmp_path / 'jem' / 'reproduce.log').read_text()


def test_report_names_the_dataset():
  npz = {'source': 'npz', 'path': '/data/c10.npz', 'sha256': 'ab' * 32}
  tfds = {'source': 'tfds', 'name': 'cifar10', 'version': '3.0.2', 'train_subset': 4096,
          'train_subset_seed': 0}
  assert results.data_line({'at': {'data': npz}, 'jeat': {'data': npz}}) == (
      f'Data: `/data/c10.npz` (sha256 `{"ab" * 32}`).')
  assert results.data_line({'at': {'data': tfds}}) == (
      'Data: TFDS `cifar10` version 3.0.2, training subset of 4096 images (seed 0).')
  mixed = results.data_line({'at': {'data': npz}, 'jeat': {'data': tfds}, 'jem': {}})
  assert '/data/c10.npz' in mixed and '(at)' in mixed and '(jeat)' in mixed
  assert 'not recorded' in results.data_line({'at': {'data': None}})


@pytest.mark.parametrize('scale', ['smoke', 'cpu', 'cpu-fair', 'paper'])
def test_every_run_config_is_valid_at_every_scale(scale):
  runs = runs_lib.FAIR_RUNS if scale == 'cpu-fair' else runs_lib.RUNS
  assert set(runs_lib.validated_configs(list(runs), scale, '')) == {r.name for r in runs}


def test_a_bad_run_config_stops_the_reproduction_before_any_run_naming_run_and_key():
  bad = dataclasses.replace(runs_lib.RUNS_BY_NAME['jeat'], overrides=(('sample.num_steps', 7),))
  with pytest.raises(app.UsageError, match=r'run jeat at --scale=cpu: .*sample\.steps_per_call'):
    runs_lib.validated_configs([runs_lib.RUNS_BY_NAME['at'], bad], 'cpu', '')


def test_validation_for_child_jobs_leaves_jax_backend_alone(monkeypatch):
  """The parent of --jobs > 1 checks with devices=1 and never asks JAX for its devices."""
  def no_backend():
    raise AssertionError('jax.device_count() called: it would start the backend in the parent')
  monkeypatch.setattr(jax, 'device_count', no_backend)
  assert set(runs_lib.validated_configs([runs_lib.RUNS_BY_NAME['jeat']], 'cpu', '', devices=1))
  with pytest.raises(AssertionError, match='device_count'):
    runs_lib.validated_configs([runs_lib.RUNS_BY_NAME['jeat']], 'cpu', '')
  bad = dataclasses.replace(runs_lib.RUNS_BY_NAME['at'], overrides=(('batch_size', 100),))
  with pytest.raises(app.UsageError, match='batch_size=100 must be divisible by the 3 devices'):
    runs_lib.validated_configs([bad], 'cpu', '', devices=3)
