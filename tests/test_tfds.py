"""The TFDS source, CIFAR-10 and CIFAR-100, on `tfds.testing.mock_data` (no network).

`tfds.testing.mock_data` patches `DatasetBuilder.download_and_prepare` (to a no-op) and
`as_dataset` (to random examples generated from the dataset's own `FeaturesDict`: uint8
32x32x3 images, labels drawn from the ClassLabel's classes). Everything in
`data.load_tfds` after those two calls is the real code: batching, dtype casts, the
Dataset and its provenance. The patches live only inside the `with` block
(`mocked_tfds`), and `no_tfds_patch_leaks` checks after every test that they are gone.
"""
import contextlib
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')

from jeat_jax import data, evaluate, train  # pylint: disable=g-import-not-at-top
from tests.conftest import smoke_config  # pylint: disable=g-import-not-at-top

# Examples per split. More than the :smoke configs' data.train_subset (256), so the subset
# really subsets and its keys appear in the provenance.
NUM_EXAMPLES = 320
SUBSET = 256

_BUILDER = tfds.core.DatasetBuilder
_ORIGINALS = {name: vars(_BUILDER)[name]  # the class's own attributes: what mock.patch swaps
              for name in ('__init__', 'download_and_prepare', 'as_dataset')}


@contextlib.contextmanager
def mocked_tfds(num_examples=NUM_EXAMPLES):
  # USE_CODE: random examples from the feature spec, never metadata files or GCS.
  with tfds.testing.mock_data(num_examples=num_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


@pytest.fixture(autouse=True)
def no_tfds_patch_leaks():
  yield
  for name, original in _ORIGINALS.items():
    assert vars(_BUILDER)[name] is original, f'tfds mock of DatasetBuilder.{name} leaked'


def tfds_version(name: str) -> str:
  """The version this tfds prepares for `name` (3.0.2 for both CIFARs in tfds 4.9)."""
  return str(tfds.builder_cls(name).VERSION)


def tfds_config(recipe: str, dataset: str, **overrides):
  # data.path names no file: a silent fall back to the npz source would fail loudly.
  return smoke_config(recipe, '/nonexistent/not-used.npz', **{
      'data.source': 'tfds', 'dataset': dataset, **overrides})


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_load_dataset_from_tfds(name):
  num_classes = data.NUM_CLASSES[name]
  with mocked_tfds():
    assert tfds.builder(name).info.features['label'].num_classes == num_classes
    ds = data.load_dataset(tfds_config('natural', name, **{'data.train_subset': 0}))
    subset = data.load_dataset(tfds_config('natural', name))
  assert ds.num_classes == num_classes and ds.source == f'tfds:{name}'
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    assert x.shape == (NUM_EXAMPLES, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (NUM_EXAMPLES,) and y.dtype == np.int32
    assert 0 <= y.min() and y.max() < num_classes
    assert x.min() < 32 and x.max() > 223  # random pixels over the whole uint8 range
  if name == 'cifar100':
    # The mock draws labels from the ClassLabel's 100 classes, not 10: 320 draws hit most.
    assert len(np.unique(ds.y_train)) > 50 and ds.y_train.max() >= 90
  version = tfds_version(name)
  assert ds.provenance == {'source': 'tfds', 'name': name, 'version': version}
  assert subset.x_train.shape == (SUBSET, 32, 32, 3) and subset.x_test.shape == ds.x_test.shape
  assert subset.provenance == {'source': 'tfds', 'name': name, 'version': version,
                               'train_subset': SUBSET, 'train_subset_seed': 0}


@pytest.mark.slow  # two trainings on a TFDS copy: ~30 s, for a 15-minute default suite
@pytest.mark.parametrize('recipe,name', [('natural', 'cifar10'), ('at', 'cifar100')])
def test_train_and_evaluate_on_tfds(tmp_path, recipe, name):
  """A real :smoke run and a PGD-20 evaluation; their JSON names the TFDS data and version."""
  config = tfds_config(recipe, name, **{'eval.num_examples': 32})
  workdir = str(tmp_path / 'run')
  expected = {'source': 'tfds', 'name': name, 'version': tfds_version(name),
              'train_subset': SUBSET, 'train_subset_seed': 0}
  with mocked_tfds():
    results = train.train_and_evaluate(config, workdir)
    config.eval.attacks = 'pgd20'
    config.eval.audit = False
    robust = evaluate.evaluate_run(config, workdir)
    model, state, ds, _ = train.load_trained(config, workdir)

  assert ds.num_classes == data.NUM_CLASSES[name]
  logits_fn = train.make_logits_fn(model, state.params, state.batch_stats, 'running')
  assert logits_fn(data.to_float(ds.x_test[:2])).shape == (2, ds.num_classes)
  assert results['step'] == 4 and 0.0 <= results['test_accuracy'] <= 1.0
  on_disk = json.loads(open(os.path.join(workdir, 'results.json')).read())
  # Strict: the data a number came from (issue 13 item 6) must be in results.json.
  assert on_disk['data'] == expected, on_disk.get('data')

  assert [r['name'] for r in robust['attacks']] == ['pgd20']
  assert robust['attacks'][0]['robust_accuracy'] <= robust['clean_accuracy']
  robustness = json.loads(open(os.path.join(workdir, 'eval', 'robustness.json')).read())
  assert robustness['data_source'] == f'tfds:{name}'
  assert robustness['data'] == expected, robustness.get('data')
