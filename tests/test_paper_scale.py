"""benchmarks/paper_scale.py end to end on a tiny variant of the paper's JEAT step."""
import json
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import REPO, write_synthetic_npz


def wrn_forward_flops(depth: int, width: int, image: int = 32) -> float:
  """FLOPs of one image's forward pass through jeat_jax.models.WideResNet, by hand.

  Only the convolutions (2 FLOPs per multiply-add); each block runs conv1 at its input
  resolution and conv2 with the stride (JEM's WRN), plus a 1x1 shortcut where the
  shape changes. Elementwise work and the head are left out (a few per cent).
  """
  def conv(hw, c_in, c_out, k):
    return 2 * hw * hw * c_in * c_out * k * k

  n = (depth - 4) // 6
  flops, hw, c = conv(image, 3, 16, 3), image, 16
  for group, channels in enumerate((16 * width, 32 * width, 64 * width)):
    for i in range(n):
      stride = 2 if group > 0 and i == 0 else 1
      out_hw = hw // stride
      flops += conv(hw, c, channels, 3) + conv(out_hw, channels, channels, 3)
      if stride != 1 or c != channels:
        flops += conv(out_hw, c, channels, 1)
      hw, c = out_hw, channels
  return flops


def test_hand_count_matches_wrn_28_10():
  # WRN-28-10 with the stride on conv2 (JEM's variant): ~11.9 GFLOP, about 10% above the
  # usual 10.5 GFLOP (5.25 G multiply-adds) of the stride-on-conv1 WRN-28-10.
  assert 11.5e9 < wrn_forward_flops(28, 10) < 12.3e9


@pytest.mark.slow  # compiles and exports a train step for three platforms
def test_paper_scale_jeat_tiny(tmp_path):
  data = write_synthetic_npz(tmp_path / 'data.npz', n_train=64, n_test=16)
  out = tmp_path / 'jeat.json'
  sgld_steps, batch = 2, 8
  cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'paper_scale.py'),
         '--config=' + os.path.join(REPO, 'configs', 'jeat.py'), f'--out={out}',
         f'--batch_size={batch}', f'--data_path={data}', '--nomemory_at_paper_batch',
         '--config.model.depth=10', '--config.model.width=1',
         f'--config.sampler.num_steps={sgld_steps}', '--config.sampler.buffer_size=64',
         '--config.data.validation_size=16']  # of the 64 images (JEAT holds out 1000)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for stage in ('counting FLOPs', 'exporting', 'compiling', 'step 1/2', 'step 2/2'):
    assert stage in proc.stdout, proc.stdout
  r = json.loads(out.read_text())

  assert r['recipe'] == 'jeat' and r['model'].startswith('WRN-10-1')
  assert r['dtype'] == 'bfloat16'  # the paper config's compute dtype, not :cpu's float32
  assert (r['batch_size'], r['paper_batch_size']) == (batch, 64)
  assert (r['attack_steps'], r['sgld_steps'], r['updates_per_train_step']) == (1, sgld_steps, 1)
  assert r['data_source'].startswith('npz:') and r['data_provenance']['sha256']
  assert r['jax_version'] == jax.__version__ and r['cpu'] and r['cpu_contended']

  assert r['steps_run'] == 2 and len(r['seconds_each_step_cpu']) == 2
  assert r['seconds_per_step_cpu'] > 0 and r['compile_seconds'] > 0
  assert r['losses_finite']

  assert 'tpu' in r['exported_platforms'] and 'cuda' in r['exported_platforms']
  assert r['exported_roundtrip_platforms'] == r['exported_platforms']
  assert r['exported_serialized_bytes'] > 10_000 and r['exported_stablehlo_bytes'] > 10_000
  assert r['exported_custom_call_targets'] == []

  # Energy attack: one gradient in x (forward + backward, ~2F); K SGLD steps (2F each);
  # the loss on x_adv and x_sgld, forward and backward with weight gradients (3F each).
  forward = wrn_forward_flops(10, 1)
  expected = (2 * 1 + 2 * sgld_steps + 2 * 3) * forward
  assert r['flops_while_loops_left'] == 0
  assert r['flops_per_step'] == pytest.approx(r['flops_per_image'] * batch)
  assert 0.8 < r['flops_per_image'] / expected < 1.25, (r['flops_per_image'], expected)

  state = r['state_bytes']
  assert state['params'] == 4 * r['parameter_count']
  assert state['opt_state'] >= 2 * state['params']  # Adam's two moments
  assert r['memory_bytes_per_device'] > state['params'] + state['opt_state']


def test_free_at_flops_count_every_replay():
  """Free AT's m replays are a lax.scan: the count must unroll it, not count one replay."""
  from benchmarks import paper_scale  # pylint: disable=g-import-not-at-top
  from configs import free  # pylint: disable=g-import-not-at-top
  from jeat_jax import parallel  # pylint: disable=g-import-not-at-top
  config = free.get_config()
  config.model.depth, config.model.width = 10, 1
  config.perturbation.free_replays = 2
  mesh = parallel.make_mesh()
  _, args = paper_scale.abstract_at_batch(config, mesh, 8)
  flops, whiles = paper_scale.count_flops(config, mesh, args)
  assert whiles == 0
  # Each replay: forward, backward with weight gradients and the input gradient (~3F);
  # a count of one replay only would come out near half of this.
  expected = 2 * 3 * wrn_forward_flops(10, 1)
  assert 0.8 < flops / 8 / expected < 1.25, (flops / 8, expected)


def test_ebjdat_paper_step_takes_its_energy_batch_and_chain_pool():
  """EB-JDAT's step takes a second (energy) batch and carries a class-Gaussian pool: the
  paper-scale tools build it with both, and its count has no loop left."""
  from benchmarks import paper_scale  # pylint: disable=g-import-not-at-top
  from configs import ebjdat  # pylint: disable=g-import-not-at-top
  from jeat_jax import parallel  # pylint: disable=g-import-not-at-top
  config = ebjdat.get_config()
  config.model.depth, config.model.width = 10, 1
  # 2 steps: a scan of length 1 'unrolled' keeps its while loop (unroll = length = 1)
  config.sampler.num_steps, config.sampler.buffer_size = 2, 64
  config.sampler.reinit_pool_size = 64
  mesh = parallel.make_mesh()
  _, args = paper_scale.abstract_at_batch(config, mesh, 8)
  state, x, y, x_energy = args
  assert x_energy.shape == (config.data.energy_batch_size, 32, 32, 3)
  assert state.extra['reinit_pool'].shape[-4:] == (64, 32, 32, 3)
  flops, whiles = paper_scale.count_flops(config, mesh, args)
  assert whiles == 0 and flops > 0
