"""benchmarks/accelerator_check.py: the budget's plan, a run with no time left, and the whole
check at toy size on the CPU (train step, SIGKILL after the first checkpoint and resume,
evaluation)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import accelerator_check
from jeat_jax import config_validation
from tests.conftest import REPO, write_synthetic_npz

SCRIPT = os.path.join(REPO, 'benchmarks', 'accelerator_check.py')


def run_check(tmp_path, *args, timeout=1800):
  """The script as a user runs it, on the CPU; its JSON."""
  out = tmp_path / 'check.json'
  proc = subprocess.run([sys.executable, SCRIPT, f'--out={out}', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text())


def test_each_part_keeps_the_minimum_of_the_parts_after_it():
  m = accelerator_check.MIN_SECONDS
  later = m['train_resume'] + m['evaluate']
  assert accelerator_check.part_timeout(450, 'train_step') == 450 - later
  assert accelerator_check.part_timeout(100, 'evaluate') == 100
  assert accelerator_check.skip_reason(450, 'train_step') is None
  assert accelerator_check.skip_reason(sum(m.values()) - 1, 'train_step')
  assert accelerator_check.skip_reason(m['evaluate'] - 1, 'evaluate')


def test_no_budget_skips_every_part_with_its_reason(tmp_path):
  r = run_check(tmp_path, '--toy', '--budget_s=1', f'--workdir={tmp_path / "scratch"}',
                timeout=300)
  assert r['machine']['platform'] == 'cpu' and r['machine']['device_count'] >= 1
  assert r['machine']['jax_version'] and r['machine']['cpu']
  assert set(r['parts']) == set(accelerator_check.PARTS)
  for part in r['parts'].values():
    assert part['status'] == 'skipped' and 'budget' in part['reason'], part


@pytest.mark.slow  # about 5 minutes on 2 cores: four processes, each compiling a JEAT step
def test_toy_check_trains_resumes_and_evaluates(tmp_path):
  data = write_synthetic_npz(tmp_path / 'data.npz', n_train=64, n_test=16)
  attacks = 'pgd20,apgd_ce' if 'apgd_ce' in config_validation.ATTACKS else 'pgd20'
  r = run_check(tmp_path, '--toy', f'--data={data}', '--budget_s=1500', f'--attacks={attacks}',
                f'--workdir={tmp_path / "scratch"}')
  assert {k: p['status'] for k, p in r['parts'].items()} == dict.fromkeys(
      accelerator_check.PARTS, 'ok'), r['parts']

  step = r['parts']['train_step']
  assert step['model'].startswith('WRN-10-1') and step['dtype'] == 'bfloat16'
  assert (step['batch_size'], step['sgld_steps']) == (8, 20)
  assert step['images_per_s'] > 0 and step['flops_per_step'] > 0
  assert step['flops_while_loops_left'] == 0 and step['mfu'] is None  # no peak for a CPU
  assert 'memory_stats' in step and step['memory_analysis']['peak_estimate_bytes'] > 0

  train = r['parts']['train_resume']
  assert train['first_run']['returncode'] == -9  # SIGKILL
  assert train['first_run']['killed_after_checkpoint'] == 2
  assert train['checkpoints_after_kill'] == [2]
  assert train['resume']['restored_step'] == 2 and train['resume']['final_step'] == 4
  assert train['resumed_from_checkpoint'] is True
  assert train['results']['data_source'] == f'npz:{data}'

  evaluation = r['parts']['evaluate']
  assert evaluation['step'] == 4 and evaluation['num_examples'] == 16
  assert [a['name'] for a in evaluation['attacks']] == attacks.split(',')
  assert json.loads((tmp_path / 'check.json').read_text()) == r
