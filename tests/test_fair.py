"""The fair comparison (jeat_jax/reproduce/fair.py, fair_report.py, reproduce
--scale=cpu-fair): its differences and intervals against hand computations, the report from
run directories, and the runs' configs."""
import json
import os
import types

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jeat_jax import generation, stats
from jeat_jax.metrics import fid
from jeat_jax.reproduce import cli, fair, fair_report
from jeat_jax.reproduce import runs as runs_lib
from jeat_jax.reproduce import stages as stages_lib


def _points(rng, p, n=500):
  return rng.random(n) < p


def _result(recipe, correct_per_seed, features=None, seed_fids=None):
  """correct_per_seed: per seed {metric: per-point bool}; seed s measured from 500 s."""
  r = fair_report.RecipeResult(recipe, dict(enumerate(correct_per_seed)),
                               {s: 500 * s for s in range(len(correct_per_seed))})
  r.features.update(features or {})
  r.seed_fids.update(seed_fids or {})
  return r


def test_accuracy_difference_by_hand():
  rng = np.random.default_rng(0)
  a = [{'autoattack': _points(rng, p)} for p in (0.30, 0.25, 0.35)]
  b = [{'autoattack': _points(rng, p)} for p in (0.20, 0.22, 0.21)]
  comparison = fair_report.Comparison({'jeat': _result('jeat', a), 'at': _result('at', b)})
  d = comparison.difference('jeat', 'at', 'autoattack')
  per_seed = [x['autoattack'].mean() - y['autoattack'].mean() for x, y in zip(a, b)]
  assert d.seeds == (0, 1, 2) and list(d.per_seed.values()) == pytest.approx(per_seed)
  assert d.estimate == pytest.approx(np.mean(per_seed))
  groups = [np.stack([x['autoattack'], y['autoattack']], 1) for x, y in zip(a, b)]
  replicates = stats.two_level_bootstrap_means(groups, fair_report.ACCURACY_RESAMPLES,
                                               fair_report.BOOTSTRAP_SEED)
  assert d.paired == pytest.approx(
      tuple(np.quantile(replicates[:, 0] - replicates[:, 1], [0.025, 0.975])))
  ka, kb = sum(x['autoattack'].sum() for x in a), sum(y['autoattack'].sum() for y in b)
  assert d.pooled == pytest.approx(stats.newcombe_difference_interval(ka, 1500, kb, 1500))
  half = scipy_stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3)
  assert d.seed_t == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
  assert d.seed_sd == pytest.approx(np.std(per_seed, ddof=1))
  diffs = [x['autoattack'].astype(float) - y['autoattack'] for x, y in zip(a, b)]
  assert d.point_se == pytest.approx(
      np.sqrt(sum(v.var(ddof=1) / 500 for v in diffs)) / 3)


def test_pairing_on_points_resolves_what_pooling_cannot():
  # b is correct on a subset of a's points: 2% more for a on every seed. Unpaired (Newcombe over
  # pooled points) that is within noise; paired on the points it is resolved.
  rng = np.random.default_rng(1)
  a, b = [], []
  for _ in range(3):
    base = _points(rng, 0.30)
    extra = np.flatnonzero(base)[:10]  # 10 of 500 points: 2%
    worse = base.copy()
    worse[extra] = False
    a.append({'autoattack': base})
    b.append({'autoattack': worse})
  comparison = fair_report.Comparison({'x': _result('x', a), 'y': _result('y', b)})
  d = comparison.difference('x', 'y', 'autoattack')
  assert d.estimate == pytest.approx(0.02)
  assert stats.verdict(d.paired) == 'resolved' and stats.verdict(d.pooled) == 'within noise'


def test_seeds_that_disagree_widen_the_paired_interval():
  # The same points for both, but seed 1 reverses the order: pooled over points it looks
  # resolved, over seeds it is within noise.
  rng = np.random.default_rng(2)
  a, b = [], []
  for shift in (0.10, -0.06, 0.10):
    base = _points(rng, 0.40)
    other = base.copy()
    idx = np.flatnonzero(base if shift > 0 else ~base)[:int(abs(shift) * 500)]
    other[idx] = ~other[idx]
    a.append({'clean': base})
    b.append({'clean': other})
  comparison = fair_report.Comparison({'x': _result('x', a), 'y': _result('y', b)})
  d = comparison.difference('x', 'y', 'clean')
  assert d.estimate == pytest.approx((0.10 - 0.06 + 0.10) / 3)
  assert stats.verdict(d.pooled) == 'resolved'
  assert stats.verdict(d.seed_t) == 'within noise'
  assert d.paired[1] - d.paired[0] > 2 * (d.pooled[1] - d.pooled[0])


