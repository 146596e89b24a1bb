"""WORKDIR/REPORT.md of `--scale=cpu-fair` (its protocol: fair.py): per recipe the seeds'
counts pooled with Wilson intervals and the pooled FID with a bootstrap interval, the
difference of two recipes with its interval, a verdict per claim, the table and the plot."""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from jeat_jax import files, generation, hardware, stats
from jeat_jax.files import write_text_atomic
from jeat_jax.metrics import fid as fid_lib
from jeat_jax.reproduce import fair
from jeat_jax.reproduce.results import _fid, collect, copy_figure, data_line, timing_table
from jeat_jax.reproduce.runs import FAIR_RUNS, RUNS_BY_NAME, make_config


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
                                                fair.BOOTSTRAP_RESAMPLES, seed)
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


def claim_line(claim: fair.Claim, results: Dict[str, RecipeResult]) -> str:
  """'- source: better above worse in metric: resolved, ... / within noise (numbers)'."""
  lower_is_better = claim.metric == 'fid'
  relation = 'lower' if lower_is_better else 'higher'
  text = (f'{claim.source}: {claim.better} {relation} than {claim.worse} in '
          f'{fair.METRIC_NAMES[claim.metric]}')
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
  return [claim_line(c, results) for c in fair.CLAIMS]


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
  ax.set_xlabel(f'FID of {fair.SAMPLES_PER_SEED * len(fair.SEEDS)} samples (lower is better)')
  ax.set_ylabel('AutoAttack robust accuracy, % (8/255)')
  ax.set_title('Fair comparison: pooled over seeds, 95% intervals')
  ax.legend()
  return files.save_figure(fig, path)


def fair_results(root: str, data_path: str) -> Dict[str, RecipeResult]:
  """Per recipe of the fair comparison: its seeds' counts and FIDs and its pooled FID with
  bootstrap replicates (against the reference statistics the runs' FID stage cached)."""
  runs = collect(root, FAIR_RUNS)
  reference = None
  results = {}
  for recipe in fair.RECIPES:
    seeds = {s: runs.get(fair.run_name(recipe, s)) for s in fair.SEEDS}
    seeds = {s: r for s, r in seeds.items() if r and r['robustness']}
    if not seeds:
      continue
    result = RecipeResult(
        recipe, {s: seed_counts(r['robustness']) for s, r in seeds.items()},
        {s: _fid(r['fid']) for s, r in seeds.items() if _fid(r['fid']) is not None})
    paths = [feature_path(os.path.join(root, fair.run_name(recipe, s))) for s in seeds]
    if len(seeds) == len(fair.SEEDS) and all(os.path.exists(p) for p in paths):
      if reference is None:
        reference = generation.fid_reference_statistics(
            make_config(FAIR_RUNS[0], 'cpu-fair', data_path), root)
      result.fid, result.fid_replicates = pooled_fid(
          [np.load(p)['pool3'] for p in paths], *reference)
    results[recipe] = result
  return results


def write_fair_report(root: str, data_path: str, wall_seconds: float, jobs: int,
                      command: str) -> str:
  """ROOT/REPORT.md of --scale=cpu-fair: the pooled table with intervals, a verdict per
  claim, the seeds' values, the setup, the compute time and the sample grids."""
  results = fair_results(root, data_path)
  runs = collect(root, FAIR_RUNS)
  figdir = os.path.join(root, 'figures')
  os.makedirs(figdir, exist_ok=True)
  plot_comparison(os.path.join(figdir, 'comparison.png'), results)
  timings, compute_seconds = timing_table(runs)
  config = make_config(FAIR_RUNS[0], 'cpu-fair', data_path)
  points, samples = config.eval.num_examples, config.sample.num_samples
  setup = ['| recipe | model | batch | steps | training images |', '|---|---|---|---|---|']
  for recipe in fair.RECIPES:
    c = make_config(RUNS_BY_NAME[fair.run_name(recipe, 0)], 'cpu-fair', data_path)
    r = (runs.get(fair.run_name(recipe, 0)) or {}).get('results') or {}
    setup.append(f'| {recipe} | {r.get("model", "-")} | {c.batch_size} | {r.get("step", "-")} | '
                 f'{c.data.train_subset} |')
  lines = [
      '# jeat-jax: the fair comparison, scale `cpu-fair`', '',
      ('> **Data caveat:** the offline CIFAR-10 stand-in (a lossy JPEG copy of CIFAR-10). '
       'Models of a few minutes of CPU training: this compares the recipes at one small, '
       'equal budget, not their converged accuracies.' if data_path else '> Data: CIFAR-10 '
       'from TFDS.'), '', data_line(runs), '',
      f'Machine: {hardware.cpu_description()}, jax {jax.__version__} on '
      f'{jax.devices()[0].platform}. Wall time of this invocation: {wall_seconds / 60:.1f} min'
      f'{f", {jobs} runs side by side" if jobs > 1 else ""}.' +
      (f' Command: `{command}`.' if command else ''), '',
      '## Protocol', '',
      f'- Recipes {", ".join(fair.RECIPES)}, each on seeds {", ".join(map(str, fair.SEEDS))} '
      f'(initialisation, data order, training subset and chains).',
      f'- The same training for all: {config.num_epochs} epoch(s) over a fixed random subset of '
      f'{config.data.train_subset} training images per seed, random crop and flip, each recipe\'s '
      '`:cpu` model size (WRN-10-1; its own normalisation and activation), optimizer, batch and '
      'attack settings. No test point steers training, and every recipe trains on the same '
      'images (robust_watch and its held-out validation split are off).',
      f'- The same evaluation for all: seed s is attacked on test points '
      f'[{points} s, {points} (s + 1)), so every recipe is measured '
      f'on the same {points * len(fair.SEEDS)} points, each once: clean, PGD-20 '
      '(step 2/255, random start) and standard AutoAttack at eps 8/255 (l_inf). Intervals: '
      'Wilson 95% over the pooled points.',
      f'- FID: {samples} samples per seed (each recipe\'s own `sample.*` chains), '
      f'pooled to {samples * len(fair.SEEDS)} per recipe, against the statistics '
      f'of the same {config.fid.max_reference} training images for all; interval: estimate -/+ '
      f'1.96 bootstrap standard deviations over the samples ({fair.BOOTSTRAP_RESAMPLES} '
      'resamples). FID at 1000 samples is '
      'biased upwards against the usual 10000/50000: compare the rows, not the paper\'s values.',
      '- A claim is **resolved** where the 95% interval of the difference excludes 0 (Newcombe '
      'for accuracies, bootstrap for FID), else **within noise**; 95% per claim, not corrected '
      f'for the {len(fair.CLAIMS)} claims.', '',
      '## Results (pooled over the seeds, 95% intervals)', '', comparison_table(results), '',
      '![robust accuracy against FID](figures/comparison.png)', '',
      '## Claims', ''] + claim_lines(results) + [
      '', '## Setup per recipe (seed 0)', ''] + setup + [
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
