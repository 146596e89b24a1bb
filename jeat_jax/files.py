"""The files of jeat-jax: atomic writes, JSON, figures and the one cache directory.

Everything a run computes (checkpoints, results, samples, the class Gaussians its
sampler starts from, the FID statistics of its reference images) lives in its
workdir. Downloaded and converted weights (the FID Inception network) live in one
cache directory: `cache_dir()`.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

CACHE_ENV = 'JEAT_JAX_CACHE'


def cache_dir() -> Path:
  """`$JEAT_JAX_CACHE` if set, else `~/.cache/jeat_jax`: downloaded and converted weights."""
  return Path(os.environ.get(CACHE_ENV, '~/.cache/jeat_jax')).expanduser()


def atomic_write(path, write_fn: Callable[[str], Any]) -> str:
  """`write_fn(tmp)` writes a temporary file beside `path`, which is then renamed to `path`:
  a reader (another process, the next run after a kill) sees the old or the new file, never
  half of one. The temporary name is unique per process and ends like `path` (so np.savez
  and savefig keep their format). Returns `path`."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}'
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_json_atomic(path, obj) -> str:
  """`obj` as indented, key-sorted JSON, written atomically (`atomic_write`)."""
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
  return atomic_write(path, write)


def write_text_atomic(path, text: str) -> str:
  """`text` written atomically (`atomic_write`)."""
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  return atomic_write(path, write)


def read_json(path) -> Optional[Any]:
  """The JSON value in `path`, or None where there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def pyplot():
  """matplotlib.pyplot drawing to files only (the Agg backend: no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path, dpi: int = 100) -> str:
  """Lays out `fig`, writes it to `path` atomically and closes it; returns `path`."""
  fig.tight_layout()
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
  pyplot().close(fig)
  return os.fspath(path)
