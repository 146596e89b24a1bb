"""WORKDIR/REPORT.md of `--scale=cpu-fair` (its protocol: fair.py).

What every run wrote is read per test point and per sample: whether each point is classified
correctly, clean and after each attack (`eval/robust_points.npz`), and the pool3 features of
its samples. A difference of two recipes is measured on the seeds both have, every recipe's
model of seed s attacked on the same points, and gets three 95% intervals (jeat_jax.stats):

- paired over seeds and points, the verdict's: the two-level bootstrap (seeds with
  replacement, then points within each drawn seed; the same draws for both recipes). For an
  accuracy its percentile interval; for FID, whose resamples sit above the estimate (repeated
  images), the normal interval of the replicates' differences.
- Student's t over the per-seed differences: the seeds as the only unit of replication.
- pooled over the points as if independent, the first fair comparison's (Newcombe for
  accuracies; for FID the images resampled within each seed, the seeds fixed).

Beside them the seed-to-seed standard deviation of the per-seed differences and the standard
error of the difference from sampling the points (or images) alone.
"""
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from jeat_jax import files, generation, hardware, stats
from jeat_jax.files import write_text_atomic
from jeat_jax.metrics import fid as fid_lib
from jeat_jax.reproduce import fair
from jeat_jax.reproduce.results import (collect, copy_figure, data_line, generation_metric,
                                       timing_table)
from jeat_jax.reproduce.runs import FAIR_RUNS, RUNS_BY_NAME, make_config

ACCURACY_RESAMPLES = 10000  # two-level replicates of an accuracy (percentile interval)
# FID's (an eigendecomposition each): its normal interval needs their standard deviation only
# (~7% error at 100)
FID_RESAMPLES = 100
BOOTSTRAP_SEED = 0  # one seed: every difference sees the same draws


@dataclasses.dataclass
class RecipeResult:
  """One recipe's runs: per seed the per-point correctness of each accuracy metric (clean and
  under each attack), its first test point, its FID (fid.json) and its samples' features."""
  recipe: str
  correct: Dict[int, Dict[str, np.ndarray]]
  first_example: Dict[int, int]
  seed_fids: Dict[int, float] = dataclasses.field(default_factory=dict)
  features: Dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

  def seeds_with(self, metric: str) -> List[int]:
    if metric == 'fid':
      return sorted(self.features)
    return sorted(s for s, c in self.correct.items() if metric in c)

  def per_seed(self, metric: str) -> Dict[int, float]:
    """Accuracy per seed (FID per seed: each seed's own samples, fid.json)."""
    if metric == 'fid':
      return dict(sorted(self.seed_fids.items()))
    return {s: float(np.mean(self.correct[s][metric])) for s in self.seeds_with(metric)}

  def counts(self, metric: str, seeds: Sequence[int]) -> Tuple[int, int]:
    """(correct, points) of an accuracy pooled over `seeds`."""
    return (int(sum(self.correct[s][metric].sum() for s in seeds)),
            int(sum(self.correct[s][metric].size for s in seeds)))


@dataclasses.dataclass(frozen=True)
class Difference:
  """better - worse of one metric (accuracies as fractions) on `seeds`, with its intervals."""
  estimate: float
  seeds: Tuple[int, ...]
  per_seed: Dict[int, float]
  paired: Tuple[float, float]  # two-level, seeds and points: the verdict's
  seed_t: Optional[Tuple[float, float]]  # t over the seeds (None with one seed)
  pooled: Tuple[float, float]  # points only, unpaired: the first report's
  seed_sd: Optional[float]  # of the per-seed differences (None with one seed)
  point_se: float  # from sampling the points (images) alone


