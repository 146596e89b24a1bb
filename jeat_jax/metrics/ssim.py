"""SSIM (Wang et al. 2004) and the nearest training images of generated ones (the paper's Fig. 7).

SSIM as in scikit-image's `structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)`: an 11 x 11 Gaussian
window (sigma 1.5) over each channel, K1 = 0.01, K2 = 0.03, the map averaged
over the positions where the window fits and over channels. Images in [0, 1].
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jeat_jax import files

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  r = np.arange(size) - (size - 1) / 2
  w = np.exp(-r ** 2 / (2 * sigma ** 2))
  return (w / w.sum()).astype(np.float32)


def local_mean(x: jax.Array) -> jax.Array:
  """Gaussian-weighted mean over every window that fits ('valid'), per channel: (..., H, W, C)."""
  w = jnp.asarray(gaussian_window())
  n = w.shape[0]
  h, wd = x.shape[-3], x.shape[-2]
  rows = sum(w[i] * x[..., i:h - n + 1 + i, :, :] for i in range(n))
  return sum(w[j] * rows[..., :, j:wd - n + 1 + j, :] for j in range(n))


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Mean SSIM of image pairs (..., H, W, C), broadcasting over leading axes."""
  c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
  mu_a, mu_b = local_mean(a), local_mean(b)
  var_a = local_mean(a * a) - mu_a ** 2
  var_b = local_mean(b * b) - mu_b ** 2
  cov = local_mean(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(-3, -2, -1))


@jax.jit
def _ssim_to_pool(queries: jax.Array, pool: jax.Array) -> jax.Array:
  """(Q, P) SSIM of every query against every pool image."""
  return jax.vmap(lambda q: ssim(q[None], pool))(queries)


def nearest_by_ssim(queries: np.ndarray, pool: np.ndarray, k: int = 5, chunk: int = 2500,
                    progress: Optional[Callable[[int], None]] = None):
  """The k pool images with the highest SSIM to each query.

  queries, pool: uint8 or [0, 1] float images (N, H, W, C). Returns (indices,
  ssim values), both (Q, k), best first. The pool is scanned in chunks;
  `progress(number of pool images scanned)` is called after each.
  """
  to_float = lambda x: (np.asarray(x, np.float32) / 255.0 if np.asarray(x).dtype == np.uint8
                        else np.asarray(x, np.float32))
  q = jnp.asarray(to_float(queries))
  chunk = min(chunk, pool.shape[0])  # a small pool is not padded to a whole chunk
  best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
  best_i = np.zeros((q.shape[0], 0), np.int64)
  for start in range(0, pool.shape[0], chunk):
    part = to_float(pool[start:start + chunk])
    n = part.shape[0]
    if n < chunk:  # pad the last chunk so one shape compiles
      part = np.concatenate([part, np.repeat(part[:1], chunk - n, axis=0)])
    s = np.asarray(_ssim_to_pool(q, jnp.asarray(part)))[:, :n]
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + n), s.shape)], axis=1)
    order = np.argsort(-cand_s, axis=1, kind='stable')[:, :k]
    best_s = np.take_along_axis(cand_s, order, axis=1)
    best_i = np.take_along_axis(cand_i, order, axis=1)
    if progress is not None:
      progress(start + n)
  return best_i, best_s


def plot_neighbours(path: str, queries: np.ndarray, pool: np.ndarray, indices: np.ndarray,
                    values: np.ndarray, title: str = '') -> str:
  """Fig. 7 layout: each row a generated image, then its nearest training images (SSIM above)."""
  rows, k = indices.shape
  fig, axes = files.pyplot().subplots(rows, k + 1, figsize=(1.2 * (k + 1), 1.3 * rows),
                                      squeeze=False)
  for r in range(rows):
    axes[r, 0].imshow(queries[r])
    axes[r, 0].set_title('generated' if r == 0 else '', fontsize=7)
    for j in range(k):
      axes[r, j + 1].imshow(pool[indices[r, j]])
      axes[r, j + 1].set_title(f'SSIM {values[r, j]:.2f}', fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  return files.save_figure(fig, path)
