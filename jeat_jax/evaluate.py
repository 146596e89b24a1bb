"""--mode=evaluate: clean and robust accuracy under the paper's attacks (Tables 1-3).

Every attack comes from `jeat_jax.attacks` (the same building blocks as
training). Attacks run jitted and batched over all devices, each on all
evaluated points (AutoAttack internally runs each sub-attack on the points
still robust). BatchNorm uses its running statistics. The model enters every
compiled attack as `model_logits`, a pytree whose leaves (the parameters and
BatchNorm statistics) are arguments of the computation, not constants compiled into
it. Every batch (`data.eval_batches`: eval.batch_size points, any number) is padded
to a multiple of the device count, and each point draws its random numbers from its
own key (`attacks.example_keys`), so its verdict is the same on any number of
devices. Writes
WORKDIR/eval/robustness.json and robustness.md (a table laid out like Table 2,
the dataset named by its provenance under `data`), and prints a sanity audit for
signs of gradient masking.

On several processes each feeds its slice of every batch, the per-example
results are gathered on every process (`gather`), and process 0 writes.
AutoAttack's host loop, which compacts the points still robust, runs on every
process on the same points; each of its chunks is split over all devices of all
processes and its results gathered (the same numbers everywhere).
"""
import functools
import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.tree_util import Partial

from jeat_jax import attacks
from jeat_jax import data as data_lib
from jeat_jax import energy
from jeat_jax import errors
from jeat_jax import models
from jeat_jax import parallel
from jeat_jax.attacks import cw as cw_lib

ATTACK_NAMES = {
    'fgsm': 'FGSM', 'pgd20': 'PGD-20 (CE)', 'pgd50': 'PGD-50 (CE)', 'energy1': 'Energy attack, 1 step',
    'energyk': 'Energy attack, k steps', 'cw_l2': 'C&W L2 (c = 0.2)', 'cw_linf': 'CW-inf (PGD on CW margin)',
    'apgd_ce': 'APGD-CE', 'autoattack': 'AutoAttack', 'autoattack_plus': 'AutoAttack+',
    'autoattack_rand': 'AutoAttack rand'}
# Attacks run by `run_autoattack`: name -> (version, None: eval.autoattack_version; the
# version's stages, or these alone). apgd_ce is standard AutoAttack's first stage.
AUTOATTACKS = {'autoattack': (None, None), 'autoattack_plus': ('plus', None),
               'autoattack_rand': ('rand', None), 'apgd_ce': ('standard', ('apgd-ce',))}


def record_name(name: str, cfg) -> str:
  """The name an attack's result is filed under: AutoAttack (or APGD-CE) with its iterations
  and queries cut (`eval.pgd_steps_scale` < 1) is not AutoAttack, and says so:
  'autoattack (0.1x)'."""
  if name in AUTOATTACKS and cfg.pgd_steps_scale != 1.0:
    return f'{name} ({cfg.pgd_steps_scale:g}x)'
  return name


def attack_title(record_name_: str) -> str:
  """'AutoAttack', or 'AutoAttack (0.1x, reduced strength)' for a reduced run."""
  base, _, scale = record_name_.partition(' (')
  return ATTACK_NAMES[base] + (f' ({scale[:-1]}, reduced strength)' if scale else '')


def apply_inference(model, variables, x):
  """The model's logits, BatchNorm on its running statistics, no dropout."""
  return model.apply(variables, x, train=False)


def model_logits(model, params, batch_stats) -> Partial:
  """x -> logits (`apply_inference`) as a pytree: its leaves, the parameters and BatchNorm
  statistics, are arguments of every jitted attack step that takes it (sharded as they
  are: replicated over the mesh), not constants compiled into the step; the model is
  static. Make it once per model: compiled steps are reused for the same object."""
  variables = {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}
  return Partial(functools.partial(apply_inference, model), variables)


def pgd_correct(logits_fn, x_uint8, y, mask, key, *, eps, step_size, num_steps):
  """Number of (unmasked) examples still classified correctly after PGD on CE (Eq. 3), the
  j-th example starting from its own key fold_in(key, j)."""
  x = data_lib.to_float(x_uint8)
  x_adv = attacks.pgd(lambda z: energy.cross_entropy(logits_fn(z), y), x,
                      attacks.example_keys(key, x.shape[0]), eps, step_size, num_steps)
  return jnp.sum((jnp.argmax(logits_fn(x_adv), -1) == y) & mask)


