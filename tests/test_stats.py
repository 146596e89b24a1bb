"""jeat_jax/stats.py (and the FID bootstraps of metrics/fid.py) against scipy, published
examples and hand computations."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from jeat_jax import stats
from jeat_jax.metrics import fid


@pytest.mark.parametrize('k,n', [(50, 100), (0, 10), (10, 10), (103, 1000), (1, 7)])
def test_wilson_interval_matches_scipy(k, n):
  expected = scipy_stats.binomtest(k, n).proportion_ci(method='wilson')
  np.testing.assert_allclose(stats.wilson_interval(k, n), (expected.low, expected.high), atol=1e-12)


def test_wilson_interval_by_hand():
  # 50 / 100: centre (0.5 + z^2/200) / (1 + z^2/100) = 0.5, half-width z sqrt(.0025 + z^2/40000) / (1 + z^2/100)
  z = stats.Z_95
  half = z * np.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
  np.testing.assert_allclose(stats.wilson_interval(50, 100), (0.5 - half, 0.5 + half), atol=1e-12)
  with pytest.raises(ValueError, match='successes'):
    stats.wilson_interval(11, 10)


def test_newcombe_difference_interval_matches_the_published_example():
  # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80, method 10.
  low, high = stats.newcombe_difference_interval(56, 70, 48, 80)
  assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_bootstrap_normal_interval_is_centred_on_the_estimate():
  replicates = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # sample standard deviation sqrt(2.5)
  low, high = stats.bootstrap_normal_interval(replicates, estimate=100.0)
  half = stats.Z_95 * np.sqrt(2.5)
  assert (low, high) == pytest.approx((100 - half, 100 + half))
  assert stats.verdict((0.1, 2.0)) == 'resolved' and stats.verdict((-3, -0.5)) == 'resolved'
  assert stats.verdict((-0.1, 2.0)) == 'within noise'


def test_two_level_draws_resample_seeds_then_rows_within_each():
  sizes = (4, 6, 5)
  draws = list(stats.two_level_draws(sizes, 200, seed=3))
  assert all(len(d) == 3 for d in draws)
  for d in draws:
    for g, rows in d:
      assert rows.size == sizes[g] and rows.min() >= 0 and rows.max() < sizes[g]
  seen = [tuple(sorted(g for g, _ in d)) for d in draws]
  assert (0, 0, 0) in seen and (0, 1, 2) in seen  # groups with replacement
  again = list(stats.two_level_draws(sizes, 200, seed=3))
  assert all(np.array_equal(r1, r2) for d1, d2 in zip(draws, again)
             for (_, r1), (_, r2) in zip(d1, d2))
  fixed = list(stats.two_level_draws(sizes, 50, seed=3, resample_groups=False))
  assert all([g for g, _ in d] == [0, 1, 2] for d in fixed)


def test_two_level_bootstrap_means_are_the_means_of_the_drawn_rows():
  rng = np.random.default_rng(0)
  groups = [rng.normal(size=(n, 2)) for n in (5, 7, 6)]
  replicates = stats.two_level_bootstrap_means(groups, 30, seed=11)
  for b, d in enumerate(stats.two_level_draws((5, 7, 6), 30, seed=11)):
    expected = np.mean([groups[g][rows].mean(0) for g, rows in d], axis=0)
    np.testing.assert_allclose(replicates[b], expected)
  np.testing.assert_allclose(stats.group_mean(groups),
                             np.mean([g.mean(0) for g in groups], axis=0))


def test_paired_columns_are_resampled_alike():
  # Two recipes equal on every point: every replicate of their difference is 0. Resampled
  # independently (other draws per column) the differences would scatter.
  rng = np.random.default_rng(1)
  correct = [rng.random(50) < p for p in (0.3, 0.5, 0.4)]
  groups = [np.stack([c, c, ~c], axis=1) for c in correct]
  replicates = stats.two_level_bootstrap_means(groups, 200)
  assert np.all(replicates[:, 0] == replicates[:, 1])
  np.testing.assert_allclose(replicates[:, 0] + replicates[:, 2], 1.0)


def test_two_level_bootstrap_variance_has_both_levels():
  # Seeds that differ and points that do not: the replicates' variance is the bootstrap
  # variance of a mean of three values, var_0 / 3 with var_0 the population variance.
  groups = [np.full((40, 1), v) for v in (0.0, 1.0, 0.5)]
  reps = stats.two_level_bootstrap_means(groups, 20000, seed=0)[:, 0]
  assert reps.var() == pytest.approx(np.var([0.0, 1.0, 0.5]) / 3, rel=0.05)
  # One seed: the usual bootstrap of a mean, var_0 / n.
  values = np.random.default_rng(2).normal(size=(60, 1))
  reps = stats.two_level_bootstrap_means([values], 20000, seed=0)[:, 0]
  assert reps.var() == pytest.approx(values.var() / 60, rel=0.05)


def test_percentile_and_t_intervals():
  assert stats.percentile_interval(np.arange(1001.0)) == pytest.approx((25.0, 975.0))
  per_seed = [0.02, 0.05, 0.03]
  half = scipy_stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3)
  assert stats.seed_t_interval(per_seed) == pytest.approx(
      (np.mean(per_seed) - half, np.mean(per_seed) + half))
  assert stats.seed_t_interval([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1))


def test_paired_point_standard_error_by_hand():
  d = [np.array([1.0, 0.0, 0.0, -1.0]), np.array([0.0, 1.0, 1.0])]
  # var (ddof 1): 2/3 and 1/3; sqrt(2/3/4 + 1/3/3) / 2
  expected = np.sqrt(2 / 3 / 4 + 1 / 3 / 3) / 2
  assert stats.paired_point_standard_error(d) == pytest.approx(expected)


@pytest.mark.parametrize('n', [12, 60])  # fewer and more samples than feature dimensions
def test_fid_from_features_equals_the_frechet_distance(n):
  rng = np.random.default_rng(n)
  d = 24
  ref = rng.normal(size=(200, d)) @ rng.normal(size=(d, d))
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
  mu_ref, sigma_ref = fid.activation_statistics(ref)
  expected = fid.frechet_distance(*fid.activation_statistics(x), mu_ref, sigma_ref)
  assert fid.fid_from_features(x, mu_ref, sigma_ref) == pytest.approx(expected, rel=1e-7)


def test_bootstrap_fids_are_the_fids_of_resampled_rows():
  rng = np.random.default_rng(0)
  x, ref = rng.normal(size=(30, 8)), rng.normal(size=(100, 8)) + 0.2
  mu_ref, sigma_ref = fid.activation_statistics(ref)
  replicates, estimate = fid.bootstrap_fids(x, mu_ref, sigma_ref, 3, seed=5)
  draw = np.random.default_rng(5)
  for r in replicates:
    rows = draw.integers(0, 30, 30)
    assert r == pytest.approx(   # rel 1e-6: the two routes differed by 1.3e-7 on an AMD EPYC
        fid.frechet_distance(*fid.activation_statistics(x[rows]), mu_ref, sigma_ref), rel=1e-6)
  assert estimate == pytest.approx(fid.fid_from_features(x, mu_ref, sigma_ref))


@pytest.mark.parametrize('resample_seeds', [True, False])
def test_two_level_bootstrap_fids_pool_the_drawn_images_of_the_drawn_seeds(resample_seeds):
  rng = np.random.default_rng(4)
  per_seed = [rng.normal(size=(20, 6)) + s for s in range(3)]
  mu_ref, sigma_ref = fid.activation_statistics(rng.normal(size=(100, 6)))
  replicates, estimate = fid.two_level_bootstrap_fids(per_seed, mu_ref, sigma_ref, 4, seed=7,
                                                      resample_seeds=resample_seeds)
  draws = stats.two_level_draws([20, 20, 20], 4, seed=7, resample_groups=resample_seeds)
  for r, d in zip(replicates, draws):
    pooled = np.concatenate([per_seed[g][rows] for g, rows in d])
    assert r == pytest.approx(
        fid.frechet_distance(*fid.activation_statistics(pooled), mu_ref, sigma_ref), rel=1e-6)
  assert estimate == pytest.approx(
      fid.fid_from_features(np.concatenate(per_seed), mu_ref, sigma_ref))
