"""WEAT (Mirza, Briglia, Beadini, Masi, ECCV 2024): TRADES whose per-example terms are
weighted by w_i = 1 / softplus(|E(x_i)|) on the natural logits (held constant).

As their code (OmnAI-Lab/Robust-Classifiers-under-the-lens-of-EBM, `WEAT_loss.py`,
`parser.py`; ../shared/ALGORITHMS.md, "Successors"):
- attack: PGD-10 of step 2/255 on KL(p(y|x) || p(y|x*)) from x + 0.001 N(0, I), eps 8/255,
  with BatchNorm in inference mode (`perturbation.bn_mode = running`);
- loss: (1/B) sum w_i CE(f(x_i), y_i) + beta (1/B) sum w_i KL_i, the `nat` variant (their
  parser's default; `loss.weat_variant = adv` puts the CE on f(x*)), beta = 6 (the parser's
  default, which their training passes; the loss function's own default is 7);
- ResNet-18 with BatchNorm (torch's default momentum), no input normalisation, SGD 0.1, wd
  5e-4, torch's OneCycleLR (main.py: pct_start 0.25, stepped per batch; its defaults: cosine,
  lr 0.1 / 25 -> 0.1 -> 0.1 / 25e4, and cycle_momentum, which replaces the parser's momentum 0.9
  by 0.95 -> 0.85 -> 0.95: `schedule.cycle_momentum`), 100 epochs at batch 128, flip and
  RandomCrop(32, padding=4), zero padding (`data.pad_mode = constant`);
- generation: SGLD on E(x, y) from the class-conditional Gaussian, step s = 1 (gradient step
  s/2), 20 steps, noise sqrt(2 s) * 0.001, no momentum.
`:cpu` and `:smoke` use the model, schedule and attack length of TRADES at those scales; the two
still differ there in the weights, the weight decay (WEAT's 5e-4 against TRADES' 2e-4) and the
sampler. The weights alone: `--config.loss.example_weights=uniform` (the fair comparison's
`weat_unweighted`, jeat_jax/reproduce/fair.py).
"""
import math

from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'weat'
  c.perturbation.name = 'trades_kl'
  c.perturbation.bn_mode = 'running'
  c.loss.name = 'trades'
  c.loss.trades_beta = 6.0
  c.loss.weat_variant = 'nat'
  c.loss.example_weights = 'inverse_softplus_energy'
  c.model.arch = 'resnet18'
  c.model.input_normalization = 'none'
  c.num_epochs = 100
  c.schedule.name = 'cosine_onecycle'
  c.schedule.peak_fraction = 0.25
  c.schedule.cycle_momentum = True
  c.schedule.base_momentum = 0.85
  c.schedule.max_momentum = 0.95
  c.data.pad_mode = 'constant'
  c.sample.objective = 'eq17'
  c.sample.start = 'gaussian'
  c.sample.num_steps = 20
  c.sample.step_size = 0.5
  c.sample.noise_std = math.sqrt(2.0) * 0.001
  default.apply_scale(c, arg)
  if arg in ('cpu', 'smoke'):  # TRADES' model at these scales (WRN-10-1, meanstd input)
    c.model.arch = 'wrn'
    c.model.input_normalization = 'meanstd'
  if arg == 'cpu':  # as trades:cpu
    c.perturbation.num_steps = 3
    c.num_epochs = 2
    c.schedule.name = 'onecycle'
    c.schedule.peak_fraction = 0.4
    c.schedule.cycle_momentum = False
    c.optimizer.lr = 0.2
  return c
