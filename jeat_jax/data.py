"""CIFAR-10/100 from tensorflow-datasets or an .npz file, fed through one pipeline.

Both sources give the same in-memory uint8 arrays (CIFAR fits in memory). The
order of training examples is a pure function of (seed, epoch), so the batch of
any step can be rebuilt after a restart: this is what makes resume exact.
Augmentation (4-pixel reflect pad, random 32x32 crop, horizontal flip) runs on
device inside the jitted train step, keyed by (seed, step).

Multi-host: every process computes the same global batch indices and loads
only its own contiguous slice (`process_slice`); `parallel.global_batch` glues
the slices into one array sharded over all devices.
"""
import dataclasses
import hashlib
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jeat_jax import files, parallel
from jeat_jax.errors import DataError

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}
NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


@dataclasses.dataclass(frozen=True)
class Dataset:
  x_train: np.ndarray  # (N, H, W, C) uint8
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  source: str
  # Where the numbers of a run come from, written into results.json, robustness.json,
  # fid.json and REPORT.md: TFDS name and version, or the npz path and its sha256.
  provenance: Dict[str, Any] = dataclasses.field(default_factory=dict)
  # Training images held out for choosing checkpoints (`data.validation_size`), never trained
  # on; empty where none are held out. `validation_indices`: their rows in the training split.
  x_val: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.uint8))
  y_val: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
  validation_indices: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int64))


def _check_split(path: str, x: np.ndarray, y: np.ndarray, split: str, num_classes: int):
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise DataError(f'{path}: x_{split} must be (N, H, W, C) images, got shape {x.shape}')
  if x.dtype != np.uint8:
    raise DataError(f'{path}: x_{split} must be uint8, got {x.dtype}')
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise DataError(f'{path}: y_{split} must have shape ({x.shape[0]},), got {y.shape}')
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'{path}: y_{split} must hold integer labels, got {y.dtype}')
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f'{path}: y_{split} has labels in [{y.min()}, {y.max()}], outside '
                    f'[0, {num_classes - 1}] for {num_classes} classes')


