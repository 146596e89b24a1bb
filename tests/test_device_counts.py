"""Every config starts on every device count a user has (issue: the paper's command on the
paper's machines), and a run moves between device counts.

`validate(config, devices=N)` checks a config for N devices without starting JAX's
backend. Only the global train batches (batch_size, data.energy_batch_size) must divide
the device count; evaluation batches, sample batches, the replay buffer and EB-JDAT's pool
may be any size (padded by the code).
"""
import importlib
import pathlib

import jax
import pytest

from jeat_jax import config_validation
from jeat_jax.errors import ConfigError
from tests.conftest import REPO

DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIG_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'default', 'energy_common'))


def scales_of(name: str):
  """The config strings a config file accepts: the paper's (None), then its own scales."""
  module = importlib.import_module(f'configs.{name}')
  scales = [None]
  for scale in ('cpu', 'smoke'):
    try:
      module.get_config(scale)
    except ValueError:
      continue
    scales.append(scale)
  return module, scales


def train_batches(config):
  sizes = {'batch_size': config.batch_size}
  if config.data.energy_batch_size > 0:
    sizes['data.energy_batch_size'] = config.data.energy_batch_size
  return sizes


def test_every_config_file_is_covered():
  assert {'jeat', 'jem', 'ebjdat', 'trades', 'free', 'fast', 'at', 'weat', 'natural', 'noise',
          'prejeat'} <= set(CONFIG_FILES)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_starts_on_every_device_count(name, monkeypatch):
  """Each scale of each config file at 1-256 devices: valid wherever its train batches
  divide the device count; elsewhere one line naming the key, the count and the nearest
  valid values. JAX's backend is never asked (validate gets the count)."""
  def no_backend():
    raise AssertionError('jax.device_count() called: validation would start the backend')
  monkeypatch.setattr(jax, 'device_count', no_backend)
  module, scales = scales_of(name)
  assert None in scales and 'smoke' in scales
  for scale in scales:
    for devices in DEVICE_COUNTS:
      config = module.get_config(scale)
      refused = {k: v for k, v in train_batches(config).items() if v % devices}
      if not refused:
        config_validation.validate(config, devices=devices)
        continue
      with pytest.raises(ConfigError) as error:
        config_validation.validate(config, devices=devices)
      message = str(error.value)
      key, value = next((k, v) for k, v in refused.items() if f'config.{k}=' in message)
      below, above = value // devices * devices, -(-value // devices) * devices
      assert '\n' not in message and f'config.{key}={value}' in message, message
      assert f'{devices} devices' in message and str(above) in message, message
      if below:
        assert f'{below} or {above}' in message, message


def test_the_paper_configs_start_on_the_capacity_plan_machines():
  """docs/capacity.md's machines (8 devices: a TPU v4-8 / v5e-8 or 8x H100), and 32 for the
  buffer recipes (JEAT, JEM: sampler.buffer_size 10000) and EB-JDAT (its pool of 10000),
  which used to stop there: every paper config starts."""
  for name in CONFIG_FILES:
    config = importlib.import_module(f'configs.{name}').get_config()
    for devices in (8, 32):
      config_validation.validate(config, devices=devices)
  jeat = importlib.import_module('configs.jeat').get_config()
  assert (jeat.eval.batch_size, jeat.sampler.buffer_size) == (500, 10000)  # neither divides 32
  config = importlib.import_module('configs.trades').get_config()
  with pytest.raises(ConfigError, match=r'config\.batch_size=128 must be divisible by the 256 '
                                        r'devices .*nearest valid values 256'):
    config_validation.validate(config, devices=256)


# ----------------------------------------------------------------------------- runs on devices

# Runs configs/NAME.py[:SCALE] with {key: value} overrides through main.run, one mode after
# the other, in one process (its devices set by XLA_FLAGS before JAX starts).
RUN_MODES = '''
import importlib, json, sys
from absl import logging
import main
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
from jeat_jax.config_validation import with_overrides
name, scale, workdir, modes, overrides = sys.argv[1:6]
config = importlib.import_module('configs.' + name).get_config(scale or None)
with_overrides(config, json.loads(overrides))
for mode in modes.split(','):
  main.run(config, workdir, mode)
  print('done:', mode, flush=True)
'''