def test_a_difference_needs_the_same_test_points():
  rng = np.random.default_rng(3)
  a, b = _result('x', [{'clean': _points(rng, 0.5)}]), _result('y', [{'clean': _points(rng, 0.5)}])
  b.first_example[0] = 250
  with pytest.raises(ValueError, match='x_seed0 and y_seed0 were not measured on the same'):
    fair_report.Comparison({'x': a, 'y': b}).difference('x', 'y', 'clean')
  assert fair_report.Comparison({'x': a}).difference('x', 'y', 'clean') is None


def test_fid_difference_is_paired_over_seeds_and_images():
  rng = np.random.default_rng(4)
  mu, sigma = fid.activation_statistics(rng.normal(size=(200, 6)))
  feats = {s: rng.normal(size=(30, 6)) + 0.2 * s for s in range(3)}
  shifted = {s: f + 0.5 for s, f in feats.items()}
  results = {'a': _result('a', [{}] * 3, feats, {0: 10.0, 1: 12.0, 2: 11.0}),
             'b': _result('b', [{}] * 3, shifted, {0: 20.0, 1: 21.0, 2: 25.0}),
             'c': _result('c', [{}] * 3, dict(feats), {0: 10.0, 1: 12.0, 2: 11.0})}
  comparison = fair_report.Comparison(results, (mu, sigma), fid_resamples=20)
  d = comparison.difference('a', 'b', 'fid')
  pooled = lambda f: fid.fid_from_features(np.concatenate([f[s] for s in range(3)]), mu, sigma)
  assert d.estimate == pytest.approx(pooled(feats) - pooled(shifted))
  two_a, _ = fid.two_level_bootstrap_fids([feats[s] for s in range(3)], mu, sigma, 20, 0)
  two_b, _ = fid.two_level_bootstrap_fids([shifted[s] for s in range(3)], mu, sigma, 20, 0)
  assert d.paired == pytest.approx(stats.bootstrap_normal_interval(two_a - two_b, d.estimate))
  assert list(d.per_seed.values()) == [-10.0, -9.0, -14.0]
  # the same images: every paired replicate difference is 0
  same = comparison.difference('a', 'c', 'fid')
  assert same.estimate == 0 and same.paired == (0.0, 0.0) and same.pooled == (0.0, 0.0)


def _fake_run(root, recipe, seed, rates, features, seed_fid):
  """A run directory as the stages leave it: per-point masks at `rates` (clean, pgd20,
  autoattack), its robustness.json, results.json, fid.json and the samples' features."""
  d = os.path.join(root, fair.run_name(recipe, seed))
  os.makedirs(os.path.join(d, 'eval'))
  os.makedirs(os.path.join(d, 'samples'))
  masks = {m: np.arange(500) < round(r * 500) for m, r in zip(fair.METRICS, rates)}
  np.savez(os.path.join(d, 'eval', 'robust_points.npz'), **masks)
  ev = {'clean_accuracy': rates[0], 'num_examples': 500, 'first_example': 500 * seed,
        'attacks': [{'name': m, 'robust_accuracy': r, 'num_examples': 500}
                    for m, r in zip(fair.METRICS[1:], rates[1:])]}
  with open(os.path.join(d, 'eval', 'robustness.json'), 'w') as f:
    json.dump(ev, f)
  with open(os.path.join(d, 'results.json'), 'w') as f:
    json.dump({'model': 'WRN-10-1', 'step': 78, 'data': {'source': 'npz', 'path': 'x.npz',
                                                        'sha256': 'abc'}}, f)
  with open(os.path.join(d, 'fid.json'), 'w') as f:
    json.dump({'fid': seed_fid}, f)
  np.savez(os.path.join(d, 'samples', 'pool3.npz'), pool3=features)


