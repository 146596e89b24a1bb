"""--mode=export and the PyTorch twins: same logits as the Flax networks, files a user can load.

The port tests give every parameter a random offset and BatchNorm random running statistics, so
a weight loaded into the wrong layer, a transposed kernel or a swapped norm shows in the logits.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jeat_jax import models, torch_port
from tests.conftest import REPO, smoke_config

ATOL = 1e-4


@pytest.fixture(scope='module')
def torch():
  torch = pytest.importorskip('torch', reason='torch is not installed (pip install torch)')
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # 2 shared cores: one thread spins less
  yield torch
  torch.set_num_threads(threads)


def model_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(arch='wrn', depth=10, width=1, norm='batch', activation='relu', dropout_rate=0.0,
                input_normalization='meanstd')
  return ml_collections.ConfigDict({**config, **overrides})


def randomized_variables(model, key):
  """Initial variables of `model` (random kernels) with N(0, 0.1^2) added to the parameters that
  start constant (biases, norm scales), and running means ~ N(0, 0.3^2), variances ~ U(0.5, 2)."""
  k_init, k_draw = jax.random.split(key)
  leaves, tree = jax.tree_util.tree_flatten_with_path(
      model.init(k_init, jnp.zeros((1, 32, 32, 3))))

  def draw(path, value, k):
    name = path[-1].key
    if name == 'kernel':
      return value
    if name == 'mean':
      return 0.3 * jax.random.normal(k, value.shape)
    if name == 'var':
      return jax.random.uniform(k, value.shape, minval=0.5, maxval=2.0)
    return value + 0.1 * jax.random.normal(k, value.shape)

  keys = jax.random.split(k_draw, len(leaves))
  return tree.unflatten([draw(path, value, k) for (path, value), k in zip(leaves, keys)])


def compare(torch, config, num_images: int, num_classes: int = 10, seed: int = 0):
  """(max |JAX - torch| logit, max |JAX logit|) of a randomized network of `config`."""
  model = models.create_model(config, num_classes)
  variables = randomized_variables(model, jax.random.PRNGKey(seed))
  x = jax.random.uniform(jax.random.PRNGKey(seed + 1), (num_images, 32, 32, 3))
  x = np.asarray(x.at[0].multiply(0.01))  # dark and nearly flat: GroupNorm's epsilon counts
  with jax.default_matmul_precision('float32'):
    expected = np.asarray(model.apply(variables, x, train=False))
  net = torch_port.port(variables, config)
  assert not net.training
  with torch.no_grad():
    got = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  assert got.shape == expected.shape == (num_images, num_classes)
  return float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))


WRN_VARIANTS = {
    'batch-relu-meanstd': dict(norm='batch', activation='relu', input_normalization='meanstd'),
    'none-leaky_relu-minus_one_one': dict(norm='none', activation='leaky_relu',
                                          input_normalization='minus_one_one'),
    # width 2: the first block widens 16 -> 32 channels, a shortcut convolution with stride 1
    'group-swish-none-width2': dict(norm='group', activation='swish', input_normalization='none',
                                    width=2),
    'batch-swish-dropout': dict(norm='batch', activation='swish',
                                input_normalization='minus_one_one', dropout_rate=0.3),
}


@pytest.mark.parametrize('variant', sorted(WRN_VARIANTS))
def test_port_matches_flax_wrn_10(torch, variant):
  diff, scale = compare(torch, model_config(**WRN_VARIANTS[variant]), num_images=4)
  assert scale > 0.5, 'logits too small for the comparison to mean anything'
  assert diff < ATOL, f'{variant}: max |JAX - torch| logit {diff:.2e} (logits up to {scale:.2f})'


def test_port_matches_flax_resnet18(torch):
  diff, scale = compare(torch, model_config(arch='resnet18', input_normalization='none'),
                        num_images=2, num_classes=100)
  assert scale > 0.5 and diff < ATOL, (diff, scale)


@pytest.mark.slow
def test_port_matches_flax_wrn_28_10(torch):
  config = model_config(depth=28, width=10, norm='none', activation='leaky_relu',
                        input_normalization='minus_one_one')
  diff, scale = compare(torch, config, num_images=2)
  assert scale > 0.5 and diff < ATOL, (diff, scale)


def test_port_refuses_weights_of_another_architecture(torch):
  """BatchNorm weights ported as a network without norms: weights would be left unused."""
  model = models.create_model(model_config(), 10)
  variables = randomized_variables(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='the architectures differ'):
    torch_port.port(variables, model_config(norm='none'))


def test_export_imports_without_torch_and_names_the_install_command():
  code = '\n'.join([
      'import sys',
      'from jeat_jax import errors, export',
      "assert 'torch' not in sys.modules, 'importing jeat_jax.export imported torch'",
      "sys.modules['torch'] = None  # as if torch were not installed",
      'try:',
      "  export.export_run(None, 'no-workdir')",
      'except errors.UserError as e:',
      "  print('UserError:', e)"])
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert 'UserError:' in out.stdout and 'pip install torch' in out.stdout, out.stdout


# ----------------------------------------------------------------------------- end to end
# About 90 s on 2 busy cores (a 4-step training and its final evaluation, then main.py): slow.

@pytest.fixture(scope='module')
def exported(tmp_path_factory, standin_path, torch):
  """configs/at.py:smoke trained for its 4 steps, then `main.py --mode=export`."""
  del torch  # the export needs it
  from jeat_jax import train  # pylint: disable=import-outside-toplevel
  config = smoke_config('at', standin_path)
  workdir = str(tmp_path_factory.mktemp('export_run'))
  train.train_and_evaluate(config, workdir)
  cmd = [sys.executable, 'main.py', '--config=configs/at.py:smoke', f'--workdir={workdir}',
         '--mode=export', '--config.data.source=npz', f'--config.data.path={standin_path}']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr[-4000:]
  return config, workdir


@pytest.mark.slow
def test_export_writes_model_weights_and_record(exported):
  config, workdir = exported
  out = os.path.join(workdir, 'export')
  assert sorted(os.listdir(out)) == ['export.json', 'model.pt', 'model.py']
  record = json.load(open(os.path.join(out, 'export.json')))
  assert record['model'] == {'arch': 'wrn', 'depth': 10, 'width': 1, 'norm': 'batch',
                             'activation': 'relu', 'dropout_rate': 0.0,
                             'input_normalization': 'meanstd', 'num_classes': 10}
  assert record['model_name'] == models.model_name(config.model)
  assert record['input'] == {'range': [0.0, 1.0], 'layout': 'NCHW', 'dtype': 'float32',
                             'shape': [3, 32, 32], 'normalization': 'meanstd'}
  assert record['checkpoint_step'] == 4 and record['num_compared'] == 256
  assert record['recipe'] == 'at' and record['data']['source'] == 'npz'
  assert record['torch_version'] and record['num_classes'] == 10
  assert 0 <= record['max_abs_logit_diff'] < ATOL and record['argmax_agreement'] >= 0.99
  assert open(os.path.join(out, 'model.py')).read() == torch_port.model_source()


@pytest.mark.slow
def test_export_loads_without_jeat_jax_and_gives_the_jax_logits(exported, tmp_path):
  """model.py + model.pt in a fresh interpreter (no PYTHONPATH, cwd the export): the logits of
  the trained JAX model with its BatchNorm running statistics."""
  config, workdir = exported
  from jeat_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  model, state, ds, _ = state_lib.load_trained(config, workdir)
  x = ds.x_test[:16].astype(np.float32) / 255.0
  logits_fn = state_lib.make_logits_fn(model, state.params, state.batch_stats, 'running')
  with jax.default_matmul_precision('float32'):
    expected = np.asarray(logits_fn(jnp.asarray(x)))
  np.save(tmp_path / 'x.npy', np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  code = '\n'.join([
      'import json, sys',
      'import numpy as np, torch',
      'from model import build_model',
      "net = build_model(**json.load(open('export.json'))['model'])",
      "net.load_state_dict(torch.load('model.pt'))",
      "assert 'jeat_jax' not in sys.modules, 'model.py imported jeat_jax'",
      'net.eval()',
      f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))",
      'with torch.no_grad():',
      f"  np.save({str(tmp_path / 'logits.npy')!r}, net(x).numpy())"])
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run([sys.executable, '-c', code], cwd=os.path.join(workdir, 'export'), env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  got = np.load(tmp_path / 'logits.npy')
  assert np.max(np.abs(expected)) > 0.1
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
