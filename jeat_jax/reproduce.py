"""The paper end to end at a chosen scale: train, evaluate, sample, score, plot, report.

  python -m jeat_jax.reproduce --scale=cpu --workdir=runs/repro_cpu \\
      --data_path=../shared/data/cifar10-jpeg-standin.npz

Every run of `RUNS` (the recipes of the paper, noise injection at three
strengths) trains in WORKDIR/<run> with `configs/<recipe>.py:<scale>`, then is
evaluated (`--mode=evaluate`), sampled and scored (`--mode=sample`, `fid`) and
analysed (`--mode=analyze`). A stage whose output exists is skipped, so an
interrupted reproduction resumes where it stopped and a recipe already trained
is not trained again. Finally WORKDIR/REPORT.md gets the paper's Table 1 and
Table 2 layouts and the IS/FID row of Fig. 6 filled with this run's numbers,
the paper's beside them, the figures inline and a verdict per claim, and
names the dataset the runs recorded.

On several processes (`--distributed`, config.distributed.*: the same command
on every process, one shared --workdir) every process runs every stage, each
feeding its share of the data; what is done is decided by process 0's view of
the workdir, and process 0 alone writes the reports, timings and figures.
"""
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from jeat_jax import logs
logs.quiet_tensorflow()  # before anything imports TensorFlow
# pylint: disable=g-import-not-at-top
from jeat_jax import analysis, evaluate, fair, files, generation, hardware, parallel, train
from jeat_jax import state as state_lib
from jeat_jax.config_validation import validate, with_overrides
from jeat_jax.errors import ConfigError, Preempted
from jeat_jax.files import read_json, write_json_atomic, write_text_atomic

SCALES = ('cpu', 'cpu-fair', 'paper', 'smoke')
CONFIG_SCALE = {'cpu': 'cpu', 'cpu-fair': 'cpu', 'paper': None, 'smoke': 'smoke'}  # get_config's
STAGES = ('train', 'evaluate', 'sample', 'fid', 'analyze', 'report')
FAIR_STAGES = ('train', 'evaluate', 'sample', 'fid', 'report')  # cpu-fair's default

# Paper numbers (CIFAR-10, WRN-28-10): Table 1, Table 2, Fig. 6 (IS, FID).
PAPER_TABLE1 = {'clean': 0.9439, 'pgd': 0.0012, 'energy': 0.0011}
PAPER_TABLE2 = {  # clean, PGD (8/255), C&W, AutoAttack
    'trades': (0.8425, 0.5581, 0.8006, 0.5157), 'fast': (0.8416, 0.4934, 0.7319, 0.4532),
    'free': (0.8596, 0.4633, 0.7254, 0.4534), 'jem': (0.9290, 0.2167, 0.4167, 0.1912),
    'jeat': (0.8516, 0.6429, 0.8047, 0.6204)}
PAPER_GENERATION = {'at': (7.50, 60.90), 'prejeat': (7.91, 56.85), 'jem': (8.66, 38.40),
                    'jeat': (8.80, 38.24)}  # (IS, FID)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  recipe: str
  overrides: Tuple[Tuple[str, object], ...] = ()
  eq16: bool = False  # also sample by Eq. 16 (into samples_eq16/)


RUNS = (
    Run('natural', 'natural'),
    Run('noise8', 'noise', (('perturbation.sigma', 8 / 255),)),
    Run('noise16', 'noise', (('perturbation.sigma', 16 / 255),)),
    Run('noise24', 'noise', (('perturbation.sigma', 24 / 255),)),
    Run('at', 'at', eq16=True),
    Run('prejeat', 'prejeat'),
    Run('jeat', 'jeat'),
    Run('jem', 'jem'),
    Run('trades', 'trades'),
    Run('fast', 'fast'),
    Run('free', 'free'),
    Run('weat', 'weat'),  # a successor (ECCV 2024): not in the paper, run when --runs names it
    Run('ebjdat', 'ebjdat'),  # a successor (CVPR 2026): likewise
)
# --scale=cpu-fair: each recipe of the fair comparison on each seed (jeat_jax/fair.py).
FAIR_RUNS = tuple(Run(fair.run_name(recipe, seed), fair.config_name(recipe),
                      tuple(fair.run_overrides(recipe, seed).items()))
                  for seed in fair.SEEDS for recipe in fair.START_ORDER)
RUNS_BY_NAME = {r.name: r for r in RUNS + FAIR_RUNS}
SUCCESSOR_RUNS = ('weat', 'ebjdat')  # not in the paper: run when --runs names them
PAPER_RUNS = tuple(r.name for r in RUNS if r.name not in SUCCESSOR_RUNS)
ADVERSARIAL = ('at', 'prejeat', 'jeat', 'trades', 'fast', 'free', 'weat', 'ebjdat')
DYNAMICS_RUNS = ('at', 'jeat')  # Fig. 3 and 12 are of the PGD-AT model; JEAT beside it


