"""What both reports read: the records the runs wrote (`collect`), the dataset they name, the
wall time of their stages, number formatting and the copying of figures."""
import json
import os
import shutil
from typing import Dict, Optional, Tuple

import numpy as np

from jeat_jax import analysis
from jeat_jax.files import read_json
from jeat_jax.reproduce.runs import DYNAMICS_RUNS, RUNS


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


def generation_metric(r: Optional[dict], key='fid') -> Optional[float]:
  """`key` ('fid' or 'inception_score') of a fid.json's contents, None where absent."""
  return None if not r or r.get(key) is None else float(r[key])


def format_number(v, fmt='{:.2f}') -> str:
  """A table cell: `v` formatted, '-' for a value not measured."""
  return '-' if v is None else fmt.format(v)


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
    cells = [format_number(t.get(s) and t[s] / 60, '{:.1f}') for s in stages]
    if trained_before:
      cells[0] += '*'
    total = sum(t.get(s) or 0.0 for s in stages)
    grand += total
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {total / 60:.1f} |')
  return '\n'.join(lines), grand


def copy_figure(src: str, figdir: str, name: str) -> Optional[str]:
  if not os.path.exists(src):
    return None
  shutil.copyfile(src, os.path.join(figdir, name))
  return f'figures/{name}'