class Comparison:
  """The recipes' results and the statistics of their differences. FID's bootstrap replicates
  (an Inception-feature eigendecomposition each) are computed once per recipe and seed set."""

  def __init__(self, results: Dict[str, RecipeResult], fid_reference=None,
               fid_resamples: int = FID_RESAMPLES):
    self.results = results
    self.fid_reference = fid_reference
    self.fid_resamples = fid_resamples
    self._fid_replicates = {}
    self._fid_root = None
    self._accuracy_intervals = {}

  def _common_seeds(self, a: str, b: str, metric: str) -> Tuple[int, ...]:
    ra, rb = self.results.get(a), self.results.get(b)
    if ra is None or rb is None:
      return ()
    seeds = tuple(sorted(set(ra.seeds_with(metric)) & set(rb.seeds_with(metric))))
    if metric != 'fid':
      for s in seeds:
        if (ra.first_example[s], ra.correct[s][metric].size) != (
            rb.first_example[s], rb.correct[s][metric].size):
          raise ValueError(
              f'{fair.run_name(a, s)} and {fair.run_name(b, s)} were not measured on the same '
              f'test points ({metric}: first {ra.first_example[s]} and {rb.first_example[s]}, '
              f'{ra.correct[s][metric].size} and {rb.correct[s][metric].size} points)')
    return seeds

  def fid_replicates(self, recipe: str, seeds: Tuple[int, ...], resample_seeds: bool
                     ) -> Tuple[np.ndarray, float]:
    """(two-level or seeds-fixed bootstrap FIDs, the pooled FID) of a recipe's seeds."""
    key = (recipe, seeds, resample_seeds)
    if key not in self._fid_replicates:
      if self._fid_root is None:
        self._fid_root = fid_lib.reference_root(self.fid_reference[1])
      features = [self.results[recipe].features[s] for s in seeds]
      self._fid_replicates[key] = fid_lib.two_level_bootstrap_fids(
          features, *self.fid_reference, self.fid_resamples, BOOTSTRAP_SEED, resample_seeds,
          self._fid_root)
    return self._fid_replicates[key]

  def accuracy_interval(self, recipe: str, metric: str
                        ) -> Optional[Tuple[float, Tuple[float, float]]]:
    """(mean over seeds, its two-level percentile interval) of one recipe's accuracy (the
    table and the plot both ask: computed once)."""
    r = self.results.get(recipe)
    seeds = r.seeds_with(metric) if r else []
    if not seeds:
      return None
    if (recipe, metric) not in self._accuracy_intervals:
      groups = [r.correct[s][metric][:, None] for s in seeds]
      replicates = stats.two_level_bootstrap_means(groups, ACCURACY_RESAMPLES, BOOTSTRAP_SEED)
      self._accuracy_intervals[recipe, metric] = (
          float(stats.group_mean(groups)[0]), stats.percentile_interval(replicates[:, 0]))
    return self._accuracy_intervals[recipe, metric]

  def fid_interval(self, recipe: str) -> Optional[Tuple[float, Tuple[float, float]]]:
    """(FID of the seeds' pooled samples, its two-level normal interval)."""
    r = self.results.get(recipe)
    if r is None or not r.features or self.fid_reference is None:
      return None
    replicates, estimate = self.fid_replicates(recipe, tuple(sorted(r.features)), True)
    return estimate, stats.bootstrap_normal_interval(replicates, estimate)

  def difference(self, a: str, b: str, metric: str) -> Optional[Difference]:
    """a - b of `metric` on the seeds both measured; None where they share none."""
    seeds = self._common_seeds(a, b, metric)
    if not seeds or (metric == 'fid' and self.fid_reference is None):
      return None
    ra, rb = self.results[a], self.results[b]
    per_a, per_b = ra.per_seed(metric), rb.per_seed(metric)
    per_seed = {s: per_a[s] - per_b[s] for s in seeds if s in per_a and s in per_b}
    if metric == 'fid':
      (two_a, fid_a), (two_b, fid_b) = (self.fid_replicates(r, seeds, True) for r in (a, b))
      fixed_a, fixed_b = (self.fid_replicates(r, seeds, False)[0] for r in (a, b))
      estimate = fid_a - fid_b
      paired = stats.bootstrap_normal_interval(two_a - two_b, estimate)
      pooled = stats.bootstrap_normal_interval(fixed_a - fixed_b, estimate)
      point_se = float(np.std(fixed_a - fixed_b, ddof=1))
    else:
      groups = [np.stack([ra.correct[s][metric], rb.correct[s][metric]], axis=1) for s in seeds]
      replicates = stats.two_level_bootstrap_means(groups, ACCURACY_RESAMPLES, BOOTSTRAP_SEED)
      estimate = float(np.mean([per_seed[s] for s in seeds]))
      paired = stats.percentile_interval(replicates[:, 0] - replicates[:, 1])
      pooled = stats.newcombe_difference_interval(*ra.counts(metric, seeds),
                                                  *rb.counts(metric, seeds))
      point_se = stats.paired_point_standard_error(
          [g[:, 0].astype(float) - g[:, 1] for g in groups])
    several = len(per_seed) > 1
    values = list(per_seed.values())
    return Difference(estimate, seeds, per_seed, paired,
                      stats.seed_t_interval(values) if several else None, pooled,
                      float(np.std(values, ddof=1)) if several else None, point_se)


