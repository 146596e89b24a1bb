"""SGLD chains (Eq. 9, 10, 16, 17) and the on-device replay buffer of Algorithm 1.

One chain function, `langevin_chain`, serves training (negatives on E(x) for
JEM/JEAT, through `sgld_chain`) and generation (conditional samples on
E(x, y), through `generate`, optionally recording gradient norms):

  x_{t+1} = x_t - step_size * grad_x E(x_t) + noise_std * N(0, I).

The paper writes step_size = alpha / 2 and noise_std = sqrt(alpha) (Eq. 9);
JEM decouples them. `sgld_parameters` maps a config to the pair.

The replay buffer is one global array of shape (rows, H, W, C), sharded over the
devices on its first axis. Its `size` entries (`sampler.buffer_size`) are rows
0 .. size - 1; `rows` is `size` rounded up to a multiple of the device count
(`padded_size`), and the rows past `size` are never drawn. Slots are drawn from
the whole buffer with one key, so a seed draws the same chain starts on any
number of devices, and a checkpoint moves between device counts unchanged
(checkpoint.py keeps the first `size` rows).
"""
import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

EnergyFn = Callable[[jax.Array], jax.Array]  # images -> per-example energy
GradFn = Callable[[jax.Array], Tuple[jax.Array, Any]]  # images -> (grad_x E, record of the step)


def sgld_parameters(parametrization: str, step_size: float, noise_std: float,
                    alpha: float) -> Tuple[float, float]:
  """(step on the gradient, noise std) for 'jem' (decoupled) or 'paper' (Eq. 9: alpha/2, sqrt(alpha))."""
  if parametrization == 'paper':
    return alpha / 2.0, math.sqrt(alpha)
  return step_size, noise_std


def langevin_chain(grad_fn: GradFn, x0: jax.Array, key: jax.Array, num_steps: int,
                   step_size: float, noise_std: float, clip: Optional[Tuple[float, float]] = None,
                   unroll: int = 1, first_step=0, grad_clamp: float = 0.0,
                   num_valid: Optional[int] = None) -> Tuple[jax.Array, Any]:
  """The one SGLD chain: `num_steps` Langevin steps from x0 (Eq. 9/10; Algorithm 1).

  x_{t+1} = x_t - step_size * grad + noise_std * N(0, I), clipped to `clip`
  where given, with (grad, record) = grad_fn(x_t); `grad_clamp` > 0 clamps each
  gradient entry to [-grad_clamp, grad_clamp] first (EB-JDAT's SADA-JEM update,
  x + lr * clamp(grad, -1, 1) on [-1, 1] images). Returns x_K and the records
  stacked over the steps (None where grad_fn records nothing). The noise of
  step t is drawn with fold_in(key, first_step + t): a chain run in pieces
  with first_step = 0, k, 2k, ... is the same chain. `unroll` > 1 unrolls the
  `lax.scan` (faster on XLA:CPU). x_K is wrapped in stop_gradient: training
  never differentiates through a chain. `num_valid`: the chains of the logical batch
  (the first ones; the rest pad the batch to a multiple of the device count): their
  noise is drawn for them alone and padded, so padding changes none of their values.
  """
  def body(x, t):
    grad, record = grad_fn(x)
    if grad_clamp > 0:
      grad = jnp.clip(grad, -grad_clamp, grad_clamp)
    n = x.shape[0] if num_valid is None else num_valid
    noise = jax.random.normal(jax.random.fold_in(key, first_step + t), (n, *x.shape[1:]), x.dtype)
    x = x - step_size * grad + noise_std * pad_rows(noise, x.shape[0])
    return (x if clip is None else jnp.clip(x, *clip)), record

  x, records = jax.lax.scan(body, x0, jnp.arange(num_steps), unroll=unroll)
  return jax.lax.stop_gradient(x), records


def energy_gradient(energy_fn: EnergyFn) -> GradFn:
  """grad_x sum(E(x)) with nothing recorded: the gradient of a chain on `energy_fn`."""
  return lambda x: (jax.grad(lambda z: jnp.sum(energy_fn(z)))(x), None)


def sgld_chain(energy_fn: EnergyFn, x0: jax.Array, key: jax.Array, num_steps: int,
               step_size: float, noise_std: float, clip: Optional[Tuple[float, float]] = None,
               unroll: int = 1, grad_clamp: float = 0.0) -> jax.Array:
  """x_K of `langevin_chain` on the energy `energy_fn` (training negatives on E(x))."""
  return langevin_chain(energy_gradient(energy_fn), x0, key, num_steps, step_size, noise_std,
                        clip, unroll, grad_clamp=grad_clamp)[0]


