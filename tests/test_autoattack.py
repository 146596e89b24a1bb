"""Properties of the JAX AutoAttack (APGD, FAB-T, Square, runner) and of C&W L2.

A tiny CNN is trained in the module fixture on the CIFAR-10 stand-in (synthetic
data where the stand-in is absent) and attacked on 64 test points with reduced
iteration counts; these are property checks, not strength checks (those are in
test_attack_crosscheck.py).
"""
import numpy as np
import pytest
import scipy.optimize

import jax
import jax.numpy as jnp

from jeat_jax.attacks.autoattack import (apgd_run, closest_boundary, dlr_loss, dlr_loss_targeted,
                                         fab_run, linf_hyperplane_projection, padded_size,
                                         run_autoattack, square, step_size_checkpoints)
from jeat_jax.attacks.autoattack.apgd import apgd_start
from jeat_jax.attacks.autoattack import runner
from jeat_jax.attacks.autoattack.apgd import ranked_class
from jeat_jax.attacks.autoattack.fab import (FabSettings, _boundary, _check, fab_start,
                                             step_towards_boundary)
from jeat_jax.attacks.autoattack.square import schedule_level, window_sides
from jeat_jax.attacks.cw import cw_l2
from tests.torch_reference import SmallCNN, accuracy, load_data, train_classifier

EPS = 8 / 255
N_POINTS = 64


@pytest.fixture(scope='module')
def setup():
  x_train, y_train, x_test, y_test, _ = load_data(4000, 400, seed=1)
  model = SmallCNN(widths=(8, 16, 32))
  variables = train_classifier(model, x_train, y_train, steps=150, batch_size=64, seed=1)
  logits_fn = jax.jit(lambda z: model.apply(variables, z))
  clean_correct = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_test)), -1)) == y_test
  assert clean_correct.mean() > 0.2, 'the tiny model did not learn'
  x, y = x_test[:N_POINTS], y_test[:N_POINTS]
  return logits_fn, jnp.asarray(x), jnp.asarray(y)


def _fab_within_eps(f, x, y, rank):
  """FAB-T towards the class of clean rank `rank` (untargeted FAB for None), kept where
  within eps (as the runner does)."""
  adv, norm = fab_run(f, x, y, rank, n_iter=10)
  return jnp.where((norm <= EPS)[:, None, None, None], adv, x)


ATTACKS = {   # one target class each for APGD-T and FAB-T; `run_autoattack` loops over targets
    'apgd-ce': lambda f, x, y, k: apgd_run(f, x, y, k, EPS, n_iter=10).x_adv,
    'apgd-dlr': lambda f, x, y, k: apgd_run(f, x, y, k, EPS, n_iter=10, loss='dlr').x_adv,
    'apgd-t': lambda f, x, y, k: apgd_run(f, x, y, k, EPS, n_iter=10, loss='dlr-targeted',
                                          target_rank=2).x_adv,
    'fab-t': lambda f, x, y, k: _fab_within_eps(f, x, y, 2),
    'fab': lambda f, x, y, k: _fab_within_eps(f, x, y, None),
    'square': lambda f, x, y, k: square(f, x, y, k, EPS, n_queries=100),
}


@pytest.fixture(scope='module')
def adversarials(setup):
  logits_fn, x, y = setup
  return {name: np.asarray(attack(logits_fn, x, y, jax.random.PRNGKey(3)))
          for name, attack in ATTACKS.items()}


@pytest.mark.parametrize('name', list(ATTACKS))
def test_attack_stays_in_eps_ball_and_box(setup, adversarials, name):
  _, x, _ = setup
  x_adv = adversarials[name]
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert np.max(np.abs(x_adv - np.asarray(x))) <= EPS + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize('name', list(ATTACKS))
def test_trained_model_accuracy_drops_under_attack(setup, adversarials, name):
  logits_fn, x, y = setup
  clean = accuracy(logits_fn, np.asarray(x), np.asarray(y))
  robust = accuracy(logits_fn, adversarials[name], np.asarray(y))
  assert robust < clean - 0.1, (name, clean, robust)


def test_apgd_best_loss_trace_is_monotone(setup):
  logits_fn, x, y = setup
  for loss, rank in (('ce', None), ('dlr-targeted', 2)):   # n_iter as in ATTACKS: compiled already
    result = apgd_run(logits_fn, x, y, jax.random.PRNGKey(0), EPS, n_iter=10, loss=loss,
                      target_rank=rank)
    trace = np.asarray(result.loss_best_trace)
    assert trace.shape == (11, N_POINTS)
    assert np.all(np.diff(trace, axis=0) >= 0.0), loss
    np.testing.assert_allclose(trace[-1], np.asarray(result.loss_best))


