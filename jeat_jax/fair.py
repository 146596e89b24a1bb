"""The fair comparison of `python -m jeat_jax.reproduce --scale=cpu-fair`: its report.

Every recipe of `RECIPES` trains with the same epochs, model size, training images and
augmentation, on each seed of `SEEDS`, and is evaluated the same way. Seed s is attacked on
test points [s * POINTS_PER_SEED, (s + 1) * POINTS_PER_SEED): together the seeds of every
recipe cover the same 1000 test points, each attacked once, so a recipe's accuracy is a
proportion over 1000 points with a Wilson interval, and two recipes' difference has
Newcombe's interval. Each seed generates `SAMPLES_PER_SEED` images; a recipe's FID is that
of its seeds' pooled 1000 images against one reference, with a bootstrap interval over the
images. A claim is "resolved" where the interval of the difference excludes 0, else
"within noise" (95% per claim, not corrected for the number of claims).
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jeat_jax import files, stats
from jeat_jax.metrics import fid as fid_lib

RECIPES = ('at', 'trades', 'prejeat', 'jeat', 'weat', 'weat_unweighted', 'ebjdat')
# Entries that are not a config of their own: (config, overrides). `weat_unweighted` is WEAT
# with its weights off, every other setting WEAT's: weat against it measures the weighting alone
# (trades differs from weat also in weight decay and sampler).
VARIANTS = {'weat_unweighted': ('weat', {'loss.example_weights': 'uniform'})}
# The order the runs start in, seed after seed (each finished seed is a complete comparison),
# within a seed the longest trainings first.
START_ORDER = ('ebjdat', 'weat', 'weat_unweighted', 'trades', 'jeat', 'at', 'prejeat')
SEEDS = (0, 1, 2)
EPOCHS = 1
TRAIN_IMAGES = 10000  # a fixed random subset per seed (data.train_subset)
POINTS_PER_SEED = 500
SAMPLES_PER_SEED = 500
BOOTSTRAP_RESAMPLES = 100  # the normal interval needs their standard deviation only (~7% error)
# On top of each recipe's `:cpu` config (WRN-10-1, its own optimizer, batch and attack
# settings): the same training length and images for all, and the same evaluation.
TRAINING = {'num_epochs': EPOCHS, 'num_train_steps': -1, 'data.train_subset': TRAIN_IMAGES,
            'data.augment': True,
            # the same training images for all: no checkpoint chosen on held-out images
            'robust_watch.enabled': False, 'data.validation_size': 0}
EVALUATION = {'eval.attacks': 'pgd20,autoattack', 'eval.num_examples': POINTS_PER_SEED,
              'eval.autoattack_num_examples': 0, 'eval.autoattack_version': 'standard',
              'eval.eps': 8 / 255, 'eval.audit_num_examples': 100,
              'sample.num_samples': SAMPLES_PER_SEED, 'sample.neighbours': 0,
              'fid.max_reference': 2000, 'dynamics_every_steps': 0}
METRICS = ('clean', 'pgd20', 'autoattack')  # accuracies; and 'fid'
METRIC_NAMES = {'clean': 'clean accuracy', 'pgd20': 'PGD-20 robust accuracy',
                'autoattack': 'AutoAttack robust accuracy', 'fid': 'FID'}


@dataclasses.dataclass(frozen=True)
class Claim:
  source: str
  metric: str  # clean | pgd20 | autoattack (higher is better) | fid (lower is better)
  better: str  # the recipe claimed better
  worse: str


CLAIMS = (
    Claim('JEAT paper, Table 2', 'autoattack', 'jeat', 'trades'),
    Claim('JEAT paper, Table 2', 'clean', 'jeat', 'trades'),
    Claim('JEAT paper, Sec. 4 (JEAT improves on PGD-AT)', 'autoattack', 'jeat', 'at'),
    Claim('JEAT paper, Sec. 4 (JEAT improves on PreJEAT)', 'autoattack', 'jeat', 'prejeat'),
    Claim('JEAT paper, Fig. 6', 'fid', 'jeat', 'at'),
    Claim('JEAT paper, Fig. 6', 'fid', 'jeat', 'prejeat'),
    Claim('WEAT (ECCV 2024): weighting TRADES', 'autoattack', 'weat', 'trades'),
    Claim('WEAT (ECCV 2024), ablation: the weights alone', 'autoattack', 'weat',
          'weat_unweighted'),
    Claim('WEAT (ECCV 2024), ablation: the weights alone', 'clean', 'weat', 'weat_unweighted'),
    Claim('WEAT (ECCV 2024): better generation than JEAT', 'fid', 'weat', 'jeat'),
    Claim('EB-JDAT (CVPR 2026): more robust than JEAT', 'autoattack', 'ebjdat', 'jeat'),
    Claim('EB-JDAT (CVPR 2026): more robust than WEAT', 'autoattack', 'ebjdat', 'weat'),
    Claim('EB-JDAT (CVPR 2026): better generation than JEAT', 'fid', 'ebjdat', 'jeat'),
)


def run_name(recipe: str, seed: int) -> str:
  return f'{recipe}_seed{seed}'


def config_name(recipe: str) -> str:
  """The configs/<name>.py an entry of RECIPES trains with."""
  return VARIANTS[recipe][0] if recipe in VARIANTS else recipe


def run_overrides(recipe: str, seed: int) -> Dict[str, object]:
  """A variant's settings, and what differs between the seeds of a recipe: the seed
  (initialisation, data order, training subset), the test points attacked and the chains'
  randomness."""
  return {**(VARIANTS[recipe][1] if recipe in VARIANTS else {}),
          'seed': seed, 'eval.first_example': seed * POINTS_PER_SEED, 'sample.seed': seed}


def seed_counts(robustness: dict) -> Dict[str, Tuple[int, int]]:
  """{metric: (correct, points)} of one run's eval/robustness.json."""
  n = robustness['num_examples']
  out = {'clean': (round(robustness['clean_accuracy'] * n), n)}
  for a in robustness['attacks']:
    out[a['name']] = (round(a['robust_accuracy'] * a['num_examples']), a['num_examples'])
  return out


