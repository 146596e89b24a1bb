"""Quiet, honest logs: progress lines of long loops (training, sampling, the SSIM search)
with rate and ETA, and TensorFlow's start-up chatter kept out."""
import os
import shutil
import tempfile
import time

from absl import logging


def quiet_tensorflow() -> None:
  """Call before anything imports TensorFlow (clu, TFDS), which computes nothing of a run.

  Its C++ INFO lines go; its oneDNN notice, printed before absl logging starts by each of
  two libraries that carry their own copy (libtensorflow_framework.so.2 and the profiler
  plugin), goes with oneDNN itself. Settings already in the environment win.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


def format_eta(seconds: float) -> str:
  """'1h02m03s', or '2m03s' under an hour."""
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Logs 'WHAT done/total (p%) | rate UNIT/s | ETA' as work is done: at the first report,
  then at most every `every_seconds`, and at the end. The rate is that since the previous
  line (as the train loop's), so a first call's compilation does not slow the estimate."""

  def __init__(self, what: str, total: float, unit: str = 'img', every_seconds: float = 30.0):
    self.what, self.total, self.unit, self.every = what, total, unit, every_seconds
    self._last_time = time.time()
    self._last_done = 0.0
    self._reported = False

  def __call__(self, done: float) -> None:
    now = time.time()
    if self._reported and done < self.total and now - self._last_time < self.every:
      return
    rate = (done - self._last_done) / max(now - self._last_time, 1e-9)
    logging.info('%s %.0f/%.0f (%.1f%%) | %.1f %s/s | ETA %s', self.what, done, self.total,
                 100 * done / self.total, rate, self.unit,
                 format_eta((self.total - done) / max(rate, 1e-9)))
    self._last_time, self._last_done, self._reported = now, done, True


class _UploadingWriter:
  """A clu metric writer for a workdir on an object store. TensorFlow's event writer reaches
  gs:// only through its own GCS client, which the one path layer (jeat_jax.files) does not
  use and which cannot be pointed at another server: the events are written to a local
  staging directory, and every flush and close uploads the files that grew (one object each,
  whole) to the workdir, under the names TensorBoard reads."""

  def __init__(self, workdir: str):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self._workdir = workdir
    self._staging = tempfile.mkdtemp(prefix='jeat_jax_tensorboard_')
    self._writer = metric_writers.create_default_writer(self._staging)
    self._uploaded = {}  # file name -> its size when last uploaded

  def __getattr__(self, name):  # write_scalars, write_images, write_hparams, ...
    return getattr(self._writer, name)

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    shutil.rmtree(self._staging, ignore_errors=True)

  def _upload(self) -> None:
    from jeat_jax import files  # pylint: disable=g-import-not-at-top
    for name in sorted(os.listdir(self._staging)):  # event files only grow: upload the grown
      local = os.path.join(self._staging, name)
      size = os.path.getsize(local)
      if self._uploaded.get(name) != size:
        files.upload(local, os.path.join(self._workdir, name))
        self._uploaded[name] = size


def tensorboard_writer(workdir: str, just_logging: bool = False):
  """clu's default metric writer for `workdir` (TensorBoard event files in it, and the log),
  for a local or an object-store workdir. Flush it to make the events visible there."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from jeat_jax import files  # pylint: disable=g-import-not-at-top
  if files.is_remote(workdir) and not just_logging:
    return _UploadingWriter(workdir)
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)