def test_host_and_device_loops_agree(setup):
  """The Python-driven loop (CPU default) and the one-program lax loop give the same attack."""
  logits_fn, x, y = setup
  runs = [apgd_run(logits_fn, x, y, jax.random.PRNGKey(1), EPS, n_iter=10, host_loop=host)
          for host in (True, False)]
  np.testing.assert_allclose(runs[0].loss_best_trace, runs[1].loss_best_trace, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(runs[0].robust, runs[1].robust)
  fabs = [fab_run(logits_fn, x, y, 2, n_iter=3, host_loop=host) for host in (True, False)]
  np.testing.assert_allclose(fabs[0][1], fabs[1][1], rtol=1e-4)
  cws = [cw_l2(logits_fn, x[:8], y[:8], steps=4, host_loop=host) for host in (True, False)]
  np.testing.assert_allclose(cws[0], cws[1], atol=1e-5)


def test_setting_aside_finished_examples_changes_no_verdict(setup):
  """APGD with `drop_broken` and FAB with `stop_norm` iterate only the examples not yet
  broken; every example ends with the verdict of the full run, and the robust ones with
  the same image."""
  logits_fn, x, y = setup
  full, dropped = (apgd_run(logits_fn, x, y, jax.random.PRNGKey(1), EPS, n_iter=20,
                            drop_broken=drop) for drop in (False, True))
  robust = np.asarray(full.robust)
  assert 0 < robust.sum() < len(robust) - 16            # the batch shrinks below its padded size
  np.testing.assert_array_equal(np.asarray(dropped.robust), robust)
  np.testing.assert_allclose(np.asarray(dropped.x_adv)[robust], np.asarray(full.x_adv)[robust],
                             atol=1e-6)
  fooled = np.asarray(jnp.argmax(logits_fn(dropped.x_adv), -1)) != np.asarray(y)
  np.testing.assert_array_equal(fooled, ~robust)
  (_, norm_full), (adv, norm) = (fab_run(logits_fn, x, y, None, n_iter=10, stop_norm=stop)
                                 for stop in (None, EPS))
  np.testing.assert_array_equal(np.asarray(norm) <= EPS, np.asarray(norm_full) <= EPS)
  assert np.all(np.asarray(norm)[np.asarray(norm) <= EPS] >= np.asarray(norm_full)[np.asarray(norm) <= EPS] - 1e-6)
  found = np.asarray(norm) <= EPS
  assert np.all(np.asarray(jnp.argmax(logits_fn(adv), -1))[found] != np.asarray(y)[found])


def test_padded_size_is_exact_up_to_8_then_wastes_at_most_a_fifth():
  assert [padded_size(n, 500) for n in range(1, 9)] == list(range(1, 9))
  assert [padded_size(n, 500) for n in (9, 11, 13, 15, 17, 25, 33, 100)] == [10, 12, 14, 16, 20,
                                                                            28, 40, 112]
  assert padded_size(300, 256) == 256
  sizes = [padded_size(n, 10**6) for n in range(1, 5000)]
  assert all(n <= p <= max(1.25 * n, n + 1) for n, p in zip(range(1, 5000), sizes))
  assert len(set(sizes)) == 8 + 4 * 9 + 1       # 8, then 4 sizes per doubling: 10 .. 5120


def test_passes_split_into_one_chunk_per_stream():
  idx = np.arange(3, 12)                               # 9 robust points, 2 streams: 5 + 4
  chunks = list(runner._chunks(idx, 100, streams=2))
  assert [len(sel) for sel, _ in chunks] == [5, 4]
  assert [len(padded) for _, padded in chunks] == [5, 4]
  np.testing.assert_array_equal(np.concatenate([sel for sel, _ in chunks]), idx)
  big = list(runner._chunks(np.arange(1000), 300, streams=2))
  assert [len(sel) for sel, _ in big] == [300, 300, 300, 100]
  assert [len(p) for _, p in big] == [300, 300, 300, 112]


def test_closest_boundary_on_hand_computed_logits():
  """z = (2, 1, 0.5), y = 0, gradients (1, 0), (0, 1), (0.2, 0): the boundary with class 1
  is at l_inf distance |1 - 2| / ||(-1, 1)||_1 = 0.5, with class 2 at 1.5 / 0.8."""
  logits = jnp.asarray([[2.0, 1.0, 0.5]])
  jacobian = jnp.asarray([[[1.0, 0.0]], [[0.0, 1.0]], [[0.2, 0.0]]])     # [C, B, D]
  w, gap = closest_boundary(logits, jacobian, jnp.asarray([0]))
  np.testing.assert_allclose(np.asarray(w), [[-1.0, 1.0]])
  np.testing.assert_allclose(np.asarray(gap), [-1.0])


def test_untargeted_fab_boundary_of_a_linear_model():
  """For logits x W the full Jacobian is W: the boundary is W_k - W_y with the smallest
  |z_k - z_y| / ||W_k - W_y||_1 over k != y."""
  rng = np.random.default_rng(0)
  w_mat = rng.normal(size=(12, 5)).astype(np.float32)
  x = rng.uniform(size=(6, 2, 2, 3)).astype(np.float32)
  y = rng.integers(0, 5, 6)
  s = FabSettings(targeted=False)
  w, gap = _boundary(s, lambda z: z.reshape(z.shape[0], -1) @ w_mat, x.shape, jnp.asarray(y), None,
                     jnp.asarray(x.reshape(6, -1)))
  z = x.reshape(6, -1) @ w_mat
  for b in range(6):
    dist = [abs(z[b, k] - z[b, y[b]]) / np.abs(w_mat[:, k] - w_mat[:, y[b]]).sum()
            if k != y[b] else np.inf for k in range(5)]
    k = int(np.argmin(dist))
    np.testing.assert_allclose(np.asarray(w)[b], w_mat[:, k] - w_mat[:, y[b]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gap)[b], z[b, k] - z[b, y[b]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('rank', [2, None], ids=['fab-t', 'fab'])
def test_fab_run_is_its_steps_in_the_reference_order(setup, rank):
  """`fab_run` (host loop, compaction) against FAB written out step by step as the reference
  (fra31, torchattacks) orders it: linearise, step, check with a forward pass."""
  logits_fn, x, y = setup
  x, y = x[:16], y[:16]
  s = FabSettings(targeted=rank is not None)
  x0 = x.reshape(16, -1)
  target = ranked_class(logits_fn(x), rank or 2)
  carry = (x0, x0, jnp.full((16,), jnp.inf))
  for _ in range(8):
    w, gap = _boundary(s, logits_fn, x.shape, y, target, carry[0])
    carry = (step_towards_boundary(s, x0, carry[0], w, gap),) + carry[1:]
    carry = _check(s, x0, y, logits_fn(carry[0].reshape(x.shape)), carry)
  adv, best = fab_run(logits_fn, x, y, rank, n_iter=8)
  found = np.isfinite(np.asarray(carry[2]))
  assert found.sum() > 8
  # Jitted and eager passes may differ in the last bit, which can flip a check on the
  # boundary (untargeted FAB: the nearest of 9 boundaries, a near tie) and fork an example's
  # path: at most one of the 16 verdicts, and most paths stay identical.
  assert np.sum(np.isfinite(np.asarray(best)) != found) <= 1, (np.asarray(best), found)
  same = np.isclose(np.asarray(best), np.asarray(carry[2]), rtol=1e-4, atol=1e-6)
  assert same.mean() >= 0.85, (np.asarray(best), np.asarray(carry[2]))
  np.testing.assert_allclose(np.asarray(adv).reshape(16, -1)[same], np.asarray(carry[1])[same],
                             atol=1e-5)


def test_fab_restart_start_reaches_half_eps_in_each_examples_largest_coordinate():
  x = jnp.full((4, 3072), 0.5)
  delta = np.abs(np.asarray(fab_start(jax.random.PRNGKey(0), x, EPS)) - 0.5)
  np.testing.assert_allclose(delta.max(axis=1), 0.5 * EPS, rtol=1e-5)


def test_step_size_checkpoints_match_the_reference_schedule():
  # fra31/auto-attack: first window 22 iterations, then 3 shorter each time, at least 6.
  assert step_size_checkpoints(100) == [(21, 22), (40, 19), (56, 16), (69, 13), (79, 10),
                                        (86, 7), (92, 6), (98, 6)]
  assert step_size_checkpoints(10) == [(1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1),
                                       (8, 1), (9, 1)]


def test_dlr_losses_on_hand_computed_logits():
  logits = jnp.asarray([[4.0, 1.0, 3.0, 0.0, -1.0]])
  y, t = jnp.asarray([0]), jnp.asarray([2])
  # untargeted: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3) = -(4 - 3) / (4 - 1)
  np.testing.assert_allclose(dlr_loss(logits, y), [-1.0 / 3.0], rtol=1e-6)
  # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(4 - 3) / (4 - 0.5)
  np.testing.assert_allclose(dlr_loss_targeted(logits, y, t), [-1.0 / 3.5], rtol=1e-6)


def _linprog_min_linf(t, w, b):
  """min ||d||_inf s.t. <w, t + d> = b, 0 <= t + d <= 1, by linear programming (d, s)."""
  n = len(t)
  cost = np.r_[np.zeros(n), 1.0]
  a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
  a_eq = np.r_[w, 0.0][None]
  bounds = [(-ti, 1.0 - ti) for ti in t] + [(0, None)]
  res = scipy.optimize.linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=a_eq,
                               b_eq=[b - w @ t], bounds=bounds, method='highs')
  return res


def test_linf_hyperplane_projection_is_the_box_constrained_minimum():
  rng = np.random.default_rng(0)
  n = 12
  t = rng.uniform(0, 1, (40, n)).astype(np.float32)
  w = rng.normal(size=(40, n)).astype(np.float32)
  w[:5, :3] = 0.0                                        # zero weights are left alone
  target = rng.uniform(0.2, 0.8, (40, n)).astype(np.float32)
  b = np.sum(w * target, axis=1)                         # the hyperplane meets the box
  b[-4:] = np.sum(np.abs(w[-4:]), axis=1) * 2.0          # ... except for these: infeasible
  d = np.asarray(linf_hyperplane_projection(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
  assert np.all(d[:5, :3] == 0.0)
  for i in range(36):
    res = _linprog_min_linf(t[i].astype(np.float64), w[i].astype(np.float64), float(b[i]))
    assert res.status == 0
    np.testing.assert_allclose(w[i] @ (t[i] + d[i]), b[i], atol=1e-4)
    np.testing.assert_allclose(np.abs(d[i]).max(), res.x[-1], atol=1e-5)
  for i in range(36, 40):                                # infeasible: every coordinate to its face
    np.testing.assert_allclose(t[i] + d[i], (w[i] > 0).astype(np.float32), atol=1e-6)


@pytest.mark.parametrize('rescale', [True, False])
def test_square_schedule_matches_the_reference_p_selection(rescale):
  def reference_p(it, n_queries, p_init=0.8):   # the schedule of Andriushchenko et al. 2020
    if rescale:  # the reference class's resc_schedule
      it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256)):
      if it <= bound:
        return p_init / div
    return p_init / 512

  sides = window_sides(5000, 0.8, 32, 32)
  for n_queries in (100, 5000):
    for query in (0, 5, 6, 25, 26, 99, 100, 101, 1000, 3000, 4000, 4001, 4999):
      level = int(schedule_level(jnp.asarray(query), n_queries, rescale))
      expected = max(int(round(np.sqrt(reference_p(query, n_queries) * 32 * 32))), 1)
      assert sides[level] == expected, (n_queries, query)


def test_autoattack_square_keeps_a_3x3_window_for_its_last_queries():
  # fra31/auto-attack runs Square with resc_schedule=False: p_init / 128 after 4000 queries.
  sides = window_sides(5000, 0.8, 32, 32)
  assert sides[int(schedule_level(jnp.asarray(4500), 5000, False))] == 3
  assert sides[int(schedule_level(jnp.asarray(4500), 5000, True))] == 1


def test_apgd_start_reaches_eps_in_each_examples_largest_coordinate():
  x = jnp.full((6, 8, 8, 3), 0.5)
  start = np.asarray(apgd_start(jax.random.PRNGKey(0), x, EPS))
  delta = np.abs(start - 0.5).reshape(6, -1)
  np.testing.assert_allclose(delta.max(1), EPS, rtol=1e-5)
  assert delta.mean() < 0.6 * EPS  # uniform directions, not the vertices
  edge = np.asarray(apgd_start(jax.random.PRNGKey(1), jnp.zeros((2, 4, 4, 3)), EPS))
  assert edge.min() >= 0.0 and edge.max() <= EPS + 1e-7  # clipped to [0, 1]


def test_run_autoattack_robust_accuracy_never_exceeds_clean(setup):
  logits_fn, x, y = setup
  lines = []
  result = run_autoattack(logits_fn, np.asarray(x), np.asarray(y), eps=2 / 255,
                          key=jax.random.PRNGKey(0), batch_size=16, log_fn=lines.append,
                          n_iter=10, n_target_classes=2, fab_n_iter=10, n_queries=100)
  names = [r['name'] for r in result['records']]
  assert names == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  accs = [r['robust_accuracy'] for r in result['records']]
  assert accs[0] == pytest.approx(result['clean_accuracy'])
  assert all(later <= earlier for earlier, later in zip(accs, accs[1:]))
  assert result['robust_accuracy'] == pytest.approx(accs[-1])
  clean_correct = np.asarray(jnp.argmax(logits_fn(x), -1)) == np.asarray(y)
  robust = result['robust']
  assert robust.dtype == bool and robust.shape == (N_POINTS,)
  assert not np.any(robust & ~clean_correct)
  assert result['robust_accuracy'] == pytest.approx(robust.mean())
  x_adv = result['x_adv']
  assert np.max(np.abs(x_adv - np.asarray(x))) <= 2 / 255 + 1e-5
  fooled = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1)) != np.asarray(y)
  assert np.sum(fooled != ~robust) <= 1     # a point on the boundary may flip with the batch
  assert len(lines) == 5 and all(r['seconds'] >= 0 for r in result['records'])


