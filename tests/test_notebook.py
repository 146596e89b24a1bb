"""notebooks/jeat_colab.ipynb runs top to bottom (nbclient) at smoke scale."""
import json
import os
import tomllib

import pytest

from configs import jeat
from tests.conftest import REPO, STANDIN, write_synthetic_npz

NOTEBOOK = REPO / 'notebooks' / 'jeat_colab.ipynb'


@pytest.mark.slow  # executes the whole notebook
def test_colab_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  data = str(STANDIN) if STANDIN.exists() else write_synthetic_npz(tmp_path / 'data.npz',
                                                                   n_train=256, n_test=64)
  workdir = tmp_path / 'run'
  # The kernel inherits this environment: no install, SCALE auto (:smoke on CPU), this data,
  # this workdir.
  monkeypatch.setenv('JEAT_NOTEBOOK_CI', '1')
  monkeypatch.delenv('JEAT_NOTEBOOK_SCALE', raising=False)  # SCALE 'auto': :smoke on CPU
  monkeypatch.setenv('JEAT_NOTEBOOK_DATA', data)
  monkeypatch.setenv('JEAT_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel's inline backend draws PNGs
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')

  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  assert not any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), (
      'commit the notebook without outputs')
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

  results = json.loads((workdir / 'results.json').read_text())
  assert results['config'] == 'jeat' and results['step'] == 4
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 2, 'the replay buffer and the class grid of SGLD samples'
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'PGD-10 (eps 8/255) robust accuracy' in text
  assert 'tensorboard --logdir' in text
  assert 'not installing' in text
  assert "JAX backend 'cpu': 1 x cpu" in text and 'scale smoke on cpu x 1' in text


class FakeDevice:

  def __init__(self, device_kind):
    self.device_kind = device_kind


def runtime_helpers():
  """The notebook's runtime-helpers cell, run on its own: its functions, by name."""
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  cells = [c for c in nb.cells if 'runtime-helpers' in c.metadata.get('tags', [])]
  assert len(cells) == 1, 'one code cell tagged runtime-helpers'
  namespace = {}
  code = compile(cells[0].source, 'notebook cell runtime-helpers', 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def test_tpu_runtime_takes_the_tpu_path(monkeypatch):
  """A TPU runtime, faked: `.[tpu]` is installed, the TPU is announced, the WRN-28-10 run chosen.

  No TPU is reachable here, so this calls the notebook's decisions with fake inputs (the
  environment and /dev of a Colab TPU VM, a backend that says 'tpu', eight TPU devices); what
  JAX does on a real TPU is not tested.
  """
  h = runtime_helpers()
  no_files, no_programs = (lambda pattern: []), (lambda program: None)
  detect = h['detect_accelerator']
  assert detect({'TPU_ACCELERATOR_TYPE': 'v2-8'}, no_files, no_programs) == 'tpu'
  assert detect({'COLAB_TPU_ADDR': '10.0.0.2:8470'}, no_files, no_programs) == 'tpu'
  assert detect({}, lambda p: ['/dev/accel0'] if 'accel' in p else [], no_programs) == 'tpu'
  assert detect({}, no_files, lambda p: '/usr/bin/nvidia-smi') == 'gpu'
  assert detect({}, no_files, no_programs) == 'cpu'

  # The install goes through pyproject.toml's extras, which pin the accelerator's JAX build to
  # the jax version of requirements.txt.
  assert h['install_command']('tpu', python='python') == [
      'python', '-m', 'pip', 'install', '-q', '-e', '.[tpu]']
  assert h['install_command']('gpu', 'python')[-1] == '.[cuda12]'
  assert h['install_command']('cpu', 'python')[-1] == '.'
  with open(REPO / 'pyproject.toml', 'rb') as f:
    extras = tomllib.load(f)['project']['optional-dependencies']
  with open(REPO / 'requirements.txt') as f:
    jax_pin = next(line.strip() for line in f if line.startswith('jax=='))
  version = jax_pin[len('jax'):]  # '==0.10.2'
  assert extras['tpu'] == [f'jax[tpu]{version}'] and extras['cuda12'] == [f'jax[cuda12]{version}']

  line = h['describe_backend']('tpu', [FakeDevice('TPU v2')] * 8, 'tpu')
  assert line.startswith("Using this runtime's TPU. JAX backend 'tpu': 8 x TPU v2"), line
  unused = h['describe_backend']('cpu', [FakeDevice('cpu')], 'tpu')
  assert 'WARNING' in unused and "pip install -e '.[tpu]'" in unused

  choose = h['choose_scale']
  assert choose('tpu') == choose('gpu') == 'accelerator' and choose('cpu') == 'smoke'
  assert choose('tpu', 'smoke') == 'smoke' and choose('cpu', 'paper') == 'paper'
  with pytest.raises(ValueError, match='SCALE'):
    choose('tpu', 'huge')

  config = h['make_config']('accelerator')
  assert (config.model.depth, config.model.width, config.model.dtype) == (28, 10, 'bfloat16')
  assert config.num_train_steps == 500 and config.sampler.num_steps == 20
  # The CLI's config, whatever the device count: no rounding of its own (the CLI takes any
  # eval.batch_size on any number of devices).
  cli = jeat.get_config()
  assert config.eval.batch_size == cli.eval.batch_size and config.batch_size == cli.batch_size
  for scale in ('smoke', 'cpu', 'paper'):
    assert h['make_config'](scale).to_dict() == jeat.get_config(
        None if scale == 'paper' else scale).to_dict(), scale
  assert h['make_config']('smoke').num_train_steps == 4
