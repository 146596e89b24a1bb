"""FID / IS arithmetic, reference-statistics caching and the score_npz plumbing.

No network weights needed: the Inception network is replaced by a cheap fake
feature map where the pipeline is tested (the real network is tested in
test_inception.py).
"""
import json

import numpy as np
import pytest

from jeat_jax.metrics import fid
from jeat_jax.metrics import inception


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / (rank or d) + (0 if rank else 0.1) * np.eye(d)


@pytest.mark.parametrize('method', fid.SQRT_METHODS)
def test_fid_of_a_set_with_itself_is_zero(method):
  feats = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
  mu, sigma = fid.activation_statistics(feats)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8


def test_activation_statistics_matches_numpy():
  feats = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = fid.activation_statistics(feats)
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64).T, ddof=1), rtol=1e-12)


@pytest.mark.parametrize('method', fid.SQRT_METHODS)
def test_fid_diagonal_gaussians_closed_form(method):
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
  s1, s2 = rng.uniform(0.1, 4, size=20), rng.uniform(0.1, 4, size=20)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_fid_of_empirical_gaussians_approaches_closed_form():
  rng = np.random.default_rng(3)
  s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
  x1 = rng.normal(size=(200_000, 3)) * np.sqrt(s1)
  x2 = rng.normal(size=(200_000, 3)) * np.sqrt(s2) + 0.5
  want = 3 * 0.25 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = fid.frechet_distance(*fid.activation_statistics(x1), *fid.activation_statistics(x2))
  np.testing.assert_allclose(got, want, atol=0.03)


def test_fid_symmetric_and_methods_agree():
  rng = np.random.default_rng(4)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
  d12 = fid.frechet_distance(mu1, s1, mu2, s2)
  d21 = fid.frechet_distance(mu2, s2, mu1, s1)
  d_eigh = fid.frechet_distance(mu1, s1, mu2, s2, method='eigh')
  assert d12 > 0
  np.testing.assert_allclose(d12, d21, rtol=1e-9)
  np.testing.assert_allclose(d12, d_eigh, rtol=1e-9)


def test_fid_singular_covariances_stay_finite():
  """Fewer samples than dimensions: rank-deficient covariances (the case the
  pytorch-fid eps fallback and imaginary-part discarding exist for)."""
  rng = np.random.default_rng(5)
  x1, x2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.1
  stats1, stats2 = fid.activation_statistics(x1), fid.activation_statistics(x2)
  d = fid.frechet_distance(*stats1, *stats2)
  d_eigh = fid.frechet_distance(*stats1, *stats2, method='eigh')
  assert np.isfinite(d) and d > 0
  np.testing.assert_allclose(d, d_eigh, rtol=1e-4)


def test_fid_rejects_bad_input():
  with pytest.raises(ValueError):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method='svd')


def test_inception_score_uniform_is_one():
  mean, std = fid.inception_score(np.zeros((100, 1008)), splits=10)
  np.testing.assert_allclose(mean, 1.0, atol=1e-12)
  assert std < 1e-12


@pytest.mark.parametrize('splits', [1, 10])
def test_inception_score_confident_distinct_is_num_classes(splits):
  num_classes = 10
  labels = np.arange(200) % num_classes  # every split holds every class equally
  logits = 60.0 * np.eye(num_classes)[labels]
  mean, std = fid.inception_score(logits, splits=splits)
  np.testing.assert_allclose(mean, num_classes, rtol=1e-6)
  assert std < 1e-6


def test_inception_score_single_class_is_one():
  logits = 60.0 * np.eye(10)[np.zeros(50, int)]
  np.testing.assert_allclose(fid.inception_score(logits, splits=5)[0], 1.0, rtol=1e-9)


def test_cached_statistics_hits_cache(tmp_path):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
  calls = []

  def features(x):
    calls.append(len(x))
    return x.reshape(len(x), -1)[:, :5].astype(np.float64)

  first = fid.cached_statistics(images, features, tmp_path, tag='w1')
  second = fid.cached_statistics(images, features, tmp_path, tag='w1')
  assert len(calls) == 1
  np.testing.assert_array_equal(first[1], second[1])
  fid.cached_statistics(images, features, tmp_path, tag='w2')
  fid.cached_statistics(images[:-1], features, tmp_path, tag='w1')
  assert len(calls) == 3
  assert len(list((tmp_path / 'fid_stats').glob('*.npz'))) == 3


