"""Throughput and model FLOP utilisation on an accelerator: JEAT, PGD-10 AT, AutoAttack.

  python benchmarks/gpu.py                       # WRN-28-10, batch 64 and 256 per device
  python benchmarks/gpu.py --batch=64,128,512 --dtypes=bfloat16
  python benchmarks/gpu.py --model=10-1 --batch=8 --steps=1 --autoattack=quick   # CPU smoke

Workloads (the package's own jitted train step, data parallel over every local
device exactly as train.py runs it: batch sharded, parameters replicated, the
replay buffer one shard per device):
  jeat        Algorithm 1: energy attack (1 step), K = --sgld_steps SGLD steps on E(x)
              from a 10000-image replay buffer, CE(x_adv) + E(x_adv) - E(x_sgld), Adam
              (configs/jeat.py: no normalisation, leaky ReLU);
  at          Madry PGD-10 AT: 10 PGD steps on CE, then the CE update, SGD (configs/at.py,
              BatchNorm);
  autoattack  jeat_jax.attacks.autoattack's standard version (APGD-CE, APGD-T, FAB-T,
              Square) on the untrained float32 WRN, each attack timed on its own on every
              image (labels = the model's own predictions, so that every image is
              attacked): seconds per image per attack, and their sum times the 10000
              CIFAR-10 test images, the cost when every image survives to the last attack.
              APGD and FAB run all their iterations; Square stops at an image's first
              success, which on an untrained model comes early, so its time here is far
              below a robust model's (up to 5000 queries). Skipped when the package has no
              autoattack. `--autoattack=quick` runs a few iterations only: it checks the
              code path, its numbers mean nothing.

Every train-step workload runs in float32 and in bfloat16 (`config.model.dtype`:
parameters float32, activations bfloat16, energies float32) at each per-device
batch of --batch.

FLOPs are XLA's cost analysis of the step, counted on the step lowered with every
`lax.fori_loop` unrolled: XLA's HloCostAnalysis counts a while-loop body once,
whatever its trip count, so the compiled (looped) step would hide 19 of JEAT's 20
SGLD steps. MFU = FLOPs per device per step / seconds per step / the device's
peak (the table PEAK_TFLOPS, or --peak_tflops). The float32 peak is the one
JAX's default matmul precision runs at: TF32 tensor cores on A100/H100, one bf16
pass on TPU, plain FP32 on V100.

Last, the projected wall time of the paper's JEAT run: 200 epochs of 50000 // 64
steps at batch 64 (the train steps alone, without evaluation).
"""
import argparse
import contextlib
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from jeat_jax import logs  # pylint: disable=g-import-not-at-top
logs.quiet_tensorflow()  # before anything imports TensorFlow

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from configs import at as at_config, jeat as jeat_config
from jeat_jax import models, parallel, train
from jeat_jax import state as state_lib

# Dense (no sparsity) peak TFLOP/s per chip: (substring of jax's device_kind, name,
# bfloat16, float32 at JAX's default precision). First match wins.
PEAK_TFLOPS = (
    ('H100 PCIe', 'NVIDIA H100 PCIe', 756.0, 378.0),   # fp32 column: TF32 tensor cores
    ('H100', 'NVIDIA H100 SXM', 989.0, 495.0),
    ('H200', 'NVIDIA H200', 989.0, 495.0),
    ('A100', 'NVIDIA A100', 312.0, 156.0),
    ('V100', 'NVIDIA V100', 15.7, 15.7),   # no bf16 tensor cores (fp16 only): fp32 rate
    ('TPU v4', 'Google TPU v4', 275.0, 275.0),  # f32 matmuls: one bf16 pass by default
    ('TPU v5 lite', 'Google TPU v5e', 197.0, 197.0),
    ('TPU v5e', 'Google TPU v5e', 197.0, 197.0),
    ('TPU v5p', 'Google TPU v5p', 459.0, 459.0),
    ('TPU v6 lite', 'Google TPU v6e', 918.0, 918.0),
)
CIFAR_TRAIN, CIFAR_TEST = 50000, 10000
PAPER_EPOCHS, PAPER_BATCH = 200, 64


def peak_tflops(device_kind: str, dtype: str, override: float):
  """(peak TFLOP/s per device, where it comes from); (None, reason) when unknown."""
  if override > 0:
    return override, '--peak_tflops'
  for key, name, bf16, fp32 in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return (bf16 if dtype == 'bfloat16' else fp32), name
  return None, f'unknown device {device_kind!r}: pass --peak_tflops'


