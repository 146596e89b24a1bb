"""The workdir lock: one training at a time in a workdir, local or on an object store.

- A local workdir: an exclusive `flock` on WORKDIR/.lock, held for the Checkpointer's
  lifetime; the OS drops it when the holder dies, even by SIGKILL.
- A gs:// workdir: a lease, the object WORKDIR/.lock, created only where absent (a
  generation precondition: of two runs starting together one gets it). Its holder
  rewrites it every LEASE_SECONDS / 4 with a new expiry (a thread, independent of the
  steps); a run that finds it takes it over only once it has expired, or at once where it
  names a process of this host that is no longer alive (a run killed here and restarted).
  Each rewrite is conditional on the holder's last generation, so a holder whose lease was
  taken over learns it (`lost`) and its Checkpointer stops before writing a checkpoint.
  The release deletes the object (conditionally too).

Both record who holds the lock (host, pid, start, command), which the refusal names.
"""
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, Optional

from absl import logging

from jeat_jax import files
from jeat_jax.errors import WorkdirError

LOCK_FILE = '.lock'
LEASE_SECONDS = 120.0  # a gs:// lease not refreshed for this long is taken over


def holder_info() -> Dict[str, object]:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'command': ' '.join(sys.argv)}


def describe_holder(info: Dict[str, object]) -> str:
  if not info:
    return 'an unknown process (it has not written its name into the lock file)'
  return (f'pid {info.get("pid")} on host {info.get("host")}, running since '
          f'{info.get("started")} ({info.get("command")})')


def in_use_error(workdir: str, info: Dict[str, object], how_released: str) -> WorkdirError:
  return WorkdirError(
      f'workdir {workdir} is in use by another training run: {describe_holder(info)}. Wait for '
      f'it to end or stop it, or use another --workdir ({how_released}).')


# ----------------------------------------------------------------------------- local: flock

class FileLock:
  """An exclusive flock on a local WORKDIR/.lock (see the module docstring)."""

  lost = None  # the OS keeps a flock for as long as its holder lives

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = self._read_holder()
      os.close(self._fd)
      raise in_use_error(workdir, info,  # pylint: disable=raise-missing-from
                         f'a run that was killed releases {self.path} by itself')
    except OSError:  # a filesystem without locks (ENOLCK, EOPNOTSUPP)
      os.close(self._fd)
      raise
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(holder_info()).encode(), 0)

  def _read_holder(self) -> Dict[str, object]:
    for _ in range(10):  # the holder writes right after locking: it may not have yet
      try:
        info = json.loads(os.pread(self._fd, 65536, 0).decode() or '{}')
      except (ValueError, OSError):
        info = {}
      if info:
        return info
      time.sleep(0.1)
    return {}

  def release(self) -> None:
    os.close(self._fd)  # drops the flock; the file stays (removing it would race a new holder)


# ----------------------------------------------------------------------------- gs://: a lease

def _bucket_and_name(uri: str):
  bucket, _, name = uri[len('gs://'):].partition('/')
  return bucket, name


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def lease_expired(info: Dict[str, object], now: float) -> bool:
  """Whether a lease may be taken over: past its expiry, or held by a dead process here."""
  if float(info.get('expires', 0.0)) < now:
    return True
  return info.get('host') == socket.gethostname() and not _process_alive(int(info.get('pid', 0)))


