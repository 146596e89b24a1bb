"""Data parallelism: 8 devices against 1, and 2 processes (killed, relaunched) against 1.

Both run in subprocesses (tests/multihost_worker.py): the pytest process has
already initialised JAX with its single CPU device, and
XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before JAX is
imported. Tolerances and why they are what they are: docs/parallelism.md.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO, write_synthetic_npz

WORKER = REPO / 'tests' / 'multihost_worker.py'
KILLED_EXIT_CODE = 17  # multihost_worker.KILLED_EXIT_CODE
# Warmup off and a larger learning rate, so that a smoke step moves the parameters
# (the energy recipes' 1000-step warmup gives a learning rate of 0 at step 0).
OVERRIDES = {'schedule.warmup_steps': 0, 'optimizer.lr': 1e-3}
# A hung collective (one process waiting for another) ends the worker after this long,
# printing every thread's stack.
WORKER_TIMEOUT_S = int(os.environ.get('JEAT_TEST_WORKER_TIMEOUT', '300'))


@pytest.fixture
def data_path(tmp_path):
  return write_synthetic_npz(tmp_path / 'data.npz', n_train=256, n_test=32)


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by every worker of this module."""
  return tmp_path_factory.mktemp('jax_cache')


def worker_env(cache_dir, num_devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env.update(XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}']),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
             # Shared by every worker: a relaunch reuses the executables of the first launch.
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


def launch(tmp_path, cache_dir, name: str, num_devices: int, *args: str) -> subprocess.Popen:
  log = open(tmp_path / f'{name}.log', 'w')  # pylint: disable=consider-using-with
  cmd = [sys.executable, str(WORKER), f'--timeout={WORKER_TIMEOUT_S}', *args]
  proc = subprocess.Popen(cmd, cwd=str(REPO), env=worker_env(cache_dir, num_devices), stdout=log,
                          stderr=subprocess.STDOUT)
  proc.name, proc.log_path = name, tmp_path / f'{name}.log'
  return proc


def log_tail(proc, lines: int = 40) -> str:
  text = proc.log_path.read_text(errors='replace').splitlines()
  keep = [l for l in text if 'oneDNN' not in l and 'absl::InitializeLog' not in l]
  return f'--- {proc.name} (exit {proc.returncode}) ---\n' + '\n'.join(keep[-lines:])


def wait_all(procs, expected_codes, timeout=WORKER_TIMEOUT_S + 30):
  """Waits for every process; one that exits unexpectedly ends the others (they would
  wait for it in a collective) and fails the test with the logs."""
  deadline = time.time() + timeout
  while any(p.poll() is None for p in procs) and time.time() < deadline:
    if any(p.returncode is not None and p.returncode != code
           for p, code in zip(procs, expected_codes)):
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  bad = [p for p, code in zip(procs, expected_codes) if p.returncode != code]
  assert not bad, (f'expected exit codes {expected_codes}, got {[p.returncode for p in procs]}\n'
                   + '\n'.join(log_tail(p) for p in procs))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ----------------------------------------------------------------------------- 8 devices vs 1

@pytest.mark.slow  # subprocesses on simulated devices: minutes on 2 cores
def test_eight_devices_match_one_device(tmp_path, data_path, jax_cache):
  """One train step on a mesh of 8 CPU devices and on a mesh of 1, same global batch of 16.

  JEAT: the replay buffer is one global array of 64 entries, sharded over the 8
  devices (8 rows each) against held by one; the same seed draws the same slots on
  both, so the SGLD negatives, the loss, the update and the buffer written back must
  agree. AT (PGD on CE, BatchNorm): the BatchNorm statistics of a sharded batch are
  those of the whole global batch, not per device.
  """
  out = tmp_path / 'eq.npz'
  proc = launch(tmp_path, jax_cache, 'equivalence', 8, '--mode=equivalence', '--recipe=jeat,at',
                f'--data={data_path}', f'--out={out}', f'--overrides={json.dumps(OVERRIDES)}')
  wait_all([proc], [0])
  d = np.load(out)
  assert int(d['num_devices']) == 8

  for recipe in ('jeat', 'at'):
    one, all8 = f'{recipe}/one/', f'{recipe}/all/'
    metrics = [k[len(one):] for k in d.files if k.startswith(one + 'metric/')]
    assert 'metric/loss' in metrics
    for k in metrics:
      # grad_norm: a norm of the all-reduced gradient (measured rel. diff 6e-6); the rest
      # are means over the batch (measured <= 1 ulp).
      rtol = 1e-4 if k.endswith('grad_norm') else 1e-5
      np.testing.assert_allclose(d[all8 + k], d[one + k], rtol=rtol, atol=1e-6,
                                 err_msg=f'{recipe} {k}')
    params = [k[len(one):] for k in d.files if k.startswith(one + 'params')]
    assert params
    for k in params:
      # Adam's first update is lr * g / (|g| + 1e-8): near-zero gradient entries
      # amplify the summation-order differences of the all-reduce. Measured max
      # |diff| 1.7e-6 with lr 1e-3; allowed 1% of one step (1e-5).
      np.testing.assert_allclose(d[all8 + k], d[one + k], rtol=0, atol=1e-5,
                                 err_msg=f'{recipe} {k}')
    for k in [k[len(one):] for k in d.files if k.startswith(one + 'batch_stats')]:
      np.testing.assert_allclose(d[all8 + k], d[one + k], rtol=0, atol=1e-6,
                                 err_msg=f'{recipe} {k}')
  assert any(k.startswith('at/one/batch_stats') for k in d.files)

  # The buffer is really sharded: spec P('data'), 8 devices, one (8, 32, 32, 3) block each.
  assert d['jeat/all/buffer_spec'] == "P('data',)" and int(d['jeat/all/buffer_mesh_size']) == 8
  shards = d['jeat/all/buffer_shards']  # rows: device id, first row, block shape
  assert sorted(shards[:, 0]) == list(range(8)) and sorted(shards[:, 1]) == list(range(0, 64, 8))
  assert all(tuple(row[2:]) == (8, 32, 32, 3) for row in shards)
  assert tuple(d['jeat/one/buffer_shards'][0, 2:]) == (64, 32, 32, 3)
  # The same chains written back to the same slots (16 chains, 64 slots); the chains carry
  # the round-off of the sharded forward passes.
  diff = np.abs(d['jeat/all/buffer'] - d['jeat/one/buffer']).max()
  print(f'8 vs 1 device: buffer max |diff| {diff:.2e}')
  np.testing.assert_allclose(d['jeat/all/buffer'], d['jeat/one/buffer'], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 2 processes

def restore_on_one_device(workdir):
  """The latest checkpoint of `workdir` (any device layout) as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, 'checkpoints')
  step = max(int(s) for s in os.listdir(root) if s.isdigit())
  path = os.path.join(root, str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return step, jax.tree.map(np.asarray, checkpointer.restore(path, target))


@pytest.mark.slow  # subprocesses on simulated devices: minutes on 2 cores
def test_two_processes_killed_resumed_match_one_process(tmp_path, data_path, jax_cache):
  """JEAT smoke run (4 steps, global batch 16) by 2 processes with 1 CPU device each,
  joined by jax.distributed (gloo collectives): both exit hard right after the
  step-2 checkpoint, are relaunched, resume and finish. Compared with one process
  with 2 CPU devices (the same 2-shard mesh and replay buffer): the parameters,
  optimizer state, replay buffer and rng must be bitwise equal. Exact, because an
  all-reduce over 2 devices adds 2 numbers, and a + b == b + a in IEEE arithmetic.
  With BatchNorm (JEAT's smoke WRN has none): its running statistics, which train-mode
  BatchNorm never reads, must be restored and equal too.
  """
  overrides = {**OVERRIDES, 'model.norm': 'batch'}
  common = [f'--data={data_path}', f'--overrides={json.dumps(overrides)}', '--mode=train']
  multi, single = tmp_path / 'multi', tmp_path / 'single'

  def launch_pair(name, *extra):
    port = free_port()
    return [launch(tmp_path, jax_cache, f'{name}{i}', 1, *common, f'--workdir={multi}',
                   f'--out={tmp_path / (name + ".json")}', f'--coordinator=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}', *extra) for i in range(2)]

  # One after the other: on 2 cores running them side by side gains nothing. The
  # relaunch loads the first launch's executables from the compilation cache.
  reference = launch(tmp_path, jax_cache, 'single', 2, *common, f'--workdir={single}',
                     f'--out={tmp_path / "single.json"}')
  wait_all([reference], [0])
  first = launch_pair('first', '--exit_after_checkpoint=2')
  wait_all(first, [KILLED_EXIT_CODE, KILLED_EXIT_CODE])
  assert sorted(os.listdir(multi / 'checkpoints')) == ['2'], 'the crash must leave only step 2'
  assert not (multi / 'results.json').exists()
  # Both processes wrote their part of the step-2 checkpoint (ocdbt.process_1, ...).
  written = [name for _, dirs, files in os.walk(multi / 'checkpoints' / '2')
             for name in dirs + files]
  assert any('process_1' in name for name in written), written

  second = launch_pair('second')
  wait_all(second, [0, 0])
  run = json.loads((tmp_path / 'second.json').read_text())
  assert run['process_count'] == 2 and run['device_count'] == 2
  assert run['results']['step'] == 4
  on_disk = json.loads((multi / 'results.json').read_text())  # written by process 0 only
  reference_results = json.loads((single / 'results.json').read_text())
  for key in ('step', 'test_accuracy', 'robust_accuracy_pgd10'):
    assert on_disk[key] == reference_results[key], key
  assert len([f for f in os.listdir(multi) if f.startswith('events.out.tfevents')]) == 2, (
      'one TensorBoard file per launch, from process 0 only')

  step_multi, multi_state = restore_on_one_device(str(multi))
  step_single, single_state = restore_on_one_device(str(single))
  assert step_multi == step_single == 4
  assert multi_state['extra']['buffer'].shape == (64, 32, 32, 3)
  assert set(multi_state) == set(single_state) == {
      'step', 'params', 'batch_stats', 'opt_state', 'rng', 'extra', 'divergence'}
  for part in multi_state:
    leaves_m, leaves_s = jax.tree.leaves(multi_state[part]), jax.tree.leaves(single_state[part])
    assert len(leaves_m) == len(leaves_s) > 0, part
    for a, b in zip(leaves_m, leaves_s):
      np.testing.assert_array_equal(a, b, err_msg=part)
  # Not vacuous: the parameters moved between the step-2 and the step-4 checkpoint.
  shutil.rmtree(multi / 'checkpoints' / '4')
  _, at_step2 = restore_on_one_device(str(multi))
  assert any(np.abs(a - b).max() > 1e-5 for a, b in zip(jax.tree.leaves(at_step2['params']),
                                                         jax.tree.leaves(multi_state['params'])))


# ----------------------------------------------------------------------------- benchmarks/gpu.py

def load_gpu_benchmark():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('gpu_benchmark', REPO / 'benchmarks' / 'gpu.py')
  gpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpu)
  return gpu


def test_gpu_benchmark_counts_every_loop_iteration():
  """XLA's cost analysis counts a while-loop body once; the benchmark unrolls loops first."""
  gpu = load_gpu_benchmark()
  x = jax.numpy.ones((64, 64))

  def make_f():  # a new function each time: jit reuses the trace of a function it has seen
    return lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jax.numpy.tanh(y @ y), x)

  looped = gpu.flops_of(jax.jit(make_f()).lower(x))
  with gpu.unrolled_loops():
    unrolled = gpu.flops_of(jax.jit(make_f()).lower(x))
  assert looped < 2 * 2 * 64 ** 3 and unrolled >= 20 * 2 * 64 ** 3, (looped, unrolled)
  assert gpu.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16', 0)[0] == 989.0
  assert gpu.peak_tflops('NVIDIA A100-SXM4-40GB', 'float32', 0)[0] == 156.0
  assert gpu.peak_tflops('TPU v5 lite', 'float32', 0)[0] == 197.0
  assert gpu.peak_tflops('cpu', 'float32', 0)[0] is None
  assert gpu.peak_tflops('cpu', 'float32', 0.5)[0] == 0.5


@pytest.mark.slow  # subprocesses on simulated devices: minutes on 2 cores
def test_gpu_benchmark_runs_on_cpu(capsys):
  """benchmarks/gpu.py end to end on a tiny model: JEAT in bfloat16 (K = 2) and AutoAttack
  (quick settings); the table, MFU against --peak_tflops, and the projection."""
  gpu = load_gpu_benchmark()
  gpu.main(['--model=10-1', '--batch=8', '--steps=1', '--sgld_steps=2', '--dtypes=bfloat16',
            '--workloads=jeat,autoattack', '--autoattack=quick', '--peak_tflops=1'])
  out = capsys.readouterr().out
  rows = [line.split('|') for line in out.splitlines() if line.startswith('| jeat')]
  assert len(rows) == 1, out
  # One forward pass of WRN-10-1 is ~26 MFLOP per image; a JEAT step with K = 2 makes
  # 5 forward-backward passes (~3 forwards each) on 8 images: ~3 GFLOP.
  assert 1.5 < float(rows[0][7]) < 6.0, out
  assert rows[0][9].strip().endswith('%')
  if 'AutoAttack: skipped' not in out:
    assert '| apgd-ce |' in out and '| square |' in out, out
  assert 'Projected paper JEAT run' in out and 'bfloat16:' in out, out