def run_modes(env_dir, num_devices, name, scale, workdir, modes, overrides):
  """main.run of each mode of `modes` on `num_devices` simulated CPU devices; the output."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.test_parallel import worker_env  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, '-c', RUN_MODES, name, scale or '', str(workdir), modes,
       json.dumps(overrides)], cwd=REPO, env=worker_env(env_dir / 'jax_cache', num_devices),
      capture_output=True, text=True, timeout=1800)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-4000:]
  assert output.count('done:') == len(modes.split(',')), output[-4000:]
  return output


@pytest.fixture(scope='module')
def env_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('device_counts')


@pytest.fixture(scope='module')
def synthetic_data(env_dir):
  from tests.conftest import write_synthetic_npz  # pylint: disable=g-import-not-at-top
  return write_synthetic_npz(env_dir / 'data.npz', n_train=256, n_test=64)


# The paper configs as shipped but for the network (WRN-10-1), the data (256 synthetic
# training images) and the step counts (2 train steps, 5 sampling steps): buffers and pools
# of 10000, eval.batch_size 500 and sample.batch_size 250, none of which 8 divides.
PAPER_SHRUNK = {'model.depth': 10, 'model.width': 1, 'num_train_steps': 2,
                'data.validation_size': 32,  # JEAT's 1000 held-out images, of 256
                'eval.num_examples': 64, 'eval.attacks': 'pgd20,autoattack',
                'sample.num_samples': 20, 'sample.num_steps': 5}


@pytest.mark.slow  # four paper configs through four modes on 8 simulated devices: minutes
@pytest.mark.parametrize('name', ['jeat', 'ebjdat', 'trades', 'free'])
def test_paper_config_trains_evaluates_samples_and_exports_on_eight_devices(
    name, env_dir, synthetic_data):
  """JEAT (replay buffer), EB-JDAT (buffer, class-Gaussian pool, energy batch), TRADES (batch
  128) and Free AT (its delta carried in the state) on 8 devices: train, evaluate (PGD-20
  and AutoAttack on 64 points), sample and export, with the paper's sizes."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  workdir = env_dir / f'{name}_paper'
  overrides = dict(PAPER_SHRUNK, **{'data.source': 'npz', 'data.path': synthetic_data})
  run_modes(env_dir, 8, name, None, workdir, 'train,evaluate,sample,export', overrides)
  assert json.loads((workdir / 'results.json').read_text())['step'] == 2
  result = json.loads((workdir / 'eval' / 'robustness.json').read_text())
  assert [a['name'] for a in result['attacks']] == ['pgd20', 'autoattack']
  assert all(a['num_examples'] == 64 for a in result['attacks'])
  with np.load(workdir / 'samples' / 'samples.npz') as samples:
    assert samples['x'].shape == (20, 32, 32, 3)
  export = json.loads((workdir / 'export' / 'export.json').read_text())
  assert export['max_abs_logit_diff'] < 1e-2, export


@pytest.mark.slow  # :smoke runs on 4, 2 and 1 simulated devices: minutes
@pytest.mark.parametrize('name', ['jeat', 'ebjdat'])
def test_smoke_run_moves_from_four_devices_to_two_and_one(name, env_dir, synthetic_data):
  """Trained 2 steps on 4 devices, resumed to 4 on 2, evaluated and sampled on 1 and on 4:
  the replay buffer (and EB-JDAT's pool) of 30 entries is re-padded at each move (32 rows
  on 4 devices, 30 on 2 and 1), and the samples of a seed are those of 4 devices."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  workdir = env_dir / f'{name}_moves'
  overrides = {'data.source': 'npz', 'data.path': synthetic_data, 'sampler.buffer_size': 30,
               'sampler.reinit_pool_size': 30, 'eval.num_examples': 20,
               'eval.attacks': 'pgd20', 'sample.num_samples': 10, 'sample.batch_size': 10}
  run_modes(env_dir, 4, name, 'smoke', workdir, 'train', dict(overrides, num_train_steps=2))
  log = run_modes(env_dir, 2, name, 'smoke', workdir, 'train', dict(overrides, num_train_steps=4))
  assert "holds extra['buffer'] as (32, 32, 32, 3), this run's devices need (30, 32, 32, 3)" in log
  assert json.loads((workdir / 'results.json').read_text())['step'] == 4
  outputs = {}
  for devices in (1, 4):
    run_modes(env_dir, devices, name, 'smoke', workdir, 'evaluate,sample', overrides)
    with np.load(workdir / 'samples' / 'samples.npz') as samples:
      outputs[devices] = (samples['x'],
                          json.loads((workdir / 'eval' / 'robustness.json').read_text()))
  (x1, eval1), (x4, eval4) = outputs[1], outputs[4]
  assert x1.shape == (10, 32, 32, 3)
  # Chains of 10 on 1 device against 10 padded to 12 on 4: the same noise, the same starts;
  # what differs is round-off (a 1-ulp change can round a pixel the other way).
  assert np.abs(x1.astype(int) - x4.astype(int)).max() <= 1, np.abs(x1.astype(int) - x4).max()
  assert eval1['clean_accuracy'] == eval4['clean_accuracy']
