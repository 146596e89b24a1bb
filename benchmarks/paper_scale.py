"""The paper-scale train step of one recipe, for real: compiled, run, exported, counted.

  python benchmarks/paper_scale.py --config=configs/jeat.py --out=benchmarks/paper_scale/jeat.json
  python benchmarks/paper_scale.py --config=configs/at.py --out=at.json --batch_size=16 \\
      --data_path=../shared/data/cifar10-jpeg-standin.npz
  python benchmarks/paper_scale.py --config=configs/jeat.py --out=/tmp/t.json \\
      --config.model.depth=10 --config.model.width=1 --config.sampler.num_steps=2   # tiny

The config is the recipe's paper setting (configs/<recipe>.py with no ':cpu' or
':smoke': WRN-28-10, bfloat16 compute, `lax.fori_loop` loops, K = 20 SGLD steps,
PGD-10, ...), changed only in the batch size (--batch_size; the paper's is
recorded beside it) and the data (data.source=npz at --data_path; synthetic
uint8 images when no npz is given or found, said so in the JSON). Any
--config.KEY=VALUE override is applied on top and recorded.

Stages (each prints a line: a WRN-28-10 step takes minutes on 2 CPU cores):
  1. the train step exactly as jeat_jax.train.train_and_evaluate builds it
     (create_optimizer(learning_rate_schedule), create_train_state, state_shardings,
     jit(train_step) with its in/out shardings and donation, on parallel.make_mesh());
  2. FLOPs: XLA's cost analysis of that step lowered with every loop unrolled
     (benchmarks/gpu.py's `unrolled_loops`, and Free AT's replay scan unrolled),
     since HloCostAnalysis counts a while-loop body once whatever its trip count;
     the unrolled module is checked to hold no while loop;
  3. compile (timed) and the compiled memory analysis (an XLA:CPU proxy for an
     accelerator's), and a compile-only memory analysis at the paper's batch;
  4. --steps real steps on this CPU on real batches (data.train_batch), each timed;
  5. jax.export of the same jitted step for platforms ('tpu', 'cuda'): export
     refuses custom calls outside its stable allowlist, so success shows the step
     holds no CPU-only construct. The exported module is for the 1-device mesh it
     was traced on; an 8-device run re-exports on its own mesh.
     `Exported.serialize` cannot write the TrainState / optax pytree nodes (no
     serialization is registered for them), so the serialized bytes are those of the
     same step exported with flat lists of leaves in and out, round-tripped
     through jax.export.deserialize.
"""
import contextlib
import functools
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from jeat_jax import logs  # pylint: disable=g-import-not-at-top
logs.quiet_tensorflow()  # before anything imports TensorFlow

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import gpu
from jeat_jax import config_validation, hardware, models, parallel, train
from jeat_jax import data as data_lib
from jeat_jax import files
from jeat_jax import state as state_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line (defined only when run as a script, so tests can import the module)."""
  config_flags.DEFINE_config_file('config', None, 'A paper-scale recipe config (no :cpu/:smoke).',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'Where to write the JSON.')
  flags.DEFINE_integer('batch_size', 16, 'Global batch of the CPU run (the paper\'s is recorded).')
  flags.DEFINE_string('data_path', '', 'npz of CIFAR-10 (default: the stand-in in ../shared/data '
                      'beside the repository, if there); "synthetic" for random uint8 images.')
  flags.DEFINE_integer('steps', 2, 'Real train steps to run and time after compiling.')
  flags.DEFINE_bool('memory_at_paper_batch', True,
                    'Also compile (not run) at the paper\'s batch for its memory analysis.')
  flags.mark_flags_as_required(['config', 'out'])


PLATFORMS = ('tpu', 'cuda')
# The stand-in where the repository's layout puts it: <repo>/../shared/data.
STANDIN = os.path.join(REPO, '..', 'shared', 'data', 'cifar10-jpeg-standin.npz')
CPU_NOTE = ('CPU shared with other jobs (2 cores, several agents): seconds are noisy and say '
            'nothing about an accelerator; the capacity plan uses flops_per_image.')
MEMORY_NOTE = ('XLA:CPU compiled memory analysis of the looped step on one device, a proxy for '
               'an accelerator compile: peak ~ argument + output - alias + temp bytes.')

_T0 = time.perf_counter()


def log(message: str) -> None:
  print(f'[{time.perf_counter() - _T0:7.1f} s] {message}', flush=True)


def find_data(path: str, standin: str = STANDIN):
  """The npz to read, or None for synthetic data: --data_path as given, else the stand-in
  relative to the repository (named by its path relative to the working directory, so that
  the JSON records no absolute path of this machine: ../shared/data/... from the root)."""
  if path == 'synthetic':
    return None
  if path:
    if not os.path.isfile(path):
      raise app.UsageError(f'--data_path {path} does not exist')
    return path
  return os.path.relpath(standin) if os.path.isfile(standin) else None


def batches(config, path, n: int):
  """n training batches as train_step takes them ((x uint8, y int32), plus the energy
  batch's images where data.energy_batch_size > 0), the data source and its provenance."""
  b, b_energy = config.batch_size, config.data.energy_batch_size
  if path is None:
    rng = np.random.default_rng(config.seed)
    images = lambda k: rng.integers(0, 256, (k, 32, 32, 3), np.uint8)
    return ([(images(b), rng.integers(0, 10, b).astype(np.int32))
             + ((images(b_energy),) if b_energy > 0 else ()) for _ in range(n)],
            'synthetic uint8 (no npz given or found)', {'source': 'synthetic'})
  ds = data_lib.load_dataset(config)
  return [train.step_batch(ds, step, config) for step in range(n)], ds.source, ds.provenance


def chain_starts(config):
  """create_train_state's start_images: zeros where sampler.reinit = class_gaussian (the
  buffer and re-initialisation pool the step carries have their real shapes; what is drawn
  into them does not change the step's cost), else None."""
  if config.sampler.name == 'sgld_buffer' and config.sampler.reinit == 'class_gaussian':
    return state_lib.placeholder_starts((32, 32, 3))
  return None


def num_batch_args(config) -> int:
  """How many batch arrays train_step takes after the state (EB-JDAT's energy batch: 3)."""
  return 3 if config.data.energy_batch_size > 0 else 2


def build(config, mesh):
  """model, tx, state, shardings and the jitted step, as train.train_and_evaluate builds them."""
  steps_per_epoch = 50000 // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  model = models.create_model(config.model, 10, jnp.dtype(config.model.dtype))
  tx = state_lib.create_optimizer(config, state_lib.learning_rate_schedule(config, steps_per_epoch,
                                                                    total_steps))
  # state.create_train_state, jitted: eager op-by-op init of WRN-28-10 takes minutes here.
  init = functools.partial(state_lib.create_train_state, config, model, image_shape=(32, 32, 3),
                           tx=tx, num_devices=mesh.size,
                           start_images=chain_starts(config))
  shardings = state_lib.state_shardings(mesh, jax.eval_shape(init, jax.random.PRNGKey(config.seed)))
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  batch_sharding = parallel.sharded_on_first_axis(mesh)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, config=config,
                                      with_dynamics=False),
                    in_shardings=(shardings,) + (batch_sharding,) * num_batch_args(config),
                    out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  return model, state, shardings, batch_sharding, step_fn


def abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def abstract_at_batch(config, mesh, batch_size: int):
  """(jitted step, abstract args) of `config` at another global batch, without running init."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  steps_per_epoch = 50000 // batch_size
  model = models.create_model(config.model, 10, jnp.dtype(config.model.dtype))
  tx = state_lib.create_optimizer(config, state_lib.learning_rate_schedule(
      config, steps_per_epoch, config.num_epochs * steps_per_epoch))
  state = jax.eval_shape(lambda k: state_lib.create_train_state(
      config, model, k, (32, 32, 3), tx, mesh.size, chain_starts(config)),
                         jax.random.PRNGKey(0))
  shardings = state_lib.state_shardings(mesh, state)
  batch_sharding = parallel.sharded_on_first_axis(mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       shardings)
  images = lambda k: jax.ShapeDtypeStruct((k, 32, 32, 3), jnp.uint8, sharding=batch_sharding)
  batch = (images(batch_size), jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding))
  if config.data.energy_batch_size > 0:
    batch += (images(config.data.energy_batch_size),)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, config=config),
                    in_shardings=(shardings,) + (batch_sharding,) * len(batch),
                    out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  return step_fn, (state,) + batch


def memory_of(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ('argument_size_in_bytes', 'output_size_in_bytes',
                                         'alias_size_in_bytes', 'temp_size_in_bytes',
                                         'generated_code_size_in_bytes')}
  out['peak_estimate_bytes'] = (out['argument_size_in_bytes'] + out['output_size_in_bytes']
                                - out['alias_size_in_bytes'] + out['temp_size_in_bytes'])
  return out


def nbytes(tree) -> int:
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


@contextlib.contextmanager
def unrolled_loops():
  """benchmarks/gpu.py's `unrolled_loops`, and a one-trip fori_loop as straight-line code.

  jax emits a fori_loop of one iteration as a while loop even when unrolled (scan with
  unroll = length = 1); HloCostAnalysis counts that one trip right, but the check that no
  while loop is left would not tell it from a real loop (Fast AT's PGD-1).
  """
  with gpu.unrolled_loops():
    patched = jax.lax.fori_loop

    def fori_loop(lower, upper, body_fun, init_val, **kwargs):
      if isinstance(lower, int) and isinstance(upper, int) and upper - lower == 1:
        return body_fun(lower, init_val)
      return patched(lower, upper, body_fun, init_val, **kwargs)

    jax.lax.fori_loop = fori_loop
    try:
      yield
    finally:
      jax.lax.fori_loop = patched


def count_flops(config, mesh, args):
  """XLA's FLOPs of the step lowered with every loop unrolled; (flops, while loops left)."""
  counting = config.copy_and_resolve_references()
  model = models.create_model(counting.model, 10, jnp.dtype(counting.model.dtype))
  fn = jax.jit(functools.partial(train.train_step, model=model, config=counting),
               in_shardings=jax.tree.map(lambda a: a.sharding, args),
               out_shardings=(jax.tree.map(lambda a: a.sharding, args[0]),
                              parallel.replicated(mesh)), donate_argnums=0)
  with unrolled_loops():
    lowered = fn.lower(*args)
  # jax's threefry2x32 lowers its 5 rounds as a small elementwise while loop: not ours.
  whiles = sum(chunk.count('stablehlo.while') for chunk in lowered.as_text().split('func.func')
               if not re.match(r'\s*(private\s+)?@threefry', chunk))
  return gpu.flops_of(lowered), whiles


def export_step(step_fn, args, shardings_in, shardings_out):
  """jax.export of the step for PLATFORMS; a flat-leaves twin for serialize/deserialize."""
  exported = jax.export.export(step_fn, platforms=PLATFORMS)(*args)
  text = exported.mlir_module()
  targets = sorted(set(re.findall(r'stablehlo\.custom_call @([\w.$-]+)', text))
                   | set(re.findall(r'call_target_name = "([^"]+)"', text)))
  leaves, treedef = jax.tree.flatten(args[0])
  out_state_shardings = jax.tree.leaves(shardings_out[0])

  def flat_step(state_leaves, *batch):
    new_state, metrics = step_fn(jax.tree.unflatten(treedef, state_leaves), *batch)
    return jax.tree.leaves(new_state), metrics

  flat_jit = jax.jit(flat_step,
                     in_shardings=(jax.tree.leaves(shardings_in[0]),) + tuple(shardings_in[1:]),
                     out_shardings=(out_state_shardings, shardings_out[1]), donate_argnums=0)
  flat = jax.export.export(flat_jit, platforms=PLATFORMS)(leaves, *args[1:])
  blob = flat.serialize()
  back = jax.export.deserialize(blob)
  return dict(
      exported_platforms=list(exported.platforms),
      exported_nr_devices=int(exported.nr_devices),
      exported_stablehlo_bytes=len(exported.mlir_module_serialized),
      exported_serialized_bytes=len(blob),
      exported_roundtrip_platforms=list(back.platforms),
      exported_custom_call_targets=targets,
      exported_calling_convention_version=int(exported.calling_convention_version))


def describe(config) -> dict:
  p, s = config.perturbation, config.sampler
  attack_steps = {'none': 0, 'gaussian': 0, 'free': 0}.get(p.name, p.num_steps)
  return dict(
      perturbation=p.name, attack_steps=attack_steps,
      free_replays=p.free_replays if p.name == 'free' else 0,
      sampler=s.name, sgld_steps=s.num_steps if s.name != 'none' else 0,
      replay_buffer_size=s.buffer_size if s.name != 'none' else 0,
      energy_batch_size=config.data.energy_batch_size, sam_rho=config.optimizer.sam_rho,
      loss=config.loss.name, optimizer=config.optimizer.name,
      updates_per_train_step=state_lib.updates_per_train_step(config),
      num_epochs=config.num_epochs)


def run(config, out: str, batch_size: int, data_path: str, steps: int, memory_at_paper: bool):
  recipe = config.recipe
  paper_batch = config.batch_size
  path = find_data(data_path)
  with config.unlocked():
    config.batch_size = batch_size
    if path is not None:
      config.data.source = 'npz'
      config.data.path = path
  config_validation.validate(config)
  mesh = parallel.make_mesh()
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  result = dict(
      recipe=recipe, model=models.model_name(config.model), dtype=config.model.dtype,
      batch_size=batch_size, paper_batch_size=paper_batch, config_overrides=overrides,
      **describe(config),
      jax_version=jax.__version__, jaxlib_version=jax.lib.__version__,
      cpu=hardware.cpu_description(), devices=f'{mesh.size} x {jax.devices()[0].device_kind}',
      platform=jax.devices()[0].platform,
      date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      command='python benchmarks/paper_scale.py ' + ' '.join(sys.argv[1:]),
      cpu_contended=CPU_NOTE, load_average_start=list(os.getloadavg()))
  log(f'{recipe}: {result["model"]}, {config.model.dtype}, batch {batch_size} (paper '
      f'{paper_batch}), {mesh.size} device(s), {result["cpu"]}')

  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  # Written after every stage (steps_run counts the steps done), so a run stopped
  # part-way keeps what it measured.
  save = lambda: files.write_json_atomic(out, result)
  result['steps_run'] = 0
  data, source, provenance = batches(config, path, steps)
  result.update(data_source=source, data_provenance=provenance)
  log(f'data: {source}')

  log('building the train step (state.create_train_state, state_shardings, jit(train_step))')
  model, state, shardings, batch_sharding, step_fn = build(config, mesh)
  result['parameter_count'] = int(sum(np.prod(a.shape) for a in jax.tree.leaves(state.params)))
  result['state_bytes'] = dict(params=nbytes(state.params), opt_state=nbytes(state.opt_state),
                               batch_stats=nbytes(state.batch_stats),
                               extra={k: nbytes(v) for k, v in state.extra.items()})
  batch0 = tuple(jax.device_put(a, batch_sharding) for a in data[0])
  args = abstract((state,) + batch0)

  log('counting FLOPs: lowering the step with every loop unrolled ...')
  start = time.perf_counter()
  flops, whiles = count_flops(config, mesh, args)
  result.update(flops_per_step=flops, flops_per_image=flops / batch_size,
                flops_per_update=flops / result['updates_per_train_step'],
                flops_while_loops_left=whiles,
                flops_note=('XLA HloCostAnalysis of the lowered step with every loop unrolled '
                            '(one train step = one minibatch of batch_size images; Free AT: '
                            'its m replays included); includes the forward/backward of every '
                            'attack and SGLD step. flops_while_loops_left counts while loops '
                            'left outside jax\'s threefry RNG (whose round loop is elementwise).'),
                flops_seconds=round(time.perf_counter() - start, 1))
  save()
  log(f'  {flops / 1e9:.1f} GFLOP per step, {flops / batch_size / 1e9:.2f} GFLOP per image '
      f'({whiles} while loops left)')

  log('exporting the jitted step for platforms tpu, cuda ...')
  start = time.perf_counter()
  result.update(export_step(step_fn, args, (shardings,) + (batch_sharding,) * len(batch0),
                            (shardings, parallel.replicated(mesh))))
  result['export_seconds'] = round(time.perf_counter() - start, 1)
  save()
  log(f'  exported for {result["exported_platforms"]}: {result["exported_stablehlo_bytes"]} '
      f'bytes of StableHLO, {result["exported_serialized_bytes"]} serialized; custom calls '
      f'{result["exported_custom_call_targets"]}')

  log('compiling the step (the looped one train.py runs) ...')
  start = time.perf_counter()
  compiled = step_fn.lower(state, *batch0).compile()
  result['compile_seconds'] = round(time.perf_counter() - start, 1)
  result['memory_analysis'] = memory_of(compiled)
  result['memory_bytes_per_device'] = result['memory_analysis'].get('peak_estimate_bytes')
  result['memory_note'] = MEMORY_NOTE
  save()
  log(f'  compiled in {result["compile_seconds"]} s; memory {result["memory_analysis"]}')

  if memory_at_paper and paper_batch != batch_size:
    log(f'compiling (not running) at the paper\'s batch {paper_batch} for its memory ...')
    start = time.perf_counter()
    fn, paper_args = abstract_at_batch(config, mesh, paper_batch)
    result['memory_analysis_at_paper_batch'] = memory_of(fn.lower(*paper_args).compile())
    result['memory_at_paper_batch_seconds'] = round(time.perf_counter() - start, 1)
    save()
    log(f'  {result["memory_analysis_at_paper_batch"]}')

  times, losses = [], []
  for i, batch in enumerate(data):
    log(f'step {i + 1}/{steps} ...')
    batch = tuple(jax.device_put(a, batch_sharding) for a in batch)
    start = time.perf_counter()
    state, metrics = compiled(state, *batch)
    metrics = jax.device_get(metrics)
    times.append(time.perf_counter() - start)
    losses.append(float(metrics['loss']))
    log(f'  {times[-1]:.1f} s, loss {losses[-1]:.4f}')
    result.update(steps_run=len(times), seconds_per_step_cpu=float(np.mean(times)),
                  seconds_each_step_cpu=[round(t, 2) for t in times], losses=losses,
                  losses_finite=bool(np.all(np.isfinite(losses))),
                  load_average_end=list(os.getloadavg()))
    save()
  log(f'wrote {out}')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run(FLAGS.config, FLAGS.out, FLAGS.batch_size, FLAGS.data_path, FLAGS.steps,
      FLAGS.memory_at_paper_batch)


if __name__ == '__main__':
  define_flags()
  app.run(main)
