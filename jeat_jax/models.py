"""Pre-activation Wide ResNet (Zagoruyko & Komodakis), as used by JEM and the paper, and the
ResNet-18 (He et al.) of TRADES-style training and of WEAT.

Images enter in [0, 1] (NHWC); the model normalises them itself, so every eps
in the project is in [0, 1] pixel units. Normalisation layers, activation and
dropout are configurable: JEM and JEAT use no normalisation and leaky ReLU, the
adversarial-training baselines BatchNorm and ReLU.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

ARCHS = ('wrn', 'resnet18')
NORMS = ('none', 'batch', 'group')
ACTIVATIONS = ('relu', 'leaky_relu', 'swish')
INPUT_NORMALIZATIONS = ('meanstd', 'minus_one_one', 'none')


def activation_fn(name: str) -> Callable:
  return {
      'relu': nn.relu,
      'leaky_relu': functools.partial(nn.leaky_relu, negative_slope=0.2),
      'swish': nn.swish,
  }[name]


class Identity(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x


def normalize_input(x, how: str):
  """Maps [0, 1] images to the network's input scale."""
  if how == 'meanstd':
    return (x - jnp.asarray(CIFAR10_MEAN, x.dtype)) / jnp.asarray(CIFAR10_STD, x.dtype)
  if how == 'minus_one_one':
    return 2.0 * x - 1.0
  return x


