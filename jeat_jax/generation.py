"""--mode=sample: class-conditional images from a trained run (Fig. 4, 6; Algorithm 1 "Generating").

Writes WORKDIR/samples/grid.png (one row per class), samples.npz (`x` uint8
N x H x W x C, `y` the conditioning labels: the layout FID tools read),
gradient_norms.npz (per-step mean |grad E(x,y)| and |grad E(x)|, Fig. 12/13),
neighbours.png/.npz (the nearest training images by SSIM, Fig. 7) and logs the
grid to TensorBoard. The chains of a batch are sharded over every device of
every process; process 0 writes the files.
"""
import functools
import hashlib
import os
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jeat_jax import data as data_lib
from jeat_jax import files, parallel, sampling
from jeat_jax import state as state_lib
from jeat_jax.files import atomic_write, write_json_atomic
from jeat_jax.metrics import ssim as ssim_lib
from jeat_jax.logs import Progress, tensorboard_writer


def gaussian_cache_path(config, workdir: str) -> str:
  """`sample.gaussian_cache`, or WORKDIR/class_gaussian_<dataset>_<hash of the data>.npz:
  the fit of the class Gaussians (a run output, like the samples)."""
  if config.sample.gaussian_cache:
    return config.sample.gaussian_cache
  key = f'{config.dataset}|{config.data.source}|{config.data.path}|{config.data.train_subset}'
  if config.data.train_subset > 0:  # the subset is drawn with the run's seed
    key += f'|{config.seed}'
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  return os.path.join(workdir, f'class_gaussian_{config.dataset}_{digest}.npz')


def image_grid(x: np.ndarray, rows: int) -> np.ndarray:
  """(N, H, W, C) images in [0, 1] -> one (rows*H, cols*W, C) grid."""
  n, h, w, c = x.shape
  cols = n // rows
  x = np.clip(x[:rows * cols], 0, 1).reshape(rows, cols, h, w, c)
  return x.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def chain_starts(config, ds, state, workdir: str):
  """A function (key, labels) -> x_0 for every label, from `config.sample.start`."""
  shape = ds.x_train.shape[1:]
  if config.sample.start == 'uniform':
    return lambda key, labels: sampling.uniform_images(key, labels.shape[0], shape)
  if config.sample.start == 'buffer':
    if 'buffer' not in state.extra:
      raise ValueError('sample.start=buffer needs a run with a replay buffer (jem, jeat)')
    size = config.sampler.buffer_size
    return lambda key, labels: sampling.buffer_images(key, state.extra['buffer'], labels.shape[0],
                                                      size)
  gaussian = sampling.ClassConditionalGaussian.cached(
      gaussian_cache_path(config, workdir), ds.x_train, ds.y_train, ds.num_classes)
  return lambda key, labels: gaussian.sample(key, labels, shape)


def class_grid(x: np.ndarray, y: np.ndarray, num_classes: int, per_class: int = 10) -> np.ndarray:
  """One row per class, `per_class` images each (fewer where fewer were drawn)."""
  rows = []
  for c in range(num_classes):
    xc = x[y == c][:per_class]
    if xc.shape[0] < per_class:
      xc = np.concatenate([xc, np.zeros((per_class - xc.shape[0],) + x.shape[1:], x.dtype)])
    rows.append(np.concatenate(list(xc), axis=1))
  return np.concatenate(rows, axis=0)


def save_png(path: str, image: np.ndarray, scale: int = 2) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(image)
  img = img.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
  atomic_write(path, img.save)


def write_neighbours(out: str, x_uint8: np.ndarray, labels: np.ndarray, ds, s) -> None:
  """Fig. 7: for one generated image per class, its `s.neighbours` most SSIM-similar
  training images; writes neighbours.png and neighbours.npz (indices, ssim, query)."""
  queries = np.array([np.flatnonzero(labels == c)[0] for c in np.unique(labels)])
  queries = queries[:s.neighbour_queries]
  pool = ds.x_train[:s.neighbour_pool] if s.neighbour_pool > 0 else ds.x_train
  progress = Progress(f'nearest training images by SSIM ({len(queries)} queries):',
                      pool.shape[0])
  idx, val = ssim_lib.nearest_by_ssim(x_uint8[queries], pool, k=s.neighbours, progress=progress)
  atomic_write(os.path.join(out, 'neighbours.npz'),
               lambda tmp: np.savez(tmp, query=queries, indices=idx, ssim=val))
  ssim_lib.plot_neighbours(os.path.join(out, 'neighbours.png'), x_uint8[queries], pool, idx, val,
                           f'generated ({s.objective}) and nearest training images by SSIM')