def padded_size(size: int, num_devices: int) -> int:
  """`size` rounded up to a multiple of `num_devices`: the rows of a pool sharded over them."""
  return -(-size // num_devices) * num_devices


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """x with rows of zeros appended up to `rows`."""
  if rows == x.shape[0]:
    return x
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def init_replay_buffer(key: jax.Array, size: int, image_shape, low: float = 0.0,
                       high: float = 1.0, num_devices: int = 1) -> jax.Array:
  """A buffer of `size` images drawn from U(low, high) (Algorithm 1), padded with rows of
  zeros to `padded_size(size, num_devices)`: the same images on any device count."""
  x = jax.random.uniform(key, (size, *image_shape), jnp.float32, low, high)
  return pad_rows(x, padded_size(size, num_devices))


def draw_from_buffer(buffer: jax.Array, key: jax.Array, batch_size: int, reinit_prob: float,
                     low: float = 0.0, high: float = 1.0, pool: Optional[jax.Array] = None,
                     size: Optional[int] = None,
                     pool_size: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """Chain starts for Algorithm 1: a uniformly drawn buffer entry, or with prob. rho a fresh
  start: U(low, high), or a uniformly drawn entry of `pool` where given (pre-drawn
  class-Gaussian images, `sampler.reinit = class_gaussian`; laid out like the buffer).

  `size` / `pool_size`: the entries of the buffer and the pool (default: all their rows).
  Returns the starts, shape (batch_size, H, W, C), and the slot each was drawn from.
  """
  size = buffer.shape[0] if size is None else size
  k_idx, k_reinit, k_noise = jax.random.split(key, 3)
  slots = jax.random.randint(k_idx, (batch_size,), 0, size)
  starts = buffer[slots]
  reinit = jax.random.bernoulli(k_reinit, reinit_prob, (batch_size,))
  if pool is None:
    fresh = jax.random.uniform(k_noise, starts.shape, starts.dtype, low, high)
  else:
    pool_size = pool.shape[0] if pool_size is None else pool_size
    fresh = pool[jax.random.randint(k_noise, (batch_size,), 0, pool_size)]
  return jnp.where(reinit[:, None, None, None], fresh, starts), slots


def class_gaussian_images(gaussian: 'ClassConditionalGaussian', key: jax.Array, size: int,
                          image_shape) -> jax.Array:
  """`size` draws of N(mu_c, Sigma_c), class-balanced in class blocks (class c fills rows
  c * size / C .. (c + 1) * size / C), shape (size, H, W, C): SADA-JEM's initial buffer
  (EB-JDAT train_sadajem.py, init_from_centers: buffer_size / n_classes draws of each class).
  Their re-initialisation draws a random class per entry (init_random); drawn uniformly from
  a pool of these (`draw_from_buffer`), each start is of class c with probability 1/C as
  there."""
  num_classes = gaussian.means.shape[0]
  labels = (np.arange(size) * num_classes // size).astype(np.int32)
  return gaussian.sample(key, labels, image_shape)


def write_to_buffer(buffer: jax.Array, slots: jax.Array, x: jax.Array) -> jax.Array:
  """Writes chain ends back to the slots they started from. A slot drawn twice keeps the
  chain that comes later in the batch, as writing them in order would: the same buffer
  on every backend and device count (a scatter of duplicates is unordered)."""
  order = jnp.arange(slots.shape[0])
  overwritten = jnp.any((slots[None, :] == slots[:, None]) & (order[None, :] > order[:, None]),
                        axis=1)
  return buffer.at[jnp.where(overwritten, buffer.shape[0], slots)].set(x, mode='drop')


# ----------------------------------------------------------------------------- generation

OBJECTIVES = ('eq17', 'eq16', 'unconditional')
STARTS = ('uniform', 'gaussian', 'buffer')


def generation_energy(logits_fn: Callable[[jax.Array], jax.Array], y: jax.Array,
                      objective: str) -> EnergyFn:
  """The energy a generation chain descends.

  'eq17': E(x, y) alone (Eq. 17, the paper's way, Algorithm 1 "Generating");
  'eq16': E(x, y) - E(x), i.e. cross-entropy (Eq. 16/21, the original robust-classifier way);
  'unconditional': E(x) (y is ignored).
  """
  from jeat_jax import energy  # pylint: disable=g-import-not-at-top

  def fn(x):
    logits = logits_fn(x)
    if objective == 'eq17':
      return energy.energy_xy(logits, y)
    if objective == 'eq16':
      return energy.cross_entropy(logits, y)
    return energy.energy_x(logits)
  return fn


def gradient_with_norms(logits_fn: Callable[[jax.Array], jax.Array], y: jax.Array,
                        objective: str, num_valid: Optional[int] = None) -> GradFn:
  """The gradient of `generation_energy`, recording the batch means of |grad_x E(x, y)|_2
  and |grad_x E(x)|_2 (the quantities of Fig. 12/13), shape (2,) per step.

  One forward pass; both gradients are pulled back from it
  (dE(x,y)/dlogits = -onehot(y), dE(x)/dlogits = -softmax). `num_valid`: the means are
  over the first chains only (the rest pad the batch).
  """
  def mean_norm(g):
    g = g[:num_valid]
    return jnp.mean(jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=-1)))

  def grad_fn(x):
    logits, pullback = jax.vjp(logits_fn, x)
    g_xy, = pullback(-jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype))
    g_x, = pullback(-jax.nn.softmax(logits))
    g = {'eq17': g_xy, 'eq16': g_xy - g_x, 'unconditional': g_x}[objective]
    return g, jnp.stack([mean_norm(g_xy), mean_norm(g_x)])
  return grad_fn