class ObjectLease:
  """A lease on the object WORKDIR/.lock of a gs:// workdir (see the module docstring)."""

  def __init__(self, workdir: str, lease_seconds: float = LEASE_SECONDS):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(workdir, LOCK_FILE)
    self._precondition_failed = exceptions.PreconditionFailed
    self._not_found = exceptions.NotFound
    bucket, name = _bucket_and_name(self.path)
    self._bucket = storage.Client().bucket(bucket)
    self._name, self._seconds = name, lease_seconds
    self._info = holder_info()
    self.lost: Optional[Dict[str, object]] = None  # the taker's record, once taken over
    self._generation = self._take(workdir)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._refresh_until_released, daemon=True,
                                    name='workdir-lease')
    self._thread.start()

  def _body(self) -> str:
    return json.dumps({**self._info, 'expires': time.time() + self._seconds})

  def _write(self, generation: int) -> int:
    """Writes the lease if the object's generation is `generation` (0: absent); returns the
    new generation."""
    blob = self._bucket.blob(self._name)
    blob.upload_from_string(self._body(), content_type='application/json',
                            if_generation_match=generation)
    return blob.generation

  def _take(self, workdir: str) -> int:
    for _ in range(10):  # the object may change under us: its holder refreshes it
      try:
        return self._write(0)
      except self._precondition_failed:
        pass
      blob = self._bucket.get_blob(self._name)
      try:
        info = json.loads(blob.download_as_bytes() or b'{}') if blob is not None else None
      except self._not_found:  # rewritten (a new generation) or released in between
        continue
      if info is None:
        continue
      if not lease_expired(info, time.time()):
        raise in_use_error(workdir, info, f'its lease {self.path} expires {self._seconds:.0f} s '
                           'after its holder stops refreshing it')
      logging.warning('taking over the expired lease %s of %s', self.path, describe_holder(info))
      try:
        return self._write(blob.generation)
      except self._precondition_failed:
        continue  # refreshed after all, or taken by another run: look again
    raise in_use_error(workdir, {}, f'its lease {self.path} kept changing while this run tried '
                       'to take it')

  def _refresh_until_released(self) -> None:
    while not self._stop.wait(self._seconds / 4):
      try:
        self._generation = self._write(self._generation)
      except self._precondition_failed:
        try:
          self.lost = json.loads(self._bucket.blob(self._name).download_as_bytes())
        except Exception:  # pylint: disable=broad-except  (changed or gone again)
          self.lost = {}
        logging.error('the lease %s was taken over by %s: this run writes no more checkpoints',
                      self.path, describe_holder(self.lost))
        return
      except Exception as e:  # pylint: disable=broad-except  (a network error: retry)
        logging.warning('cannot refresh the lease %s (%s); retrying', self.path, e)

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    if self.lost is None:
      try:
        self._bucket.blob(self._name).delete(if_generation_match=self._generation)
      except (self._precondition_failed, self._not_found):
        pass


# ----------------------------------------------------------------------------- per process

# Locks this process holds: lock path -> [lock, number of Checkpointers using it]. A flock
# belongs to an open file, so a second open in the same process would conflict with the
# first: Checkpointers of one process on one workdir share the lock instead.
_HELD: Dict[str, list] = {}


def _key(workdir: str) -> str:
  path = os.path.join(workdir, LOCK_FILE)
  return path if files.is_remote(path) else os.path.realpath(path)


def acquire(workdir: str) -> Optional[str]:
  """Takes the lock of `workdir` (or shares this process's); returns its key (None where the
  filesystem has no locks)."""
  key = _key(workdir)
  if key in _HELD:
    _HELD[key][1] += 1
    return key
  if not files.is_remote(workdir):
    try:
      lock = FileLock(workdir)
    except OSError as e:
      logging.warning('cannot lock %s (%s): a second training started on this workdir would '
                      'not be stopped', key, e)
      return None
  elif workdir.startswith('gs://'):
    lock = ObjectLease(workdir)
  else:
    logging.warning('no lock for %s: only local and gs:// workdirs have one; a second training '
                    'started on this workdir would not be stopped', workdir)
    return None
  _HELD[key] = [lock, 1]
  return key


def lost(key: Optional[str]) -> Optional[Dict[str, object]]:
  """The record of the run that took over this process's lock `key`, or None."""
  held = _HELD.get(key)
  return held[0].lost if held is not None else None


def release(key: Optional[str]) -> None:
  held = _HELD.get(key)
  if held is None:
    return
  held[1] -= 1
  if held[1] == 0:
    del _HELD[key]
    held[0].release()