def samples_dir(config, workdir: str) -> str:
  """WORKDIR/samples, or WORKDIR/<sample.subdir> to keep several samplings of one run apart."""
  return os.path.join(workdir, config.sample.subdir)


def fid_json_path(config, workdir: str) -> str:
  """WORKDIR/fid.json for the default samples, else beside the samples in their subdir."""
  if config.sample.subdir == 'samples':
    return os.path.join(workdir, 'fid.json')
  return os.path.join(samples_dir(config, workdir), 'fid.json')


def features_path(config, workdir: str) -> str:
  """The samples' pool3 features that --mode=fid keeps, beside the samples."""
  return os.path.join(samples_dir(config, workdir), 'pool3.npz')


def to_host(array) -> np.ndarray:
  """The whole value of `array` on this host: a global array sharded over the devices of
  several processes is gathered (a collective: every process calls it)."""
  if isinstance(array, jax.Array) and not (array.is_fully_addressable or
                                           array.is_fully_replicated):
    return multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def write_samples(out: str, x_uint8, labels, norms, grid, ds, s) -> None:
  """samples.npz, gradient_norms.npz, grid.png and the SSIM neighbours in OUT (process 0's job)."""
  atomic_write(os.path.join(out, 'samples.npz'), lambda tmp: np.savez(tmp, x=x_uint8, y=labels))
  if norms is not None:
    atomic_write(os.path.join(out, 'gradient_norms.npz'), lambda tmp: np.savez(
        tmp, norms=norms, columns=np.array(['grad_energy_xy', 'grad_energy_x']),
        objective=s.objective))
  save_png(os.path.join(out, 'grid.png'), grid)
  if s.neighbours > 0:
    write_neighbours(out, x_uint8, labels, ds, s)