def uniform_images(key: jax.Array, n: int, image_shape, low: float = 0.0,
                   high: float = 1.0) -> jax.Array:
  """Chain starts from U(low, high)."""
  return jax.random.uniform(key, (n, *image_shape), jnp.float32, low, high)


class ClassConditionalGaussian:
  """N(mu_y, Sigma_y) of the training images of each class (Sec. 2.2, Santurkar et al.),
  with the full (H*W*C)^2 covariance, fitted once and cached as an .npz."""

  def __init__(self, means: np.ndarray, cholesky: np.ndarray):
    self.means = means          # (num_classes, D)
    self.cholesky = cholesky    # (num_classes, D, D), lower triangular

  @classmethod
  def fit(cls, x_uint8: np.ndarray, y: np.ndarray, num_classes: int,
          jitter: float = 2.5e-5) -> 'ClassConditionalGaussian':
    """Means and Cholesky factors of Sigma_c + jitter I on [0, 1] images. The jitter is
    EB-JDAT's 1e-4 I (train_sadajem.py, init_from_centers) on their [-1, 1] images, whose
    covariances are 4x ours: 1e-4 / 4 here."""
    d = int(np.prod(x_uint8.shape[1:]))
    means = np.zeros((num_classes, d), np.float32)
    chol = np.zeros((num_classes, d, d), np.float32)
    for c in range(num_classes):
      xc = x_uint8[y == c].reshape(-1, d).astype(np.float64) / 255.0
      means[c] = xc.mean(0)
      cov = np.cov(xc, rowvar=False) + jitter * np.eye(d)
      chol[c] = np.linalg.cholesky(cov)
    return cls(means, chol)

  @classmethod
  def cached(cls, path: str, x_uint8: np.ndarray, y: np.ndarray,
             num_classes: int) -> 'ClassConditionalGaussian':
    """Loads the fit from `path`, or fits it and saves it there."""
    from jeat_jax import files  # pylint: disable=g-import-not-at-top
    if files.exists(path):
      with files.open_npz(path) as f:
        return cls(f['means'], f['cholesky'])
    fitted = cls.fit(x_uint8, y, num_classes)
    files.atomic_write(path, lambda tmp: np.savez(tmp, means=fitted.means,
                                                  cholesky=fitted.cholesky))
    return fitted

  def sample(self, key: jax.Array, labels, image_shape) -> jax.Array:
    """mu_y + L_y z, clipped to [0, 1]; one matrix product per class present in `labels`
    (a per-example gather of the D x D factors would take N * D^2 memory)."""
    labels = np.asarray(labels)
    z = jax.random.normal(key, (labels.shape[0], self.means.shape[1]), jnp.float32)
    x = jnp.asarray(self.means)[labels]
    for c in np.unique(labels):
      idx = np.flatnonzero(labels == c)
      x = x.at[idx].add(z[idx] @ jnp.asarray(self.cholesky[c]).T)
    return jnp.clip(x, 0.0, 1.0).reshape((labels.shape[0], *image_shape))


def buffer_images(key: jax.Array, buffer: jax.Array, n: int, size: int) -> jax.Array:
  """Chain starts drawn uniformly from the `size` entries of a replay buffer."""
  return buffer[jax.random.randint(key, (n,), 0, size)]


def class_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """Labels 0, 1, ..., C-1, 0, 1, ... : balanced over classes."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def generate(logits_fn, x0: jax.Array, y: jax.Array, key: jax.Array, *, objective: str = 'eq17',
             num_steps: int = 100, step_size: float = 1.0, noise_std: float = 0.01,
             clip=(0.0, 1.0), record_gradient_norms: bool = False, unroll: int = 1,
             first_step=0, grad_clamp: float = 0.0, num_valid: Optional[int] = None):
  """Generation by SGLD from x0 (Eq. 16, 17 or unconditional on E(x)).

  Returns x_K, or (x_K, per-step gradient norms of shape (num_steps, 2):
  [|grad E(x,y)|, |grad E(x)|]) when `record_gradient_norms`. `first_step`:
  the index of the first step in a chain run in pieces (see `langevin_chain`).
  `num_valid`: the first chains are the logical batch, the rest padding (see
  `langevin_chain`). Jit it with the model bound in `logits_fn` (as
  `generation.sample_run` does).
  """
  if record_gradient_norms:
    grad_fn = gradient_with_norms(logits_fn, y, objective, num_valid)
  else:
    grad_fn = energy_gradient(generation_energy(logits_fn, y, objective))
  x, norms = langevin_chain(grad_fn, x0, key, num_steps, step_size, noise_std, clip, unroll,
                            first_step, grad_clamp, num_valid)
  return (x, norms) if record_gradient_norms else x
