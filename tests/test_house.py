"""The house rules of issue 15: no import cycle, atomic files, quiet and honest logs.

One :smoke training (6 steps, checkpoints at 2, 4, 6) is shared by the tests below
that need a trained workdir.
"""
import ast
import contextlib
import logging
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
from absl import logging as absl_logging

from tests.conftest import REPO, smoke_config

PACKAGE = REPO / 'jeat_jax'


# ----------------------------------------------------------------------------- import graph

def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path: pathlib.Path, modules) -> set:
  """The jeat_jax modules `path` imports anywhere in it (function-local imports too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the importing module's package
        package = module_name(path).split('.')
        package = package[:len(package) - node.level + (path.name == '__init__.py')]
        base = '.'.join(package + ([base] if base else []))
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    out.update(n for n in names if n in modules)
  return out - {module_name(path)}


def import_graph():
  paths = sorted(PACKAGE.rglob('*.py'))
  modules = {module_name(p) for p in paths}
  return {module_name(p): sorted(imported_modules(p, modules)) for p in paths}


def find_cycle(graph):
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycle():
  graph = import_graph()
  assert 'jeat_jax.state' in graph['jeat_jax.evaluate']  # the parser sees local imports
  cycle = find_cycle(graph)
  shown = '\n'.join(f'{m} -> {", ".join(d) or "-"}' for m, d in graph.items())
  assert cycle is None, f'import cycle {" -> ".join(cycle)} in\n{shown}'
  importers_of_train = sorted(m for m, deps in graph.items() if 'jeat_jax.train' in deps)
  # entry points only: the reproduction's stages (python -m jeat_jax.reproduce) and main.py
  assert importers_of_train == ['jeat_jax.reproduce.stages'], shown


# ----------------------------------------------------------------------------- files

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
  from jeat_jax import files
  path = tmp_path / 'sub' / 'results.json'
  files.write_json_atomic(path, {'a': 1})

  def fail(tmp):
    with open(tmp, 'w') as f:
      f.write('{"a": ')
    raise OSError('disk full')

  with pytest.raises(OSError):
    files.atomic_write(path, fail)
  assert files.read_json(path) == {'a': 1}
  assert os.listdir(path.parent) == ['results.json']  # no temporary file left
  assert files.read_json(tmp_path / 'missing.json') is None


# ----------------------------------------------------------------------------- one :smoke run

@contextlib.contextmanager
def absl_records():
  """Every absl log record (DEBUG too) while the block runs."""
  records = []
  handler = logging.Handler(logging.DEBUG)
  handler.emit = records.append
  logger = logging.getLogger('absl')
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.DEBUG)
  logger.addHandler(handler)
  try:
    yield records
  finally:
    logger.removeHandler(handler)
    absl_logging.set_verbosity(verbosity)


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, standin_path):
  """Trains natural :smoke for 6 steps, then trains again in the same workdir after
  removing results.json (as a run killed after its last checkpoint leaves it)."""
  from jeat_jax import train
  workdir = str(tmp_path_factory.mktemp('house') / 'natural')
  config = smoke_config('natural', standin_path, num_train_steps=6)
  with absl_records() as records:
    first = train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, 'results.json'))
  second = train.train_and_evaluate(config, workdir)
  return types.SimpleNamespace(workdir=workdir, config=config, records=records, first=first,
                               second=second)


def test_checkpoint_lines_first_and_last_at_info(smoke_run):
  saves = {int(re.search(r'step (\d+)', r.getMessage()).group(1)): r.levelno
           for r in smoke_run.records if r.getMessage().startswith('saved checkpoint')}
  assert saves == {2: logging.INFO, 4: logging.DEBUG, 6: logging.INFO}


def test_wall_seconds_is_the_total_over_sessions(smoke_run):
  first, second = smoke_run.first, smoke_run.second
  assert first['wall_seconds'] == first['wall_seconds_this_session']
  assert second['step'] == first['step'] == 6
  # The rerun only evaluates; its total keeps the first session's training time.
  assert second['wall_seconds_this_session'] < 0.5 * first['wall_seconds']
  assert second['wall_seconds'] >= 0.8 * first['wall_seconds'], (first, second)
  assert second['wall_seconds'] >= second['wall_seconds_this_session']


def test_wall_seconds_of_a_checkpoint_without_them(smoke_run, monkeypatch):
  """A workdir of an older version: its results.json at the same step keeps the total."""
  from jeat_jax import checkpoint, files, train
  monkeypatch.setattr(checkpoint.Checkpointer, 'wall_seconds', lambda self, step: None)
  third = train.train_and_evaluate(smoke_run.config, smoke_run.workdir)
  assert third['wall_seconds'] == pytest.approx(
      smoke_run.second['wall_seconds'] + third['wall_seconds_this_session'], abs=0.11)
  assert files.read_json(os.path.join(smoke_run.workdir, 'results.json')) == third


def test_sampling_reports_progress_without_preamble(smoke_run, standin_path):
  """--mode=sample in pieces of one step: progress lines with rate and ETA (sampling and the
  SSIM search), and no TensorFlow preamble."""
  cmd = [sys.executable, 'main.py', '--config=configs/natural.py:smoke', '--mode=sample',
         f'--workdir={smoke_run.workdir}', '--config.data.source=npz',
         f'--config.data.path={standin_path}', '--config.num_train_steps=6',
         '--config.sample.steps_per_call=1']
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log
  assert re.search(r'sampled [1-9]/20 \(\d+\.\d%\) \| [\d.]+ img/s \| ETA \d+m\d\ds', log), log
  assert 'sampled 20/20 (100.0%)' in log, log
  assert re.search(r'nearest training images by SSIM \(10 queries\): 256/256 \(100\.0%\) \| '
                   r'[\d.]+ img/s \| ETA 0m00s', log), log
  assert 'oneDNN' not in log and 'InitializeLog' not in log, log
