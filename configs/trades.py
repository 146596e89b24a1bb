"""TRADES (Zhang et al.), 1/lambda = 6: CE(x, y) + 6 KL(f(x) || f(x')),
x' from PGD-10 on the KL (step 2/255, start x + 0.001 N(0, I)).

Paper Table 4: SGD 0.1, momentum 0.9, wd 2e-4, batch 128, multistep [75, 90, 100], 120 epochs.
As yaodongyu/TRADES runs it: the attack under model.eval() (trades.py: BatchNorm running
statistics, `perturbation.bn_mode = running`) and RandomCrop(32, padding=4), zero padding
(train_trades_cifar10.py: `data.pad_mode = constant`).
"""
from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'trades'
  c.perturbation.name = 'trades_kl'
  c.loss.name = 'trades'
  c.loss.trades_beta = 6.0
  c.perturbation.bn_mode = 'running'
  c.data.pad_mode = 'constant'
  c.optimizer.weight_decay = 2e-4
  c.schedule.decay_epochs = (75, 90, 100)
  c.num_epochs = 120
  default.apply_scale(c, arg)
  if arg == 'cpu':
    c.perturbation.num_steps = 3
    c.num_epochs = 2
    c.schedule.name = 'onecycle'
    c.optimizer.lr = 0.2
  return c
