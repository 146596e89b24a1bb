"""Same weights in JAX and PyTorch: helpers for the attack cross-checks and benchmarks.

Holds
  * `SmallCNN`, a tiny Flax classifier, with its PyTorch twin (`torch_small_cnn`)
    and `port_small_cnn(variables) -> torch.nn.Module`;
  * `port_wideresnet(variables, model) -> torch.nn.Module`: a PyTorch copy of a Flax
    `jeat_jax.models.WideResNet` carrying its weights, by the package's own port
    (`jeat_jax.torch_port`, whose twins `--mode=export` writes);
  * the CIFAR-10 stand-in loader and a short Flax training loop used by the
    tests and `benchmarks/autoattack.py`;
  * `torch_autoattack`, torchattacks' AutoAttack compositions (standard, plus, rand)
    with the iteration counts of fra31/auto-attack (torchattacks' own
    `AutoAttack` runs APGD and FAB with their class defaults of 10 steps).

torch is imported lazily, here as in the package (`jeat_jax.torch_port`): the Flax
half works where torch is absent. Every torch model works on NCHW [0, 1] images;
`to_torch_images` converts from the project's NHWC.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jeat_jax import torch_port
from jeat_jax.energy import cross_entropy
from jeat_jax.models import CIFAR10_MEAN, CIFAR10_STD, WideResNet

STANDIN_PATH = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'cifar10-jpeg-standin.npz'


# ---------------------------------------------------------------- data

def load_standin(n_train: int, n_test: int, seed: int = 0,
                 path: Path = STANDIN_PATH) -> Optional[Tuple[np.ndarray, ...]]:
  """Shuffled float32 [0, 1] NHWC subsets of the CIFAR-10 stand-in, or None if absent.

  The stand-in is grouped by class, so both splits are permuted with `seed`.
  """
  if not Path(path).exists():
    return None
  rng = np.random.default_rng(seed)
  with np.load(path) as data:
    train_idx = np.sort(rng.permutation(len(data['y_train']))[:n_train])
    test_idx = np.sort(rng.permutation(len(data['y_test']))[:n_test])
    x_train, y_train = data['x_train'][train_idx], data['y_train'][train_idx]
    x_test, y_test = data['x_test'][test_idx], data['y_test'][test_idx]
  perm = rng.permutation(n_train)
  to_float = lambda a: a.astype(np.float32) / 255.0
  return (to_float(x_train[perm]), y_train[perm].astype(np.int32),
          to_float(x_test), y_test.astype(np.int32))


def synthetic_data(n_train: int, n_test: int, seed: int = 0,
                   num_classes: int = 10) -> Tuple[np.ndarray, ...]:
  """Learnable stand-in for the stand-in: one smooth colour template per class plus noise."""
  rng = np.random.default_rng(seed)
  templates = rng.uniform(0.2, 0.8, (num_classes, 4, 4, 3)).astype(np.float32)
  templates = np.repeat(np.repeat(templates, 8, axis=1), 8, axis=2)

  def draw(n):
    y = rng.integers(0, num_classes, n).astype(np.int32)
    x = templates[y] + rng.normal(0.0, 0.15, (n, 32, 32, 3)).astype(np.float32)
    return np.clip(x, 0.0, 1.0), y

  x_train, y_train = draw(n_train)
  x_test, y_test = draw(n_test)
  return x_train, y_train, x_test, y_test


def load_data(n_train: int, n_test: int, seed: int = 0):
  """(x_train, y_train, x_test, y_test, source): the stand-in if present, else synthetic."""
  data = load_standin(n_train, n_test, seed)
  if data is not None:
    return (*data, 'cifar10-jpeg-standin')
  return (*synthetic_data(n_train, n_test, seed), 'synthetic')


# ---------------------------------------------------------------- Flax side

class SmallCNN(nn.Module):
  """Three 3x3 convolutions (the last two with stride 2), ReLU, global mean, dense.

  Mean pooling before the head keeps the Flax (NHWC) and torch (NCHW) flattening
  orders out of the port.
  """
  widths: Tuple[int, ...] = (16, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = normalize_meanstd(x.astype(jnp.float32))
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, padding=1,
                          name=f'conv{i}')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


def normalize_meanstd(x):
  return (x - jnp.asarray(CIFAR10_MEAN)) / jnp.asarray(CIFAR10_STD)


def train_classifier(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, *,
                     steps: int, batch_size: int = 128, learning_rate: float = 3e-3,
                     seed: int = 0, has_batch_stats: bool = False) -> Dict[str, Any]:
  """Adam on cross-entropy for `steps` minibatches; returns the model's variables.

  With `has_batch_stats` the model is called with `train=True` and its
  BatchNorm running averages are updated.
  """
  key = jax.random.PRNGKey(seed)
  variables = model.init(key, jnp.asarray(x_train[:2]))
  params, state = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  def loss_fn(p, s, xb, yb):
    if has_batch_stats:
      logits, new_state = model.apply({'params': p, **s}, xb, train=True, mutable=['batch_stats'])
    else:
      logits, new_state = model.apply({'params': p, **s}, xb), s
    return jnp.mean(cross_entropy(logits, yb)), new_state

  @jax.jit
  def step(p, s, o, xb, yb):
    (_, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, xb, yb)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), s, o

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    xb = x_train[idx]
    xb = np.where(rng.random((batch_size, 1, 1, 1)) < 0.5, xb, xb[:, :, ::-1])   # flips
    params, state, opt_state = step(params, state, opt_state, jnp.asarray(xb),
                                    jnp.asarray(y_train[idx]))
  return {'params': params, **state}


def accuracy(logits_fn, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
  preds = [np.asarray(jnp.argmax(logits_fn(jnp.asarray(x[i:i + batch_size])), -1))
           for i in range(0, len(x), batch_size)]
  return float(np.mean(np.concatenate(preds) == y))


# ---------------------------------------------------------------- torch side

def _torch():
  import torch   # pylint: disable=import-outside-toplevel
  return torch


def to_torch_images(x: np.ndarray):
  """NHWC float32 numpy -> NCHW torch tensor."""
  torch = _torch()
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def from_torch_images(x) -> np.ndarray:
  """NCHW torch tensor -> NHWC float32 numpy."""
  return x.detach().cpu().numpy().transpose(0, 2, 3, 1)


def torch_small_cnn(widths=(16, 32, 64), num_classes: int = 10):
  """The PyTorch twin of `SmallCNN` (random weights; see `port_small_cnn`)."""
  torch = _torch()
  from jeat_jax.torch_models import InputNormalization  # pylint: disable=import-outside-toplevel
  tnn = torch.nn

  class TorchSmallCNN(tnn.Module):

    def __init__(self):
      super().__init__()
      chans = (3,) + tuple(widths)
      self.convs = tnn.ModuleList([
          tnn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1)
          for i in range(len(widths))])
      self.head = tnn.Linear(widths[-1], num_classes)
      self.normalize = InputNormalization('meanstd')

    def forward(self, x):
      x = self.normalize(x)
      for conv in self.convs:
        x = torch.relu(conv(x))
      return self.head(x.mean(dim=(2, 3)))

  return TorchSmallCNN()


def port_small_cnn(variables, model: SmallCNN = SmallCNN()):
  """A torch `SmallCNN` in eval mode carrying the Flax `variables`."""
  torch = _torch()
  net = torch_small_cnn(model.widths, model.num_classes)
  params = variables['params']
  state = {'head.weight': torch_port.dense_kernel(params['head']['kernel']),
           'head.bias': params['head']['bias']}
  for i in range(len(model.widths)):
    state[f'convs.{i}.weight'] = torch_port.conv_kernel(params[f'conv{i}']['kernel'])
    state[f'convs.{i}.bias'] = params[f'conv{i}']['bias']
  net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
  return net.eval()


def port_wideresnet(variables, model: WideResNet):
  """A torch copy (eval mode) of the Flax `model` carrying its `variables`: the package's
  `jeat_jax.torch_port.port`, given the `config.model` of `model`."""
  keys = ('depth', 'width', 'norm', 'activation', 'dropout_rate', 'input_normalization')
  return torch_port.port(variables, {'arch': 'wrn', **{k: getattr(model, k) for k in keys}})


def torch_accuracy(net, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
  torch = _torch()
  with torch.no_grad():
    preds = [net(to_torch_images(x[i:i + batch_size])).argmax(1).numpy()
             for i in range(0, len(x), batch_size)]
  return float(np.mean(np.concatenate(preds) == y))


def import_torchattacks():
  """torchattacks, or its attack submodules where the package import fails.

  A few torchattacks modules import torchvision at import time; where that is
  missing, the attacks used here are loaded from their own submodules.
  Raises ImportError if neither works.
  """
  try:
    import torchattacks   # pylint: disable=import-outside-toplevel
    return torchattacks
  except ImportError:
    import importlib   # pylint: disable=import-outside-toplevel
    import types   # pylint: disable=import-outside-toplevel
    names = {'PGD': 'pgd', 'APGD': 'apgd', 'APGDT': 'apgdt', 'FAB': 'fab', 'Square': 'square',
             'CW': 'cw', 'AutoAttack': 'autoattack'}
    ns = types.SimpleNamespace()
    for cls, mod in names.items():
      setattr(ns, cls, getattr(importlib.import_module(f'torchattacks.attacks.{mod}'), cls))
    ns.MultiAttack = importlib.import_module('torchattacks.wrappers.multiattack').MultiAttack
    return ns


def torch_autoattack(net, eps: float, version: str = 'standard', *, apgd_steps: int = 100,
                     fab_steps: int = 100, square_queries: int = 5000, n_target_classes: int = 9,
                     restarts: int = 5, eot_iter: int = 20, seed: int = 0):
  """torchattacks' AutoAttack composition of `version` at the given strength.

  standard: APGD-CE, APGD-T, FAB-T, Square; plus: APGD-CE and APGD-DLR (`restarts`
  each), untargeted FAB (`restarts`), Square, APGD-T, FAB-T; rand: APGD-CE and
  APGD-DLR with `eot_iter` gradient draws. As `torchattacks.AutoAttack(version=...)`
  builds them, but with the iteration counts given (its own runs APGD and FAB with
  their class defaults of 10 steps). Each attack sees only the points the previous
  ones left robust (MultiAttack). Square's p schedule is not rescaled to its query
  budget, as in fra31/auto-attack (torchattacks' own AutoAttack rescales it).
  `n_target_classes` < 9 is passed to torchattacks through its `n_classes`.
  """
  ta = import_torchattacks()
  common = dict(norm='Linf', eps=eps, seed=seed)
  n_classes = n_target_classes + 1
  apgd = lambda loss, **kw: ta.APGD(net, steps=apgd_steps, loss=loss, **common, **kw)
  apgd_t = ta.APGDT(net, steps=apgd_steps, n_restarts=1, n_classes=n_classes, **common)
  fab_t = ta.FAB(net, steps=fab_steps, n_restarts=1, multi_targeted=True, n_classes=n_classes,
                 **common)
  square = ta.Square(net, n_queries=square_queries, n_restarts=1, resc_schedule=False, **common)
  attacks = {
      'standard': lambda: [apgd('ce', n_restarts=1), apgd_t, fab_t, square],
      'plus': lambda: [apgd('ce', n_restarts=restarts), apgd('dlr', n_restarts=restarts),
                       ta.FAB(net, steps=fab_steps, n_restarts=restarts, **common), square,
                       apgd_t, fab_t],
      'rand': lambda: [apgd('ce', n_restarts=1, eot_iter=eot_iter),
                       apgd('dlr', n_restarts=1, eot_iter=eot_iter)],
  }[version]()
  return ta.MultiAttack(attacks)


def torch_robust_accuracy(net, attack, x: np.ndarray, y: np.ndarray) -> Tuple[float, np.ndarray]:
  """(robust accuracy, adversarial NHWC images) of a torchattacks attack on (x, y)."""
  torch = _torch()
  adv = attack(to_torch_images(x), torch.from_numpy(np.asarray(y, np.int64)))
  with torch.no_grad():
    preds = net(adv).argmax(1).numpy()
  return float(np.mean(preds == y)), from_torch_images(adv)
