"""JEAT (Algorithm 1): energy attack (Eq. 18), SGLD on E(x) from a replay buffer,
loss CE(x_adv, y) + mean E(x_adv) - mean E(x_sgld) (Eq. 19-20).

SGLD values are JEM's (the paper gives none), converted to [0, 1] images:
20 steps of size 0.25 with noise std 0.005; buffer 10000, rho = 0.05.
"""
from configs import default, energy_common


def get_config(arg=None):
  c = energy_common.use_jem_setup(default.get_base_config())
  c.recipe = 'jeat'
  c.perturbation.name = 'energy'
  c.perturbation.num_steps = 1
  c.perturbation.step_size = 8 / 255
  c.sampler.name = 'sgld_buffer'
  c.loss.name = 'joint_energy'
  c.robust_watch.enabled = True  # single-step attack: watch for catastrophic overfitting
  c.data.validation_size = 1000  # the watch's points: training images held out (Rice et al.)
  default.apply_scale(c, arg)
  if arg == 'cpu':  # WRN-10-1, K = 5 unrolled SGLD steps, 1.5 epochs.
    energy_common.use_cpu_scale(c, epochs=1.5)
    c.sampler.num_steps = 5
  return c