def judge(claim: fair.Claim, interval: Tuple[float, float], estimate: float) -> str:
  """'resolved, holds' / 'resolved, contradicted' / 'within noise' of a claim better > worse."""
  if stats.verdict(interval) != 'resolved':
    return 'within noise'
  holds = estimate < 0 if claim.metric == 'fid' else estimate > 0
  return f'resolved, {"holds" if holds else "contradicted"}'


def _unit(metric: str):
  """Differences in FID units, accuracies in percentage points."""
  return (lambda v: f'{v:+.1f}') if metric == 'fid' else (lambda v: f'{100 * v:+.1f}')


def _interval(interval, fmt) -> str:
  return '-' if interval is None else f'[{fmt(interval[0])}, {fmt(interval[1])}]'


def claims_table(comparison: Comparison, claims: Sequence[fair.Claim] = fair.CLAIMS) -> str:
  """Per claim: the difference, per seed, the two spreads, the paired two-level interval and
  its verdict, the t interval over seeds, and the first report's pooled interval and verdict."""
  lines = ['| claim | difference | per seed | seed SD | point SE | paired, seeds and points | '
           'verdict | t over seeds | pooled points (first report) | its verdict |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for claim in claims:
    relation = '<' if claim.metric == 'fid' else '>'
    text = (f'{claim.source}: {claim.better} {relation} {claim.worse} '
            f'({fair.METRIC_NAMES[claim.metric]})')
    d = comparison.difference(claim.better, claim.worse, claim.metric)
    if d is None:
      lines.append(f'| {text} | not measured |' + ' - |' * 8)
      continue
    fmt = _unit(claim.metric)
    size = (lambda v: f'{v:.1f}') if claim.metric == 'fid' else (lambda v: f'{100 * v:.1f}')
    lines.append(
        f'| {text} | {fmt(d.estimate)} | {" / ".join(fmt(v) for v in d.per_seed.values())} | '
        f'{"-" if d.seed_sd is None else size(d.seed_sd)} | {size(d.point_se)} | '
        f'{_interval(d.paired, fmt)} | **{judge(claim, d.paired, d.estimate)}** | '
        f'{_interval(d.seed_t, fmt)} | {_interval(d.pooled, fmt)} | '
        f'{judge(claim, d.pooled, d.estimate)} |')
  return '\n'.join(lines)


def comparison_table(comparison: Comparison) -> str:
  """Per recipe: each accuracy (mean over seeds) and the pooled FID with their two-level 95%
  intervals, and the seeds' own values."""
  lines = ['| recipe | clean | PGD-20 | AutoAttack | AutoAttack per seed | FID (pooled) | '
           'FID per seed |', '|---|---|---|---|---|---|---|']
  for name, r in comparison.results.items():
    cells = []
    for metric in fair.METRICS:
      a = comparison.accuracy_interval(name, metric)
      cells.append('-' if a is None else
                   f'{100 * a[0]:.1f}% [{100 * a[1][0]:.1f}, {100 * a[1][1]:.1f}]')
    f = comparison.fid_interval(name)
    fid_cell = '-' if f is None else f'{f[0]:.1f} [{f[1][0]:.1f}, {f[1][1]:.1f}]'
    aa_seeds = ' / '.join(f'{100 * v:.1f}' for v in r.per_seed('autoattack').values()) or '-'
    fid_seeds = ' / '.join(f'{v:.1f}' for v in r.per_seed('fid').values()) or '-'
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {aa_seeds} | {fid_cell} | {fid_seeds} |')
  return '\n'.join(lines)


def plot_comparison(path: str, comparison: Comparison) -> Optional[str]:
  """AutoAttack robust accuracy against pooled FID per recipe with their two-level 95%
  intervals, and each seed's own model (small markers, its own samples' FID)."""
  points = [(n, comparison.accuracy_interval(n, 'autoattack'), comparison.fid_interval(n))
            for n in comparison.results]
  points = [p for p in points if p[1] is not None and p[2] is not None]
  if not points:
    return None
  plt = files.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.8))
  for name, (acc, (acc_low, acc_high)), (fid, (fid_low, fid_high)) in points:
    line = ax.errorbar(fid, 100 * acc, xerr=[[fid - fid_low], [fid_high - fid]],
                       yerr=[[max(0.0, 100 * (acc - acc_low))], [max(0.0, 100 * (acc_high - acc))]],
                       fmt='o', capsize=3, label=name)
    r = comparison.results[name]
    seeds = [s for s in r.seeds_with('autoattack') if s in r.seed_fids]
    ax.scatter([r.seed_fids[s] for s in seeds],
               [100 * r.per_seed('autoattack')[s] for s in seeds], s=12, marker='x',
               color=line[0].get_color(), alpha=0.7)
  ax.set_xlabel('FID (lower is better): dots pooled over seeds, crosses one seed each')
  ax.set_ylabel('AutoAttack robust accuracy, % (8/255)')
  ax.set_title('Fair comparison: 95% intervals over seeds and points')
  ax.legend(fontsize='small')
  return files.save_figure(fig, path)


