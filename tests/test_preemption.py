"""A preemption is a checkpoint, not a loss: SIGTERM at a random moment after the first
checkpoint saves the step reached, prints one line and exits 0; the same command resumes,
and the run ends bitwise where an uninterrupted run ends. On several processes the notice
reaches one of them and JAX's preemption sync point makes all save the same step."""
import json
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, follow_output, write_synthetic_npz
from tests.test_checkpoint_safety import raw_checkpoint
from tests.test_parallel import free_port, launch, log_tail, wait_all, worker_env

STEPS = 40
PREEMPTED = re.compile(r'preempted at step (\d+): checkpoint saved')


@pytest.fixture(scope='module')
def module_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('preemption')


@pytest.fixture(scope='module')
def data_path(module_dir):
  return write_synthetic_npz(module_dir / 'data.npz', n_train=256, n_test=32)


def main_command(workdir, data_path):
  return [sys.executable, 'main.py', '--config=configs/natural.py:smoke', f'--workdir={workdir}',
          '--config.data.source=npz', f'--config.data.path={data_path}',
          f'--config.num_train_steps={STEPS}', '--config.checkpoint_every_steps=10',
          '--config.eval_every_steps=1000', '--config.log_every_steps=1']


def assert_same_checkpoint(a, b, step):
  left, right = raw_checkpoint(a, step), raw_checkpoint(b, step)
  for part in ('params', 'batch_stats', 'opt_state', 'rng', 'step'):
    for u, v in zip(*(jax_leaves(t[part]) for t in (left, right))):
      np.testing.assert_array_equal(u, v, err_msg=part)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


@pytest.mark.slow  # three main.py runs of 40 steps: a few minutes on 2 cores
def test_sigterm_after_the_first_checkpoint_saves_and_the_resume_is_exact(module_dir, data_path):
  reference = module_dir / 'uninterrupted'
  done = subprocess.run(main_command(reference, data_path), cwd=REPO, capture_output=True,
                        text=True, env=worker_env(module_dir / 'jax_cache', 1), timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]

  workdir = module_dir / 'preempted'
  proc = subprocess.Popen(main_command(workdir, data_path), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=worker_env(module_dir / 'jax_cache', 1))
  lines, first_checkpoint, reader = follow_output(proc, 'saved checkpoint at step 10')
  assert first_checkpoint.wait(600), ''.join(lines[-40:])
  delay = random.Random().uniform(0.0, 1.0)  # a random moment after the first checkpoint
  time.sleep(delay)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(300) == 0, ''.join(lines[-40:])
  reader.join()
  output = ''.join(lines)
  found = PREEMPTED.findall(output)
  assert len(found) == 1, output[-3000:]
  step = int(found[0])
  print(f'SIGTERM {delay:.2f} s after the step-10 checkpoint: preempted at step {step}')
  assert 10 <= step < STEPS
  assert not (workdir / 'results.json').exists()
  assert (workdir / 'checkpoints' / str(step)).is_dir()

  resumed = subprocess.run(main_command(workdir, data_path), cwd=REPO, capture_output=True,
                           text=True, env=worker_env(module_dir / 'jax_cache', 1), timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'restored checkpoint at step {step}' in resumed.stderr, resumed.stderr[-3000:]
  assert_same_checkpoint(reference, workdir, STEPS)


@pytest.mark.slow  # 2 processes (gloo) and a 1-process reference: minutes on 2 cores
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path, module_dir,
                                                                      data_path):
  """JEAT :smoke by 2 processes x 1 device; process 1 alone gets SIGTERM after the first
  checkpoint: both stop at the sync step, save it and exit 0; relaunched, they end where
  one process with 2 devices ends, bitwise."""
  overrides = json.dumps({'num_train_steps': 24, 'checkpoint_every_steps': 4,
                          'log_every_steps': 1, 'eval_every_steps': 1000,
                          'schedule.warmup_steps': 0})
  common = [f'--data={data_path}', f'--overrides={overrides}', '--mode=train']
  cache = module_dir / 'jax_cache'
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  reference = launch(tmp_path, cache, 'single', 2, *common, f'--workdir={single}',
                     f'--out={tmp_path / "single.json"}')
  wait_all([reference], [0])

  def launch_pair(name):
    port = free_port()
    return [launch(tmp_path, cache, f'{name}{i}', 1, *common, f'--workdir={multi}',
                   f'--out={tmp_path / (name + ".json")}', f'--coordinator=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}') for i in range(2)]

  pair = launch_pair('first')
  deadline = time.time() + 600
  while 'saved checkpoint at step 4' not in pair[0].log_path.read_text(errors='replace'):
    assert time.time() < deadline and all(p.poll() is None for p in pair), log_tail(pair[0])
    time.sleep(0.2)
  time.sleep(random.Random().uniform(0.0, 1.0))
  pair[1].send_signal(signal.SIGTERM)
  wait_all(pair, [0, 0])
  steps = [PREEMPTED.findall(p.log_path.read_text(errors='replace')) for p in pair]
  assert steps[0] and steps[0] == steps[1], [log_tail(p) for p in pair]
  step = int(steps[0][0])
  print(f'2 processes, SIGTERM to process 1: both preempted at step {step}')
  assert (multi / 'checkpoints' / str(step)).is_dir()
  second = launch_pair('second')
  wait_all(second, [0, 0])
  assert_same_checkpoint(single, multi, 24)
