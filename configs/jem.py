"""JEM (Grathwohl et al.): CE plus the p(x) term from SGLD samples of a replay buffer.

Data noise N(0, 0.03^2) on [-1, 1] images is std 0.015 on [0, 1] images.
"""
from configs import default, energy_common


def get_config(arg=None):
  c = energy_common.use_jem_setup(default.get_base_config())
  c.recipe = 'jem'
  c.perturbation.name = 'gaussian'
  c.perturbation.sigma = 0.015
  c.sampler.name = 'sgld_buffer'
  c.loss.name = 'joint_energy'
  default.apply_scale(c, arg)
  if arg == 'cpu':
    energy_common.use_cpu_scale(c, epochs=1.5)
    c.sampler.num_steps = 5
    # Not JEM's: the Du & Mordatch energy regulariser 0.1 * (E(x+)^2 + E(x-)^2). Without it
    # JEM:cpu diverged in every try (2026-11-26): the loss ran away at steps 100-260 at Adam
    # 1e-3 (with or without gradient clipping at norm 1) and at step ~500 at 3e-4; with it
    # the data and sample energies stay a few units apart (500 steps at 1e-3: stable).
    c.loss.energy_l2 = 0.1
  return c
