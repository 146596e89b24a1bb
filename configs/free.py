"""Free AT (Shafahi et al.), m = 8 minibatch replays.

Paper Table 4: SGD 0.1, momentum 0.9, wd 2e-4, batch 128, multistep [100, 150]
over 200 epochs counted in parameter updates; each pass over the data makes m
updates per minibatch, so that is 200 / m = 25 passes, decays at 12.5 and 18.75.
The PyTorch CIFAR-10 Free AT of locuslab/fast_adversarial (CIFAR10/train_free.py, as
mahyarnajibi/FreeAdversarialTraining's main_free.py) replays under model.train()
(`perturbation.bn_mode = batch`) and crops with RandomCrop(32, padding=4), zeros
(`data.pad_mode = constant`).
"""
from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'free'
  c.perturbation.name = 'free'
  c.perturbation.free_replays = 8
  c.perturbation.bn_mode = 'batch'
  c.data.pad_mode = 'constant'
  c.optimizer.weight_decay = 2e-4
  c.num_epochs = 25
  c.schedule.decay_epochs = (12.5, 18.75)
  default.apply_scale(c, arg)
  if arg == 'cpu':
    c.perturbation.free_replays = 4
    c.num_epochs = 1
    c.schedule.name = 'onecycle'
    c.optimizer.lr = 0.2
  return c
