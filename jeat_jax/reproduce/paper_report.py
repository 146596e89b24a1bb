"""WORKDIR/REPORT.md of the paper's scales (cpu, paper, smoke): Table 1, Table 2 and the IS/FID
of Fig. 6 beside the paper's numbers, a verdict per claim, the compute time and the figures."""
import os
import time
from typing import Dict, List

import jax
import numpy as np
from jax.experimental import multihost_utils

from jeat_jax import analysis, files, hardware
from jeat_jax import state as state_lib
from jeat_jax.files import write_text_atomic
from jeat_jax.reproduce.results import (collect, copy_figure, data_line, format_number,
                                       generation_metric, timing_table)
from jeat_jax.reproduce.runs import ADVERSARIAL, DYNAMICS_RUNS, RUNS, make_config
from jeat_jax.reproduce.stages import seen_by_process_0

# Paper numbers (CIFAR-10, WRN-28-10): Table 1, Table 2, Fig. 6 (IS, FID).
PAPER_TABLE1 = {'clean': 0.9439, 'pgd': 0.0012, 'energy': 0.0011}
PAPER_TABLE2 = {  # clean, PGD (8/255), C&W, AutoAttack
    'trades': (0.8425, 0.5581, 0.8006, 0.5157), 'fast': (0.8416, 0.4934, 0.7319, 0.4532),
    'free': (0.8596, 0.4633, 0.7254, 0.4534), 'jem': (0.9290, 0.2167, 0.4167, 0.1912),
    'jeat': (0.8516, 0.6429, 0.8047, 0.6204)}
PAPER_GENERATION = {'at': (7.50, 60.90), 'prejeat': (7.91, 56.85), 'jem': (8.66, 38.40),
                    'jeat': (8.80, 38.24)}  # (IS, FID)


def _pct(v) -> str:
  return '-' if v is None else f'{100 * v:.2f}%'


def _acc(r: dict, attack: str):
  a = r['attacks'].get(attack)
  return None if a is None else a['robust_accuracy']


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
      fid, is_ = generation_metric(f), generation_metric(f, 'inception_score')
      lines.append(f'| {name} | {label} | {format_number(fid)} | {format_number(is_)} | '
                   f'{f"{paper[0]:.2f} / {paper[1]:.2f}" if paper and key == "fid" else "-"} |')
  return '\n'.join(lines)


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
  fids = {n: generation_metric(r['fid']) for n, r in runs.items()}
  fids = {n: v for n, v in fids.items() if v is not None}
  if 'at' in fids and 'natural' in fids:
    holds = fids['at'] < fids['natural']
    out.append(f'Sec. 3.1, a robust classifier generates better images than a natural one: '
               f'{"holds" if holds else "does not hold"} (FID {fids["at"]:.1f} vs {fids["natural"]:.1f}).')
  at = runs.get('at') or {}
  a17, a16 = (generation_metric(at.get(k)) for k in ('fid', 'fid_eq16'))
  if a17 is not None and a16 is not None:
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


def write_report(root: str, scale: str, data_path: str, started: float, jobs: int = 1,
                 command: str = '') -> str:
  """ROOT/REPORT.md and ROOT/figures/. Every process computes the landscapes (restoring a
  checkpoint is collective); process 0 writes. Returns the report's path. started: the
  invocation's start (time.time()); its wall time includes the report's."""
  grids = landscapes(root, scale, data_path, ('natural', 'at', 'prejeat', 'jeat'))
  path = os.path.join(root, 'REPORT.md')
  if jax.process_index() == 0:
    _write_report(path, root, scale, data_path, started, jobs, command, grids)
  multihost_utils.sync_global_devices('reproduce: report written')
  return path


def _write_report(path: str, root: str, scale: str, data_path: str, started: float,
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
      f'Wall time of this invocation, this report included: '
      f'{(time.time() - started) / 60:.1f} min'
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