@dataclasses.dataclass
class RecipeResult:
  recipe: str
  seeds: Dict[int, Dict[str, Tuple[int, int]]]  # per seed: {metric: (correct, points)}
  seed_fids: Dict[int, float]  # per seed, its own samples (fid.json)
  fid: Optional[float] = None  # the seeds' pooled samples
  fid_replicates: Optional[np.ndarray] = None

  def counts(self, metric: str) -> Optional[Tuple[int, int]]:
    """(correct, points) over the seeds; None unless every seed has the metric."""
    per_seed = [c.get(metric) for c in self.seeds.values()]
    if not per_seed or any(c is None for c in per_seed):
      return None
    return sum(k for k, _ in per_seed), sum(n for _, n in per_seed)

  def accuracy(self, metric: str) -> Optional[float]:
    c = self.counts(metric)
    return None if c is None else c[0] / c[1]


def pooled_fid(features: Sequence[np.ndarray], mu_ref, sigma_ref, seed: int = 0
               ) -> Tuple[float, np.ndarray]:
  """(FID of the concatenated features, FIDs of BOOTSTRAP_RESAMPLES bootstrap resamples)."""
  replicates, estimate = fid_lib.bootstrap_fids(np.concatenate(features), mu_ref, sigma_ref,
                                                BOOTSTRAP_RESAMPLES, seed)
  return estimate, replicates


def difference(a: RecipeResult, b: RecipeResult, metric: str
               ) -> Optional[Tuple[float, Tuple[float, float]]]:
  """(a - b, its 95% interval) of a metric: Newcombe for accuracies, the normal bootstrap of
  the paired replicate differences for FID (the two resamplings are independent)."""
  if metric == 'fid':
    if a.fid is None or b.fid is None:
      return None
    d = a.fid - b.fid
    return d, stats.bootstrap_normal_interval(a.fid_replicates - b.fid_replicates, d)
  ca, cb = a.counts(metric), b.counts(metric)
  if ca is None or cb is None:
    return None
  return ca[0] / ca[1] - cb[0] / cb[1], stats.newcombe_difference_interval(*ca, *cb)