def feature_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'samples', 'pool3.npz')


def read_run(run_dir: str, recipe: str, seed: int, run: dict) -> Optional[RecipeResult]:
  """A run's per-point correctness (eval/robust_points.npz), first test point, FID and sample
  features, as a one-seed RecipeResult; None before it was evaluated."""
  points = os.path.join(run_dir, 'eval', 'robust_points.npz')
  if not run.get('robustness') or not files.exists(points):
    return None
  with files.open_npz(points) as f:
    correct = {m: np.asarray(f[m], bool) for m in fair.METRICS if m in f}
  result = RecipeResult(recipe, {seed: correct}, {seed: int(run['robustness']['first_example'])})
  fid = generation_metric(run['fid'])
  if fid is not None:
    result.seed_fids[seed] = fid
  if files.exists(feature_path(run_dir)):
    with files.open_npz(feature_path(run_dir)) as f:
      result.features[seed] = np.asarray(f['pool3'], np.float64)
  return result


def fair_results(root: str) -> Dict[str, RecipeResult]:
  """Per recipe of the fair comparison (in fair.RECIPES' order), its evaluated seeds."""
  runs = collect(root, FAIR_RUNS)
  results = {}
  for recipe in fair.RECIPES:
    for seed in fair.SEEDS:
      name = fair.run_name(recipe, seed)
      one = read_run(os.path.join(root, name), recipe, seed, runs[name]) if name in runs else None
      if one is None:
        continue
      if recipe not in results:
        results[recipe] = one
        continue
      r = results[recipe]
      r.correct.update(one.correct)
      r.first_example.update(one.first_example)
      r.seed_fids.update(one.seed_fids)
      r.features.update(one.features)
  return results