# At `cpu` scale the reproduction must finish in about 2 hours on 2 cores (with
# --jobs=2): noise injection, TRADES, Fast and Free train shorter than their
# `:cpu` configs (which are sized for 20 minutes each), each run is attacked with
# what its table needs (PGD-20 and standard AutoAttack on 1000 test points), and FID
# uses 500 samples against 2000 training images (Inception runs at ~5 img/s).
CPU_TRAINING = {
    'noise8': {'num_epochs': 1}, 'noise16': {'num_epochs': 1}, 'noise24': {'num_epochs': 1},
    'trades': {'num_train_steps': 195}, 'weat': {'num_train_steps': 195},
    'ebjdat': {'num_train_steps': 195},
    'fast': {'num_epochs': 1}, 'free': {'num_train_steps': 195},
}
CPU_ATTACKS = {'natural': 'pgd20,energyk', 'noise8': 'pgd20', 'noise16': 'pgd20',
               'noise24': 'pgd20'}  # the others: pgd20,autoattack (C&W only at paper scale)


def scale_overrides(scale: str, run: Run) -> Dict[str, object]:
  """What the reproduction trains and measures at each scale, on top of each recipe's config."""
  if scale == 'cpu':
    out = {'eval.attacks': CPU_ATTACKS.get(run.name, 'pgd20,autoattack'),
           'eval.num_examples': 1000, 'eval.autoattack_num_examples': 0,   # all 1000
           'eval.audit_num_examples': 100,
           'sample.num_samples': 500, 'fid.max_reference': 2000, 'dynamics_every_steps': 50,
           **CPU_TRAINING.get(run.name, {})}
  elif scale == 'cpu-fair':
    out = {**fair.TRAINING, **fair.EVALUATION}
  elif scale == 'smoke':
    out = {'eval.attacks': 'pgd20,energyk,cw_linf'}
  else:
    out = {'eval.attacks': 'pgd20,pgd50,energyk,cw_l2,cw_linf,autoattack',
           'sample.num_samples': 10000, 'dynamics_every_steps': 500}
  if run.name != 'jeat':  # Fig. 7 (SSIM neighbours of the samples) is JEAT's only
    out['sample.neighbours'] = 0
  return out


def make_config(run: Run, scale: str, data_path: str, distributed: Optional[Dict] = None):
  """configs/<recipe>.py:<scale> with the scale's and the run's overrides, the npz data
  path (if any) and `distributed.*` settings (if any: {'enabled': True, ...})."""
  config = importlib.import_module(f'configs.{run.recipe}').get_config(CONFIG_SCALE[scale])
  settings = dict(scale_overrides(scale, run))
  settings.update(dict(run.overrides))
  if data_path:
    settings.update({'data.source': 'npz', 'data.path': data_path})
  settings.update({f'distributed.{k}': v for k, v in (distributed or {}).items()})
  return with_overrides(config, settings)


def validated_configs(runs: List[Run], scale: str, data_path: str,
                      distributed: Optional[Dict] = None,
                      devices: Optional[int] = None) -> Dict[str, object]:
  """{run name: its make_config}, each checked by config_validation.validate before any run
  starts, so a bad value stops the reproduction at once, naming the run and the key, not
  hours later inside a stage. `devices`: see validate (the parent of --jobs > 1 leaves
  JAX's backend, and an accelerator's memory, to its children)."""
  configs = {}
  for run in runs:
    config = make_config(run, scale, data_path, distributed)
    try:
      validate(config, devices)
    except ConfigError as e:
      raise app.UsageError(f'run {run.name} at --scale={scale}: {e}') from e
    configs[run.name] = config
  return configs


def sample_subdirs(run: Run) -> List[Tuple[str, str]]:
  return [('samples', 'eq17')] + ([('samples_eq16', 'eq16')] if run.eq16 else [])


def seen_by_process_0(path: str) -> bool:
  """Whether `path` exists as process 0 sees it. Every process takes the same decision
  (a collective where there are several): one that skipped a stage the others run
  would leave them waiting in its collectives."""
  exists = os.path.exists(path)
  if jax.process_count() == 1:
    return exists
  return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def _timed(workdir: str, stage: str, fn, *args):
  """Runs one stage and adds its wall seconds to WORKDIR/timings.json (also when it fails;
  written by process 0)."""
  start = time.time()
  try:
    fn(*args)
  finally:
    if jax.process_index() == 0:
      _add_timing(workdir, stage, time.time() - start)


def _add_timing(workdir: str, stage: str, seconds: float) -> None:
  path = os.path.join(workdir, 'timings.json')
  timings = read_json(path) or {}
  timings[stage] = round(timings.get(stage, 0.0) + seconds, 1)
  write_json_atomic(path, timings)


