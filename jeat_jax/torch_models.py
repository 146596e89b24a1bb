"""PyTorch twins of jeat-jax's networks (jeat_jax/models.py): standalone, they import only torch.

`--mode=export` copies this file unchanged into WORKDIR/export/model.py, beside the trained
weights (model.pt, a state_dict) and export.json, whose "model" entry holds the arguments of
`build_model`:

    import json, torch
    from model import build_model
    net = build_model(**json.load(open('export.json'))['model'])
    net.load_state_dict(torch.load('model.pt'))
    net.eval()                      # BatchNorm on its running statistics, no dropout

A network takes float32 images in [0, 1], NCHW, normalises them itself (`input_normalization`)
and returns logits. Layer names follow the Flax modules (`stem`, `group1_block0.conv2`,
`stage2_block1.shortcut`, `head`), so `jeat_jax.torch_port` maps the weights by name.
"""
import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
GROUP_NORM_GROUPS = 16
GROUP_NORM_EPS = 1e-6   # Flax GroupNorm's epsilon (torch's default is 1e-5)
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1   # Flax's momentum 0.9: the weight of the old running average


class InputNormalization(nn.Module):
  """[0, 1] images to the network's input scale: 'meanstd' (CIFAR-10's), 'minus_one_one' or 'none'."""

  def __init__(self, how: str):
    super().__init__()
    if how not in ('meanstd', 'minus_one_one', 'none'):
      raise ValueError(f'unknown input_normalization {how!r}')
    self.how = how
    self.register_buffer('mean', torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)

  def forward(self, x):
    if self.how == 'meanstd':
      return (x - self.mean) / self.std
    if self.how == 'minus_one_one':
      return 2.0 * x - 1.0
    return x


def activation_layer(name: str) -> nn.Module:
  """relu, leaky_relu (slope 0.2) or swish (x * sigmoid(x))."""
  layers = {'relu': nn.ReLU, 'leaky_relu': lambda: nn.LeakyReLU(0.2), 'swish': nn.SiLU}
  if name not in layers:
    raise ValueError(f'unknown activation {name!r}')
  return layers[name]()


def norm_layer(norm: str, channels: int) -> nn.Module:
  """BatchNorm (eps 1e-5, momentum 0.1), GroupNorm (16 groups, eps 1e-6) or nothing ('none')."""
  if norm == 'batch':
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)
  if norm == 'group':
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS)
  if norm == 'none':
    return nn.Identity()
  raise ValueError(f'unknown norm {norm!r}')


def float32_head(head: nn.Linear, x):
  """Global average pooling in float32, then the classifier."""
  return head(x.float().mean(dim=(2, 3)))


class WideBasicBlock(nn.Module):
  """Pre-activation block: norm-act-conv1-dropout-norm-act-conv2 (stride on conv2), plus a
  shortcut that is the input itself or a strided 1x1 convolution of it."""

  def __init__(self, in_channels, channels, stride, dropout_rate, norm, act):
    super().__init__()
    self.norm1, self.act1 = norm_layer(norm, in_channels), activation_layer(act)
    self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
    self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
    self.norm2, self.act2 = norm_layer(norm, channels), activation_layer(act)
    self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
    self.shortcut = (nn.Conv2d(in_channels, channels, 1, stride=stride)
                     if stride != 1 or in_channels != channels else None)

  def forward(self, x):
    out = self.conv1(self.act1(self.norm1(x)))
    out = self.conv2(self.act2(self.norm2(self.dropout(out))))
    return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
  """WRN-depth-width (depth = 6n + 4), pre-activation, as jeat_jax.models.WideResNet."""

  def __init__(self, depth=28, width=10, num_classes=10, norm='none', activation='leaky_relu',
               dropout_rate=0.0, input_normalization='minus_one_one'):
    super().__init__()
    if (depth - 4) % 6:
      raise ValueError(f'WideResNet depth {depth} is not 6n + 4')
    self.normalize = InputNormalization(input_normalization)
    self.stem = nn.Conv2d(3, 16, 3, padding=1)
    self.block_names = []
    in_channels = 16
    for group, channels in enumerate((16 * width, 32 * width, 64 * width)):
      for i in range((depth - 4) // 6):
        name = f'group{group}_block{i}'
        stride = 2 if (group > 0 and i == 0) else 1
        self.add_module(name, WideBasicBlock(in_channels, channels, stride, dropout_rate, norm,
                                             activation))
        self.block_names.append(name)
        in_channels = channels
    self.norm, self.act = norm_layer(norm, in_channels), activation_layer(activation)
    self.head = nn.Linear(in_channels, num_classes)

  def forward(self, x):
    x = self.stem(self.normalize(x))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return float32_head(self.head, self.act(self.norm(x)))


class BasicBlock(nn.Module):
  """Post-activation ResNet block: conv1 (strided)-norm-act-conv2-norm, plus a shortcut (the
  input, or a strided 1x1 convolution and norm), then act. Convolutions without bias."""

  def __init__(self, in_channels, channels, stride, norm, act):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
    self.norm1, self.act1 = norm_layer(norm, channels), activation_layer(act)
    self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    self.norm2, self.act2 = norm_layer(norm, channels), activation_layer(act)
    self.shortcut = self.shortcut_norm = None
    if stride != 1 or in_channels != channels:
      self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)
      self.shortcut_norm = norm_layer(norm, channels)

  def forward(self, x):
    out = self.act1(self.norm1(self.conv1(x)))
    out = self.norm2(self.conv2(out))
    shortcut = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
    return self.act2(out + shortcut)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 images (3x3 stem, stages of 64-512 channels), as jeat_jax.models.ResNet18."""

  def __init__(self, num_classes=10, norm='batch', activation='relu', input_normalization='none'):
    super().__init__()
    self.normalize = InputNormalization(input_normalization)
    self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    self.stem_norm, self.stem_act = norm_layer(norm, 64), activation_layer(activation)
    self.block_names = []
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512)):
      for i in range(2):
        name = f'stage{stage}_block{i}'
        stride = 2 if (stage > 0 and i == 0) else 1
        self.add_module(name, BasicBlock(in_channels, channels, stride, norm, activation))
        self.block_names.append(name)
        in_channels = channels
    self.head = nn.Linear(in_channels, num_classes)

  def forward(self, x):
    x = self.stem_act(self.stem_norm(self.stem(self.normalize(x))))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return float32_head(self.head, x)


def build_model(arch='wrn', **settings) -> nn.Module:
  """The network of `arch` ('wrn' or 'resnet18') with `settings` (export.json's "model")."""
  networks = {'wrn': WideResNet, 'resnet18': ResNet18}
  if arch not in networks:
    raise ValueError(f'unknown arch {arch!r}; use one of {sorted(networks)}')
  return networks[arch](**settings)
