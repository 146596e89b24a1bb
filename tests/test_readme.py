"""README.md's code blocks run as written, in order, so that they cannot rot.

The rule: every ```python block runs as written; every command of a ```bash block runs with `:cpu`
replaced by `:smoke` (the same recipe, trained for seconds), except the commands that start with a
prefix of NOT_RUN, each skipped for the reason given there. Blocks of other languages (the layout
listing) are text. They run in a scratch directory laid out as a fresh clone's root, beside a
`shared/` that points at the real one (where the README's data paths lead), so nothing is written
into the repository.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = REPO / 'README.md'
NOT_RUN = {
    'pip install ': 'the set-up command: it ran before any test could (.ci/run runs it from README.md)',
    'python -m pytest ': 'the test command: it is running this test',
    'python -m jeat_jax.reproduce ': 'every recipe end to end: about 2 hours at --scale=cpu, '
                                     'accelerators at --scale=paper; tests/test_reproduce.py runs '
                                     'its stages at smoke scale',
    'PYTHONPATH=. python benchmarks/robustness_audit.py ': 'about 2.5 hours of attacks at full '
        'strength even on :smoke models; tests/test_robustness_audit.py runs it end to end on a '
        ':smoke model with fewer points',
}
BLOCK = re.compile(r'^```(\w*)\n(.*?)^```$', re.M | re.S)


def code_blocks(text: str):
  """(language, code) of every fenced block, in order."""
  return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def bash_commands(code: str):
  """The commands of a bash block: continuation lines joined, blank lines dropped."""
  return [line.strip() for line in code.replace('\\\n', ' ').splitlines() if line.strip()]


def not_run_reason(command: str):
  return next((reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)), None)


def first_command_under(heading: str) -> str:
  """The first command of the first bash block under `## heading` (what .ci/run runs)."""
  section = README.read_text().split(f'\n## {heading}\n', 1)[1]
  return next(bash_commands(code) for lang, code in code_blocks(section) if lang == 'bash')[0]


def scratch_root(tmp_path: pathlib.Path) -> pathlib.Path:
  """tmp/jeat-jax: links to the repository's files (no runs/), beside tmp/shared."""
  root = tmp_path / 'jeat-jax'
  root.mkdir()
  for entry in REPO.iterdir():
    if entry.name not in ('.git', 'runs'):
      (root / entry.name).symlink_to(entry)
  (tmp_path / 'shared').symlink_to(REPO.parent / 'shared')
  return root


def run(args, cwd, shell: bool = False) -> subprocess.CompletedProcess:
  """`args` in `cwd` with this interpreter first on PATH (so `python` is the one testing)."""
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  return subprocess.run(args, cwd=cwd, env=env, shell=shell, executable='/bin/bash' if shell else None,
                        capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_readme_code_blocks_run_as_written(tmp_path, standin_path):
  """Each README block in order: `:cpu` runs at `:smoke`, NOT_RUN's commands are skipped."""
  del standin_path  # the README's commands find it at ../shared/data/ (skips where it is absent)
  root = scratch_root(tmp_path)
  kinds_run = set()
  for lang, code in code_blocks(README.read_text()):
    if lang == 'python':
      jobs = [(code, run([sys.executable, '-c', code], root))]
    elif lang == 'bash':
      jobs = []
      for command in bash_commands(code):
        reason = not_run_reason(command)
        if reason:
          print(f'not run: {command}\n  because: {reason}')
          continue
        command = command.replace(':cpu', ':smoke')
        jobs.append((command, run(command, root, shell=True)))
    else:
      continue
    for what, done in jobs:
      assert done.returncode == 0, (f'README {lang} block failed:\n{what}\n'
                                    f'{done.stdout[-2000:]}\n{done.stderr[-4000:]}')
      kinds_run.add(lang)
  assert kinds_run == {'bash', 'python'}, kinds_run


def test_ci_runs_the_readme_set_up_and_test_commands():
  """.ci/run reads the same two commands from README that NOT_RUN skips as set-up and test."""
  ci = (REPO / '.ci' / 'run').read_text()
  function = re.search(r'^readme_command\(\) \{.*?^\}$', ci, re.M | re.S).group(0)
  def ci_reads(heading):
    return run(f'{function}\nreadme_command {heading}', REPO, shell=True).stdout.strip()

  setup, tests = first_command_under('Install'), first_command_under('Test')
  assert ci_reads('Install') == setup and ci_reads('Test') == tests
  # The lock, test tools included: the test command works after it.
  assert setup.split('&&')[0].strip() == 'pip install -r requirements.txt'
  assert not_run_reason(setup).startswith('the set-up command')
  assert not_run_reason(tests).startswith('the test command')
  assert 'run_tests "$tests -m slow"' in ci


def collected(*args):
  out = run([sys.executable, '-m', 'pytest', '--collect-only', '-q', 'tests/test_readme.py', *args],
            REPO).stdout
  return {line.split('::')[1] for line in out.splitlines() if '::' in line}


def test_default_run_leaves_out_slow_tests_and_m_slow_runs_only_them():
  """pyproject's addopts `-m 'not slow'`; a later `-m slow` on the command line replaces it."""
  default, slow = collected(), collected('-m', 'slow')
  assert slow == {'test_readme_code_blocks_run_as_written'}
  assert default and not default & slow
  assert 'test_default_run_leaves_out_slow_tests_and_m_slow_runs_only_them' in default