def claim_line(claim: Claim, results: Dict[str, RecipeResult]) -> str:
  """'- source: better above worse in metric: resolved, ... / within noise (numbers)'."""
  lower_is_better = claim.metric == 'fid'
  relation = 'lower' if lower_is_better else 'higher'
  text = (f'{claim.source}: {claim.better} {relation} than {claim.worse} in '
          f'{METRIC_NAMES[claim.metric]}')
  a, b = results.get(claim.better), results.get(claim.worse)
  diff = difference(a, b, claim.metric) if a and b else None
  if diff is None:
    return f'- {text}: not measured.'
  d, interval = diff
  verdict = stats.verdict(interval)
  if verdict == 'resolved':
    holds = (d < 0) if lower_is_better else (d > 0)
    verdict = f'**resolved, {"holds" if holds else "contradicted"}**'
  else:
    verdict = '**within noise**'
  unit = (lambda v: f'{v:+.1f}') if lower_is_better else (lambda v: f'{100 * v:+.1f} points')
  return (f'- {text}: {verdict} (difference {claim.better} - {claim.worse} {unit(d)}, 95% '
          f'interval [{unit(interval[0])}, {unit(interval[1])}]).')


def _interval_cell(counts: Optional[Tuple[int, int]]) -> str:
  if counts is None:
    return '-'
  low, high = stats.wilson_interval(*counts)
  return f'{100 * counts[0] / counts[1]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]'


def _seed_cell(result: RecipeResult, metric: str) -> str:
  cells = []
  for seed in sorted(result.seeds):
    c = result.seeds[seed].get(metric)
    cells.append('-' if c is None else f'{100 * c[0] / c[1]:.1f}')
  return ' / '.join(cells)


def comparison_table(results: Dict[str, RecipeResult]) -> str:
  """Per recipe: each accuracy over the pooled points with its Wilson interval, the seeds'
  own values, and the pooled FID with its bootstrap interval."""
  lines = ['| recipe | clean | PGD-20 | AutoAttack | AA per seed | FID (pooled) | FID per seed |',
           '|---|---|---|---|---|---|---|']
  for name, r in results.items():
    if r.fid is not None:
      low, high = stats.bootstrap_normal_interval(r.fid_replicates, r.fid)
      fid_cell = f'{r.fid:.1f} [{low:.1f}, {high:.1f}]'
    else:
      fid_cell = '-'
    seed_fids = ' / '.join(f'{r.seed_fids[s]:.1f}' if s in r.seed_fids else '-'
                           for s in sorted(r.seeds))
    lines.append(f'| {name} | {_interval_cell(r.counts("clean"))} | '
                 f'{_interval_cell(r.counts("pgd20"))} | {_interval_cell(r.counts("autoattack"))} '
                 f'| {_seed_cell(r, "autoattack")} | {fid_cell} | {seed_fids} |')
  return '\n'.join(lines)


def claim_lines(results: Dict[str, RecipeResult]) -> List[str]:
  return [claim_line(c, results) for c in CLAIMS]


def feature_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'samples', 'pool3.npz')


def plot_comparison(path: str, results: Dict[str, RecipeResult]) -> Optional[str]:
  """AutoAttack robust accuracy against pooled FID per recipe, each with its 95% interval."""
  points = [(n, r) for n, r in results.items()
            if r.counts('autoattack') is not None and r.fid is not None]
  if not points:
    return None
  plt = files.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name, r in points:
    k, n = r.counts('autoattack')
    acc_low, acc_high = stats.wilson_interval(k, n)
    fid_low, fid_high = stats.bootstrap_normal_interval(r.fid_replicates, r.fid)
    # max(0, .): Wilson's bound at 0 or n sits on the estimate up to rounding
    ax.errorbar(r.fid, 100 * k / n, xerr=[[r.fid - fid_low], [fid_high - r.fid]],
                yerr=[[max(0.0, 100 * (k / n - acc_low))], [max(0.0, 100 * (acc_high - k / n))]],
                fmt='o', capsize=3, label=name)
  ax.set_xlabel(f'FID of {SAMPLES_PER_SEED * len(SEEDS)} samples (lower is better)')
  ax.set_ylabel('AutoAttack robust accuracy, % (8/255)')
  ax.set_title('Fair comparison: pooled over seeds, 95% intervals')
  ax.legend()
  return files.save_figure(fig, path)
