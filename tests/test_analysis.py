"""Figure functions: valid PNGs; the landscape's centre is E(x, y) at the image."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jeat_jax import analysis, energy
from jeat_jax.models import WideResNet


def _png_ok(path):
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert img.format == 'PNG' and img.size[0] > 100


def test_energy_landscape_centre_and_plot(tmp_path):
  model = WideResNet(depth=10, width=1, norm='none')
  x = jax.random.uniform(jax.random.PRNGKey(0), (32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x[None])
  logits_fn = lambda z: model.apply(variables, z)
  d = analysis.random_directions(jax.random.PRNGKey(2), x.shape)
  assert set(np.unique(np.asarray(d)).tolist()) == {-1.0, 1.0}
  grid = analysis.energy_landscape(logits_fn, x, 3, d, radius=8 / 255, resolution=7, batch_size=10)
  assert grid.shape == (7, 7)
  np.testing.assert_allclose(grid[3, 3], energy.energy_xy(logits_fn(x[None]), jnp.array([3]))[0],
                             rtol=1e-5)
  corner = energy.energy_xy(logits_fn(x[None] + 8 / 255 * (d[0] + d[1])), jnp.array([3]))[0]
  np.testing.assert_allclose(grid[6, 6], corner, rtol=1e-5)
  _png_ok(analysis.plot_landscapes(str(tmp_path / 'l.png'), {'a': grid, 'b': grid + 1}, 8 / 255))


def test_dynamics_and_gradient_norm_plots(tmp_path):
  scalars = {f'{n}_{s}': [(step, float(step) * (1 if s == 'mean' else 0.1)) for step in (1, 2, 3, 4)]
             for n in analysis.DYNAMICS for s in ('mean', 'std')}
  per_epoch = analysis.dynamics_per_epoch(scalars, steps_per_epoch=2)
  np.testing.assert_allclose(per_epoch['dx_energy_xy'], [[1, 1.5, 0.15], [2, 3.5, 0.35]])
  _png_ok(analysis.plot_dynamics(str(tmp_path / 'd.png'), per_epoch, 'at'))
  per_period, xlabel = analysis.dynamics_curve(scalars, steps_per_epoch=4, period_steps=2)
  assert xlabel == 'training step'   # a short run: one point per 2 steps, x = the period's end
  np.testing.assert_allclose(per_period['dx_energy_xy'], [[2, 1.5, 0.15], [4, 3.5, 0.35]])
  assert analysis.dynamics_curve(scalars, steps_per_epoch=4)[1] == 'epoch'
  _png_ok(analysis.plot_gradient_norms(str(tmp_path / 'g.png'), np.random.rand(10, 2), 'at'))


def test_image_panels_show_each_image(tmp_path):
  red = np.zeros((40, 40, 3), np.uint8)
  red[..., 0] = 255
  blue = np.zeros((40, 40, 3), np.uint8)
  blue[..., 2] = 255
  path = analysis.plot_image_panels(str(tmp_path / 'p.png'), {'8/255': red, '24/255': blue}, 'noise')
  _png_ok(path)
  with Image.open(path) as img:
    pixels = np.asarray(img.convert('RGB')).reshape(-1, 3).astype(int)
  # Both panels are drawn: pure red and pure blue pixels are both present.
  assert ((pixels[:, 0] > 240) & (pixels[:, 1] < 15) & (pixels[:, 2] < 15)).any()
  assert ((pixels[:, 2] > 240) & (pixels[:, 0] < 15) & (pixels[:, 1] < 15)).any()
