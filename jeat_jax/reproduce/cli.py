"""The command line of `python -m jeat_jax.reproduce`: its flags and `main`, which checks
every run's config, runs the stages of the chosen runs (here, or in child processes with
--jobs > 1) and writes the report."""
import os
import sys
import time
from typing import Dict

from absl import app, flags, logging

from jeat_jax import generation, parallel
from jeat_jax.errors import Preempted
from jeat_jax.reproduce import fair_report, paper_report
from jeat_jax.reproduce import stages as stages_lib
from jeat_jax.reproduce.runs import (FAIR_RUNS, FAIR_STAGES, PAPER_RUNS, RUNS_BY_NAME, SCALES,
                                     STAGES, make_config, validated_configs)

flags.DEFINE_enum('scale', 'cpu', SCALES, 'cpu: the :cpu configs on 2 cores; cpu-fair: the '
                  'recipes of jeat_jax/reproduce/fair.py on its seeds at one equal budget, with '
                  'intervals over seeds and points; paper: WRN-28-10.')
flags.DEFINE_string('workdir', None, 'Root directory: one subdirectory per run, REPORT.md.')
flags.DEFINE_string('data_path', '', 'An npz dataset (the offline stand-in); empty: TFDS.')
flags.DEFINE_list('runs', list(PAPER_RUNS), 'Which runs, in this order (default: the paper\'s; '
                  f'also: {", ".join(n for n in RUNS_BY_NAME if n not in PAPER_RUNS)}).')
flags.DEFINE_list('stages', list(STAGES), f'Which stages, of {STAGES} (cpu-fair: by default '
                  f'{FAIR_STAGES}).')
flags.DEFINE_integer('jobs', 1, 'Runs processed side by side, each in its own process (log: '
                     'WORKDIR/<run>/reproduce.log). On 2 CPU cores 2 jobs gave 1.4x the throughput '
                     'of one: XLA:CPU leaves cores idle on these small models.')
flags.DEFINE_bool('distributed', False, 'Run every stage on several processes joined by '
                  'jax.distributed (config.distributed.*): start the same command on each, with '
                  'the same --workdir (a directory every process sees).')
flags.DEFINE_string('coordinator_address', '', 'With --distributed: host:port of process 0; '
                    'empty: JAX finds it (TPU pods, SLURM, Open MPI).')
flags.DEFINE_integer('num_processes', 1, 'With --distributed and --coordinator_address.')
flags.DEFINE_integer('process_id', 0, 'With --distributed and --coordinator_address.')


def distributed_settings(flag_values) -> Dict[str, object]:
  """The config.distributed.* settings of the command line; {} without --distributed."""
  if not flag_values.distributed:
    return {}
  return {'enabled': True, 'coordinator_address': flag_values.coordinator_address,
          'num_processes': flag_values.num_processes, 'process_id': flag_values.process_id}


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  unknown = set(FLAGS.runs) - set(RUNS_BY_NAME)
  if unknown:
    raise app.UsageError(f'unknown runs {sorted(unknown)}; choose from {list(RUNS_BY_NAME)}')
  if FLAGS.jobs < 1:
    raise app.UsageError(f'--jobs must be >= 1, got {FLAGS.jobs}')
  distributed = distributed_settings(FLAGS)
  if distributed and FLAGS.jobs > 1:
    raise app.UsageError('--jobs > 1 runs each run in a child process: not with --distributed')
  start = time.time()
  fair_scale = FLAGS.scale == 'cpu-fair'
  # In the order given; by default the paper's runs (cpu-fair: its recipes on its seeds).
  names = list(dict.fromkeys(FLAGS.runs if FLAGS['runs'].present or not fair_scale
                             else [r.name for r in FAIR_RUNS]))
  stages = (FLAGS.stages if FLAGS['stages'].present or not fair_scale else list(FAIR_STAGES))
  if distributed:  # before anything touches JAX's devices
    parallel.initialize_distributed(
        make_config(RUNS_BY_NAME[names[0]], FLAGS.scale, FLAGS.data_path, distributed))
  in_children = FLAGS.jobs > 1 and len(names) > 1
  configs = validated_configs([RUNS_BY_NAME[name] for name in names], FLAGS.scale,
                              FLAGS.data_path, distributed, devices=1 if in_children else None)
  per_run = [s for s in stages if s != 'report']
  failed = []
  if in_children and per_run:
    if 'fid' in per_run:  # once here, not once per job side by side (minutes at 5 img/s)
      generation.fid_reference_statistics(  # into ROOT/fid_stats, where run_stages looks
          make_config(RUNS_BY_NAME[names[0]], FLAGS.scale, FLAGS.data_path),
          os.path.abspath(FLAGS.workdir))
    failed = stages_lib.run_in_subprocesses(FLAGS.workdir, FLAGS.scale, FLAGS.data_path, names,
                                            per_run, FLAGS.jobs)
  else:
    try:
      for name in names:
        run = RUNS_BY_NAME[name]
        logging.info('=== %s (%s)', run.name, run.recipe)
        stages_lib.run_stages(run, configs[name], os.path.join(FLAGS.workdir, run.name), stages)
    except Preempted as e:  # the run's checkpoint is saved: the same command goes on from it
      print(e, flush=True)
      return
  if 'report' in stages:
    command = ' '.join(['python -m jeat_jax.reproduce'] + sys.argv[1:])
    if fair_scale:
      path = fair_report.write_fair_report(FLAGS.workdir, FLAGS.data_path, start,
                                           FLAGS.jobs, command)
    else:
      path = paper_report.write_report(FLAGS.workdir, FLAGS.scale, FLAGS.data_path,
                                       start, FLAGS.jobs, command)
    logging.info('wrote %s', path)
  if failed:
    sys.exit(f'runs whose process failed: {failed}; see WORKDIR/<run>/reproduce.log')
