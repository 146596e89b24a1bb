"""The fair comparison's statistics and report (jeat_jax/stats.py, jeat_jax/reproduce/
fair.py and fair_report.py, reproduce --scale=cpu-fair) against hand computations and
published values."""
import json
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jeat_jax import generation, stats
from jeat_jax.metrics import fid
from jeat_jax.reproduce import cli, fair, fair_report
from jeat_jax.reproduce import runs as runs_lib
from jeat_jax.reproduce import stages as stages_lib


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


def _result(recipe, per_seed, fids=None):
  """per_seed: [(clean k, aa k)] on 500 points each."""
  seeds = {s: {'clean': (c, 500), 'autoattack': (a, 500)} for s, (c, a) in enumerate(per_seed)}
  r = fair_report.RecipeResult(recipe, seeds, {})
  if fids is not None:
    r.fid, r.fid_replicates = fids
  return r


def test_claims_pool_the_seeds_and_say_resolved_or_within_noise():
  results = {'jeat': _result('jeat', [(300, 100), (310, 110)]),     # AA 21.0% of 1000
             'trades': _result('trades', [(320, 150), (330, 150)]),  # AA 30.0%
             'at': _result('at', [(300, 105), (300, 100)])}          # AA 20.5%
  assert results['jeat'].counts('autoattack') == (210, 1000)
  line = fair_report.claim_line(fair.Claim('src', 'autoattack', 'jeat', 'trades'), results)
  low, high = stats.newcombe_difference_interval(210, 1000, 300, 1000)
  assert 'resolved, contradicted' in line and f'{100 * low:+.1f}' in line and high < 0
  line = fair_report.claim_line(fair.Claim('src', 'autoattack', 'jeat', 'at'), results)
  assert 'within noise' in line and '+0.5 points' in line
  assert 'not measured' in fair_report.claim_line(
      fair.Claim('src', 'autoattack', 'jeat', 'weat'), results)


def test_fid_claims_use_the_paired_bootstrap_differences():
  a = _result('jeat', [(1, 1)], (100.0, np.array([101.0, 102.0, 103.0, 104.0])))
  b = _result('at', [(1, 1)], (110.0, np.array([111.0, 112.0, 113.0, 114.0])))
  d, interval = fair_report.difference(a, b, 'fid')
  assert d == -10.0 and interval == pytest.approx((-10.0, -10.0))  # the replicates differ by 10
  b.fid_replicates = np.array([111.0, 112.0, 113.0, 118.0])
  half = stats.Z_95 * np.std([-10.0, -10.0, -10.0, -14.0], ddof=1)
  assert fair_report.difference(a, b, 'fid')[1] == pytest.approx((-10.0 - half, -10.0 + half))
  assert 'resolved, holds' in fair_report.claim_line(
      fair.Claim('src', 'fid', 'jeat', 'at'), {'jeat': a, 'at': b})


def _fake_run(root, recipe, seed, clean, pgd, aa, features):
  d = os.path.join(root, fair.run_name(recipe, seed))
  os.makedirs(os.path.join(d, 'eval'))
  os.makedirs(os.path.join(d, 'samples'))
  ev = {'clean_accuracy': clean / 500, 'num_examples': 500, 'first_example': 500 * seed,
        'attacks': [{'name': 'pgd20', 'robust_accuracy': pgd / 500, 'num_examples': 500},
                    {'name': 'autoattack', 'robust_accuracy': aa / 500, 'num_examples': 500}]}
  with open(os.path.join(d, 'eval', 'robustness.json'), 'w') as f:
    json.dump(ev, f)
  with open(os.path.join(d, 'results.json'), 'w') as f:
    json.dump({'model': 'WRN-10-1', 'step': 78, 'data': {'source': 'npz', 'path': 'x.npz',
                                                        'sha256': 'abc'}}, f)
  with open(os.path.join(d, 'fid.json'), 'w') as f:
    json.dump({'fid': 50.0 + seed}, f)
  np.savez(os.path.join(d, 'samples', 'pool3.npz'), pool3=features)


def test_fair_report_pools_seeds_with_intervals(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(300, 6))
  reference = fid.activation_statistics(ref)
  monkeypatch.setattr(generation, 'fid_reference_statistics', lambda config, root: reference)
  for seed in (0, 1):
    _fake_run(str(tmp_path), 'jeat', seed, 300, 150, 100 + 10 * seed,
              rng.normal(size=(40, 6)) + 0.5)
    _fake_run(str(tmp_path), 'at', seed, 320, 160, 150, rng.normal(size=(40, 6)))
  path = fair_report.write_fair_report(str(tmp_path), '', 60.0, 2, 'cmd')
  text = open(path).read()
  low, high = stats.wilson_interval(210, 1000)
  assert f'21.0% [{100 * low:.1f}, {100 * high:.1f}]' in text  # jeat: (100 + 110) / 1000
  assert '| 20.0 / 22.0 |' in text  # its seeds
  pooled = np.concatenate([np.load(os.path.join(tmp_path, fair.run_name('jeat', s), 'samples',
                                                'pool3.npz'))['pool3'] for s in (0, 1)])
  assert f'{fid.fid_from_features(pooled, *reference):.1f} [' in text
  assert 'JEAT paper, Sec. 4 (JEAT improves on PGD-AT): jeat higher than at in AutoAttack robust ' \
         'accuracy: **resolved, contradicted**' in text
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
