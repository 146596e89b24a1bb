"""The fair comparison of `python -m jeat_jax.reproduce --scale=cpu-fair`: its protocol
(its report: fair_report.py).

Every recipe of `RECIPES` trains with the same epochs, model size, training images and
augmentation, on each seed of `SEEDS`, and is evaluated the same way. The models of seed s are
attacked on test points [s * POINTS_PER_SEED, (s + 1) * POINTS_PER_SEED): two recipes are
compared on the same points, seed by seed, and a difference has the spread between training
seeds and the noise of the points (fair_report.py: a two-level bootstrap, seeds then points).
Each seed generates `SAMPLES_PER_SEED` images; a recipe's FID is that of its seeds' pooled
images against one reference. A claim is "resolved" where the interval of the difference
excludes 0, else "within noise" (95% per claim, not corrected for the number of claims).
"""
import dataclasses
from typing import Dict

RECIPES = ('at', 'trades', 'prejeat', 'jeat', 'weat', 'weat_unweighted', 'ebjdat')
# Entries that are not a config of their own: (config, overrides). `weat_unweighted` is WEAT
# with its weights off, every other setting WEAT's: weat against it measures the weighting alone
# (trades differs from weat also in weight decay and sampler).
VARIANTS = {'weat_unweighted': ('weat', {'loss.example_weights': 'uniform'})}
# The order the runs start in, seed after seed (each finished seed is a complete comparison),
# within a seed the longest trainings first.
START_ORDER = ('ebjdat', 'weat', 'weat_unweighted', 'trades', 'jeat', 'at', 'prejeat')
SEEDS = (0, 1, 2)
EPOCHS = 1
TRAIN_IMAGES = 10000  # a fixed random subset per seed (data.train_subset)
POINTS_PER_SEED = 500
SAMPLES_PER_SEED = 500
# On top of each recipe's `:cpu` config (WRN-10-1, its own optimizer, batch and attack
# settings): the same training length and images for all, and the same evaluation.
TRAINING = {'num_epochs': EPOCHS, 'num_train_steps': -1, 'data.train_subset': TRAIN_IMAGES,
            'data.augment': True,
            # the same training images for all: no checkpoint chosen on held-out images
            'robust_watch.enabled': False, 'data.validation_size': 0}
EVALUATION = {'eval.attacks': 'pgd20,autoattack', 'eval.num_examples': POINTS_PER_SEED,
              'eval.autoattack_num_examples': 0, 'eval.autoattack_version': 'standard',
              'eval.eps': 8 / 255, 'eval.audit_num_examples': 100,
              'sample.num_samples': SAMPLES_PER_SEED, 'sample.neighbours': 0,
              'fid.max_reference': 2000, 'dynamics_every_steps': 0}
METRICS = ('clean', 'pgd20', 'autoattack')  # accuracies; and 'fid'
METRIC_NAMES = {'clean': 'clean accuracy', 'pgd20': 'PGD-20 robust accuracy',
                'autoattack': 'AutoAttack robust accuracy', 'fid': 'FID'}


@dataclasses.dataclass(frozen=True)
class Claim:
  source: str
  metric: str  # clean | pgd20 | autoattack (higher is better) | fid (lower is better)
  better: str  # the recipe claimed better
  worse: str


CLAIMS = (
    Claim('JEAT paper, Table 2', 'autoattack', 'jeat', 'trades'),
    Claim('JEAT paper, Table 2', 'clean', 'jeat', 'trades'),
    Claim('JEAT paper, Sec. 4 (JEAT improves on PGD-AT)', 'autoattack', 'jeat', 'at'),
    Claim('JEAT paper, Sec. 4 (JEAT improves on PreJEAT)', 'autoattack', 'jeat', 'prejeat'),
    Claim('JEAT paper, Fig. 6', 'fid', 'jeat', 'at'),
    Claim('JEAT paper, Fig. 6', 'fid', 'jeat', 'prejeat'),
    Claim('WEAT (ECCV 2024): weighting TRADES', 'autoattack', 'weat', 'trades'),
    Claim('WEAT (ECCV 2024), ablation: the weights alone', 'autoattack', 'weat',
          'weat_unweighted'),
    Claim('WEAT (ECCV 2024): better generation than JEAT', 'fid', 'weat', 'jeat'),
    Claim('EB-JDAT (CVPR 2026): more robust than JEAT', 'autoattack', 'ebjdat', 'jeat'),
    Claim('EB-JDAT (CVPR 2026): more robust than WEAT', 'autoattack', 'ebjdat', 'weat'),
    Claim('EB-JDAT (CVPR 2026): better generation than JEAT', 'fid', 'ebjdat', 'jeat'),
)


def run_name(recipe: str, seed: int) -> str:
  return f'{recipe}_seed{seed}'


def config_name(recipe: str) -> str:
  """The configs/<name>.py an entry of RECIPES trains with."""
  return VARIANTS[recipe][0] if recipe in VARIANTS else recipe


def run_overrides(recipe: str, seed: int) -> Dict[str, object]:
  """A variant's settings, and what differs between the seeds of a recipe: the seed
  (initialisation, data order, training subset), the test points attacked and the chains'
  randomness."""
  return {**(VARIANTS[recipe][1] if recipe in VARIANTS else {}),
          'seed': seed, 'eval.first_example': seed * POINTS_PER_SEED, 'sample.seed': seed}