def robust_accuracy_pgd(logits_fn, mesh, x, y, batch_size: int, key, eps=8 / 255,
                        step_size=2 / 255, num_steps=10) -> float:
  """PGD-k robust accuracy (random start, one restart) over (x, y), batched on all devices;
  `logits_fn` (`model_logits`) is an argument of the compiled step."""
  fn = jax.jit(functools.partial(pgd_correct, eps=eps, step_size=step_size, num_steps=num_steps))
  correct = 0
  for i, (xb, yb, mb) in enumerate(data_lib.eval_batches(x, y, batch_size)):
    correct += int(fn(attacks.as_argument(logits_fn), *parallel.global_batch(mesh, xb, yb, mb),
                      jax.random.fold_in(key, i)))
  return correct / x.shape[0]


def attack_fn(name: str, cfg, logits_fn, eps: float) -> Callable:
  """(x, y, key) -> x_adv for one named attack of `eval.attacks` (AutoAttack aside). The
  j-th example of the batch draws its random start from fold_in(key, j)
  (`attacks.example_keys`): the same on any number of devices and with any padding."""
  steps = lambda k: max(1, int(round(k * cfg.pgd_steps_scale)))
  ce = lambda y: lambda z: energy.cross_entropy(logits_fn(z), y)
  e_xy = lambda y: lambda z: energy.energy_xy(logits_fn(z), y)
  margin = lambda y: lambda z: attacks.cw_margin(logits_fn(z), y)
  keys = lambda x, key: attacks.example_keys(key, x.shape[0])
  if name == 'fgsm':
    return lambda x, y, key: attacks.fgsm(ce(y), x, eps)
  if name in ('pgd20', 'pgd50'):
    k = steps(int(name[3:]))
    return lambda x, y, key: attacks.pgd(ce(y), x, keys(x, key), eps, cfg.step_size, k,
                                         unroll=cfg.unroll)
  if name == 'energy1':
    return lambda x, y, key: attacks.energy_attack(e_xy(y), x, keys(x, key), eps, eps, 1)
  if name == 'energyk':
    k = steps(cfg.energy_steps)
    return lambda x, y, key: attacks.energy_attack(e_xy(y), x, keys(x, key), eps, cfg.step_size,
                                                   k, unroll=cfg.unroll)
  if name == 'cw_linf':
    k = steps(50)
    return lambda x, y, key: attacks.pgd(margin(y), x, keys(x, key), eps, cfg.step_size, k,
                                         unroll=cfg.unroll)
  if name == 'cw_l2':
    k = steps(cfg.cw_steps)
    return lambda x, y, key: cw_lib.cw_l2(logits_fn, x, y, key, c=cfg.cw_c, steps=k, lr=cfg.cw_lr)
  raise ValueError(name)


def is_linf_attack(name: str) -> bool:
  return name != 'cw_l2'


def make_attack_check(name, cfg, logits_fn) -> Callable:
  """(x_uint8, y, key, eps) -> (correct after the attack, x_adv inside the eps-ball and [0, 1]).

  Compiled once per attack: eps is an argument, so the audit's eps sweep reuses it, and
  so is `logits_fn` (`model_logits`: its variables are not compiled in).
  """
  def check(fn, x_adv, xb, yb, eps):
    inside = jnp.max(jnp.abs(x_adv - xb).reshape(xb.shape[0], -1), axis=1) <= eps + 1e-6
    inside = inside | (not is_linf_attack(name))
    in_box = jnp.all(((x_adv >= 0) & (x_adv <= 1)).reshape(xb.shape[0], -1), axis=1)
    return (jnp.argmax(fn(x_adv), -1) == yb), inside & in_box

  def correct_after_attack(fn, xb_uint8, yb, k, eps):
    xb = data_lib.to_float(xb_uint8)
    return check(fn, attack_fn(name, cfg, fn, eps)(xb, yb, k), xb, yb, eps)

  if name == 'cw_l2':  # C&W drives its own (host or device) loop of jitted steps
    check = jax.jit(check)
  else:
    correct_after_attack = jax.jit(correct_after_attack)
  return functools.partial(correct_after_attack, attacks.as_argument(logits_fn))


