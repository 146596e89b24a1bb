"""SSIM against scikit-image and the nearest-neighbour search of Fig. 7."""
import jax.numpy as jnp
import numpy as np
import pytest

from jeat_jax.metrics import ssim as ssim_lib


def _pair(seed, noise):
  rng = np.random.default_rng(seed)
  a = rng.random((32, 32, 3)).astype(np.float32)
  b = np.clip(a + noise * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  return a, b


@pytest.mark.parametrize('noise', [0.02, 0.2, 1.0])
def test_ssim_matches_scikit_image(noise):
  metrics = pytest.importorskip('skimage.metrics', reason='scikit-image (test-only) not installed')
  a, b = _pair(0, noise)
  ref = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                      use_sample_covariance=False, channel_axis=-1)
  np.testing.assert_allclose(float(ssim_lib.ssim(jnp.asarray(a), jnp.asarray(b))), ref, atol=1e-5)


def test_ssim_identity_symmetry_and_batching():
  a, b = _pair(1, 0.3)
  assert float(ssim_lib.ssim(jnp.asarray(a), jnp.asarray(a))) == pytest.approx(1.0, abs=1e-5)
  ab = float(ssim_lib.ssim(jnp.asarray(a), jnp.asarray(b)))
  assert ab == pytest.approx(float(ssim_lib.ssim(jnp.asarray(b), jnp.asarray(a))), abs=1e-6)
  assert ab < 0.9
  batched = ssim_lib.ssim(jnp.asarray(a)[None], jnp.stack([jnp.asarray(a), jnp.asarray(b)]))
  np.testing.assert_allclose(np.asarray(batched), [1.0, ab], atol=1e-5)


def test_nearest_by_ssim_finds_the_copies_across_chunks():
  rng = np.random.default_rng(2)
  pool = (rng.random((50, 32, 32, 3)) * 255).astype(np.uint8)
  queries = pool[[3, 47]].copy()
  queries[1] = np.clip(queries[1].astype(int) + 3, 0, 255)  # a near copy of image 47
  idx, val = ssim_lib.nearest_by_ssim(queries, pool, k=4, chunk=16)  # 4 chunks, the last padded
  assert idx.shape == val.shape == (2, 4)
  assert idx[0, 0] == 3 and val[0, 0] == pytest.approx(1.0, abs=1e-5)
  assert idx[1, 0] == 47 and 0.9 < val[1, 0] < 1.0
  assert np.all(np.diff(val, axis=1) <= 0) and idx.max() < 50
  # the same as an exhaustive search
  full = np.asarray(ssim_lib._ssim_to_pool(jnp.asarray(queries / 255.0, jnp.float32),  # pylint: disable=protected-access
                                           jnp.asarray(pool / 255.0, jnp.float32)))
  np.testing.assert_array_equal(idx, np.argsort(-full, axis=1, kind='stable')[:, :4])


def test_plot_neighbours_writes_png(tmp_path):
  from PIL import Image
  pool = (np.random.default_rng(3).random((6, 32, 32, 3)) * 255).astype(np.uint8)
  path = ssim_lib.plot_neighbours(str(tmp_path / 'n.png'), pool[:2], pool,
                                  np.array([[0, 1], [2, 3]]), np.array([[1.0, 0.5], [0.9, 0.1]]))
  assert Image.open(path).format == 'PNG'
