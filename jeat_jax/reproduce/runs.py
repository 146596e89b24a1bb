"""The runs of the reproduction and their configs: the recipes of the paper (and their
successors), the fair comparison's recipes on its seeds, what each scale trains and measures,
and `make_config`, which builds a run's config at a scale."""
import dataclasses
import importlib
from typing import Dict, List, Optional, Tuple

from absl import app

from jeat_jax.config_validation import validate, with_overrides
from jeat_jax.errors import ConfigError
from jeat_jax.reproduce import fair

SCALES = ('cpu', 'cpu-fair', 'paper', 'smoke')
CONFIG_SCALE = {'cpu': 'cpu', 'cpu-fair': 'cpu', 'paper': None, 'smoke': 'smoke'}  # get_config's
STAGES = ('train', 'evaluate', 'sample', 'fid', 'analyze', 'report')
FAIR_STAGES = ('train', 'evaluate', 'sample', 'fid', 'report')  # cpu-fair's default


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
# --scale=cpu-fair: each recipe of the fair comparison on each seed (fair.py).
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
