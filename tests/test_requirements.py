"""The locked environment and portable reports (issues 24 and 25).

requirements.txt locks every dependency pyproject.toml names (runtime and the test extra) at an
exact version inside pyproject's range, and README's set-up command installs through it; the
accelerator extras pin JAX to the locked version. Reports record data files by the path the user
gave plus their sha256, never by an absolute path of the machine that wrote them.
"""
import hashlib
import pathlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO, write_synthetic_npz


def pyproject():
  with open(REPO / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['project']


def locked_versions(text: str) -> dict:
  """{canonical name: Version} of requirements.txt; every requirement line must be name==version."""
  pins = {}
  for number, line in enumerate(text.splitlines(), 1):
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    assert not line.startswith('-'), f'requirements.txt:{number}: an option, not a pin: {line}'
    req = Requirement(line)
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == '==' and '*' not in specs[0].version, (
        f'requirements.txt:{number}: not an exact pin (name==version): {line}')
    name = canonicalize_name(req.name)
    assert name not in pins, f'requirements.txt:{number}: {req.name} pinned twice'
    pins[name] = Version(specs[0].version)
  return pins


def unpinned_or_outside(project: dict, pins: dict) -> list:
  """The dependencies of pyproject (runtime and the test extra) that requirements.txt does not
  pin, or pins at a version outside pyproject's range."""
  problems = []
  for line in project['dependencies'] + project['optional-dependencies']['test']:
    req = Requirement(line)
    version = pins.get(canonicalize_name(req.name))
    if version is None:
      problems.append(f'{req.name}: not pinned')
    elif not req.specifier.contains(version, prereleases=True):
      problems.append(f'{req.name}=={version} outside {req.specifier}')
  return problems


def setup_command() -> str:
  """The first line of the bash block under README's '## Install' (what .ci/run evals)."""
  section = (REPO / 'README.md').read_text().split('\n## Install\n', 1)[1]
  return section.split('```bash\n', 1)[1].splitlines()[0]


def test_requirements_pin_every_dependency_within_its_range():
  pins = locked_versions((REPO / 'requirements.txt').read_text())
  assert unpinned_or_outside(pyproject(), pins) == []
  # the pinned set is a whole environment, not just the direct dependencies
  assert {'jaxlib', 'tensorstore', 'keras', 'protobuf'} <= set(pins)
  assert str(pins['torch']) == '2.13.0'  # satisfied by the CPU build 2.13.0+cpu where pip finds it
  assert 'jeat-jax' not in pins


def test_the_check_catches_a_missing_pin_and_a_pin_out_of_range():
  project = {'dependencies': ['jax>=0.5.3', 'optax>=0.2.5'],
             'optional-dependencies': {'test': ['torch==2.13.0']}}
  pins = locked_versions('jax==0.10.2\noptax==0.2.4  # too old\ntorch==2.13.0+cpu\n')
  assert unpinned_or_outside(project, pins) == ['optax==0.2.4 outside >=0.2.5']
  del pins['jax']
  assert unpinned_or_outside(project, pins)[0] == 'jax: not pinned'
  with pytest.raises(AssertionError, match='not an exact pin'):
    locked_versions('numpy>=1.26\n')


def test_accelerator_extras_pin_the_locked_jax():
  jax = locked_versions((REPO / 'requirements.txt').read_text())['jax']
  extras = pyproject()['optional-dependencies']
  assert extras['tpu'] == [f'jax[tpu]=={jax}'] and extras['cuda12'] == [f'jax[cuda12]=={jax}']


def test_readme_setup_installs_through_the_lock():
  command = setup_command()
  steps = [s.strip() for s in command.split('&&')]
  assert steps[0] == 'pip install -r requirements.txt', command
  # the package itself and torchattacks add nothing to the locked set
  assert 'pip install --no-deps -e .' in steps and 'pip install --no-deps torchattacks==3.5.1' in steps


# ------------------------------------------------------------------ no path of one machine

# An absolute path into a home or work directory, or an absolute path to an .npz data file.
MACHINE_PATH = re.compile(r'(?<![\w.~])/(?:work|home|root|Users)/[^\s`\'"]*'
                          r'|(?<![\w.~])/[\w.-]+(?:/[\w.-]+)*\.npz\b')
PRODUCT_FILES = ('README.md', 'benchmarks/**/*.json', 'benchmarks/**/*.md', 'docs/**/*.md',
                 'notebooks/*.ipynb', 'configs/*.py', 'jeat_jax/**/*.py', 'benchmarks/*.py')


def test_no_absolute_machine_path_in_the_product():
  found = []
  for pattern in PRODUCT_FILES:
    for path in sorted(REPO.glob(pattern)):
      for number, line in enumerate(path.read_text().splitlines(), 1):
        found += [f'{path.relative_to(REPO)}:{number}: {m}' for m in MACHINE_PATH.findall(line)]
  assert found == []
  assert MACHINE_PATH.findall('"path": "/srv/data/x.npz"')  # the pattern bites


def test_npz_provenance_is_the_path_as_given_and_its_sha256(tmp_path, monkeypatch):
  from jeat_jax import data  # pylint: disable=g-import-not-at-top
  write_synthetic_npz(tmp_path / 'synthetic.npz')
  monkeypatch.chdir(tmp_path)
  ds = data.load_npz('synthetic.npz', 10)
  sha = hashlib.sha256((tmp_path / 'synthetic.npz').read_bytes()).hexdigest()
  assert ds.provenance == {'source': 'npz', 'path': 'synthetic.npz', 'sha256': sha}
  assert ds.source == 'npz:synthetic.npz'


def test_paper_scale_finds_the_standin_relative_to_the_repository(tmp_path, monkeypatch):
  from benchmarks import paper_scale  # pylint: disable=g-import-not-at-top
  assert pathlib.Path(paper_scale.STANDIN).resolve() == (
      REPO.parent / 'shared' / 'data' / 'cifar10-jpeg-standin.npz').resolve()
  (tmp_path / 'shared').mkdir()
  (tmp_path / 'repo').mkdir()
  standin = write_synthetic_npz(tmp_path / 'shared' / 'standin.npz')
  monkeypatch.chdir(tmp_path / 'repo')
  assert paper_scale.find_data('', standin) == '../shared/standin.npz'  # relative to the repository
  assert paper_scale.find_data('', str(tmp_path / 'absent.npz')) is None      # synthetic data
  assert paper_scale.find_data('../shared/standin.npz') == '../shared/standin.npz'  # as given
  assert paper_scale.find_data('synthetic') is None
