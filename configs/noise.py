"""Noise injection (paper Sec. 3.2, Fig. 5): CE on x + N(0, sigma^2), sigma in {8, 16, 24}/255.

The paper writes N(0, 24/255); we read the second argument as the std.
"""
from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'noise'
  c.perturbation.name = 'gaussian'
  c.perturbation.sigma = 24 / 255
  default.apply_scale(c, arg)
  if arg == 'cpu':
    c.num_epochs = 4
    c.schedule.name = 'onecycle'
    c.optimizer.lr = 0.2
    c.optimizer.nesterov = True
  return c
