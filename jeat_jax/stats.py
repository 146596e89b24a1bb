"""Confidence intervals for the numbers a comparison reports.

Accuracies are binomial proportions over test points: `wilson_interval` (Wilson's score
interval) for one, `newcombe_difference_interval` (Newcombe's hybrid score interval, his
method 10) for the difference of two measured on independent points. FID has no closed
form: `bootstrap_normal_interval` of resamples of the generated images
(`metrics.fid.bootstrap_fids`).
"""
import math
from typing import Sequence, Tuple

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> Tuple[float, float]:
  """Wilson's score interval of a proportion successes / trials (95% at the default z)."""
  if trials <= 0:
    raise ValueError(f'trials must be positive, got {trials}')
  if not 0 <= successes <= trials:
    raise ValueError(f'successes must be in [0, {trials}], got {successes}')
  p = successes / trials
  denominator = 1 + z * z / trials
  centre = (p + z * z / (2 * trials)) / denominator
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
  return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference_interval(successes1: int, trials1: int, successes2: int, trials2: int,
                                 z: float = Z_95) -> Tuple[float, float]:
  """Interval of p1 - p2 for two independent proportions, from their Wilson intervals
  (Newcombe 1998, method 10): p1 - p2 -/+ sqrt of the squared distances to the bounds."""
  p1, p2 = successes1 / trials1, successes2 / trials2
  l1, u1 = wilson_interval(successes1, trials1, z)
  l2, u2 = wilson_interval(successes2, trials2, z)
  d = p1 - p2
  return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
          d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


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