def load_npz(path: str, num_classes: int) -> Dataset:
  """Reads x_train, y_train, x_test, y_test (uint8 NHWC, int labels) from `path`."""
  if not files.isfile(path):
    raise DataError(f'data file not found: {path} (set --config.data.path)')
  try:
    with files.open_npz(path) as f:
      missing = [k for k in NPZ_KEYS if k not in f.files]
      if missing:
        raise DataError(f'{path}: missing keys {missing}; an npz data file needs {list(NPZ_KEYS)}')
      arrays = {k: f[k] for k in NPZ_KEYS}
  except DataError:
    raise
  except Exception as e:  # not a zip, truncated, pickled objects...
    raise DataError(f'{path}: not a readable .npz file ({type(e).__name__}: {e})') from None
  for split in ('train', 'test'):
    _check_split(path, arrays[f'x_{split}'], arrays[f'y_{split}'], split, num_classes)
  if arrays['x_train'].shape[1:] != arrays['x_test'].shape[1:]:
    raise DataError(f'{path}: x_train images {arrays["x_train"].shape[1:]} and x_test images '
                    f'{arrays["x_test"].shape[1:]} differ in shape')
  x_test, y_test = interleave_if_grouped(arrays['x_test'], arrays['y_test'].astype(np.int32))
  # The path as the user gave it (no absolute path of this machine in a report), and the sha256
  # that names the file wherever it lies.
  provenance = {'source': 'npz', 'path': path, 'sha256': file_sha256(path)}
  return Dataset(arrays['x_train'], arrays['y_train'].astype(np.int32), x_test, y_test,
                 num_classes, f'npz:{path}', provenance)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with files.epath(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def interleave_if_grouped(x: np.ndarray, y: np.ndarray):
  """Applies a fixed permutation to a test split whose labels are sorted.

  The offline stand-in stores each split grouped by class, so its "first N
  test images" would all be planes; shuffled once with a fixed seed, the first N
  are a class-balanced sample, as they are in the real CIFAR test set.
  """
  if y.size > 1 and np.all(np.diff(y) >= 0):
    perm = np.random.default_rng(0).permutation(y.size)
    logging.info('test labels are grouped by class: using a fixed shuffled order')
    return x[perm], y[perm]
  return x, y


def load_tfds(name: str, data_dir: str) -> Dataset:
  """Loads a whole TFDS CIFAR dataset into memory (downloads it if needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  splits = {}
  builder = tfds.builder(name, data_dir=data_dir or None)
  builder.download_and_prepare()
  for split in ('train', 'test'):
    ds = builder.as_dataset(split=split, as_supervised=True)
    batches = list(tfds.as_numpy(ds.batch(10000)))
    splits[split] = (np.concatenate([x for x, _ in batches]).astype(np.uint8),
                     np.concatenate([y for _, y in batches]).astype(np.int32))
  provenance = {'source': 'tfds', 'name': name, 'version': str(builder.version)}
  return Dataset(*splits['train'], *splits['test'], NUM_CLASSES[name], f'tfds:{name}', provenance)


def tfds_is_prepared(name: str, data_dir: str) -> bool:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(name, data_dir=data_dir or None).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def load_dataset(config) -> Dataset:
  """Chooses the source from `config.data.source`: 'tfds', 'npz' or 'auto'.

  'auto' uses TFDS where the dataset is already prepared, else the npz file at
  `config.data.path` where it exists (the offline stand-in), else downloads
  with TFDS.
  """
  name, source, path = config.dataset, config.data.source, config.data.path
  num_classes = NUM_CLASSES[name]
  if source == 'auto':
    if tfds_is_prepared(name, config.data.tfds_data_dir):
      source = 'tfds'
    elif path and files.isfile(path):
      logging.warning('TFDS %s is not prepared here; using the npz file %s', name, path)
      source = 'npz'
    else:
      source = 'tfds'
  if source == 'npz':
    ds = load_npz(path, num_classes)
  else:
    ds = load_tfds(name, config.data.tfds_data_dir)
  if config.data.validation_size > 0:
    ds = hold_out_validation(ds, config.data.validation_size)
  if config.data.train_subset > 0:
    ds = train_subset(ds, config.data.train_subset, config.seed)
  return ds


VALIDATION_SEED = 20200101  # one split for every training seed: runs of several seeds compare


def hold_out_validation(ds: Dataset, size: int) -> Dataset:
  """`size` training images, drawn at random with a fixed seed (the same for every run on
  this data), moved from the training split to the validation split (Rice et al. 2020 choose
  checkpoints on 1000 held-out CIFAR-10 training images, never on test points). The training
  split keeps its order without them; `train_subset` draws from what remains."""
  n = ds.x_train.shape[0]
  if not 0 < size < n:
    raise DataError(f'data.validation_size={size}: must be at least 1 and less than the {n} '
                    f'training images of {ds.source}')
  held = np.sort(np.random.default_rng(VALIDATION_SEED).permutation(n)[:size])
  keep = np.setdiff1d(np.arange(n), held)
  digest = hashlib.sha256(held.astype(np.int64).tobytes()).hexdigest()
  provenance = dict(ds.provenance, validation_size=size, validation_sha256=digest)
  return dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep],
                             x_val=ds.x_train[held], y_val=ds.y_train[held],
                             validation_indices=held, provenance=provenance)


def train_subset(ds: Dataset, size: int, seed: int) -> Dataset:
  """A fixed random subset of the training set (for CPU-scale runs)."""
  if size >= ds.x_train.shape[0]:
    return ds
  idx = np.sort(np.random.default_rng([seed, 12345]).permutation(ds.x_train.shape[0])[:size])
  provenance = dict(ds.provenance, train_subset=size, train_subset_seed=seed)
  return dataclasses.replace(ds, x_train=ds.x_train[idx], y_train=ds.y_train[idx],
                             provenance=provenance)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of training examples in `epoch`, a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of the global batch at `step` (the remainder of each epoch is dropped)."""
  steps_per_epoch = n // batch_size
  epoch, i = divmod(step, steps_per_epoch)
  return epoch_permutation(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


def process_slice(indices: np.ndarray) -> np.ndarray:
  """This process's share of a global batch: the rows its devices hold on the mesh
  (`parallel.process_rows`; a contiguous block where the mesh orders devices by process)."""
  if jax.process_count() == 1:
    return indices
  return indices[parallel.process_rows(parallel.make_mesh(), len(indices))]


def train_batch(ds: Dataset, step: int, batch_size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """This process's part of the training batch at `step`: uint8 images, int32 labels."""
  idx = process_slice(global_batch_indices(step, ds.x_train.shape[0], batch_size, seed))
  return ds.x_train[idx], ds.y_train[idx]


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
  """Batches of `batch_size` points over (x, y) (the last one fewer), each padded at its end
  (with x[0], masked out) to the next multiple of the device count, so that any batch size
  splits evenly over any number of devices and every batch has one shape; yields
  (x, y, mask) of this process."""
  n, devices = x.shape[0], jax.device_count()
  batch_size = min(batch_size, n)  # fewer points than a batch: one batch of them, not padding
  padded = -(-batch_size // devices) * devices
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + padded)
    mask = idx < min(start + batch_size, n)
    idx = process_slice(np.where(mask, idx, 0))
    yield x[idx], y[idx], process_slice(mask)


def to_float(x_uint8: jax.Array) -> jax.Array:
  """uint8 pixels to float32 in [0, 1]."""
  return x_uint8.astype(jnp.float32) / 255.0


def augment(key: jax.Array, x: jax.Array, pad: int = 4, pad_mode: str = 'reflect') -> jax.Array:
  """Pad by `pad`, random crop back to size, random horizontal flip (per image).

  `pad_mode` (`data.pad_mode`): 'reflect' as JEM's and EB-JDAT's tr.Pad(4,
  padding_mode="reflect") and Rice et al.'s np.pad(mode='reflect'), or 'constant' (zeros)
  as torchvision's RandomCrop(32, padding=4) of TRADES, Fast AT and WEAT."""
  n, h, w, _ = x.shape
  k_crop, k_flip = jax.random.split(key)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,))

  def crop_flip(img, off, flip):
    img = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    return jnp.where(flip, img[:, ::-1], img)

  return jax.vmap(crop_flip)(padded, offsets, flips)