def robust_mask(name, cfg, logits_fn, mesh, x, y, eps, key, restarts: int,
                attack_check: Optional[Callable] = None,
                batch_size: Optional[int] = None) -> np.ndarray:
  """Per-example robustness of the len(x) examples under attack `name` (robust under every
  restart). Each process feeds its slice of every batch; every process returns the whole mask."""
  attack_check = attack_check or make_attack_check(name, cfg, logits_fn)
  batch_size = batch_size or cfg.batch_size
  robust = []
  for i, (xb, yb, _) in enumerate(data_lib.eval_batches(x, y, batch_size)):
    points = min(batch_size, x.shape[0] - i * batch_size)   # the padding is at the batch's end
    ok = np.ones(points, bool)
    for r in range(restarts if name in ('pgd20', 'pgd50', 'cw_linf', 'energyk') else 1):
      k = jax.random.fold_in(jax.random.fold_in(key, i), r)
      correct, valid = gather(attack_check(*parallel.global_batch(mesh, xb, yb), k,
                                           jnp.float32(eps)))
      if not valid[:points].all():
        raise AssertionError(f'{name} returned images outside the eps-ball or [0, 1]')
      ok &= correct[:points]
    robust.append(ok)
  return np.concatenate(robust)


def clean_mask(logits_fn, mesh, x, y, batch_size) -> np.ndarray:
  """Per-example correctness of the model on (x, y), the whole mask on every process."""
  fn = jax.jit(lambda f, xb, yb: jnp.argmax(f(data_lib.to_float(xb)), -1) == yb)
  out = [gather(fn(attacks.as_argument(logits_fn), *parallel.global_batch(mesh, xb, yb)))
         [:min(batch_size, x.shape[0] - i * batch_size)]
         for i, (xb, yb, _) in enumerate(data_lib.eval_batches(x, y, batch_size))]
  return np.concatenate(out)


def gather(arrays):
  """Arrays sharded over the devices of every process (outputs of a computation on global
  batches), whole on the host of every process; a collective: every process calls it."""
  return multihost_utils.process_allgather(arrays, tiled=True)


def noisy_logits(logits_fn, noise_std, x, keys):
  """Logits of x + N(0, noise_std^2), clipped to [0, 1], each image's noise drawn from its
  own key (`keys`: one per image)."""
  noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
  return logits_fn(jnp.clip(x + noise_std * noise, 0, 1))


def stochastic_logits(logits_fn, noise_std: float) -> Partial:
  """For models random at test time: (x, keys) -> `noisy_logits`, a pytree (`model_logits`)."""
  return Partial(noisy_logits, attacks.as_argument(logits_fn), jnp.float32(noise_std))


def autoattack_points(name: str, cfg, n: int) -> int:
  """How many of the n points (the first ones) the AutoAttack `name` runs on:
  `eval.autoattack_num_examples` (0: all n), or for autoattack_plus, the costliest,
  `eval.autoattack_plus_num_examples` where > 0; apgd_ce (as cheap as PGD-100) on all n."""
  if name == 'apgd_ce':
    return n
  m = cfg.autoattack_num_examples or n
  if name == 'autoattack_plus' and cfg.autoattack_plus_num_examples:
    m = cfg.autoattack_plus_num_examples
  return min(m, n)


def run_autoattack(cfg, logits_fn, x, y, eps, key, version: Optional[str] = None,
                   mesh=None, stages: Optional[Tuple[str, ...]] = None) -> Dict:
  """`runner.run_autoattack` on host arrays (x uint8, the same on every process): every
  process runs its host loop on the same points with the same keys, each chunk split over
  all devices of `mesh` (default: all), so every process gets the same result.

  `version` (standard, plus, rand) defaults to `eval.autoattack_version`; `stages`
  (runner's attack names) replaces its list. The rand version draws the model's test-time
  noise (`eval.test_noise_std`) where there is any."""
  from jeat_jax.attacks.autoattack import runner  # pylint: disable=g-import-not-at-top
  version = version or cfg.autoattack_version
  stochastic = version == 'rand' and cfg.test_noise_std > 0
  fn = stochastic_logits(logits_fn, cfg.test_noise_std) if stochastic else logits_fn
  scaled = lambda k: max(1, int(round(k * cfg.pgd_steps_scale)))  # 1.0: the reference counts
  return runner.run_autoattack(fn, data_lib.to_float(jnp.asarray(x)), y, eps=eps, key=key,
                               version=version, attacks=stages, batch_size=cfg.batch_size,
                               stochastic=stochastic, log_fn=logging.info, n_iter=scaled(100),
                               fab_n_iter=scaled(100), n_queries=scaled(5000), mesh=mesh)


# ----------------------------------------------------------------------------- audit