def test_run_autoattack_rand_version_with_a_stochastic_model(setup):
  logits_fn, x, y = setup

  def noisy_logits(images, keys):   # a randomised defence: Gaussian input noise, per image
    noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)
    return logits_fn(jnp.clip(images + 0.02 * noise, 0.0, 1.0))

  result = run_autoattack(noisy_logits, np.asarray(x[:16]), np.asarray(y[:16]), eps=EPS,
                          key=jax.random.PRNGKey(0), version='rand', batch_size=16, n_iter=5,
                          eot_iter=3, stochastic=True)
  assert [r['name'] for r in result['records']] == ['clean', 'apgd-ce', 'apgd-dlr']
  assert result['robust_accuracy'] <= result['clean_accuracy']
  assert np.max(np.abs(result['x_adv'] - np.asarray(x[:16]))) <= EPS + 1e-5


def test_plus_version_passes(setup, monkeypatch):
  """AutoAttack+: APGD-CE, APGD-DLR and untargeted FAB 5 times each (restarts), Square once,
  APGD-T and FAB-T once per target; each pass attacks only the points left robust."""
  logits_fn, x, y = setup
  passes = []
  run_pass = runner._attack_robust_points

  def recorded(*args, **kwargs):
    robust = args[5]
    passes.append((args[1], kwargs['restart'], kwargs['rank'], int(robust.sum())))
    run_pass(*args, **kwargs)
    passes[-1] += (int(robust.sum()),)

  monkeypatch.setattr(runner, '_attack_robust_points', recorded)
  run_autoattack(logits_fn, np.asarray(x[:16]), np.asarray(y[:16]), eps=1 / 255, version='plus',
                 key=jax.random.PRNGKey(0), batch_size=16, n_iter=2, fab_n_iter=2,
                 n_target_classes=2, n_queries=10)
  expected = ([('apgd-ce', r, None) for r in range(5)] + [('apgd-dlr', r, None) for r in range(5)]
              + [('fab', r, None) for r in range(5)] + [('square', 0, None)]
              + [('apgd-t', 0, 2), ('apgd-t', 0, 3), ('fab-t', 0, 2), ('fab-t', 0, 3)])
  assert [p[:3] for p in passes] == expected
  assert all(p[3] == q[4] for p, q in zip(passes[1:], passes))   # robust after = next's input
  assert passes[-1][4] > 0          # eps 1/255: points survive, so no pass was skipped


def test_cw_l2_lowers_accuracy_with_a_finite_perturbation(setup):
  logits_fn, x, y = setup
  x_adv = np.asarray(cw_l2(logits_fn, x, y, c=0.2, steps=50, lr=0.01))
  delta = x_adv - np.asarray(x)
  assert np.all(np.isfinite(delta))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  clean = accuracy(logits_fn, np.asarray(x), np.asarray(y))
  robust = accuracy(logits_fn, x_adv, np.asarray(y))
  assert robust <= clean - 4 / N_POINTS, (clean, robust)   # c = 0.2 is a weak constant
  fooled = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1)) != np.asarray(y)
  assert np.all(np.linalg.norm(delta[~fooled].reshape(np.sum(~fooled), -1), axis=1) == 0.0)