def run_stages(run: Run, config, workdir: str, stages) -> None:
  """Each stage once: skipped when its output is already in `workdir`.

  A training that diverges past its retries is recorded in WORKDIR/failed.json
  and the run is left out from then on (delete that file to try again). With
  several processes every one runs the same stages (process 0's view of what is
  done decides) and process 0 writes the files.
  """
  done = lambda *p: seen_by_process_0(os.path.join(workdir, *p))
  if done('failed.json'):
    logging.warning('%s: skipped, it failed before (%s)', run.name, os.path.join(workdir, 'failed.json'))
    return
  if 'train' in stages and not done('results.json'):
    try:
      _timed(workdir, 'train', train.train_and_evaluate, config, workdir)
    except train.TrainingDiverged as e:
      logging.error('%s: %s; going on with the other runs', run.name, e)
      if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, 'failed.json'), {'stage': 'train', 'error': str(e)})
      return
  if not done('results.json'):
    return
  if 'evaluate' in stages and not done('eval', 'robustness.json'):
    _timed(workdir, 'evaluate', evaluate.evaluate_run, config, workdir)
  root = os.path.dirname(os.path.abspath(workdir))
  for subdir, objective in sample_subdirs(run):
    c = config.copy_and_resolve_references()
    c.sample.subdir, c.sample.objective = subdir, objective
    # The runs of a reproduction (same data) share one fit of the class Gaussians and one
    # set of FID reference statistics, in ROOT.
    c.sample.gaussian_cache = c.sample.gaussian_cache or generation.gaussian_cache_path(c, root)
    c.fid.reference_dir = c.fid.reference_dir or root
    if 'sample' in stages and not done(subdir, 'samples.npz'):
      _timed(workdir, 'sample', generation.sample_run, c, workdir)
    if 'fid' in stages and not seen_by_process_0(generation.fid_json_path(c, workdir)):
      try:
        _timed(workdir, 'fid', generation.fid_run, c, workdir)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('%s: FID not computed (%s); the report shows "-"', run.name, e)
  if 'analyze' in stages and not done('figures', 'energy_landscape.npz'):
    _timed(workdir, 'analyze', analysis.analyze_run, config, workdir)


# ----------------------------------------------------------------------------- report


def collect(root: str, runs=RUNS) -> Dict[str, dict]:
  """Everything the runs wrote, per run name."""
  out = {}
  for run in runs:
    d = os.path.join(root, run.name)
    if not os.path.isdir(d):
      continue
    ev = read_json(os.path.join(d, 'eval', 'robustness.json'))
    results = read_json(os.path.join(d, 'results.json'))
    out[run.name] = {
        'results': results,
        'data': (results or {}).get('data') or (ev or {}).get('data'),
        'robustness': ev,
        'attacks': {a['name']: a for a in ev['attacks']} if ev else {},
        'clean': ev['clean_accuracy'] if ev else None,
        'audit': (ev or {}).get('audit', {}).get('warnings', []),
        'fid': read_json(os.path.join(d, 'fid.json')),
        'fid_eq16': read_json(os.path.join(d, 'samples_eq16', 'fid.json')),
        'timings': read_json(os.path.join(d, 'timings.json')) or {},
        'failed': read_json(os.path.join(d, 'failed.json')),
        'dynamics': ({k: float(np.mean([v for _, v in pts])) for k, pts in
                      analysis.read_scalars(d, [f'{n}_mean' for n in analysis.DYNAMICS]).items()}
                     if run.name in DYNAMICS_RUNS else {}),
        'gradient_norms': _gradient_norms(d),
    }
  return out


def _gradient_norms(run_dir: str) -> Optional[dict]:
  """Fig. 12: the per-step gradient norms of the run's generation by Eq. 16 (both terms
  move the chain) where it has one, else by Eq. 17; None without a record."""
  for subdir in ('samples_eq16', 'samples'):
    path = os.path.join(run_dir, subdir, 'gradient_norms.npz')
    if os.path.exists(path):
      with np.load(path) as f:
        return {'objective': str(f['objective']), 'columns': [str(c) for c in f['columns']],
                'norms': np.asarray(f['norms'])}
  return None


def describe_data(provenance: dict) -> str:
  """A dataset as a run recorded it (`data` of results.json / robustness.json): TFDS name
  and version, or the npz path and its sha256; plus the training subset, if any."""
  if provenance.get('source') == 'tfds':
    text = f'TFDS `{provenance.get("name")}` version {provenance.get("version")}'
  elif provenance.get('source') == 'npz':
    text = f'`{provenance.get("path")}` (sha256 `{provenance.get("sha256")}`)'
  else:
    text = json.dumps(provenance, sort_keys=True)
  if provenance.get('train_subset'):
    text += (f', training subset of {provenance["train_subset"]} images (seed '
             f'{provenance.get("train_subset_seed")})')
  return text


