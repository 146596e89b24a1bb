"""PreJEAT (Algorithm 2): CE on energy-attack examples (Eq. 18), no SGLD."""
from configs import default, energy_common


def get_config(arg=None):
  c = energy_common.use_jem_setup(default.get_base_config())
  c.recipe = 'prejeat'
  c.perturbation.name = 'energy'
  c.perturbation.num_steps = 1
  c.perturbation.step_size = 8 / 255   # Alg. 2: delta += eps * sign(grad E(x, y))
  c.robust_watch.enabled = True  # single-step attack: watch for catastrophic overfitting
  c.data.validation_size = 1000  # the watch's points: training images held out (Rice et al.)
  default.apply_scale(c, arg)
  if arg == 'cpu':
    energy_common.use_cpu_scale(c, epochs=3)
  return c