def test_load_images_subset_is_seeded(tmp_path):
  x = np.arange(40 * 2 * 2 * 3, dtype=np.uint8).reshape(40, 2, 2, 3)
  np.savez(tmp_path / 'd.npz', x_train=x, y_train=np.zeros(40))
  a = fid.load_images(tmp_path / 'd.npz', max_images=10, seed=3)
  b = fid.load_images(tmp_path / 'd.npz', 'x_train', max_images=10, seed=3)
  assert a.shape == (10, 2, 2, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, fid.load_images(tmp_path / 'd.npz', max_images=10, seed=4))


def _fake_network(monkeypatch, with_head):
  """Replaces weight loading and the network by a small deterministic map."""
  proj = np.random.default_rng(7).normal(size=(4 * 4 * 3, 8))
  fake_vars = {'params': {'w': np.ones(3, np.float32)}}
  if with_head:
    fake_vars['params']['fc'] = {'kernel': np.ones((8, 5), np.float32)}

  def compute_activations(images, variables, include_logits=None, **kwargs):
    del kwargs
    x = np.asarray(images, np.float64)[:, ::8, ::8, :].reshape(len(images), -1) / 255
    out = {'pool3': (x @ proj).astype(np.float32)}
    if (include_logits is None and 'fc' in variables['params']) or include_logits:
      out['logits'] = out['logits_unbiased'] = out['pool3'][:, :5] * 3
    return out

  monkeypatch.setattr(inception, 'load_inception_variables', lambda w, c=None: fake_vars)
  monkeypatch.setattr(inception, 'compute_activations', compute_activations)


@pytest.mark.parametrize('with_head', [False, True])
def test_score_npz_plumbing(tmp_path, monkeypatch, with_head):
  _fake_network(monkeypatch, with_head)
  rng = np.random.default_rng(8)
  data = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
  np.savez(tmp_path / 'ref.npz', x_train=data, y_train=np.zeros(300))
  np.savez(tmp_path / 'same.npz', x=data[:100], y=np.zeros(100))
  np.savez(tmp_path / 'shifted.npz', x=np.clip(data[100:200] * 0.5, 0, 255).astype(np.uint8))
  kw = dict(cache_dir=tmp_path / 'cache', max_reference=100, seed=0)
  same = fid.score_npz(tmp_path / 'same.npz', tmp_path / 'ref.npz', **kw)
  other = fid.score_npz(tmp_path / 'shifted.npz', tmp_path / 'ref.npz', **kw)
  assert set(same) == ({'fid', 'inception_score', 'inception_score_std'} if with_head
                       else {'fid'})
  assert 0 < same['fid'] < other['fid']
  assert len(list((tmp_path / 'cache' / 'fid_stats').glob('*.npz'))) == 1
  # Reference given as precomputed statistics (pytorch-fid/TTUR stats file).
  mu, sigma = fid.activation_statistics(
      inception.compute_activations(data[:100], {'params': {}})['pool3'])
  np.savez(tmp_path / 'stats.npz', mu=mu, sigma=sigma)
  assert abs(fid.score_npz(tmp_path / 'same.npz', tmp_path / 'stats.npz')['fid']) < 1e-6


def test_cli_prints_json(tmp_path, monkeypatch, capsys):
  _fake_network(monkeypatch, with_head=True)
  data = np.random.default_rng(9).integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
  np.savez(tmp_path / 'ref.npz', x_train=data)
  np.savez(tmp_path / 'samples.npz', x=data[:30], y=np.zeros(30))
  fid.main(['--samples', str(tmp_path / 'samples.npz'), '--reference',
            str(tmp_path / 'ref.npz'), '--reference-key', 'x_train', '--cache-dir',
            str(tmp_path / 'cache'), '--splits', '3'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(out) == {'fid', 'inception_score', 'inception_score_std'}
  assert np.isfinite(out['fid'])
