"""Both data sources through the one pipeline: shapes, dtypes, ranges, order."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jeat_jax import data
from jeat_jax.errors import DataError
from tests.conftest import write_synthetic_npz


def _check_dataset(ds, num_classes):
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (32, 32, 3)
    assert y.dtype == np.int32 and y.shape == (x.shape[0],)
    assert 0 <= y.min() and y.max() < num_classes
  assert ds.num_classes == num_classes


def test_npz_source(synthetic_npz):
  ds = data.load_npz(synthetic_npz, 10)
  _check_dataset(ds, 10)
  x, y = data.train_batch(ds, 0, 16, seed=0)
  assert x.shape == (16, 32, 32, 3) and y.shape == (16,)


def test_standin_source(standin_path):
  ds = data.load_npz(standin_path, 10)
  _check_dataset(ds, 10)
  assert ds.x_train.shape[0] == 50000 and ds.x_test.shape[0] == 10000
  # The stand-in is grouped by class: the loader shuffles the test split once.
  assert len(set(ds.y_test[:100].tolist())) == 10


@pytest.mark.parametrize('name,num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_tfds_source(name, num_classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    ds = data.load_tfds(name, '')
  _check_dataset(ds, num_classes)


def test_cifar100_lossless_images(tmp_path):
  from tests.conftest import SHARED_DATA
  path = SHARED_DATA / 'cifar100-test-first20-lossless.npz'
  if not path.exists():
    pytest.skip(f'{path} not found')
  with np.load(path) as f:
    x, y = f['x_test'], f['y_test']
  npz = write_synthetic_npz(tmp_path / 'c100.npz', num_classes=100, x_test=x, y_test=y)
  _check_dataset(data.load_npz(npz, 100), 100)


def test_epoch_order_is_a_partition_and_deterministic():
  """Each epoch visits every example once; the order is a function of (seed, epoch) only:
  the same again, another in the next epoch and under another seed."""
  n, b = 100, 10

  def epoch_order(epoch, seed):
    return np.concatenate([data.global_batch_indices(s, n, b, seed)
                           for s in range(epoch * n // b, (epoch + 1) * n // b)])

  first, second = epoch_order(0, seed=3), epoch_order(1, seed=3)
  for order in (first, second):
    assert sorted(order.tolist()) == list(range(n))
  np.testing.assert_array_equal(first, epoch_order(0, seed=3))
  assert not np.array_equal(first, np.arange(n))       # shuffled
  assert not np.array_equal(first, second)             # reshuffled every epoch
  assert not np.array_equal(first, epoch_order(0, seed=4))


def test_augment_shapes_range_and_content():
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3))
  out = data.augment(jax.random.PRNGKey(1), x)
  assert out.shape == x.shape and out.dtype == x.dtype
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  # Each output is a (possibly flipped) crop of the reflect-padded input.
  padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)), mode='reflect')
  for i in range(8):
    found = any(np.allclose(np.asarray(out[i]), c) for dy in range(9) for dx in range(9)
                for c in (padded[i, dy:dy + 32, dx:dx + 32], padded[i, dy:dy + 32, dx:dx + 32][:, ::-1]))
    assert found


def test_to_float_range():
  x = jnp.array([[0, 255]], jnp.uint8)
  np.testing.assert_allclose(data.to_float(x), [[0.0, 1.0]])


def test_eval_batches_cover_and_mask():
  x = np.arange(25)[:, None]
  y = np.arange(25)
  seen = []
  for xb, yb, mb in data.eval_batches(x, y, 10):
    assert xb.shape[0] == 10
    seen += yb[mb].tolist()
  assert seen == list(range(25))


@pytest.mark.parametrize('overrides,needle', [
    (dict(x_test=None), 'missing keys'),
    (dict(x_train=np.zeros((4, 32, 32), np.uint8)), 'x_train must be (N, H, W, C)'),
    (dict(x_train=np.zeros((64, 32, 32, 3), np.float32)), 'must be uint8'),
    (dict(y_train=np.full((64,), 10)), 'outside [0, 9]'),
    (dict(y_test=np.zeros((5,), np.int64)), 'y_test must have shape (32,)'),
])
def test_malformed_npz_is_named(tmp_path, overrides, needle):
  path = write_synthetic_npz(tmp_path / 'bad.npz', **overrides)
  with pytest.raises(DataError, match='bad.npz') as err:
    data.load_npz(path, 10)
  assert needle in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(DataError, match='not found'):
    data.load_npz(str(tmp_path / 'nope.npz'), 10)
  bad = tmp_path / 'corrupt.npz'
  bad.write_bytes(b'not a zip file')
  with pytest.raises(DataError, match='corrupt.npz'):
    data.load_npz(str(bad), 10)


def test_validation_images_are_held_out_of_every_training_split(synthetic_npz):
  """data.validation_size moves a fixed draw of training images (the same for every seed) to
  ds.x_val; the training split, and any train_subset drawn from it, never holds them."""
  from tests.conftest import smoke_config  # pylint: disable=g-import-not-at-top
  whole = data.load_dataset(smoke_config('natural', synthetic_npz, **{'data.train_subset': 0}))
  n = whole.x_train.shape[0]
  splits = [data.load_dataset(smoke_config('natural', synthetic_npz, seed=seed, **{
      'data.validation_size': 10, 'data.train_subset': subset}))
            for seed, subset in ((0, 0), (1, 0), (0, 40))]
  held = splits[0].validation_indices
  assert held.size == 10 and np.unique(held).size == 10 and held.max() < n
  for ds in splits:
    np.testing.assert_array_equal(ds.validation_indices, held)  # one split for every seed
    np.testing.assert_array_equal(ds.x_val, whole.x_train[held])
    np.testing.assert_array_equal(ds.y_val, whole.y_train[held])
    # No training image is a held-out one (row-wise comparison of the images).
    overlap = {x.tobytes() for x in ds.x_train} & {x.tobytes() for x in ds.x_val}
    assert not overlap, f'{len(overlap)} held-out images in the training split'
    assert ds.provenance['validation_size'] == 10
  kept = np.setdiff1d(np.arange(n), held)
  np.testing.assert_array_equal(splits[0].x_train, whole.x_train[kept])  # order kept
  assert splits[2].x_train.shape[0] == 40
  with pytest.raises(DataError, match='data.validation_size=64: must be at least 1 and less'):
    data.hold_out_validation(whole, n)  # nothing left to train on