def data_line(runs: Dict[str, dict]) -> str:
  """'Data: ...' naming the dataset(s) the runs recorded, with the runs of each."""
  by_data = {}
  for name, r in runs.items():
    if r.get('data'):
      by_data.setdefault(describe_data(r['data']), []).append(name)
  if not by_data:
    return 'Data: not recorded by the runs (no `data` in their results.json / robustness.json).'
  if len(by_data) == 1:
    return f'Data: {next(iter(by_data))}.'
  return 'Data: ' + '; '.join(f'{d} ({", ".join(n)})' for d, n in by_data.items()) + '.'


def _pct(v) -> str:
  return '-' if v is None else f'{100 * v:.2f}%'


def _acc(r: dict, attack: str):
  a = r['attacks'].get(attack)
  return None if a is None else a['robust_accuracy']


def _fid(r: Optional[dict], key='fid') -> Optional[float]:
  return None if not r or r.get(key) is None else float(r[key])


def _num(v, fmt='{:.2f}') -> str:
  return '-' if v is None else fmt.format(v)


def _counts(runs: Dict[str, dict]) -> str:
  """'PGD-20 on 1000, autoattack on 200' from the records themselves."""
  counts = {}
  for r in runs.values():
    for name, a in r['attacks'].items():
      counts.setdefault(name, set()).add(a['num_examples'])
  return ', '.join(f'{name} on {"/".join(map(str, sorted(n)))}' for name, n in sorted(counts.items()))


def table1(runs: Dict[str, dict]) -> str:
  r = runs.get('natural')
  ours = (r['clean'], _acc(r, 'pgd20'), _acc(r, 'energyk')) if r else (None, None, None)
  rows = [('No attack', ours[0], PAPER_TABLE1['clean']),
          ('Normal attack (PGD-20 on CE, Eq. 14)', ours[1], PAPER_TABLE1['pgd']),
          ('Energy attack (k steps on E(x, y), Eq. 18)', ours[2], PAPER_TABLE1['energy'])]
  lines = ['| Attack | this run | paper (CIFAR-10, WRN-28-10) |', '|---|---|---|']
  lines += [f'| {name} | {_pct(v)} | {_pct(p)} |' for name, v, p in rows]
  return '\n'.join(lines)


def table2(runs: Dict[str, dict]) -> str:
  lines = ['| METHOD | ACCURACY | PGD-20 (8/255) | C&W (CW-inf) | AUTOATTACK | paper: acc / PGD / C&W / AA |',
           '|---|---|---|---|---|---|']
  for name, r in runs.items():
    paper = PAPER_TABLE2.get(name)
    paper_cell = ' / '.join(_pct(v) for v in paper) if paper else '-'
    lines.append(f'| {name} | {_pct(r["clean"])} | {_pct(_acc(r, "pgd20"))} | '
                 f'{_pct(_acc(r, "cw_linf"))} | {_pct(_acc(r, "autoattack"))} | {paper_cell} |')
  return '\n'.join(lines)


def generation_table(runs: Dict[str, dict]) -> str:
  lines = ['| model | sampler | FID (this run) | IS (this run) | paper IS / FID |', '|---|---|---|---|---|']
  for name, r in runs.items():
    paper = PAPER_GENERATION.get(name)
    for label, key in (('Eq. 17', 'fid'), ('Eq. 16', 'fid_eq16')):
      f = r[key]
      if f is None and key == 'fid_eq16':
        continue
      is_ = _fid(f, 'inception_score')
      lines.append(f'| {name} | {label} | {_num(_fid(f))} | {_num(is_)} | '
                   f'{f"{paper[0]:.2f} / {paper[1]:.2f}" if paper and key == "fid" else "-"} |')
  return '\n'.join(lines)


def timing_table(runs: Dict[str, dict]) -> Tuple[str, float]:
  """Wall minutes per run and stage, as the stages recorded them (timings.json); a
  training found done before this reproduction shows the time its results.json recorded."""
  stages = ('train', 'evaluate', 'sample', 'fid', 'analyze')
  lines = ['| run | ' + ' | '.join(stages) + ' | total |', '|---' * (len(stages) + 2) + '|']
  grand = 0.0
  for name, r in runs.items():
    t = dict(r['timings'])
    trained_before = 'train' not in t and r['results']
    if trained_before:  # the training's seconds over all its sessions
      t['train'] = r['results'].get('wall_seconds', r['results'].get('wall_seconds_this_session'))
    cells = [_num(t.get(s) and t[s] / 60, '{:.1f}') for s in stages]
    if trained_before:
      cells[0] += '*'
    total = sum(t.get(s) or 0.0 for s in stages)
    grand += total
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {total / 60:.1f} |')
  return '\n'.join(lines), grand


