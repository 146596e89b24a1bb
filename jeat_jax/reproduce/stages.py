"""The stages of one run (train, evaluate, sample, fid, analyze), each skipped when its
output exists and timed into WORKDIR/timings.json, and several runs side by side in child
processes (`--jobs`)."""
import os
import subprocess
import sys
import time
from typing import List, Tuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jeat_jax import analysis, evaluate, generation, train
from jeat_jax.files import read_json, write_json_atomic
from jeat_jax.reproduce.runs import Run


def sample_subdirs(run: Run) -> List[Tuple[str, str]]:
  return [('samples', 'eq17')] + ([('samples_eq16', 'eq16')] if run.eq16 else [])


def seen_by_process_0(path: str) -> bool:
  """Whether `path` exists as process 0 sees it. Every process takes the same decision
  (a collective where there are several): one that skipped a stage the others run
  would leave them waiting in its collectives."""
  exists = os.path.exists(path)
  if jax.process_count() == 1:
    return exists
  return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def _timed(workdir: str, stage: str, fn, *args):
  """Runs one stage and adds its wall seconds to WORKDIR/timings.json (also when it fails;
  written by process 0)."""
  start = time.time()
  try:
    fn(*args)
  finally:
    if jax.process_index() == 0:
      _add_timing(workdir, stage, time.time() - start)


def _add_timing(workdir: str, stage: str, seconds: float) -> None:
  path = os.path.join(workdir, 'timings.json')
  timings = read_json(path) or {}
  timings[stage] = round(timings.get(stage, 0.0) + seconds, 1)
  write_json_atomic(path, timings)


def run_stages(run: Run, config, workdir: str, stages) -> None:
  """Each stage once: skipped when its output is already in `workdir`.

  A training that diverges past its retries is recorded in WORKDIR/failed.json
  and the run is left out from then on (delete that file to try again). With
  several processes every one runs the same stages (process 0's view of what is
  done decides) and process 0 writes the files.
  """
  done = lambda *p: seen_by_process_0(os.path.join(workdir, *p))
  if done('failed.json'):
    logging.warning('%s: skipped, it failed before (%s)', run.name, os.path.join(workdir, 'failed.json'))
    return
  if 'train' in stages and not done('results.json'):
    try:
      _timed(workdir, 'train', train.train_and_evaluate, config, workdir)
    except train.TrainingDiverged as e:
      logging.error('%s: %s; going on with the other runs', run.name, e)
      if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, 'failed.json'), {'stage': 'train', 'error': str(e)})
      return
  if not done('results.json'):
    return
  if 'evaluate' in stages and not done('eval', 'robustness.json'):
    _timed(workdir, 'evaluate', evaluate.evaluate_run, config, workdir)
  root = os.path.dirname(os.path.abspath(workdir))
  for subdir, objective in sample_subdirs(run):
    c = config.copy_and_resolve_references()
    c.sample.subdir, c.sample.objective = subdir, objective
    # The runs of a reproduction (same data) share one fit of the class Gaussians and one
    # set of FID reference statistics, in ROOT.
    c.sample.gaussian_cache = c.sample.gaussian_cache or generation.gaussian_cache_path(c, root)
    c.fid.reference_dir = c.fid.reference_dir or root
    if 'sample' in stages and not done(subdir, 'samples.npz'):
      _timed(workdir, 'sample', generation.sample_run, c, workdir)
    if 'fid' in stages and not seen_by_process_0(generation.fid_json_path(c, workdir)):
      try:
        _timed(workdir, 'fid', generation.fid_run, c, workdir)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('%s: FID not computed (%s); the report shows "-"', run.name, e)
  if 'analyze' in stages and not done('figures', 'energy_landscape.npz'):
    _timed(workdir, 'analyze', analysis.analyze_run, config, workdir)


def run_in_subprocesses(root: str, scale: str, data_path: str, names: List[str],
                        stages: List[str], jobs: int) -> List[str]:
  """Runs `names` with at most `jobs` child processes at a time, in the given order;
  returns the names whose process failed (their log says why; the others go on)."""
  pending, running, failed = list(names), {}, []
  while pending or running:
    while pending and len(running) < jobs:
      name = pending.pop(0)
      workdir = os.path.join(root, name)
      os.makedirs(workdir, exist_ok=True)
      cmd = [sys.executable, '-m', 'jeat_jax.reproduce', f'--scale={scale}',
             f'--workdir={root}', f'--data_path={data_path}', f'--runs={name}',
             f'--stages={",".join(stages)}', '--jobs=1']
      log = open(os.path.join(workdir, 'reproduce.log'), 'a')  # pylint: disable=consider-using-with
      running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
      logging.info('started %s (log: %s)', name, log.name)
    time.sleep(1.0)
    for name, (proc, log) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[name]
      if proc.returncode:
        failed.append(name)
        logging.error('%s failed (exit %d): see %s', name, proc.returncode, log.name)
      else:
        logging.info('finished %s', name)
  return failed
