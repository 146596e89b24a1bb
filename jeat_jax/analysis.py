"""The paper's analyses as figures: energy landscapes (Fig. 2), energy dynamics
(Fig. 3, 9-11), gradient norms during generation (Fig. 12/13) and generated
images of several models side by side (Fig. 5).

`python main.py --mode=analyze --config=CONFIG --workdir=DIR` writes every figure
that applies to the run into DIR/figures/.
"""
import os
from typing import Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jeat_jax import data as data_lib
from jeat_jax import energy
from jeat_jax import files
from jeat_jax import state as state_lib

DYNAMICS = ('dx_energy_xy', 'dtheta_energy_xy', 'dx_energy_x', 'dtheta_energy_x')


def random_directions(key: jax.Array, image_shape) -> jax.Array:
  """Two Rademacher directions (every pixel +-1): a step `a` along one moves each
  pixel by `a`, so grid coordinates are in l_inf pixel units like eps."""
  return jax.random.rademacher(key, (2, *image_shape), jnp.float32)


def energy_landscape(logits_fn: Callable, x: jax.Array, y: int, directions: jax.Array,
                     radius: float, resolution: int = 41, batch_size: int = 441) -> np.ndarray:
  """E(x + a d1 + b d2, y) on a resolution x resolution grid of (a, b) in [-radius, radius]
  (Fig. 2), evaluated in jitted batches. Row i is b = coords[i], column j is a = coords[j]."""
  coords = jnp.linspace(-radius, radius, resolution)
  a, b = jnp.meshgrid(coords, coords)
  offsets = a.reshape(-1, 1, 1, 1) * directions[0] + b.reshape(-1, 1, 1, 1) * directions[1]

  @jax.jit
  def energies(off):
    labels = jnp.full((off.shape[0],), y, jnp.int32)
    return energy.energy_xy(logits_fn(x[None] + off), labels)

  out = [np.asarray(energies(offsets[i:i + batch_size]))
         for i in range(0, offsets.shape[0], batch_size)]
  return np.concatenate(out).reshape(resolution, resolution)


def plot_landscapes(path: str, landscapes: Dict[str, np.ndarray], radius: float) -> str:
  """Contour plots side by side (one per model) with the data point marked."""
  n = len(landscapes)
  fig, axes = files.pyplot().subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
  for ax, (name, grid) in zip(axes[0], landscapes.items()):
    coords = np.linspace(-radius, radius, grid.shape[0]) * 255
    cs = ax.contourf(coords, coords, grid, levels=20, cmap='viridis')
    ax.contour(coords, coords, grid, levels=20, colors='k', linewidths=0.3)
    ax.plot([0], [0], marker='*', color='tab:blue', markersize=14, markeredgecolor='w')
    ax.set_title(name)
    ax.set_xlabel('direction 1 (x/255)')
    ax.set_ylabel('direction 2 (x/255)')
    fig.colorbar(cs, ax=ax, label='E(x, y)')
  return files.save_figure(fig, path)