def verdicts(runs: Dict[str, dict], flatness: Dict[str, float]) -> List[str]:
  """One sentence per claim of the paper, from this run's numbers."""
  out = []
  nat = runs.get('natural')
  if nat and _acc(nat, 'pgd20') is not None and _acc(nat, 'energyk') is not None:
    p, e = _acc(nat, 'pgd20'), _acc(nat, 'energyk')
    holds = abs(p - e) <= 0.02 and max(p, e) <= 0.05
    out.append(f'Table 1, the energy attack is as strong as PGD on a natural model: '
               f'{"holds" if holds else "does not hold"} (PGD {_pct(p)}, energy {_pct(e)}).')
  adv = {n: _acc(r, 'autoattack') if _acc(r, 'autoattack') is not None else _acc(r, 'pgd20')
         for n, r in runs.items() if n in ADVERSARIAL}
  adv = {n: v for n, v in adv.items() if v is not None}
  if 'jeat' in adv and len(adv) > 1:
    best = max(adv, key=adv.get)
    out.append(f'Table 2, JEAT is the most robust method: {"holds" if best == "jeat" else "does not hold"} '
               f'(robust accuracy, AutoAttack where run: ' +
               ', '.join(f'{n} {_pct(v)}' for n, v in sorted(adv.items(), key=lambda t: -t[1])) + ').')
  fids = {n: _fid(r['fid']) for n, r in runs.items() if _fid(r['fid']) is not None}
  if 'at' in fids and 'natural' in fids:
    holds = fids['at'] < fids['natural']
    out.append(f'Sec. 3.1, a robust classifier generates better images than a natural one: '
               f'{"holds" if holds else "does not hold"} (FID {fids["at"]:.1f} vs {fids["natural"]:.1f}).')
  at = runs.get('at')
  if at and _fid(at['fid']) is not None and _fid(at['fid_eq16']) is not None:
    a17, a16 = _fid(at['fid']), _fid(at['fid_eq16'])
    out.append(f'Sec. 3.4, generating by E(x, y) alone (Eq. 17) beats Eq. 16 on the AT model: '
               f'{"holds" if a17 < a16 else "does not hold"} (FID {a17:.1f} vs {a16:.1f}).')
  gen = {n: fids[n] for n in ('at', 'prejeat', 'jem', 'jeat') if n in fids}
  if 'jeat' in gen and len(gen) > 1:
    best = min(gen, key=gen.get)
    out.append(f'Fig. 6, JEAT generates the best images (lowest FID): '
               f'{"holds" if best == "jeat" else "does not hold"} (' +
               ', '.join(f'{n} {v:.1f}' for n, v in sorted(gen.items(), key=lambda t: t[1])) + ').')
  noise = [(s, fids.get(f'noise{s}')) for s in (8, 16, 24)]
  if all(v is not None for _, v in noise):
    holds = noise[2][1] < noise[1][1] < noise[0][1]
    out.append(f'Fig. 5, stronger noise injection gives better generation: '
               f'{"holds" if holds else "does not hold"} (FID ' +
               ', '.join(f'sigma {s}/255: {v:.1f}' for s, v in noise) + ').')
  dyn = (runs.get('at') or {}).get('dynamics') or {}
  if all(f'{n}_mean' in dyn for n in analysis.DYNAMICS):
    up, down = dyn['dx_energy_xy_mean'], dyn['dtheta_energy_xy_mean']
    out.append('Fig. 3(a), in PGD-AT the attack raises E(x, y) and the update lowers it again: '
               f'{"holds" if up > 0 > down else "does not hold"} (mean over training: '
               f'Delta_x E(x, y) {up:+.3f}, Delta_theta E(x, y) {down:+.3f}).')
    dtx, dty = dyn['dtheta_energy_x_mean'], abs(down)
    out.append('Fig. 3(b), in PGD-AT E(x) is left alone (Delta_theta E(x) near zero): '
               f'{"holds" if abs(dtx) < dty else "does not hold"} (mean Delta_theta E(x) {dtx:+.3f} '
               f'against |Delta_theta E(x, y)| {dty:.3f}).')
  g = (runs.get('at') or {}).get('gradient_norms')
  if g and g['columns'] == ['grad_energy_xy', 'grad_energy_x']:
    tenth = max(1, g['norms'].shape[0] // 10)
    (xy0, x0), (xy1, x1) = g['norms'][:tenth].mean(0), g['norms'][-tenth:].mean(0)
    holds = xy0 > x0 and abs(np.log(xy1 / x1)) < abs(np.log(xy0 / x0))
    out.append('Fig. 12, in generation by the PGD-AT model |grad_x E(x, y)| dominates at first and '
               f'the two gradients come closer later: {"holds" if holds else "does not hold"} '
               f'(by {g["objective"]}; mean norms, first tenth of the steps: {xy0:.3g} vs '
               f'{x0:.3g}; last tenth: {xy1:.3g} vs {x1:.3g}).')
  if 'natural' in flatness and len(flatness) > 1:
    flatter = [n for n, v in flatness.items() if n != 'natural' and v < flatness['natural']]
    out.append('Fig. 2, adversarial training flattens the energy around the data (mean |E - E(x)| over '
               f'the landscape grid): flatter than natural for {", ".join(flatter) or "none"} (' +
               ', '.join(f'{n} {v:.2f}' for n, v in flatness.items()) + ').')
  return out


def landscapes(root: str, scale: str, data_path: str, names) -> Dict[str, np.ndarray]:
  """E(x, y) around one test image for several models, same image and directions (Fig. 2)."""
  from jeat_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  grids = {}
  for run in RUNS:
    if run.name not in names or not seen_by_process_0(
        os.path.join(root, run.name, 'results.json')):
      continue
    config = make_config(run, scale, data_path)
    model, state, ds, _ = state_lib.load_trained(config, os.path.join(root, run.name))
    a = config.analysis
    x = data_lib.to_float(jax.numpy.asarray(ds.x_test[a.image_index]))
    directions = analysis.random_directions(jax.random.PRNGKey(a.seed), x.shape)
    logits_fn = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'running')
    grids[run.name] = analysis.energy_landscape(logits_fn, x, int(ds.y_test[a.image_index]),
                                                directions, a.radius, a.resolution)
  return grids