def audit(cfg, logits_fn, mesh, x, y, records: List[Dict], key,
          masks: Optional[Dict[str, np.ndarray]] = None) -> Tuple[List[str], Dict[int, float]]:
  """Signs of gradient masking, in the manner of AutoAttack's own checks.

  AutoAttack+ is compared with standard AutoAttack on the points both ran on: with
  `masks` (record name -> per-point robust mask), on the first points common to both.

  Returns (warnings, sweep): the warning messages, and the PGD-20 robust
  accuracy of the first `audit_num_examples` points at each eps in 255ths
  (8, 16, 32, 64, 128).
  """
  warnings = []
  aa = next((r for r in records if r['name'] == 'autoattack'), None)
  if aa and aa.get('stages'):
    stages = {s['name']: s['robust_accuracy'] for s in aa['stages']}
    order = [s['name'] for s in aa['stages']]
    if 'square' in stages and len(order) > 1:
      before = stages[order[order.index('square') - 1]]
      if before - stages['square'] > 0.002:
        warnings.append(f'the black-box Square attack lowered robust accuracy from {before:.4f} '
                        f'to {stages["square"]:.4f} after the white-box attacks: '
                        'possible gradient masking')
  plus = next((r for r in records if r['name'] == 'autoattack_plus'), None)
  if aa and plus and (aa['num_examples'] == plus['num_examples'] or masks is not None):
    m = min(aa['num_examples'], plus['num_examples'])
    aa_acc, plus_acc = ((float(masks[r['name']][:m].mean()) for r in (aa, plus)) if masks
                        else (aa['robust_accuracy'], plus['robust_accuracy']))
    if aa_acc - plus_acc > 0.01:
      warnings.append(f'AutoAttack+ lowered robust accuracy from {aa_acc:.4f} '
                      f'(standard AutoAttack) to {plus_acc:.4f} on the same {m} points: '
                      'restarts and untargeted attacks find what the standard version misses; '
                      'possible gradient masking')
  n = min(cfg.audit_num_examples, x.shape[0])
  xs, ys = x[:n], y[:n]
  sweep = {}
  pgd20 = make_attack_check('pgd20', cfg, logits_fn)
  sweep_batch = min(cfg.batch_size, n)  # one batch of the subset, not one of eval.batch_size
  for eps_255 in (8, 16, 32, 64, 128):
    eps = eps_255 / 255
    mask = robust_mask('pgd20', cfg, logits_fn, mesh, xs, ys, eps, key, 1, pgd20, sweep_batch)
    sweep[eps_255] = float(mask.mean())
  if sweep[128] > 0.05:
    warnings.append(f'PGD-20 robust accuracy is still {sweep[128]:.3f} at eps 128/255 (sweep '
                    f'{sweep}): it should fall towards 0; possible gradient masking')
  values = list(sweep.values())
  if any(b > a + 0.02 for a, b in zip(values, values[1:])):
    warnings.append(f'robust accuracy rises with eps in the sweep {sweep}: attack failures')
  batch = data_lib.to_float(jnp.asarray(xs[:min(n, 32)]))
  out1, out2 = np.asarray(logits_fn(batch)), np.asarray(logits_fn(batch))
  if not np.array_equal(out1, out2):
    warnings.append('the model output is not deterministic: use eval.autoattack_version=rand')
  if out1.min() >= 0 and np.allclose(out1.sum(-1), 1.0, atol=1e-4):
    warnings.append('the model returns probabilities instead of logits: attacks on softmax '
                    'outputs are weakened')
  return warnings, sweep


# ----------------------------------------------------------------------------- the command

def markdown_tables(model_name: str, recipe: str, clean: float, records: List[Dict]) -> str:
  """Table 2's layout for this run, then every attack."""
  acc = {r['name']: r['robust_accuracy'] for r in records}
  pct = lambda k: f'{100 * acc[k]:.2f}%' if k in acc else '-'
  lines = ['| MODELS | METHODS | ACCURACY | PGD (eps=8/255) | C&W | AUTOATTACK |',
           '|---|---|---|---|---|---|',
           f'| {model_name} | {recipe} | {100 * clean:.2f}% | {pct("pgd50") if "pgd50" in acc else pct("pgd20")} '
           f'| {pct("cw_l2")} | {pct("autoattack")} |', '',
           'PGD column: PGD-50 (PGD-20 where PGD-50 was not run); C&W column: the L2 C&W attack '
           'with c = 0.2 as the paper names it.', '',
           '| attack | eps | examples | robust accuracy | seconds |', '|---|---|---|---|---|',
           f'| clean | - | {records[0]["num_examples"] if records else "-"} | {100 * clean:.2f}% | - |']
  for r in records:
    eps = f'{r["eps"] * 255:.0f}/255' if r['name'] != 'cw_l2' else 'L2, c = 0.2'
    lines.append(f'| {attack_title(r["name"])} | {eps} | {r["num_examples"]} | '
                 f'{100 * r["robust_accuracy"]:.2f}% | {r["seconds"]:.1f} |')
  return '\n'.join(lines) + '\n'


