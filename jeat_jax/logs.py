"""Quiet, honest logs: progress lines of long loops (training, sampling, the SSIM search)
with rate and ETA, and TensorFlow's start-up chatter kept out."""
import os
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