def test_fair_report_from_run_directories(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  reference = fid.activation_statistics(rng.normal(size=(300, 6)))
  monkeypatch.setattr(generation, 'fid_reference_statistics', lambda config, root: reference)
  monkeypatch.setattr(fair_report, 'FID_RESAMPLES', 10)
  monkeypatch.setattr(fair_report, 'ACCURACY_RESAMPLES', 500)
  for seed in fair.SEEDS:
    _fake_run(str(tmp_path), 'jeat', seed, (0.6, 0.3, 0.20 + 0.02 * seed),
              rng.normal(size=(40, 6)) + 0.5, 50.0 + seed)
    _fake_run(str(tmp_path), 'at', seed, (0.64, 0.32, 0.30), rng.normal(size=(40, 6)), 40.0)
  _fake_run(str(tmp_path), 'weat', 0, (0.7, 0.3, 0.25), rng.normal(size=(40, 6)), 45.0)
  clock = [1000.0]  # the comparison takes 2 min of the report's time: the wall time counts it
  monkeypatch.setattr(fair_report, 'time', types.SimpleNamespace(time=lambda: clock[0]))
  make_comparison = fair_report.make_comparison
  def slow_comparison(*args):
    clock[0] += 120.0
    return make_comparison(*args)
  monkeypatch.setattr(fair_report, 'make_comparison', slow_comparison)
  path = fair_report.write_fair_report(str(tmp_path), '', clock[0] - 60.0, 2, 'cmd')
  text = open(path).read()
  assert 'Wall time of this invocation, this report included: 3.0 min, 2 runs side by' in text
  assert '| jeat | 60.0% [' in text and '| 20.0 / 22.0 / 24.0 |' in text  # AA per seed
  assert '| 50.0 / 51.0 / 52.0 |' in text  # FID per seed
  comparison = fair_report.make_comparison(str(tmp_path), '')
  d = comparison.difference('jeat', 'at', 'autoattack')
  assert d.estimate == pytest.approx(0.22 - 0.30)
  row = [l for l in text.splitlines()
         if l.startswith('| JEAT paper, Sec. 4 (JEAT improves on PGD-AT): jeat > at')][0]
  assert ('| -8.0 | -10.0 / -8.0 / -6.0 | 2.0 | ' in row
          and f'[{100 * d.paired[0]:+.1f}, {100 * d.paired[1]:+.1f}] | **resolved, contradicted**'
          in row), row
  assert 'weat > trades (AutoAttack robust accuracy) | not measured |' in text
  missing = text.split('**Not yet measured** (left out of every number below): ')[1]
  missing = missing.split('.\n')[0].split(', ')
  assert 'weat_seed1' in missing and 'prejeat_seed0' in missing and 'jeat_seed0' not in missing
  fid_row = [l for l in text.splitlines() if 'jeat < at (FID)' in l][0]
  assert '| +10.0 / +11.0 / +12.0 |' in fid_row
  assert os.path.exists(tmp_path / 'figures' / 'comparison.png')


def test_cpu_fair_runs_every_recipe_on_every_seed_and_fits_the_reference_once(tmp_path,
                                                                             monkeypatch):
  calls = {'reference': [], 'jobs': None}
  monkeypatch.setattr(generation, 'fid_reference_statistics',
                      lambda config, root: calls['reference'].append(root))
  monkeypatch.setattr(stages_lib, 'run_in_subprocesses',
                      lambda root, scale, data, names, stages, jobs: calls.update(
                          jobs=(scale, names, stages, jobs)) or [])
  monkeypatch.setattr(fair_report, 'write_fair_report', lambda *a: str(tmp_path / 'REPORT.md'))
  flag_values = cli.flags.FLAGS
  flag_values(['reproduce', '--scale=cpu-fair', f'--workdir={tmp_path}', '--jobs=2'])
  try:
    cli.main([])
  finally:
    flag_values.unparse_flags()
  scale, names, stages, jobs = calls['jobs']
  assert scale == 'cpu-fair' and jobs == 2
  # seed after seed, within a seed the longest trainings first
  assert names[:2] == ['ebjdat_seed0', 'weat_seed0']
  assert [n[-1] for n in names] == sorted(n[-1] for n in names)
  assert sorted(names) == sorted(f'{r}_seed{s}' for r in fair.RECIPES for s in fair.SEEDS)
  assert stages == ['train', 'evaluate', 'sample', 'fid']  # no analyze by default
  assert calls['reference'] == [str(tmp_path)]  # once, before the jobs start


def test_cpu_fair_configs_share_the_budget_and_split_the_test_points():
  configs = {r.name: runs_lib.make_config(r, 'cpu-fair', '') for r in runs_lib.FAIR_RUNS}
  for name, c in configs.items():
    assert (c.num_epochs, c.num_train_steps, c.data.train_subset) == (
        fair.EPOCHS, -1, fair.TRAIN_IMAGES), name
    assert (c.model.depth, c.model.width, c.data.augment) == (10, 1, True), name
    assert not c.robust_watch.enabled and c.eval.attacks == 'pgd20,autoattack'
    seed = int(name[-1])
    assert (c.seed, c.eval.first_example, c.eval.num_examples) == (
        seed, seed * fair.POINTS_PER_SEED, fair.POINTS_PER_SEED)


def test_the_weat_ablation_differs_from_weat_by_the_weights_only():
  weat, ablation = (runs_lib.make_config(runs_lib.RUNS_BY_NAME[f'{r}_seed1'], 'cpu-fair', '')
                    for r in ('weat', 'weat_unweighted'))
  assert weat.loss.example_weights == 'inverse_softplus_energy'
  assert ablation.loss.example_weights == 'uniform'
  ablation.loss.example_weights = weat.loss.example_weights
  assert ablation.to_dict() == weat.to_dict()
