"""Madry PGD-AT: CE on PGD-10 examples (eps 8/255, step 2/255, random start).

The "standard adversarially trained classifier" of the paper's Fig. 6(a).
Defaults from Madry et al. / Rice et al.: SGD 0.1, momentum 0.9, wd 5e-4,
multistep [100, 150] x0.1, 200 epochs, BatchNorm, ReLU.
As locuslab/robust_overfitting runs it (train_cifar.py, utils.py): PGD under model.train()
(`perturbation.bn_mode = batch`) and the crop of a reflect-padded image (`data.pad_mode`).
"""
from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'at'
  c.perturbation.name = 'pgd'
  c.perturbation.num_steps = 10
  c.perturbation.bn_mode = 'batch'
  c.data.pad_mode = 'reflect'
  default.apply_scale(c, arg)
  if arg == 'cpu':  # WRN-10-1, PGD-5 training, 2 epochs, one-cycle, batch 64 (as natural:cpu).
    c.perturbation.num_steps = 5
    c.batch_size = 64
    c.num_epochs = 2
    c.schedule.name = 'onecycle'
    c.optimizer.lr = 0.1
    c.optimizer.nesterov = True
  return c