def make_comparison(root: str, data_path: str) -> Comparison:
  """The runs under ROOT, with the FID reference statistics their FID stage cached there."""
  results = fair_results(root)
  reference = None
  if any(r.features for r in results.values()):
    reference = generation.fid_reference_statistics(
        make_config(FAIR_RUNS[0], 'cpu-fair', data_path), root)
  return Comparison(results, reference, FID_RESAMPLES)


def protocol(config, comparison: Comparison) -> List[str]:
  points, samples = config.eval.num_examples, config.sample.num_samples
  n_seeds = len(fair.SEEDS)
  return [
      f'- Recipes {", ".join(fair.RECIPES)}, each on seeds {", ".join(map(str, fair.SEEDS))} '
      '(initialisation, data order, training subset and chains). `weat_unweighted` is WEAT '
      'with its weights off (`loss.example_weights=uniform`), every other setting WEAT\'s: '
      'weat against it measures the weighting alone (TRADES differs from WEAT also in weight '
      'decay, 2e-4 against 5e-4, and in its sampler).',
      f'- The same training for all: {config.num_epochs} epoch(s) over a fixed random subset of '
      f'{config.data.train_subset} training images per seed (seed s: the same images for every '
      'recipe), random crop and flip, each recipe\'s `:cpu` model size (WRN-10-1; its own '
      'normalisation and activation), optimizer, batch and attack settings. No test point '
      'steers training, and every recipe trains on the same images (robust_watch and its '
      'held-out validation split are off).',
      f'- The same evaluation for all: the models of seed s are attacked on test points '
      f'[{points} s, {points} (s + 1)), so a recipe is measured on {points * n_seeds} points, '
      'each once, and two recipes of the same seed on the same points: clean, PGD-20 (step '
      '2/255, random start) and standard AutoAttack at eps 8/255 (l_inf). An accuracy is the '
      'mean over seeds.',
      f'- FID: {samples} samples per seed (each recipe\'s own `sample.*` chains), pooled to '
      f'{samples * n_seeds} per recipe, against the statistics of the same '
      f'{config.fid.max_reference} training images for all. FID at this sample count is biased '
      'upwards against the usual 10000/50000: compare the rows, not the paper\'s values.',
      '- Intervals, 95%: **paired, seeds and points** is the two-level bootstrap (seeds drawn '
      'with replacement, then the points of each drawn seed; the same draws for both recipes '
      f'of a difference; {ACCURACY_RESAMPLES} resamples and the percentile interval for '
      f'accuracies, {comparison.fid_resamples} resamples and estimate -/+ 1.96 standard '
      'deviations for FID, whose resamples sit above the estimate); **t over seeds** is '
      f'Student\'s t over the {n_seeds} per-seed differences ({n_seeds - 1} degrees of freedom; '
      'for FID on each seed\'s own samples); **pooled points** is the first fair comparison\'s '
      'reading, the points pooled over seeds as if the recipes were measured on independent '
      'points (Newcombe; for FID the images resampled within each seed). **seed SD** is the '
      'standard deviation of the per-seed differences (it holds point noise too: each seed has '
      'its own points); **point SE** the standard error of the difference from sampling the '
      'points (images) alone. Accuracies in percentage points.',
      '- A claim is **resolved** where the paired interval excludes 0, else **within noise**; '
      f'95% per claim, not corrected for the {len(fair.CLAIMS)} claims. With {n_seeds} seeds '
      'the bootstrap over seeds sees few distinct draws: the t interval beside it is the '
      'cautious reading.']


