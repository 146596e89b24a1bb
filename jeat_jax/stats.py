"""Confidence intervals for the numbers a comparison of recipes reports.

An accuracy is a proportion over test points, measured on models trained with several seeds;
each seed's model is attacked on its own block of points, and every recipe's model of that seed
on the same block. Three readings of its noise:

- points only, pooled over the seeds: Wilson's score interval for one accuracy
  (`wilson_interval`) and Newcombe's hybrid score interval for a difference of two measured on
  independent points (`newcombe_difference_interval`), both from statsmodels. These ignore the
  spread between training seeds and the pairing of two recipes on the same points: the first
  fair comparison's intervals, kept beside the others.
- seeds and points, paired: `two_level_bootstrap_means`, a two-stage bootstrap (Davison &
  Hinkley 1997, Sec. 3.8): per resample the seeds are drawn with replacement, then within each
  drawn seed its points, and the same draws serve every recipe, so a difference of two recipes
  keeps their pairing on seeds and on points; `percentile_interval` of the differences.
  Resampling both stages counts the within-seed noise once in the spread of the seed means and
  once more in the second stage: slightly conservative, which offsets the first stage's
  optimism with few seeds (the bootstrap variance of a mean of S values is (S - 1) / S of the
  usual estimate).
- seeds only: `seed_t_interval`, Student's t over the per-seed differences (scipy), which
  assumes nothing of the points but has S - 1 degrees of freedom.

Beside the seed-to-seed standard deviation of a difference, `paired_point_standard_error` is
the standard error that sampling the points alone gives.

FID has no closed form: `bootstrap_normal_interval` of resamples of the generated images
(`metrics.fid.bootstrap_fids`, and `metrics.fid.two_level_bootstrap_fids` over seeds and
images).
"""
from typing import Iterator, List, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats import proportion

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> Tuple[float, float]:
  """Wilson's score interval of a proportion successes / trials (statsmodels)."""
  if trials <= 0:
    raise ValueError(f'trials must be positive, got {trials}')
  if not 0 <= successes <= trials:
    raise ValueError(f'successes must be in [0, {trials}], got {successes}')
  low, high = proportion.proportion_confint(successes, trials, alpha=1 - level, method='wilson')
  return max(0.0, float(low)), min(1.0, float(high))


def newcombe_difference_interval(successes1: int, trials1: int, successes2: int, trials2: int,
                                 level: float = 0.95) -> Tuple[float, float]:
  """Interval of p1 - p2 for two independent proportions from their Wilson intervals (Newcombe
  1998, method 10; statsmodels' `confint_proportions_2indep(method='newcomb')`)."""
  low, high = proportion.confint_proportions_2indep(
      successes1, trials1, successes2, trials2, method='newcomb', compare='diff',
      alpha=1 - level)
  return float(low), float(high)


def two_level_draws(group_sizes: Sequence[int], num_resamples: int, seed: int = 0,
                    resample_groups: bool = True) -> Iterator[List[Tuple[int, np.ndarray]]]:
  """The draws of a two-stage bootstrap: per resample, len(group_sizes) groups drawn with
  replacement (every group once without `resample_groups`: the stratified bootstrap of the
  rows alone), and within each drawn group as many rows as it has, drawn with replacement.
  Yields per resample [(group, rows)]; the draws depend on the arguments only, so two calls
  with the same arguments resample two recipes alike."""
  sizes = [int(n) for n in group_sizes]
  if not sizes or min(sizes) < 1:
    raise ValueError(f'need at least one group, each with rows; got sizes {sizes}')
  rng = np.random.default_rng(seed)
  for _ in range(num_resamples):
    groups = rng.integers(0, len(sizes), len(sizes)) if resample_groups else range(len(sizes))
    yield [(int(g), rng.integers(0, sizes[g], sizes[g])) for g in groups]


def two_level_bootstrap_means(groups: Sequence[np.ndarray], num_resamples: int, seed: int = 0
                              ) -> np.ndarray:
  """[num_resamples, K] replicates of the mean over groups of each group's column means.

  groups[s]: [n_s, K] values of group s (a seed) on its rows (test points), K columns measured
  on the same rows (one per recipe); every column is resampled with the same draws
  (`two_level_draws`), so differences of columns are paired on groups and rows. The estimate
  the replicates scatter around is `group_mean(groups)`."""
  groups = [np.asarray(g, np.float64).reshape(len(g), -1) for g in groups]
  out = np.empty((num_resamples, groups[0].shape[1]))
  for b, draw in enumerate(two_level_draws([len(g) for g in groups], num_resamples, seed)):
    out[b] = np.mean([groups[g][rows].mean(axis=0) for g, rows in draw], axis=0)
  return out


def group_mean(groups: Sequence[np.ndarray]) -> np.ndarray:
  """The mean over groups of each group's column means (every seed weighs the same)."""
  return np.mean([np.asarray(g, np.float64).reshape(len(g), -1).mean(axis=0) for g in groups],
                 axis=0)


def percentile_interval(replicates: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
  """The percentile bootstrap interval: the replicates' (1 -/+ level) / 2 quantiles."""
  tail = (1 - level) / 2
  low, high = np.quantile(np.asarray(replicates, np.float64), [tail, 1 - tail])
  return float(low), float(high)


def seed_t_interval(per_seed: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
  """Student's t interval of the mean of per-seed values (scipy's one-sample t test):
  seeds as the only unit of replication."""
  values = np.asarray(per_seed, np.float64)
  if values.size < 2:
    raise ValueError(f'need at least 2 seeds, got {values.size}')
  if np.allclose(values, values[0], rtol=1e-12, atol=0):  # equal up to round-off: no spread
    return float(values.mean()), float(values.mean())
  ci = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(level)
  return float(ci.low), float(ci.high)


def paired_point_standard_error(differences: Sequence[np.ndarray]) -> float:
  """Standard error of the mean over groups of per-row differences from sampling the rows
  alone (the seeds held fixed): sqrt(sum_s var_s / n_s) / S, var_s the sample variance of the
  paired differences (e.g. correct under recipe a minus under b) of group s."""
  d = [np.asarray(x, np.float64) for x in differences]
  return float(np.sqrt(sum(x.var(ddof=1) / x.size for x in d)) / len(d))


def bootstrap_normal_interval(replicates: Sequence[float], estimate: float,
                              z: float = Z_95) -> Tuple[float, float]:
  """The normal bootstrap interval: estimate -/+ z times the replicates' standard deviation
  (Efron & Tibshirani 1993, Sec. 13.2). Centred on the estimate, not on the replicates:
  FID grows as the number of distinct images falls, a resample holds ~63% distinct ones,
  so FID's replicates sit above the estimate (a bias that comparisons at equal sample
  counts share); their spread is the sampling noise."""
  values = np.asarray(replicates, np.float64)
  half = z * float(values.std(ddof=1))
  return estimate - half, estimate + half


def verdict(interval: Tuple[float, float]) -> str:
  """'resolved' where a difference's interval excludes 0, else 'within noise'."""
  low, high = interval
  return 'resolved' if low > 0 or high < 0 else 'within noise'