def read_scalars(workdir: str, prefix_names: Sequence[str]) -> Dict[str, List]:
  """(step, value) lists of TensorBoard scalars whose tag starts with one of the names."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out: Dict[str, List] = {}
  for path in files.glob(workdir, 'events.out.tfevents.*'):
    with files.local_copy(path) as local:
      for event in tf.compat.v1.train.summary_iterator(local):
        for value in event.summary.value:
          if any(value.tag.startswith(p) for p in prefix_names):
            v = tf.make_ndarray(value.tensor) if value.HasField('tensor') else value.simple_value
            out.setdefault(value.tag, []).append((event.step, float(v)))
  return out


def dynamics_per_epoch(scalars: Dict[str, List], steps_per_epoch: int) -> Dict[str, np.ndarray]:
  """Per epoch: (epoch, mean of the logged batch means, mean of the logged batch stds)."""
  out = {}
  for name in DYNAMICS:
    means, stds = dict(scalars.get(f'{name}_mean', [])), dict(scalars.get(f'{name}_std', []))
    epochs = {}
    for step, m in means.items():
      epochs.setdefault((step - 1) // steps_per_epoch, []).append((m, stds.get(step, 0.0)))
    if epochs:
      out[name] = np.array([(e + 1, np.mean([m for m, _ in v]), np.mean([s for _, s in v]))
                            for e, v in sorted(epochs.items())])
  return out


def dynamics_curve(scalars: Dict[str, List], steps_per_epoch: int,
                   period_steps: int = 0) -> Tuple[Dict[str, np.ndarray], str]:
  """The Eq. 15 changes per epoch (the paper's Fig. 3), or per `period_steps` training steps
  when > 0 (a short run has too few epochs for a curve); the x column is then the period's
  last step. Returns the curves and their x-axis label."""
  if period_steps <= 0:
    return dynamics_per_epoch(scalars, steps_per_epoch), 'epoch'
  curves = dynamics_per_epoch(scalars, period_steps)
  return {k: v * np.array([period_steps, 1.0, 1.0]) for k, v in curves.items()}, 'training step'


def plot_dynamics(path: str, per_epoch: Dict[str, np.ndarray], title: str,
                  xlabel: str = 'epoch') -> str:
  """Fig. 3 / 9-11: mean +- std per epoch (or per period) of the Eq. 15 energy changes."""
  fig, axes = files.pyplot().subplots(1, 2, figsize=(10, 3.6))
  labels = {'dx_energy_xy': r'$\Delta_x E(x,y)$', 'dtheta_energy_xy': r'$\Delta_\theta E(x,y)$',
            'dx_energy_x': r'$\Delta_x E(x)$', 'dtheta_energy_x': r'$\Delta_\theta E(x)$'}
  for ax, names in zip(axes, (('dx_energy_xy', 'dtheta_energy_xy'), ('dx_energy_x', 'dtheta_energy_x'))):
    for name in names:
      if name in per_epoch:
        e, m, s = per_epoch[name].T
        ax.errorbar(e, m, yerr=s, marker='o', capsize=3, label=labels[name])
    ax.axhline(0, color='gray', lw=0.8)
    ax.set_xlabel(xlabel)
    ax.legend()
  axes[0].set_title(f'{title}: E(x, y)')
  axes[1].set_title(f'{title}: E(x)')
  return files.save_figure(fig, path)


def plot_gradient_norms(path: str, norms: np.ndarray, title: str) -> str:
  """Fig. 12/13: mean |grad_x E(x,y)| and |grad_x E(x)| per generation step."""
  fig, ax = files.pyplot().subplots(figsize=(6, 3.6))
  steps = np.arange(1, norms.shape[0] + 1)
  ax.plot(steps, norms[:, 0], label=r'$\|\nabla_x E(x,y)\|$')
  ax.plot(steps, norms[:, 1], label=r'$\|\nabla_x E(x)\|$')
  ax.set_xlabel('generation step')
  ax.set_ylabel('mean L2 norm')
  ax.set_title(title)
  ax.legend()
  return files.save_figure(fig, path)


def plot_image_panels(path: str, images: Dict[str, np.ndarray], title: str = '') -> str:
  """Fig. 5: images (e.g. the sample grids of the noise-injection models) side by side,
  one titled panel each, at their native resolution."""
  n = len(images)
  height = max(im.shape[0] for im in images.values())
  fig, axes = files.pyplot().subplots(1, n, figsize=(n * 3.2, 3.2 * 1.1), squeeze=False)
  for ax, (name, im) in zip(axes[0], images.items()):
    ax.imshow(im, interpolation='nearest')
    ax.set_title(name)
    ax.axis('off')
  if title:
    fig.suptitle(title)
  return files.save_figure(fig, path, dpi=max(100, height // 3))


def analyze_run(config, workdir: str) -> Dict[str, str]:
  """Writes every figure that applies to the run in `workdir` into workdir/figures/.

  Every process restores the checkpoint and computes the landscape (collectives);
  process 0 alone reads the logs and writes the figures. Returns {figure: path}
  (empty on the other processes).
  """
  model, state, ds, _ = state_lib.load_trained(config, workdir)
  logits_fn = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'running')
  a = config.analysis
  x = data_lib.to_float(jnp.asarray(ds.x_test[a.image_index]))
  directions = random_directions(jax.random.PRNGKey(a.seed), x.shape)
  grid = energy_landscape(logits_fn, x, int(ds.y_test[a.image_index]), directions, a.radius,
                          a.resolution)
  figures = write_figures(config, workdir, ds, grid) if jax.process_index() == 0 else {}
  multihost_utils.sync_global_devices('analyze: figures written')
  return figures


def write_figures(config, workdir: str, ds, grid: np.ndarray) -> Dict[str, str]:
  """The landscape, the energy dynamics of the logs and the gradient norms of the samples,
  into workdir/figures/ (process 0's job)."""
  a = config.analysis
  out = os.path.join(workdir, 'figures')
  files.makedirs(out)
  figures = {}
  files.atomic_write(os.path.join(out, 'energy_landscape.npz'),
                     lambda tmp: np.savez(tmp, energy=grid, radius=a.radius))
  figures['energy_landscape'] = plot_landscapes(os.path.join(out, 'energy_landscape.png'),
                                                {config.recipe: grid}, a.radius)
  scalars = read_scalars(workdir, DYNAMICS)
  if scalars:
    steps_per_epoch = max(1, ds.x_train.shape[0] // config.batch_size)
    curves, xlabel = dynamics_curve(scalars, steps_per_epoch, a.dynamics_period_steps)
    figures['energy_dynamics'] = plot_dynamics(os.path.join(out, 'energy_dynamics.png'), curves,
                                               config.recipe, xlabel)
  norms_path = os.path.join(workdir, config.sample.subdir, 'gradient_norms.npz')
  if files.exists(norms_path):
    with files.open_npz(norms_path) as f:
      figures['gradient_norms'] = plot_gradient_norms(
          os.path.join(out, 'gradient_norms.png'), f['norms'],
          f'{config.recipe}: generation by {str(f["objective"])}')
  logging.info('figures: %s', figures)
  return figures
