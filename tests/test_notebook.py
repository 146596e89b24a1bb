"""notebooks/jeat_colab.ipynb runs top to bottom (nbclient) at smoke scale."""
import json
import os

import pytest

from tests.conftest import REPO, STANDIN, write_synthetic_npz

NOTEBOOK = REPO / 'notebooks' / 'jeat_colab.ipynb'


def test_colab_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  data = str(STANDIN) if STANDIN.exists() else write_synthetic_npz(tmp_path / 'data.npz',
                                                                   n_train=256, n_test=64)
  workdir = tmp_path / 'run'
  # The kernel inherits this environment: no install, smoke scale, this data, this workdir.
  monkeypatch.setenv('JEAT_NOTEBOOK_CI', '1')
  monkeypatch.setenv('JEAT_NOTEBOOK_SCALE', 'smoke')
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
