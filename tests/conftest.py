"""Shared test fixtures: data files, a tiny synthetic dataset, the smoke config."""
import os
import pathlib
import sys
import threading

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
STANDIN = SHARED_DATA / 'cifar10-jpeg-standin.npz'
sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def standin_path():
  if not STANDIN.exists():
    pytest.skip(f'CIFAR-10 stand-in not found at {STANDIN} (see ../shared/data/README.md)')
  return str(STANDIN)


def write_synthetic_npz(path, n_train=64, n_test=32, num_classes=10, seed=0, **overrides):
  rng = np.random.default_rng(seed)
  arrays = dict(
      x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
      y_train=rng.integers(0, num_classes, n_train).astype(np.int64),
      x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
      y_test=rng.integers(0, num_classes, n_test).astype(np.int64))
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture
def synthetic_npz(tmp_path):
  return write_synthetic_npz(tmp_path / 'synthetic.npz')


def smoke_config(recipe='natural', data_path=None, **overrides):
  """The recipe's :smoke config on `data_path` (an npz), with dotted-key overrides."""
  import importlib
  from jeat_jax.config_validation import with_overrides
  module = importlib.import_module(f'configs.{recipe}')
  config = module.get_config('smoke')
  config.data.source = 'npz'
  config.data.path = data_path or str(STANDIN)
  return with_overrides(config, overrides)


def follow_output(proc, needle: str):
  """Reads the text stdout of `proc` in a thread: returns (its lines so far, an Event set at the
  first line that contains `needle`, the thread; join it once the process has ended)."""
  lines, seen = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if needle in line:
        seen.set()
  reader = threading.Thread(target=read)
  reader.start()
  return lines, seen, reader