@contextlib.contextmanager
def unrolled_loops():
  """Every `jax.lax.fori_loop` with static bounds and every `jax.lax.scan` (the SGLD chain,
  Free AT's replays) fully unrolled while tracing (for FLOPs)."""
  original_fori_loop, original_scan = jax.lax.fori_loop, jax.lax.scan

  def fori_loop(lower, upper, body_fun, init_val, **kwargs):
    if isinstance(lower, int) and isinstance(upper, int) and upper > lower:
      kwargs['unroll'] = True
    return original_fori_loop(lower, upper, body_fun, init_val, **kwargs)

  def scan(f, init, xs=None, length=None, **kwargs):
    kwargs['unroll'] = True
    return original_scan(f, init, xs, length, **kwargs)

  jax.lax.fori_loop, jax.lax.scan = fori_loop, scan
  try:
    yield
  finally:
    jax.lax.fori_loop, jax.lax.scan = original_fori_loop, original_scan


def flops_of(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def make_config(workload: str, depth: int, width: int, dtype: str, global_batch: int,
                sgld_steps: int, num_devices: int):
  c = (jeat_config if workload == 'jeat' else at_config).get_config()
  c.model.depth, c.model.width = depth, width
  c.model.dtype = dtype
  c.batch_size = global_batch
  c.sampler.num_steps = sgld_steps
  c.sampler.buffer_size = max(num_devices, 10000 // num_devices * num_devices)
  return c


def time_train_step(workload, config, mesh, steps: int):
  """Seconds per step, FLOPs per step (whole batch) and compile seconds of the jitted step."""
  model = models.create_model(config.model, 10, jnp.dtype(config.model.dtype))
  tx = state_lib.create_optimizer(config, state_lib.learning_rate_schedule(config, 781, 1000))
  state = state_lib.create_train_state(config, model, jax.random.PRNGKey(0), (32, 32, 3), tx,
                                   mesh.size)
  shardings = state_lib.state_shardings(mesh, state)
  state = jax.device_put(state, shardings)
  batch_sharding = parallel.sharded_on_first_axis(mesh)
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.integers(0, 256, (config.batch_size, 32, 32, 3), np.uint8), batch_sharding)
  y = jax.device_put(rng.integers(0, 10, config.batch_size).astype(np.int32), batch_sharding)

  def step_fn():
    return jax.jit(functools.partial(train.train_step, model=model, config=config),
                   in_shardings=(shardings, batch_sharding, batch_sharding),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)

  try:
    with unrolled_loops():
      flops = flops_of(step_fn().lower(state, x, y))
  except Exception as e:  # pylint: disable=broad-except
    print(f'  (cost analysis of the unrolled step failed: {e}; using the compiled step, '
          'which counts each loop body once)', flush=True)
    flops = None
  start = time.perf_counter()
  compiled = step_fn().lower(state, x, y).compile()
  compile_s = time.perf_counter() - start
  if not flops:
    flops = flops_of(compiled)
  state, metrics = compiled(state, x, y)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, x, y)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  loss = float(metrics['loss'])
  del state
  return dict(seconds=seconds, flops=flops, compile_s=compile_s, loss=loss)


def autoattack_settings(mode: str):
  if mode == 'quick':  # code path only
    return dict(n_iter=2, n_target_classes=1, fab_n_iter=2, n_queries=8, square_segment=4)
  return {}  # the standard version's own settings


def time_autoattack(mode: str, depth: int, width: int, dtype: str, n: int, batch_size: int):
  """Seconds per image of each attack of AutoAttack's standard version, each on all n images."""
  try:
    from jeat_jax.attacks import autoattack  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f'jeat_jax.attacks.autoattack is not available ({e})'
  config = make_config('jeat', depth, width, dtype, n, 1, 1)
  model = models.create_model(config.model, 10, jnp.dtype(dtype))
  variables = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
  logits_fn = state_lib.make_logits_fn(model, variables['params'], variables.get('batch_stats', {}),
                                   'running')
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (n, 32, 32, 3)))
  y = np.asarray(jnp.argmax(jax.jit(logits_fn)(x), -1))  # every image starts correct
  rows = []
  for attack in autoattack.VERSIONS['standard']:
    for run in ('compile', 'timed'):  # the first call compiles
      result = autoattack.run_autoattack(logits_fn, x, y, key=jax.random.PRNGKey(2),
                                         version='standard', attacks=(attack,),
                                         batch_size=batch_size, **autoattack_settings(mode))
    record = [r for r in result['records'] if r['name'] != 'clean'][-1]
    rows.append(dict(attack=attack, seconds=record['seconds'], n_attacked=record['n_attacked'],
                     robust_accuracy=result['robust_accuracy']))
  return rows, None


