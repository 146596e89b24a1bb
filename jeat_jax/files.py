"""The files of jeat-jax: one path layer for the workdir, atomic writes, JSON, figures and
the one cache directory.

Everything a run computes (checkpoints, results, samples, the class Gaussians its
sampler starts from, the FID statistics of its reference images, figures, exports,
TensorBoard events) lives in its workdir, a local directory or an object-store URI
(`gs://bucket/run`). Every file under the workdir goes through the functions here,
which take either: local paths through `os`, URIs through `etils.epath` on fsspec
(gcsfs for gs://), the client orbax uses for its checkpoint metadata. Orbax writes the
checkpoint arrays through tensorstore. Downloaded and converted weights (the FID
Inception network) live in one local cache directory: `cache_dir()`.

Clients and their settings (`configure_storage_clients`, run at import):
- epath picks TensorFlow's GCS client for gs:// where TensorFlow is installed; here it
  uses fsspec (`EPATH_USE_TF=false`, unless the environment sets it), so that orbax's
  metadata and our files share one client, and one that honours an emulator.
- fsspec's listing cache is off for gs:// (tensorstore writes objects that gcsfs would
  not see in a cached listing).
- `STORAGE_EMULATOR_HOST` (a local GCS API server, e.g. fake-gcs-server) is honoured by
  gcsfs and google-cloud-storage; tensorstore is pointed at it too
  (`TENSORSTORE_GCS_HTTP_URL`, with the test token `GOOGLE_AUTH_TOKEN_FOR_TESTING`), and
  gcsfs's bucket-type probe (Storage Control API, which emulators lack) is switched off.
"""
import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import numpy as np

CACHE_ENV = 'JEAT_JAX_CACHE'


def configure_storage_clients(environ=os.environ) -> None:
  """Sets the clients of object stores as described in the module docstring; settings
  already in the environment win."""
  environ.setdefault('EPATH_USE_TF', 'false')
  emulator = environ.get('STORAGE_EMULATOR_HOST', '')
  if emulator:
    environ.setdefault('TENSORSTORE_GCS_HTTP_URL',
                       emulator if '://' in emulator else f'http://{emulator}')
    environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')  # emulators check none
    environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


configure_storage_clients()


def cache_dir() -> Path:
  """`$JEAT_JAX_CACHE` if set, else `~/.cache/jeat_jax`: downloaded and converted weights."""
  return Path(os.environ.get(CACHE_ENV, '~/.cache/jeat_jax')).expanduser()


# ----------------------------------------------------------------------------- the path layer

def is_remote(path) -> bool:
  """Whether `path` is an object-store URI (gs://, s3://, ...) rather than a local path."""
  return '://' in os.fspath(path)


def epath(path):
  """`path` as an `etils.epath.Path` (local, or gs:// through fsspec)."""
  from etils import epath as epath_lib  # pylint: disable=g-import-not-at-top
  return epath_lib.Path(os.fspath(path))


def absolute(path) -> str:
  """A local path made absolute; a URI as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
  return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path) -> bool:
  return epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path) -> bool:
  return epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path) -> None:
  """A local directory and its parents; nothing for a URI (an object store has no directories:
  writing an object creates its prefix)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def glob(directory, pattern: str) -> List[str]:
  """The paths in `directory` whose names match `pattern`, sorted."""
  directory = os.fspath(directory)
  if is_remote(directory):
    return sorted(os.path.join(directory, p.name) for p in epath(directory).glob(pattern))
  import glob as glob_lib  # pylint: disable=g-import-not-at-top
  return sorted(glob_lib.glob(os.path.join(directory, pattern)))


def read_bytes(path) -> bytes:
  if is_remote(path):
    return epath(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def open_npz(path):
  """np.load of the .npz file at `path` (use it in a `with`): arrays are read when indexed;
  an object's bytes are fetched whole first."""
  return np.load(io.BytesIO(read_bytes(path)) if is_remote(path) else os.fspath(path))


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local file with the content of `path` (`path` itself where it is local), for readers
  that take only local files (TensorFlow's event reader)."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix='jeat_jax_') as tmp:
    local = os.path.join(tmp, os.path.basename(os.fspath(path)))
    with open(local, 'wb') as f:
      f.write(read_bytes(path))
    yield local


def upload(local_file, path) -> None:
  """Copies the local file to `path` as one object write: readers see the old object or the
  new one. (A local `path` is written with `atomic_write`.)"""
  if is_remote(path):
    with open(local_file, 'rb') as f:
      epath(path).write_bytes(f.read())
  else:
    atomic_write(path, lambda tmp: shutil.copyfile(local_file, tmp))


def atomic_write(path, write_fn: Callable[[str], Any]) -> str:
  """`write_fn(tmp)` writes a temporary local file, which then becomes `path`: a reader
  (another process, the next run after a kill) sees the old or the new file, never half of
  one. Locally the temporary file lies beside `path` (unique per process) and is renamed;
  for a URI it lies in the system's temporary directory and is uploaded as one object.
  The temporary name ends like `path` (so np.savez and savefig keep their format).
  Returns `path`."""
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1]
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix='jeat_jax_') as tmp_dir:
      tmp = os.path.join(tmp_dir, f'upload{suffix}')
      write_fn(tmp)
      upload(tmp, path)
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}{suffix}'
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
  try:
    return json.loads(read_bytes(path).decode())
  except FileNotFoundError:
    return None


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