def write_results(out: str, result: Dict, table: str, masks: Dict[str, np.ndarray]) -> None:
  """OUT/robustness.json, OUT/robustness.md, and OUT/robust_points.npz: per test point
  (first_example onwards) whether it is classified correctly ('clean') and still after
  each attack (its record name) (process 0's job)."""
  from jeat_jax.files import atomic_write, write_json_atomic, write_text_atomic  # pylint: disable=g-import-not-at-top
  write_json_atomic(os.path.join(out, 'robustness.json'), result)
  write_text_atomic(os.path.join(out, 'robustness.md'), table)
  atomic_write(os.path.join(out, 'robust_points.npz'), lambda tmp: np.savez(
      tmp, **{name: np.asarray(mask, bool) for name, mask in masks.items()}))


def evaluate_run(config, workdir: str) -> Dict:
  """Evaluates the latest checkpoint of `workdir` with `config.eval`."""
  from jeat_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  cfg = config.eval
  model, state, ds, mesh = state_lib.load_trained(config, workdir)
  logits_fn = model_logits(model, state.params, state.batch_stats)
  first = cfg.first_example
  if not 0 <= first < ds.x_test.shape[0]:
    raise errors.ConfigError(
        f'eval.first_example={first} is outside the {ds.x_test.shape[0]} test images')
  n = min(cfg.num_examples, ds.x_test.shape[0] - first)
  x, y = ds.x_test[first:first + n], ds.y_test[first:first + n]
  key = jax.random.PRNGKey(cfg.seed)
  clean = clean_mask(logits_fn, mesh, x, y, cfg.batch_size)
  logging.info('clean accuracy %.4f on %d test images', clean.mean(), n)
  names = [a for a in cfg.attacks.split(',') if a]
  records, masks = [], {'clean': clean}
  for i, name in enumerate(names):
    start = time.time()
    k = jax.random.fold_in(key, i)
    m = n
    if name in AUTOATTACKS:
      m = autoattack_points(name, cfg, n)
      version, stages = AUTOATTACKS[name]
      out = run_autoattack(cfg, logits_fn, x[:m], y[:m], cfg.eps, k, version, mesh, stages)
      robust = np.asarray(out['robust'])
      stages = [{'name': s['name'], 'robust_accuracy': float(s['robust_accuracy'])}
                for s in out['records']]
    else:
      robust = robust_mask(name, cfg, logits_fn, mesh, x, y, cfg.eps, k, cfg.pgd_restarts)
      stages = None
    record = {'name': record_name(name, cfg), 'eps': float(cfg.eps), 'num_examples': int(m),
              'robust_accuracy': float(np.mean(robust & clean[:m])),
              'seconds': round(time.time() - start, 2)}
    if stages:
      record['stages'] = stages
    records.append(record)
    masks[record['name']] = robust & clean[:m]
    logging.info('[%d/%d] %s: robust accuracy %.4f (%.1fs)', i + 1, len(names),
                 attack_title(record['name']),
                 record['robust_accuracy'], record['seconds'])
  result = {'clean_accuracy': float(clean.mean()), 'num_examples': int(n), 'first_example': first,
            'attacks': records,
            'model': models.model_name(config.model), 'recipe': config.recipe,
            'step': int(state.step), 'data_source': ds.source, 'data': ds.provenance}
  if cfg.audit:
    warnings, sweep = audit(cfg, logits_fn, mesh, x, y, records, jax.random.fold_in(key, 999),
                            masks)
    result['audit'] = {'warnings': warnings, 'eps_sweep_pgd20': sweep}
    for w in warnings:
      logging.warning('AUDIT: %s', w)
    if not warnings:
      logging.info('AUDIT: no sign of gradient masking (eps sweep %s)', sweep)
  table = markdown_tables(models.model_name(config.model), config.recipe, result['clean_accuracy'],
                          records)
  if jax.process_index() == 0:
    write_results(os.path.join(workdir, 'eval'), result, table, masks)
  multihost_utils.sync_global_devices('evaluate: results written')
  print(table)
  return result