def fmt_hours(seconds: float) -> str:
  return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='28-10', help='WRN depth-width')
  parser.add_argument('--batch', default='64,256', help='per-device batch sizes, comma-separated')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--workloads', default='jeat,at,autoattack')
  parser.add_argument('--steps', type=int, default=10, help='timed steps after one warm-up step')
  parser.add_argument('--sgld_steps', type=int, default=20, help='K, JEAT\'s SGLD steps')
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='peak TFLOP/s per device (overrides the table, both dtypes)')
  parser.add_argument('--autoattack', choices=('standard', 'quick'), default='standard')
  parser.add_argument('--aa_examples', type=int, default=0,
                      help='images for AutoAttack (0: the first per-device batch x devices)')
  args = parser.parse_args(argv)

  depth, width = map(int, args.model.split('-'))
  batches = [int(b) for b in args.batch.split(',')]
  dtypes = args.dtypes.split(',')
  workloads = args.workloads.split(',')
  mesh = parallel.make_mesh()
  devices = jax.devices()
  kind = devices[0].device_kind
  print(f'devices: {len(devices)} x {kind} ({devices[0].platform}); jax {jax.__version__}; '
        f'WRN-{depth}-{width}, K = {args.sgld_steps}', flush=True)
  for dtype in dtypes:
    peak, source = peak_tflops(kind, dtype, args.peak_tflops)
    print(f'peak {dtype}: ' + (f'{peak:g} TFLOP/s per device ({source})' if peak else source))

  print('\n| workload | dtype | batch/device | global batch | ms/step | images/s | '
        'GFLOP/step | TFLOP/s per device | MFU | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|', flush=True)
  results = []
  for workload in [w for w in workloads if w in ('jeat', 'at')]:
    for dtype in dtypes:
      peak, _ = peak_tflops(kind, dtype, args.peak_tflops)
      for per_device in batches:
        global_batch = per_device * mesh.size
        config = make_config(workload, depth, width, dtype, global_batch, args.sgld_steps,
                             mesh.size)
        try:
          r = time_train_step(workload, config, mesh, args.steps)
        except Exception as e:  # pylint: disable=broad-except
          if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
            raise
          print(f'| {workload} | {dtype} | {per_device} | {global_batch} | out of memory |'
                ' | | | | |', flush=True)
          continue
        tflops_per_device = r['flops'] / mesh.size / r['seconds'] / 1e12
        mfu = f'{tflops_per_device / peak:.1%}' if peak else 'n/a'
        r.update(workload=workload, dtype=dtype, per_device=per_device, global_batch=global_batch,
                 images_per_s=global_batch / r['seconds'])
        results.append(r)
        print(f'| {workload} | {dtype} | {per_device} | {global_batch} | '
              f'{1e3 * r["seconds"]:.1f} | {r["images_per_s"]:.1f} | {r["flops"] / 1e9:.1f} | '
              f'{tflops_per_device:.2f} | {mfu} | {r["compile_s"]:.1f} |', flush=True)

  if 'autoattack' in workloads:
    n = args.aa_examples or batches[0] * mesh.size
    dtype = 'float32'
    rows, why_not = time_autoattack(args.autoattack, depth, width, dtype, n,
                                    batch_size=max(8, batches[-1] * mesh.size))
    print()
    if rows is None:
      print(f'AutoAttack: skipped, {why_not}')
    else:
      note = ' (quick: a few iterations, not the standard cost)' if args.autoattack == 'quick' else ''
      print(f'AutoAttack standard{note}, {dtype}, {n} images, each attack on every image:')
      print('| attack | seconds | images attacked | ms/image |')
      print('|---|---|---|---|')
      per_image = 0.0
      for row in rows:
        ms = 1e3 * row['seconds'] / max(row['n_attacked'], 1)
        per_image += ms / 1e3
        print(f'| {row["attack"]} | {row["seconds"]:.2f} | {row["n_attacked"]} | {ms:.1f} |')
      print(f'all four on the {CIFAR_TEST} CIFAR-10 test images, every image surviving to the '
            f'last attack: {fmt_hours(per_image * CIFAR_TEST)} (Square stops early on this '
            'untrained model: a robust one costs more)')

  jeat_rows = [r for r in results if r['workload'] == 'jeat']
  if jeat_rows:
    steps_per_epoch = CIFAR_TRAIN // PAPER_BATCH
    total_steps = PAPER_EPOCHS * steps_per_epoch
    print(f'\nProjected paper JEAT run (WRN-{depth}-{width}, K = {args.sgld_steps}, '
          f'{PAPER_EPOCHS} epochs x {steps_per_epoch} steps of batch {PAPER_BATCH}, '
          f'train steps only) on {mesh.size} x {kind}:')
    for dtype in dtypes:
      rows = [r for r in jeat_rows if r['dtype'] == dtype]
      if not rows:
        continue
      exact = [r for r in rows if r['global_batch'] == PAPER_BATCH]
      if exact:
        seconds = total_steps * exact[0]['seconds']
        how = f'measured at batch {PAPER_BATCH}'
      else:  # from the throughput of the smallest measured batch
        r = min(rows, key=lambda r: r['global_batch'])
        seconds = total_steps * PAPER_BATCH / r['images_per_s']
        how = (f'from {r["images_per_s"]:.1f} images/s at global batch {r["global_batch"]}; '
               f'the paper\'s batch is {PAPER_BATCH}')
      print(f'  {dtype}: {fmt_hours(seconds)} ({how})')


if __name__ == '__main__':
  main()