def write_fair_report(root: str, data_path: str, started: float, jobs: int,
                      command: str) -> str:
  """ROOT/REPORT.md of --scale=cpu-fair: the recipes with intervals over seeds and points, a
  verdict per claim with its three intervals, the setup, the compute time and samples.
  started: the invocation's start (time.time()); its wall time includes the report's."""
  comparison = make_comparison(root, data_path)
  runs = collect(root, FAIR_RUNS)
  figdir = os.path.join(root, 'figures')
  os.makedirs(figdir, exist_ok=True)
  plot_comparison(os.path.join(figdir, 'comparison.png'), comparison)
  timings, compute_seconds = timing_table(runs)
  config = make_config(FAIR_RUNS[0], 'cpu-fair', data_path)
  setup = ['| recipe | config | model | batch | steps | training images |',
           '|---|---|---|---|---|---|']
  for recipe in fair.RECIPES:
    run = RUNS_BY_NAME[fair.run_name(recipe, 0)]
    c = make_config(run, 'cpu-fair', data_path)
    r = (runs.get(run.name) or {}).get('results') or {}
    variant = ', '.join(f'{k}={v}' for k, v in fair.VARIANTS.get(recipe, (None, {}))[1].items())
    setup.append(f'| {recipe} | {run.recipe}{f" ({variant})" if variant else ""} | '
                 f'{r.get("model", "-")} | {c.batch_size} | {r.get("step", "-")} | '
                 f'{c.data.train_subset} |')
  measured = {n: r.seeds_with('autoattack') for n, r in comparison.results.items()}
  missing = [fair.run_name(n, s) for n in fair.RECIPES for s in fair.SEEDS
             if s not in measured.get(n, [])]
  lines = [
      '# jeat-jax: the fair comparison, scale `cpu-fair`', '',
      ('> **Data caveat:** the offline CIFAR-10 stand-in (a lossy JPEG copy of CIFAR-10). '
       'Models of a few minutes of CPU training: this compares the recipes at one small, '
       'equal budget, not their converged accuracies.' if data_path else '> Data: CIFAR-10 '
       'from TFDS.'), '', data_line(runs), '',
      f'Machine: {hardware.cpu_description()}, jax {jax.__version__} on '
      f'{jax.devices()[0].platform}. Wall time of this invocation, '
      f'this report included: {(time.time() - started) / 60:.1f} min'
      f'{f", {jobs} runs side by side" if jobs > 1 else ""} (stages found done were not rerun: '
      'the time of every stage is under Compute time).' +
      (f' Command: `{command}`.' if command else ''), ''] + (
      [f'**Not yet measured** (left out of every number below): {", ".join(missing)}.', '']
      if missing else []) + [
      '## Protocol', ''] + protocol(config, comparison) + [
      '', '## Results (mean over seeds, 95% intervals over seeds and points)', '',
      comparison_table(comparison), '',
      '![robust accuracy against FID](figures/comparison.png)', '',
      '## Claims', '', claims_table(comparison), '',
      '## The WEAT ablation: the weights alone', '',
      'The same training, attack and sampler, the weights on and off:', '',
      claims_table(comparison, [fair.Claim('ablation', m, 'weat', 'weat_unweighted')
                                for m in fair.METRICS + ('fid',)]), '',
      '## Setup per recipe (seed 0)', ''] + setup + [
      '', '## Compute time (wall minutes per stage)', '', timings, '',
      f'Sum over runs and stages: {compute_seconds / 60:.1f} min (runs side by side: each stage\'s '
      'own wall time, shared cores included).', '', '## Samples (seed 0)', '']
  for recipe in fair.RECIPES:
    rel = copy_figure(os.path.join(root, fair.run_name(recipe, 0), 'samples', 'grid.png'), figdir,
                      f'{recipe}_samples.png')
    if rel:
      lines += [f'**{recipe}**', '', f'![{recipe} samples]({rel})', '']
  path = os.path.join(root, 'REPORT.md')
  write_text_atomic(path, '\n'.join(lines))
  return path