def copy_figure(src: str, figdir: str, name: str) -> Optional[str]:
  if not os.path.exists(src):
    return None
  shutil.copyfile(src, os.path.join(figdir, name))
  return f'figures/{name}'


def write_report(root: str, scale: str, data_path: str, wall_seconds: float, jobs: int = 1,
                 command: str = '') -> str:
  """ROOT/REPORT.md and ROOT/figures/. Every process computes the landscapes (restoring a
  checkpoint is collective); process 0 writes. Returns the report's path."""
  grids = landscapes(root, scale, data_path, ('natural', 'at', 'prejeat', 'jeat'))
  path = os.path.join(root, 'REPORT.md')
  if jax.process_index() == 0:
    _write_report(path, root, scale, data_path, wall_seconds, jobs, command, grids)
  multihost_utils.sync_global_devices('reproduce: report written')
  return path


def _write_report(path: str, root: str, scale: str, data_path: str, wall_seconds: float,
                  jobs: int, command: str, grids: Dict[str, np.ndarray]) -> None:
  runs = collect(root)
  figdir = os.path.join(root, 'figures')
  os.makedirs(figdir, exist_ok=True)
  flatness = {n: float(np.mean(np.abs(g - g[g.shape[0] // 2, g.shape[1] // 2])))
              for n, g in grids.items()}
  figs = []
  if grids:
    radius = make_config(RUNS[0], scale, data_path).analysis.radius
    analysis.plot_landscapes(os.path.join(figdir, 'energy_landscapes.png'), grids, radius)
    figs.append(('Fig. 2: E(x, y) around one test image (same image and directions)',
                 'figures/energy_landscapes.png'))
  for name in runs:
    for sub, label in (('samples/grid.png', 'Eq. 17'), ('samples_eq16/grid.png', 'Eq. 16')):
      rel = copy_figure(os.path.join(root, name, sub), figdir,
                        f'{name}_{sub.split("/")[0]}.png')
      if rel:
        figs.append((f'{name}: samples by {label}', rel))
    if name in DYNAMICS_RUNS:
      rel = copy_figure(os.path.join(root, name, 'figures', 'energy_dynamics.png'), figdir,
                        f'{name}_energy_dynamics.png')
      if rel:
        figs.append((f'Fig. 3: energy changes of Eq. 15 during training ({name})', rel))
      g = runs[name]['gradient_norms']
      if g is not None:
        rel = f'figures/{name}_gradient_norms.png'
        analysis.plot_gradient_norms(os.path.join(root, rel), g['norms'],
                                     f'{name}: generation by {g["objective"]}')
        figs.append((f'Fig. 12: gradient norms during generation by {g["objective"]} ({name})', rel))
    rel = copy_figure(os.path.join(root, name, 'samples', 'neighbours.png'), figdir,
                      f'{name}_neighbours.png')
    if rel and name == 'jeat':
      figs.append(('Fig. 7: JEAT samples and their nearest training images (SSIM)', rel))
  noise = {f'sigma = {n[5:]}/255': os.path.join(root, n, 'samples', 'grid.png')
           for n in ('noise8', 'noise16', 'noise24')}
  if all(os.path.exists(p) for p in noise.values()):
    analysis.plot_image_panels(os.path.join(figdir, 'noise_injection.png'),
                               {k: files.pyplot().imread(p) for k, p in noise.items()},
                               'Noise injection: samples by Eq. 17')
    figs.insert(1, ('Fig. 5: samples of the noise-injection models, sigma 8, 16, 24 / 255',
                    'figures/noise_injection.png'))
  timings, compute_seconds = timing_table(runs)
  audits = [f'- {n}: {w}' for n, r in runs.items() for w in r['audit']]
  failures = [f'- **{n}** failed in its {r["failed"]["stage"]} stage: {r["failed"]["error"]}'
              for n, r in runs.items() if r['failed']]
  lines = [
      f'# jeat-jax reproduction, scale `{scale}`', '',
      ('> **Data caveat:** trained and evaluated on the offline CIFAR-10 stand-in (a lossy JPEG '
       'copy of CIFAR-10), not on CIFAR-10 itself; absolute numbers are not comparable with the '
       'paper\'s, which are WRN-28-10 on CIFAR-10 after 200 epochs.' if data_path else
       '> Data: CIFAR-10 from TFDS.'), '', data_line(runs), '',
      f'Machine: {hardware.cpu_description()}, jax {jax.__version__} on {jax.devices()[0].platform} '
      f'({jax.device_count()} devices'
      f'{f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""}). '
      f'Wall time of this invocation: {wall_seconds / 60:.1f} min'
      f'{f", {jobs} runs side by side" if jobs > 1 else ""} '
      '(stages found done were not rerun: the time of every stage is under Compute time). Every '
      'number below comes from the runs in this directory.' +
      (f' Command: `{command}`.' if command else ''), '',
      '## Table 1: PGD and the energy attack on the natural model', '', table1(runs), '',
      '## Table 2: robustness', '', table2(runs), '',
      f'Robust accuracies at eps 8/255 on the first test images: {_counts(runs)}. C&W is the '
      'l_inf PGD on the CW margin ("-": not run at this scale). The recipes train for different '
      'budgets (see Compute time): at reduced scales this table compares short runs, not '
      'converged models.', '',
      '## Generation (Fig. 6 IS / FID)', '', generation_table(runs), '',
      '## Verdicts', ''] + [f'- {v}' for v in verdicts(runs, flatness)] + (
      ['', '## Runs that failed', ''] + failures if failures else []) + [
      '', '## Compute time (wall minutes per stage)', '', timings, '',
      f'Sum over runs and stages: {compute_seconds / 60:.1f} min (with runs side by side each '
      'stage\'s time is its own wall time, shared cores included). `*`: trained before this '
      'reproduction started (a workdir found trained is not trained again); the time is the '
      'one its results.json recorded.'] + [
      '', '## Gradient-masking audit warnings', ''] + (audits or ['- none']) + ['', '## Figures', '']
  for caption, rel in figs:
    lines += [f'**{caption}**', '', f'![{caption}]({rel})', '']
  write_text_atomic(path, '\n'.join(lines))


def fair_results(root: str, data_path: str) -> Dict[str, 'fair.RecipeResult']:
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
    result = fair.RecipeResult(
        recipe, {s: fair.seed_counts(r['robustness']) for s, r in seeds.items()},
        {s: _fid(r['fid']) for s, r in seeds.items() if _fid(r['fid']) is not None})
    paths = [fair.feature_path(os.path.join(root, fair.run_name(recipe, s))) for s in seeds]
    if len(seeds) == len(fair.SEEDS) and all(os.path.exists(p) for p in paths):
      if reference is None:
        reference = generation.fid_reference_statistics(
            make_config(FAIR_RUNS[0], 'cpu-fair', data_path), root)
      result.fid, result.fid_replicates = fair.pooled_fid(
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
  fair.plot_comparison(os.path.join(figdir, 'comparison.png'), results)
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
      '## Results (pooled over the seeds, 95% intervals)', '', fair.comparison_table(results), '',
      '![robust accuracy against FID](figures/comparison.png)', '',
      '## Claims', ''] + fair.claim_lines(results) + [
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


# ----------------------------------------------------------------------------- CLI

flags.DEFINE_enum('scale', 'cpu', SCALES, 'cpu: the :cpu configs on 2 cores; cpu-fair: the '
                  'recipes of jeat_jax/fair.py on 2 seeds at one equal budget, with intervals; '
                  'paper: WRN-28-10.')
flags.DEFINE_string('workdir', None, 'Root directory: one subdirectory per run, REPORT.md.')
flags.DEFINE_string('data_path', '', 'An npz dataset (the offline stand-in); empty: TFDS.')
flags.DEFINE_list('runs', list(PAPER_RUNS), 'Which runs, in this order (default: the paper\'s; '
                  f'also: {", ".join(n for n in RUNS_BY_NAME if n not in PAPER_RUNS)}).')
flags.DEFINE_list('stages', list(STAGES), f'Which stages, of {STAGES} (cpu-fair: by default '
                  f'{FAIR_STAGES}).')
flags.DEFINE_integer('jobs', 1, 'Runs processed side by side, each in its own process (log: '
                     'WORKDIR/<run>/reproduce.log). On 2 CPU cores 2 jobs gave 1.4x the throughput '
                     'of one: XLA:CPU leaves cores idle on these small models.')
flags.DEFINE_bool('distributed', False, 'Run every stage on several processes joined by '
                  'jax.distributed (config.distributed.*): start the same command on each, with '
                  'the same --workdir (a directory every process sees).')
flags.DEFINE_string('coordinator_address', '', 'With --distributed: host:port of process 0; '
                    'empty: JAX finds it (TPU pods, SLURM, Open MPI).')
flags.DEFINE_integer('num_processes', 1, 'With --distributed and --coordinator_address.')
flags.DEFINE_integer('process_id', 0, 'With --distributed and --coordinator_address.')


def distributed_settings(flag_values) -> Dict[str, object]:
  """The config.distributed.* settings of the command line; {} without --distributed."""
  if not flag_values.distributed:
    return {}
  return {'enabled': True, 'coordinator_address': flag_values.coordinator_address,
          'num_processes': flag_values.num_processes, 'process_id': flag_values.process_id}


def run_in_subprocesses(root: str, scale: str, data_path: str, names: List[str],
                        stages: List[str], jobs: int) -> List[str]:
  """Runs `names` with at most `jobs` child processes at a time, in the given order;
  returns the names whose process failed (their log says why; the others go on)."""
  pending, running, failed = list(names), {}, []
  while pending or running:
    while pending and len(running) < jobs:
      name = pending.pop(0)
      workdir = os.path.join(root, name)
      os.makedirs(workdir, exist_ok=True)
      cmd = [sys.executable, '-m', 'jeat_jax.reproduce', f'--scale={scale}',
             f'--workdir={root}', f'--data_path={data_path}', f'--runs={name}',
             f'--stages={",".join(stages)}', '--jobs=1']
      log = open(os.path.join(workdir, 'reproduce.log'), 'a')  # pylint: disable=consider-using-with
      running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
      logging.info('started %s (log: %s)', name, log.name)
    time.sleep(1.0)
    for name, (proc, log) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[name]
      if proc.returncode:
        failed.append(name)
        logging.error('%s failed (exit %d): see %s', name, proc.returncode, log.name)
      else:
        logging.info('finished %s', name)
  return failed


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  unknown = set(FLAGS.runs) - set(RUNS_BY_NAME)
  if unknown:
    raise app.UsageError(f'unknown runs {sorted(unknown)}; choose from {list(RUNS_BY_NAME)}')
  if FLAGS.jobs < 1:
    raise app.UsageError(f'--jobs must be >= 1, got {FLAGS.jobs}')
  distributed = distributed_settings(FLAGS)
  if distributed and FLAGS.jobs > 1:
    raise app.UsageError('--jobs > 1 runs each run in a child process: not with --distributed')
  start = time.time()
  fair_scale = FLAGS.scale == 'cpu-fair'
  # In the order given; by default the paper's runs (cpu-fair: its recipes on its seeds).
  names = list(dict.fromkeys(FLAGS.runs if FLAGS['runs'].present or not fair_scale
                             else [r.name for r in FAIR_RUNS]))
  stages = (FLAGS.stages if FLAGS['stages'].present or not fair_scale else list(FAIR_STAGES))
  if distributed:  # before anything touches JAX's devices
    parallel.initialize_distributed(
        make_config(RUNS_BY_NAME[names[0]], FLAGS.scale, FLAGS.data_path, distributed))
  in_children = FLAGS.jobs > 1 and len(names) > 1
  configs = validated_configs([RUNS_BY_NAME[name] for name in names], FLAGS.scale,
                              FLAGS.data_path, distributed, devices=1 if in_children else None)
  per_run = [s for s in stages if s != 'report']
  failed = []
  if in_children and per_run:
    if 'fid' in per_run:  # once here, not once per job side by side (minutes at 5 img/s)
      generation.fid_reference_statistics(  # into ROOT/fid_stats, where run_stages looks
          make_config(RUNS_BY_NAME[names[0]], FLAGS.scale, FLAGS.data_path),
          os.path.abspath(FLAGS.workdir))
    failed = run_in_subprocesses(FLAGS.workdir, FLAGS.scale, FLAGS.data_path, names, per_run,
                                 FLAGS.jobs)
  else:
    try:
      for name in names:
        run = RUNS_BY_NAME[name]
        logging.info('=== %s (%s)', run.name, run.recipe)
        run_stages(run, configs[name], os.path.join(FLAGS.workdir, run.name), stages)
    except Preempted as e:  # the run's checkpoint is saved: the same command goes on from it
      print(e, flush=True)
      return
  if 'report' in stages:
    command = ' '.join(['python -m jeat_jax.reproduce'] + sys.argv[1:])
    if fair_scale:
      path = write_fair_report(FLAGS.workdir, FLAGS.data_path, time.time() - start, FLAGS.jobs,
                               command)
    else:
      path = write_report(FLAGS.workdir, FLAGS.scale, FLAGS.data_path, time.time() - start,
                          FLAGS.jobs, command)
    logging.info('wrote %s', path)
  if failed:
    sys.exit(f'runs whose process failed: {failed}; see WORKDIR/<run>/reproduce.log')


if __name__ == '__main__':
  app.run(main)
