"""benchmarks/robustness_audit.py: the verdicts of its report on made-up evaluation results, and
the whole audit (evaluate, export, torchattacks on the export, report) on a :smoke model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import robustness_audit as audit
from tests.conftest import REPO, write_synthetic_npz

N, M = 100, 20


def made_up_result(aa_points, plus_points, square_breaks=0, sweep_top=0.0):
  """An evaluate result: AA robust on aa_points (of N), AA+ on plus_points (of the first M)."""
  aa, plus = np.zeros(N, bool), np.zeros(M, bool)
  aa[aa_points], plus[plus_points] = True, True
  fab = (aa.sum() + square_breaks) / N
  stage = lambda name, acc: dict(name=name, robust_accuracy=acc)
  return dict(
      num_examples=N, clean_accuracy=0.5, model='WRN-10-1',
      attacks=[dict(name='pgd20', robust_accuracy=0.3, seconds=6.0),
               dict(name='autoattack', robust_accuracy=aa.mean(), seconds=60.0,
                    stages=[stage('clean', 0.5), stage('apgd-ce', 0.3), stage('apgd-t', fab),
                            stage('fab-t', fab), stage('square', aa.mean())]),
               dict(name='autoattack_plus', num_examples=M, robust_accuracy=plus.mean(),
                    seconds=30.0, stages=[stage('clean', 0.5), stage('apgd-ce', plus.mean())])],
      audit=dict(eps_sweep_pgd20={'8': 0.3, '128': sweep_top}, warnings=[]),
      points=dict(autoattack=aa, autoattack_plus=plus))


def test_plus_against_standard_counts_the_points_each_breaks_on_the_first_m():
  res = made_up_result(aa_points=[0, 1, 2, 3, 50, 60], plus_points=[0, 1, 5])
  # On the first 20: AA robust {0,1,2,3}, AA+ robust {0,1,5}; points 50, 60 lie beyond m.
  assert audit.plus_against_standard(res) == dict(m=M, aa=0.2, plus=0.15, plus_only=2, aa_only=1)


def test_signals_names_each_sign_of_masking():
  clean = made_up_result(aa_points=[0, 1, 2], plus_points=[0, 1, 2])
  assert audit.signals({'jeat': clean})[0].endswith('No sign of masking.')
  assert 'PGD-20 (CE) leaves 27.0 points more than AutoAttack' in audit.signals({'jeat': clean})[0]
  plus_stronger = made_up_result(aa_points=[0, 1, 2, 3, 4], plus_points=[0, 1])
  square_breaks = made_up_result(aa_points=[0, 1, 2], plus_points=[0, 1, 2], square_breaks=3)
  flat_sweep = made_up_result(aa_points=[0, 1, 2], plus_points=[0, 1, 2], sweep_top=0.2)
  for res in (plus_stronger, square_breaks, flat_sweep):
    assert audit.signals({'jeat': res})[0].endswith('A sign of masking: see the audit warnings.')
  assert 'Square breaks 3 of the 100 points' in audit.signals({'jeat': square_breaks})[0]


def test_report_tables_each_model(tmp_path):
  runs = {'jeat': str(tmp_path)}
  (tmp_path / 'config.json').write_text('{"num_train_steps": 1171, "num_epochs": 1, '
                                        '"batch_size": 64}')
  res = made_up_result(aa_points=[0, 1, 2, 3, 50], plus_points=[0, 1])
  text = audit.report(runs, {'jeat': res}, {}, 'cmd', 1.0)
  assert '| JEAT (`WRN-10-1`) | 50.0% | 30.0% | 5.0% [' in text
  assert '| 20.0% (m = 20) | 10.0% [' in text and '| +10.0 points | none |' in text
  assert 'JEAT 1171 steps of batch 64' in text
  assert 'Here PGD-20 sits 25.0 (JEAT) points above AutoAttack' in text


@pytest.mark.slow
def test_audit_end_to_end_on_a_smoke_model(tmp_path):
  """Train a :smoke JEAT model, audit it on 16 points (AA+ on 8, torchattacks on 8), rerun."""
  pytest.importorskip('torch')
  pytest.importorskip('torchattacks')
  data = write_synthetic_npz(tmp_path / 'synthetic.npz')
  workdir = tmp_path / 'jeat'
  subprocess.run([sys.executable, str(REPO / 'main.py'), '--config=configs/jeat.py:smoke',
                  f'--workdir={workdir}', '--mode=train', '--config.data.source=npz',
                  f'--config.data.path={data}'], check=True, cwd=REPO, capture_output=True)
  out = tmp_path / 'audit.md'
  command = [sys.executable, str(REPO / 'benchmarks' / 'robustness_audit.py'), f'--runs=jeat={workdir}',
             f'--data_path={data}', '--scale=smoke', '--points=16', '--plus-points=8',
             '--torch-points=8', '--export=jeat', f'--out={out}']
  subprocess.run(command, check=True, cwd=REPO, capture_output=True)
  result = json.loads((workdir / 'eval' / 'robustness.json').read_text())
  sizes = {r['name']: r['num_examples'] for r in result['attacks']}
  assert list(sizes) == ['pgd20', 'autoattack', 'autoattack_plus']   # full strength: no '(0.1x)'
  assert result['num_examples'] == 16 and sizes['autoattack_plus'] == 8
  assert [s['name'] for s in result['attacks'][1]['stages']] == [
      'clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  assert (workdir / 'export' / 'model.pt').exists()
  torch_run = json.loads((workdir / 'export_autoattack.json').read_text())
  assert torch_run['num_examples'] == 8 and torch_run['max_linf'] <= 8 / 255 + 1e-6
  text = out.read_text()
  assert '| JEAT (`WRN-10-1' in text and 'AutoAttack (16 points)' in text
  assert '| JEAT | 8 |' in text and 'of 8 points' in text
  # A second run finds every stage on disk: nothing is evaluated or exported again.
  logs = {name: os.path.getmtime(workdir / name) for name in
          ('audit_evaluate.log', 'audit_export.log', 'export_autoattack.json')}
  subprocess.run(command, check=True, cwd=REPO, capture_output=True)
  assert logs == {name: os.path.getmtime(workdir / name) for name in logs}