class WideBasicBlock(nn.Module):
  """Pre-activation block: norm-act-conv-dropout-norm-act-conv, plus shortcut."""
  channels: int
  stride: int
  dropout_rate: float
  norm: Callable
  act: Callable
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=True, dtype=self.dtype)
    out = self.act(self.norm()(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = conv(self.channels, (1, 1), strides=self.stride, name='shortcut')(x)
    out = conv(self.channels, (3, 3), padding=1, name='conv1')(out)
    if self.dropout_rate > 0:
      out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
    out = self.act(self.norm()(out))
    out = conv(self.channels, (3, 3), strides=self.stride, padding=1, name='conv2')(out)
    return out + shortcut


BN_MOMENTUM = 0.9  # flax's convention (see norm_layer): torch's default momentum 0.1


def norm_layer(norm: str, use_running_average: bool, dtype,
               bn_momentum: float = BN_MOMENTUM) -> Callable:
  """A constructor of the configured normalisation layer.

  `bn_momentum` (`model.bn_momentum`) is in FLAX's convention: a train-mode pass sets
  running = bn_momentum * running + (1 - bn_momentum) * batch statistic. torch's
  `nn.BatchNorm2d(momentum=m)` does running = (1 - m) * running + m * batch, so torch's m is
  flax's 1 - m: torch's default 0.1 is our 0.9, EB-JDAT's `momentum=0.9` (their
  models/norms.py, get_norm) our 0.1. eps 1e-5 as torch's.
  """
  if norm == 'batch':
    return functools.partial(nn.BatchNorm, use_running_average=use_running_average,
                             momentum=bn_momentum, epsilon=1e-5, dtype=dtype)
  if norm == 'group':
    return functools.partial(nn.GroupNorm, num_groups=16, dtype=dtype)
  return Identity


def float32_stem(x, input_normalization: str, dtype, stem: nn.Module):
  """The input normalisation and the stem convolution `stem` (built with dtype float32), in
  float32; its output cast to the compute `dtype`.

  A bfloat16 input would sit on a grid of 1/256 above 0.5, coarser than the 0.001 start noise of
  TRADES and WEAT and part of the SGLD noise: the attacks and SGLD act on float32 images, so the
  network must see them in float32 up to its first layer.
  """
  return stem(normalize_input(x.astype(jnp.float32), input_normalization)).astype(dtype)


def float32_head(x, num_classes: int):
  """Global average pooling and the classifier, in float32 (see WideResNet)."""
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  return nn.Dense(num_classes, dtype=jnp.float32, name='head')(x)


class WideResNet(nn.Module):
  """WRN-depth-width; depth = 6n + 4. Returns float32 logits.

  `dtype` is the compute dtype of the convolutions and normalisation layers after the stem;
  the input normalisation and the stem convolution (`float32_stem`), the global pooling and
  the classifier head always run in float32, so the network sees the float32 images of the
  attacks and SGLD, and the logits, and with them every energy (Eq. 12), loss and gradient
  with respect to x, are float32 under bfloat16 compute (a bf16 logit of size 10 has a
  resolution of 0.06).
  """
  depth: int = 28
  width: int = 10
  num_classes: int = 10
  norm: str = 'none'
  activation: str = 'leaky_relu'
  dropout_rate: float = 0.0
  input_normalization: str = 'minus_one_one'
  dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool = False, use_running_average: Optional[bool] = None):
    """x: [0, 1] images, NHWC. `use_running_average` overrides BatchNorm's mode
    (default: running averages unless `train`)."""
    if use_running_average is None:
      use_running_average = not train
    norm = norm_layer(self.norm, use_running_average, self.dtype, self.bn_momentum)
    act = activation_fn(self.activation)
    n = (self.depth - 4) // 6
    widths: Sequence[int] = (16 * self.width, 32 * self.width, 64 * self.width)

    x = float32_stem(x, self.input_normalization, self.dtype,
                     nn.Conv(16, (3, 3), padding=1, dtype=jnp.float32, name='stem'))
    for group, channels in enumerate(widths):
      for i in range(n):
        stride = 2 if (group > 0 and i == 0) else 1
        x = WideBasicBlock(channels, stride, self.dropout_rate, norm, act, self.dtype,
                           name=f'group{group}_block{i}')(x, train)
    x = act(norm()(x))
    return float32_head(x, self.num_classes)


class BasicBlock(nn.Module):
  """Post-activation block of ResNet-18: conv-norm-act-conv-norm, plus shortcut, then act."""
  channels: int
  stride: int
  norm: Callable
  act: Callable
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    out = self.act(self.norm()(conv(self.channels, (3, 3), strides=self.stride, padding=1,
                                    name='conv1')(x)))
    out = self.norm()(conv(self.channels, (3, 3), padding=1, name='conv2')(out))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = self.norm()(conv(self.channels, (1, 1), strides=self.stride, name='shortcut')(x))
    return self.act(out + shortcut)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 images (3x3 stem, stages of 64-512 channels, 2 blocks each), the
  architecture of TRADES' and WEAT's CIFAR-10 code. Returns float32 logits (float32 stem and
  head, see WideResNet)."""
  num_classes: int = 10
  norm: str = 'batch'
  activation: str = 'relu'
  input_normalization: str = 'none'
  dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool = False, use_running_average: Optional[bool] = None):
    if use_running_average is None:
      use_running_average = not train
    norm = norm_layer(self.norm, use_running_average, self.dtype, self.bn_momentum)
    act = activation_fn(self.activation)
    x = act(norm()(float32_stem(
        x, self.input_normalization, self.dtype,
        nn.Conv(64, (3, 3), padding=1, use_bias=False, dtype=jnp.float32, name='stem'))))
    for stage, channels in enumerate((64, 128, 256, 512)):
      for i in range(2):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = BasicBlock(channels, stride, norm, act, self.dtype, name=f'stage{stage}_block{i}')(x)
    return float32_head(x, self.num_classes)


def create_model(model_config, num_classes: int, dtype=jnp.float32) -> nn.Module:
  """The network of `model.arch`: a WRN-depth-width or a ResNet-18. A model config without
  `bn_momentum` (written before the key) gets torch's default, flax's BN_MOMENTUM."""
  bn_momentum = model_config.get('bn_momentum', BN_MOMENTUM)
  if model_config.arch == 'resnet18':
    return ResNet18(num_classes=num_classes, norm=model_config.norm,
                    activation=model_config.activation,
                    input_normalization=model_config.input_normalization, dtype=dtype,
                    bn_momentum=bn_momentum)
  return WideResNet(
      depth=model_config.depth, width=model_config.width, num_classes=num_classes,
      norm=model_config.norm, activation=model_config.activation,
      dropout_rate=model_config.dropout_rate,
      input_normalization=model_config.input_normalization, dtype=dtype,
      bn_momentum=bn_momentum)


def model_name(model_config) -> str:
  """E.g. 'WRN-28-10 (norm none, leaky_relu)' or 'ResNet-18 (norm batch, relu)'."""
  arch = ('ResNet-18' if model_config.arch == 'resnet18'
          else f'WRN-{model_config.depth}-{model_config.width}')
  return f'{arch} (norm {model_config.norm}, {model_config.activation})'
