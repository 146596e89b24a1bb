"""Flax weights into the PyTorch twins of `jeat_jax.torch_models` (the export's model.py).

`port(variables, model_config)` builds the twin of a config's network and loads its Flax
variables (params and BatchNorm running statistics); the tests compare the two, and
`--mode=export` writes the twin's state_dict. The twins' layers carry the Flax names, so a torch
key names its Flax leaf: `group1_block0.conv2.weight` is params/group1_block0/conv2/kernel
(HWIO -> OIHW), `head.weight` the transposed Dense kernel; the norms, which Flax numbers in the
order they are called (`BatchNorm_0`, ...), are mapped by `FLAX_NORM_INDEX`.

torch is optional for jeat-jax: this module imports it, and `torch_models`, only inside its
functions (`require_torch` names the install command where it is missing).
"""
import importlib.util
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from jeat_jax.errors import UserError

MODEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torch_models.py')
FLAX_NORM_INDEX = {'norm': 0, 'stem_norm': 0, 'norm1': 0, 'norm2': 1, 'shortcut_norm': 2}
FLAX_NORM_NAME = {'batch': 'BatchNorm', 'group': 'GroupNorm'}
WRN_KEYS = ('depth', 'width', 'norm', 'activation', 'dropout_rate', 'input_normalization')
RESNET18_KEYS = ('norm', 'activation', 'input_normalization')


def require_torch():
  """The torch module, or a UserError naming the install command."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError('PyTorch is needed to export or port a model and is not installed: '
                    'pip install torch') from e
  return torch


def model_source() -> str:
  """The text of the standalone model definition (torch_models.py), the export's model.py."""
  with open(MODEL_SOURCE) as f:
    return f.read()


def model_settings(model_config: Mapping[str, Any], num_classes: int) -> Dict[str, Any]:
  """The keyword arguments of `torch_models.build_model` for a `config.model` (a ConfigDict or
  dict): the keys of its architecture and `num_classes` (JSON-ready plain values)."""
  arch = model_config['arch']
  keys = RESNET18_KEYS if arch == 'resnet18' else WRN_KEYS
  settings = {k: model_config[k] for k in keys}
  if 'dropout_rate' in settings:
    settings['dropout_rate'] = float(settings['dropout_rate'])
  return {'arch': arch, **settings, 'num_classes': int(num_classes)}


def load_model_module(path: str):
  """The model definition at `path` (an export's model.py) imported as a module of its own,
  outside sys.modules: what a user of the export runs, not `jeat_jax.torch_models`."""
  require_torch()
  spec = importlib.util.spec_from_file_location('model', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def conv_kernel(kernel) -> np.ndarray:
  """A Flax conv kernel (H, W, in, out) as torch's (out, in, H, W)."""
  return np.ascontiguousarray(np.asarray(kernel, np.float32).transpose(3, 2, 0, 1))


def dense_kernel(kernel) -> np.ndarray:
  """A Flax Dense kernel (in, out) as torch's Linear weight (out, in)."""
  return np.ascontiguousarray(np.asarray(kernel, np.float32).T)


def flax_leaf(variables, torch_key: str, norm: str) -> np.ndarray:
  """The Flax array of one torch state_dict entry, in torch's layout."""
  *modules, leaf = torch_key.split('.')
  is_norm = modules[-1] in FLAX_NORM_INDEX
  if is_norm:
    modules[-1] = f'{FLAX_NORM_NAME[norm]}_{FLAX_NORM_INDEX[modules[-1]]}'
  if leaf in ('running_mean', 'running_var'):
    tree, name = variables['batch_stats'], {'running_mean': 'mean', 'running_var': 'var'}[leaf]
  else:
    tree, name = variables['params'], 'scale' if (is_norm and leaf == 'weight') else leaf
  for module in modules:
    tree = tree[module]
  value = np.array(tree['kernel' if name == 'weight' else name], np.float32)  # a writable copy
  if name == 'weight':
    return conv_kernel(value) if value.ndim == 4 else dense_kernel(value)
  return value


def num_flax_values(variables) -> int:
  """The number of numbers in the params and batch_stats of `variables`."""
  import jax  # pylint: disable=import-outside-toplevel
  trees = [variables['params'], variables.get('batch_stats', {})]
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(trees))


def load_flax_variables(net, variables, norm: str):
  """Copies Flax `variables` into the torch twin `net` (in place); returns `net`.

  Every entry of the twin's state_dict but BatchNorm's `num_batches_tracked` comes from a
  Flax leaf, and every Flax number must land somewhere (else the twin lacks a layer).
  """
  torch = require_torch()
  state = net.state_dict()
  loaded = {k: torch.from_numpy(flax_leaf(variables, k, norm))
            for k in state if not k.endswith('num_batches_tracked')}
  used = sum(v.numel() for v in loaded.values())
  if used != num_flax_values(variables):
    raise ValueError(f'the torch twin holds {used} of the {num_flax_values(variables)} Flax '
                     'numbers: the architectures differ')
  net.load_state_dict({**state, **loaded})
  return net


def port(variables, model_config: Mapping[str, Any]):
  """The torch twin of `model_config`'s network (eval mode) carrying the Flax `variables`
  ({'params': ..., 'batch_stats': ...}, host or device arrays). The number of classes is read
  from the head."""
  require_torch()
  from jeat_jax import torch_models  # pylint: disable=import-outside-toplevel
  num_classes = np.shape(variables['params']['head']['kernel'])[-1]
  net = torch_models.build_model(**model_settings(model_config, num_classes))
  return load_flax_variables(net, variables, model_config['norm']).eval()


def load_export(directory: str, settings: Optional[Dict[str, Any]] = None):
  """An export's network, fresh from DIRECTORY/model.py and model.pt (eval mode; DIRECTORY
  local or a URI); `settings` default to DIRECTORY/export.json's "model"."""
  from jeat_jax import files  # pylint: disable=import-outside-toplevel
  torch = require_torch()
  if settings is None:
    settings = files.read_json(os.path.join(directory, 'export.json'))['model']
  with files.local_copy(os.path.join(directory, 'model.py')) as source, \
      files.local_copy(os.path.join(directory, 'model.pt')) as weights:
    net = load_model_module(source).build_model(**settings)
    net.load_state_dict(torch.load(weights, weights_only=True))
  return net.eval()
