"""Fast AT (Wong et al.): FGSM from a uniform random start, step 1.25 eps = 10/255.

Paper Table 4: cyclic lr 0 -> 0.2 -> 0, SGD momentum 0.9, wd 5e-4, batch 128, 15 epochs.
As locuslab/fast_adversarial runs it (CIFAR10/train_fgsm.py, utils.py): the attack in
model.train() (`perturbation.bn_mode = batch`), RandomCrop(32, padding=4) with zeros
(`data.pad_mode = constant`), and torch's CyclicLR, whose defaults (cycle_momentum=True,
base_momentum 0.8, max_momentum 0.9) cycle the momentum 0.9 -> 0.8 -> 0.9 against the lr
(`schedule.cycle_momentum`).
"""
from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'fast'
  c.perturbation.name = 'pgd'
  c.perturbation.num_steps = 1
  c.perturbation.step_size = 10 / 255
  c.schedule.name = 'onecycle'
  c.schedule.peak_fraction = 0.5
  c.schedule.cycle_momentum = True
  c.schedule.base_momentum = 0.8
  c.schedule.max_momentum = 0.9
  c.perturbation.bn_mode = 'batch'
  c.data.pad_mode = 'constant'
  c.optimizer.lr = 0.2
  c.num_epochs = 15
  c.robust_watch.enabled = True  # single-step attack: watch for catastrophic overfitting
  c.data.validation_size = 1000  # the watch's points: training images held out (Rice et al.)
  default.apply_scale(c, arg)
  if arg == 'cpu':
    c.num_epochs = 4
  return c
