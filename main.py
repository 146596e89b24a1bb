"""jeat-jax entry point: python main.py --config=configs/jeat.py --workdir=DIR [--mode=train].

Config strings select the scale: configs/jeat.py (the paper's), configs/jeat.py:cpu,
configs/jeat.py:smoke. Any key can be overridden: --config.optimizer.lr=0.05.
"""
import logging as std_logging
import os
import sys

from jeat_jax import logs as logs_lib

logs_lib.quiet_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe config file (and :cpu / :smoke).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'sample', 'fid', 'analyze', 'export'],
                  'train (resumes), or evaluate / sample / export the latest checkpoint in --workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, mode: str):
  from jeat_jax import config_validation  # pylint: disable=g-import-not-at-top
  from jeat_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(config)  # before anything counts the devices
  config_validation.validate(config)
  if mode == 'train':
    from jeat_jax import train  # pylint: disable=g-import-not-at-top
    results = train.train_and_evaluate(config, workdir)
    logging.info('results: %s', results)
  elif mode == 'evaluate':
    from jeat_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate_run(config, workdir)
  elif mode == 'sample':
    from jeat_jax import generation  # pylint: disable=g-import-not-at-top
    logging.info('samples: %s', generation.sample_run(config, workdir))
  elif mode == 'fid':
    from jeat_jax import generation  # pylint: disable=g-import-not-at-top
    generation.fid_run(config, workdir)
  elif mode == 'analyze':
    from jeat_jax import analysis  # pylint: disable=g-import-not-at-top
    analysis.analyze_run(config, workdir)
  elif mode == 'export':
    from jeat_jax import export  # pylint: disable=g-import-not-at-top
    export.export_run(config, workdir)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and other libraries from the log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/jeat_jax/' in record.pathname or (
        record.pathname.endswith('main.py'))


def parse_flags(argv):
  """absl flag parsing, with bad flags and config overrides reported in one line."""
  try:
    args = FLAGS(argv)
    _ = FLAGS.config.recipe  # config files load lazily: surface a bad --config here
    return args
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unknown_key = isinstance(e, AttributeError) or 'has no attribute' in str(e)
    if unknown_key:
      overrides = [a for a in argv[1:] if a.startswith('--config.')]
      key = lines[-1].strip('"\'')
      message = f'unknown config key {key!r} in {" ".join(overrides)}'
    else:
      message = lines[0] if len(lines) == 1 else f'{lines[0]} ({lines[-1]})'
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  std_logging.getLogger('jeat_jax').setLevel(std_logging.INFO)  # modules on std logging (metrics)
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from jeat_jax.errors import Preempted, UserError  # pylint: disable=g-import-not-at-top
  # Keep TensorFlow (used by TFDS and the TensorBoard writer) off accelerators.
  os.environ.setdefault('CUDA_VISIBLE_DEVICES_FOR_TF', '')
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Preempted as e:  # the checkpoint is saved: the same command resumes
    print(e, flush=True)
    sys.exit(0)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