def sample_run(config, workdir: str) -> dict:
  """Generates `sample.num_samples` images from the latest checkpoint of `workdir`.

  The chains of a batch are sharded over every device of every process (each process
  feeds its slice); the images are gathered, and process 0 writes the files.
  """
  model, state, ds, mesh = state_lib.load_trained(config, workdir)
  s = config.sample
  logits_fn = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'running')
  # On XLA:CPU a chain inside a while loop runs its conv gradients ~3x slower than
  # straight-line code: `sample.steps_per_call` > 0 runs the chain as jitted,
  # fully unrolled pieces of that many steps, called from Python.
  steps_per_call = s.steps_per_call or s.num_steps
  gen = jax.jit(functools.partial(
      sampling.generate, logits_fn, objective=s.objective, num_steps=steps_per_call,
      step_size=s.step_size, noise_std=s.noise_std, clip=(0.0, 1.0) if s.clip else None,
      grad_clamp=s.grad_clamp, num_valid=s.batch_size,
      record_gradient_norms=s.record_gradient_norms, unroll=s.unroll))
  # Batches of sample.batch_size chains, each padded to a multiple of the device count: the
  # starts and the chain noise are drawn for the batch's own chains and padded, so a seed
  # gives the same samples on any number of devices.
  batch_size = s.batch_size
  padded = sampling.padded_size(batch_size, mesh.size)
  num_batches = -(-s.num_samples // batch_size)
  # Labels cycle through the classes; those past num_samples fill the last batch and are
  # dropped with their images.
  labels = sampling.class_labels(num_batches * batch_size, ds.num_classes)
  mine = data_lib.process_slice(np.arange(padded))
  starts = chain_starts(config, ds, state, workdir)
  key = jax.random.PRNGKey(s.seed)
  xs, norms = [], []
  pieces = s.num_steps // steps_per_call
  progress = Progress('sampled', s.num_samples)
  for i in range(0, num_batches * batch_size, batch_size):
    y = labels[i:i + batch_size]
    k_start, k_chain = jax.random.split(jax.random.fold_in(key, i))
    x0 = np.asarray(sampling.pad_rows(jnp.asarray(to_host(starts(k_start, y))), padded))
    y = np.pad(y, (0, padded - batch_size))
    x, y_global = parallel.global_batch(mesh, x0[mine], y[mine])
    batch_norms = []
    for piece in range(pieces):
      out = gen(x, y_global, k_chain, first_step=piece * steps_per_call)  # one chain
      x, n = out if s.record_gradient_norms else (out, None)
      batch_norms.append(n)
      if piece + 1 < pieces:  # chains part-way: their share of the batch's images
        jax.block_until_ready(x)
        progress(min(i + batch_size * (piece + 1) / pieces, s.num_samples))
    xs.append(to_host(x)[:batch_size])
    if s.record_gradient_norms:
      norms.append(np.concatenate([to_host(n) for n in batch_norms]))
    progress(min(i + batch_size, s.num_samples))
  x_uint8 = np.round(np.concatenate(xs)[:s.num_samples] * 255).clip(0, 255).astype(np.uint8)
  labels = labels[:s.num_samples]
  grid = class_grid(x_uint8, labels, ds.num_classes)
  out = samples_dir(config, workdir)
  if jax.process_index() == 0:
    write_samples(out, x_uint8, labels, np.mean(np.stack(norms), axis=0) if norms else None,
                  grid, ds, s)
    writer = tensorboard_writer(workdir)
    writer.write_images(int(state.step), {f'samples_{s.objective}': grid[None]})
    writer.close()
    logging.info('wrote %s/{grid.png,samples.npz,gradient_norms.npz}', out)
  multihost_utils.sync_global_devices('sample: files written')  # fid_run reads them next
  return {'samples': os.path.join(out, 'samples.npz'), 'grid': os.path.join(out, 'grid.png'),
          'num_samples': int(s.num_samples)}


def fid_reference(config, workdir: str, ds) -> Tuple[str, Optional[str], str]:
  """(reference .npz, its image key or None, the directory of its cached statistics) of
  `config.fid`: `fid.reference`, else the training images of `data` (for TFDS written as
  an .npz into the statistics directory, `fid.reference_dir` or the workdir)."""
  f = config.fid
  reference, key = f.reference, f.reference_key or None
  reference_dir = f.reference_dir or workdir
  if not reference:
    if config.data.source == 'npz' or (config.data.source == 'auto' and files.isfile(config.data.path)):
      reference, key = config.data.path, 'x_train'
    else:  # TFDS: its training images as an .npz, beside the statistics
      reference, key = os.path.join(reference_dir, f'{config.dataset}_train.npz'), 'x_train'
      atomic_write(reference, lambda tmp: np.savez(tmp, x_train=ds.x_train))
  return reference, key, reference_dir


def fid_reference_statistics(config, workdir: str) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the reference `fid_run` scores against (from the statistics cache
  where it has run before)."""
  from jeat_jax.metrics import fid, inception  # pylint: disable=g-import-not-at-top
  reference, key, reference_dir = fid_reference(config, workdir, data_lib.load_dataset(config))
  variables = inception.load_inception_variables(config.fid.weights or None)
  return fid.reference_statistics(reference, variables, key, config.fid.max_reference or None,
                                  batch_size=config.fid.batch_size, cache_dir=reference_dir)


def fid_run(config, workdir: str) -> dict:
  """--mode=fid: FID (and IS where the weights have the 1008-way head) of
  WORKDIR/samples/samples.npz against the training set; writes WORKDIR/fid.json (with
  `sample.subdir`: that directory's samples.npz and fid.json), naming the dataset (`data`:
  its provenance), and the samples' Inception features (`features_path`). With several processes each featurises its
  share of the images (`fid.sharded_activations`) and process 0 writes."""
  from jeat_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  samples = os.path.join(samples_dir(config, workdir), 'samples.npz')
  if not files.isfile(samples):
    from jeat_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
    raise WorkdirError(f'{samples} not found: run --mode=sample first')
  ds = data_lib.load_dataset(config)
  reference, key, reference_dir = fid_reference(config, workdir, ds)
  f = config.fid
  start = time.time()
  result = fid.score_npz(samples, reference, weights=f.weights or None, reference_key=key,
                         max_reference=f.max_reference or None, batch_size=f.batch_size,
                         stats_dir=reference_dir, keep_features=True)
  features = result.pop('pool3')
  with files.open_npz(samples) as npz:
    num_samples = int(npz['x'].shape[0])
  result.update({'num_samples': num_samples, 'reference': reference,
                 'reference_images': f.max_reference or 'all', 'data': ds.provenance,
                 'protocol': 'TTUR/pytorch-fid: pool3 of the TF 2015 Inception at 299x299; '
                             'IS on the 1008-way logits, 10 splits',
                 'seconds': round(time.time() - start, 1)})
  if jax.process_index() == 0:
    # The samples' Inception features, beside fid.json: what a bootstrap interval or a
    # pooled FID over several runs needs (`fid.bootstrap_fids`).
    atomic_write(features_path(config, workdir), lambda tmp: np.savez(tmp, pool3=features))
    write_json_atomic(fid_json_path(config, workdir), result)
  multihost_utils.sync_global_devices('fid: fid.json written')
  logging.info('FID: %s', result)
  return result
