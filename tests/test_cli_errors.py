"""Bad input ends main.py with one clear line on stderr naming the key or file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, write_synthetic_npz


def run_main(*args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  proc = subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr


def assert_clear_error(rc, stderr, *needles):
  assert rc != 0
  assert 'Traceback' not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, stderr
  for needle in needles:
    assert needle in errors[0], errors[0]


SMOKE = '--config=configs/natural.py:smoke'


@pytest.mark.parametrize('override,needles', [
    ('--config.no_such_key=1', ('no_such_key',)),
    ('--config.optimizer.lr=fast', ('optimizer.lr',)),
    ('--config.optimizer.lr=-0.1', ('config.optimizer.lr', '> 0')),
    ('--config.perturbation.eps=-0.5', ('config.perturbation.eps',)),
    ('--config.dataset=mnist', ('config.dataset', 'cifar10')),
    ('--config.recipe=alchemy', ('config.recipe', 'jeat')),
])
def test_bad_config_values(tmp_path, override, needles):
  rc, stderr = run_main(SMOKE, f'--workdir={tmp_path}', override)
  assert_clear_error(rc, stderr, *needles)


def test_unknown_recipe_file_and_scale(tmp_path):
  assert_clear_error(*run_main('--config=configs/alchemy.py', f'--workdir={tmp_path}'), 'alchemy.py')
  assert_clear_error(*run_main('--config=configs/natural.py:gpu', f'--workdir={tmp_path}'), 'gpu')


def test_batch_not_divisible_by_devices(tmp_path):
  rc, stderr = run_main(SMOKE, f'--workdir={tmp_path}', '--config.batch_size=16',
                        env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=3'})
  assert_clear_error(rc, stderr, 'config.batch_size', '3 devices')


@pytest.mark.parametrize('overrides,needle', [
    (None, 'not found'),
    (dict(y_test=None), 'missing keys'),
    (dict(x_train=np.zeros((8, 32, 32), np.uint8)), 'x_train'),
    (dict(y_train=np.full((64,), 42)), 'y_train'),
])
def test_bad_data_files(tmp_path, overrides, needle):
  path = tmp_path / 'data.npz'
  if overrides is not None:
    write_synthetic_npz(path, **overrides)
  rc, stderr = run_main(SMOKE, f'--workdir={tmp_path / "w"}', '--config.data.source=npz',
                        f'--config.data.path={path}')
  assert_clear_error(rc, stderr, str(path), needle)


def test_workdir_of_another_recipe(tmp_path, synthetic_npz):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'run_info.json').write_text(json.dumps(
      {'recipe': 'jeat', 'dataset': 'cifar10', 'model': {'depth': 28, 'width': 10, 'norm': 'none'}}))
  rc, stderr = run_main(SMOKE, f'--workdir={workdir}', '--config.data.source=npz',
                        f'--config.data.path={synthetic_npz}')
  assert_clear_error(rc, stderr, str(workdir), "'jeat'")
