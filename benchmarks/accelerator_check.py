"""One check of a lent accelerator, in one command and one JSON: the paper's JEAT run works there.

  python benchmarks/accelerator_check.py --out=check.json               # < 8 minutes on one H100
  python benchmarks/accelerator_check.py --out=check.json --data=cifar10.npz
  python benchmarks/accelerator_check.py --out=toy.json --toy --data=small.npz   # CPU, the tests

Parts, each timed, each run in a process of its own (one at a time on the device: the parent
never starts JAX's backend, so a child has the accelerator's memory to itself):
  train_step    the JEAT train step of configs/jeat.py (WRN-28-10, bfloat16, K = 20 SGLD steps)
                at the paper's batch of 64, built as train.py builds it (paper_scale.build):
                images/s, FLOPs of the step lowered with every loop unrolled (XLA's cost
                analysis, paper_scale.count_flops), MFU against gpu.PEAK_TFLOPS, and the peak
                memory of device.memory_stats() where the platform has it (the compiled
                step's memory analysis beside it);
  train_resume  `python main.py --config=configs/jeat.py` unchanged but for num_train_steps=50,
                checkpoint_every_steps=25 (and the data, with --data) into a workdir, SIGKILLed
                once it logs its first checkpoint, then the same command again, which must
                restore that checkpoint and finish at step 50;
  evaluate      `python main.py --mode=evaluate` of that workdir: PGD-20 and APGD-CE
                (--attacks) on the first 200 test points, with the gradient-masking audit the
                mode runs.
A part starts only while the time left of --budget_s covers its own minimum (MIN_SECONDS) and
those of the parts after it; it is killed when it would eat into theirs. A part that cannot run
is recorded as skipped, with the reason. The JSON is written after every part. The children
share JAX's persistent compilation cache in the scratch folder, so the resume reuses the step
the first run compiled, as a restarted job with a cache does.

Data: the config's `data.source=auto` (CIFAR-10 from TFDS where prepared, else the stand-in
../shared/data/cifar10-jpeg-standin.npz beside the repository: main.py runs in the repository
root), or --data=PATH.npz. --toy runs the same code paths at a size for 2 CPU cores: WRN-10-1,
batch 8, 4 train steps (a checkpoint every 2), 16 evaluation points; further --config.KEY=VALUE
overrides go to every part.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from jeat_jax import logs  # pylint: disable=g-import-not-at-top
logs.quiet_tensorflow()  # before anything imports TensorFlow

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from jeat_jax import files, hardware

FLAGS = flags.FLAGS
CONFIG = os.path.join('configs', 'jeat.py')  # the paper's JEAT, relative to the repository
PARTS = ('train_step', 'train_resume', 'evaluate')
MIN_SECONDS = {'train_step': 90, 'train_resume': 180, 'evaluate': 60}  # one H100, roughly
SCALES = {  # per scale: timed steps of train_step, train steps, checkpoint period, eval points
    'paper': dict(timed_steps=20, train_steps=50, checkpoint_every=25, eval_points=200),
    'toy': dict(timed_steps=2, train_steps=4, checkpoint_every=2, eval_points=16),
}
TOY_OVERRIDES = ('--config.model.depth=10', '--config.model.width=1', '--config.batch_size=8',
                 '--config.sampler.buffer_size=64', '--config.robust_watch.num_examples=16',
                 '--config.eval.batch_size=16', '--config.data.validation_size=16')
SAVED = re.compile(r'saved checkpoint at step (\d+)')
RESTORED = re.compile(r'restored checkpoint at step (\d+)')
PROBE = ('import json, jax, jaxlib; d = jax.devices(); print(json.dumps(dict('
         'platform=d[0].platform, device_kind=d[0].device_kind, device_count=len(d), '
         'jax_version=jax.__version__, jaxlib_version=jaxlib.__version__)))')


def define_flags():
  """The command line (defined only when run as a script, so tests can import the module)."""
  config_flags.DEFINE_config_file('config', os.path.join(REPO, CONFIG),
                                  'The paper config (only --config.KEY overrides are meant).',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'Where to write the JSON.')
  flags.DEFINE_float('budget_s', 450.0, 'Seconds for all parts together.')
  flags.DEFINE_string('data', '', 'An npz (x_train, y_train, x_test, y_test); default: the '
                      'config\'s data.source=auto.')
  flags.DEFINE_bool('toy', False, 'WRN-10-1, batch 8, a few steps, 16 points (CPU, tests).')
  flags.DEFINE_string('workdir', '', 'Scratch folder for the run and the logs (default: new '
                      'temporary folder).')
  flags.DEFINE_string('attacks', 'pgd20,apgd_ce', 'eval.attacks of the evaluate part.')
  flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s per device for the MFU, where '
                     'benchmarks/gpu.py\'s PEAK_TFLOPS does not know the device.')
  flags.DEFINE_string('part', '', 'Internal: run only this part in this process (train_step).')


def part_timeout(remaining_s: float, part: str) -> float:
  """Seconds `part` may take: the time left less the minimum of every part after it."""
  later = PARTS[PARTS.index(part) + 1:]
  return remaining_s - sum(MIN_SECONDS[p] for p in later)


def skip_reason(remaining_s: float, part: str):
  """Why `part` cannot start with `remaining_s` of the budget left (None: it can)."""
  timeout = part_timeout(remaining_s, part)
  if timeout >= MIN_SECONDS[part]:
    return None
  return (f'{remaining_s:.0f} s of the budget left: {part} needs about {MIN_SECONDS[part]} s '
          'and the parts after it their own minimum')


def config_overrides(argv, toy: bool, data: str):
  """The --config.KEY=VALUE arguments every part gets: the toy size, the data, the user's."""
  out = list(TOY_OVERRIDES) if toy else []
  if data:
    out += ['--config.data.source=npz', f'--config.data.path={os.path.abspath(data)}']
  return out + [a for a in argv[1:] if a.startswith('--config.')]


def run_logged(cmd, log_path: str, timeout_s: float, kill_on=None, kill_when=None):
  """Runs `cmd` in the repository root, its output (stdout and stderr) teed to `log_path`,
  with JAX's persistent compilation cache in the scratch folder (the resume and the later
  parts reuse what an earlier process compiled, unless JAX_COMPILATION_CACHE_DIR is set).

  SIGKILLs it at the first output line matching `kill_on` (a compiled regex), once
  `kill_when(match)` is true where given (polled: an asynchronous checkpoint is committed
  after its log line), or after `timeout_s`. Returns (return code, the match or None,
  seconds, timed out).
  """
  start = time.perf_counter()
  cache = os.path.join(os.path.dirname(os.path.abspath(log_path)), 'jax_cache')
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={'JAX_COMPILATION_CACHE_DIR': cache, **os.environ})
  timer = threading.Timer(max(timeout_s, 1.0), proc.kill)
  timer.start()
  match = None
  with open(log_path, 'w') as log:
    for line in proc.stdout:
      log.write(line)
      log.flush()
      if kill_on is not None and match is None:
        match = kill_on.search(line)
        if match:
          while kill_when is not None and not kill_when(match) and proc.poll() is None:
            time.sleep(0.05)
          proc.send_signal(signal.SIGKILL)
  returncode = proc.wait()
  timed_out = not timer.is_alive() and match is None and returncode == -signal.SIGKILL
  timer.cancel()
  return returncode, match, round(time.perf_counter() - start, 1), timed_out


def log_tail(log_path: str, lines: int = 6) -> str:
  """The last lines of a child's log, for a failure's reason."""
  with open(log_path) as f:
    return ' | '.join(line.strip() for line in f.readlines()[-lines:])


def failure(returncode: int, timed_out: bool, log_path: str) -> dict:
  """A failed part's status, reason (how the child ended, its last lines) and log."""
  why = 'timed out (killed)' if timed_out else f'exit status {returncode}'
  return dict(status='failed', reason=f'{why}; {log_tail(log_path)}', log=log_path)


def probe_machine(timeout_s: float = 120.0) -> dict:
  """Platform, device kind and count, jax and jaxlib versions, from a child process."""
  try:
    proc = subprocess.run([sys.executable, '-c', PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, check=True)
    machine = json.loads(proc.stdout.strip().splitlines()[-1])
  except (subprocess.SubprocessError, ValueError, IndexError) as e:
    machine = dict(error=f'the device probe failed: {e}')
  machine['cpu'] = hardware.cpu_description()
  return machine


def run_train_step_part(out_json: str, log_path: str, timeout_s: float, overrides) -> dict:
  """Part train_step, in a child process of this script (--part=train_step)."""
  cmd = [sys.executable, os.path.abspath(__file__), '--part=train_step', f'--out={out_json}',
         f'--peak_tflops={FLAGS.peak_tflops}', *(['--toy'] if FLAGS.toy else []), *overrides]
  returncode, _, seconds, timed_out = run_logged(cmd, log_path, timeout_s)
  if returncode != 0 or not os.path.isfile(out_json):
    return dict(failure(returncode, timed_out, log_path), seconds=seconds)
  with open(out_json) as f:
    return dict(status='ok', seconds=seconds, **json.load(f))


def checkpoint_steps(workdir: str):
  """The finished checkpoints in WORKDIR/checkpoints (orbax names them by step)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def main_py(workdir: str, overrides, *extra):
  """The command line of main.py on the paper config in `workdir`."""
  return [sys.executable, 'main.py', f'--config={CONFIG}', f'--workdir={workdir}', *extra,
          *overrides]


def run_train_resume_part(workdir: str, scratch: str, timeout_s: float, overrides,
                          scale: dict) -> dict:
  """Part train_resume: train, SIGKILL after the first checkpoint, resume to the end."""
  steps = scale['train_steps']
  overrides = [*overrides, f'--config.num_train_steps={steps}',
               f'--config.checkpoint_every_steps={scale["checkpoint_every"]}']
  cmd = main_py(workdir, overrides)
  record = dict(command=' '.join(cmd[1:]), num_train_steps=steps,
                checkpoint_every_steps=scale['checkpoint_every'])
  start = time.perf_counter()
  first_log = os.path.join(scratch, 'train_first.log')
  committed = lambda saved: int(saved.group(1)) in checkpoint_steps(workdir)
  returncode, saved, seconds, timed_out = run_logged(cmd, first_log, timeout_s, kill_on=SAVED,
                                                     kill_when=committed)
  record['first_run'] = dict(seconds=seconds, returncode=returncode, log=first_log,
                             killed_after_checkpoint=int(saved.group(1)) if saved else None)
  record['checkpoints_after_kill'] = checkpoint_steps(workdir)
  if saved is None:
    return dict(failure(returncode, timed_out, first_log), **record,
                seconds=round(time.perf_counter() - start, 1))
  second_log = os.path.join(scratch, 'train_resume.log')
  returncode, _, seconds, timed_out = run_logged(
      cmd, second_log, timeout_s - (time.perf_counter() - start))
  with open(second_log) as f:
    restored = RESTORED.search(f.read())
  results = files.read_json(os.path.join(workdir, 'results.json')) or {}
  record['resume'] = dict(seconds=seconds, returncode=returncode, log=second_log,
                          restored_step=int(restored.group(1)) if restored else None,
                          final_step=results.get('step'))
  record['resumed_from_checkpoint'] = (
      record['resume']['restored_step'] == record['first_run']['killed_after_checkpoint'])
  record['results'] = {k: results[k] for k in ('test_accuracy', 'test_examples',
                                               'robust_accuracy_pgd10', 'data_source',
                                               'wall_seconds', 'divergence_rollbacks')
                       if k in results}
  record['seconds'] = round(time.perf_counter() - start, 1)
  if returncode != 0:
    return dict(record, **failure(returncode, timed_out, second_log))
  if not record['resumed_from_checkpoint'] or results.get('step') != steps:
    return dict(record, status='failed', reason=(
        f'the resume restored step {record["resume"]["restored_step"]} (killed after '
        f'{record["first_run"]["killed_after_checkpoint"]}) and ended at step '
        f'{results.get("step")} of {steps}'))
  return dict(record, status='ok')


def run_evaluate_part(workdir: str, scratch: str, timeout_s: float, overrides,
                      scale: dict) -> dict:
  """Part evaluate: --mode=evaluate with --attacks on the first points of the test set."""
  cmd = main_py(workdir, overrides, '--mode=evaluate', f'--config.eval.attacks={FLAGS.attacks}',
                f'--config.eval.num_examples={scale["eval_points"]}')
  log_path = os.path.join(scratch, 'evaluate.log')
  returncode, _, seconds, timed_out = run_logged(cmd, log_path, timeout_s)
  record = dict(command=' '.join(cmd[1:]), seconds=seconds)
  robustness = files.read_json(os.path.join(workdir, 'eval', 'robustness.json'))
  if returncode != 0 or robustness is None:
    return dict(record, **failure(returncode, timed_out, log_path))
  return dict(record, status='ok', step=robustness['step'],
              num_examples=robustness['num_examples'],
              clean_accuracy=robustness['clean_accuracy'],
              attacks=[{k: a[k] for k in ('name', 'robust_accuracy', 'num_examples', 'seconds')}
                       for a in robustness['attacks']],
              audit_warnings=robustness.get('audit', {}).get('warnings'))


def run_check(argv) -> dict:
  """Every part in turn, within --budget_s; the JSON written after each."""
  start = time.perf_counter()
  scale = SCALES['toy' if FLAGS.toy else 'paper']
  scratch = os.path.abspath(FLAGS.workdir or tempfile.mkdtemp(prefix='accelerator_check_'))
  workdir = os.path.join(scratch, 'jeat')
  os.makedirs(scratch, exist_ok=True)
  overrides = config_overrides(argv, FLAGS.toy, FLAGS.data)
  result = dict(
      command='python benchmarks/accelerator_check.py ' + ' '.join(argv[1:]),
      date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), toy=FLAGS.toy,
      budget_s=FLAGS.budget_s, config=CONFIG, config_overrides=overrides,
      data=os.path.abspath(FLAGS.data) if FLAGS.data else 'data.source=auto', scratch=scratch,
      machine=probe_machine(), parts={})
  save = lambda: files.write_json_atomic(FLAGS.out, result)
  save()
  runners = {
      'train_step': lambda t: run_train_step_part(
          os.path.join(scratch, 'train_step.json'), os.path.join(scratch, 'train_step.log'), t,
          overrides),
      'train_resume': lambda t: run_train_resume_part(workdir, scratch, t, overrides, scale),
      'evaluate': lambda t: run_evaluate_part(workdir, scratch, t, overrides, scale),
  }
  for part in PARTS:
    remaining = FLAGS.budget_s - (time.perf_counter() - start)
    reason = skip_reason(remaining, part)
    if reason is None and part == 'evaluate' and not checkpoint_steps(workdir):
      reason = 'no checkpoint to evaluate (train_resume did not save one)'
    if reason:
      result['parts'][part] = dict(status='skipped', reason=reason)
    else:
      result['parts'][part] = runners[part](part_timeout(remaining, part))
    print(f'{part}: {result["parts"][part]["status"]} '
          f'{result["parts"][part].get("reason", "")}', flush=True)
    result['elapsed_s'] = round(time.perf_counter() - start, 1)
    save()
  return result


def train_step_figures(config, timed_steps: int, peak_override: float = 0.0) -> dict:
  """Part train_step's figures, in this process (the child): the step as train.py builds it,
  its FLOPs, its speed on synthetic uint8 batches (the cost does not depend on the pixels)
  and the device's memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import gpu, paper_scale  # pylint: disable=g-import-not-at-top
  from jeat_jax import config_validation, models, parallel  # pylint: disable=g-import-not-at-top

  config_validation.validate(config)
  mesh = parallel.make_mesh()
  _, state, _, batch_sharding, step_fn = paper_scale.build(config, mesh)
  rng = np.random.default_rng(0)
  batch = tuple(jax.device_put(a, batch_sharding) for a in (
      rng.integers(0, 256, (config.batch_size, 32, 32, 3), np.uint8),
      rng.integers(0, 10, config.batch_size).astype(np.int32)))
  start = time.perf_counter()
  flops, whiles = paper_scale.count_flops(config, mesh, paper_scale.abstract((state,) + batch))
  flops_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = step_fn.lower(state, *batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, *batch)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(timed_steps):
    state, metrics = compiled(state, *batch)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / timed_steps
  device = jax.devices()[0]
  peak, peak_source = gpu.peak_tflops(device.device_kind, config.model.dtype, peak_override)
  tflops = flops / mesh.size / seconds / 1e12
  return dict(
      model=models.model_name(config.model), dtype=config.model.dtype,
      batch_size=config.batch_size, sgld_steps=config.sampler.num_steps, devices=mesh.size,
      timed_steps=timed_steps, seconds_per_step=seconds,
      images_per_s=config.batch_size / seconds, flops_per_step=flops,
      flops_while_loops_left=whiles, tflops_per_device=tflops, peak_tflops=peak,
      peak_source=peak_source, mfu=tflops / peak if peak else None,
      loss=float(metrics['loss']), flops_seconds=round(flops_s, 1),
      compile_seconds=round(compile_s, 1), memory_stats=memory_stats(device),
      memory_analysis=paper_scale.memory_of(compiled),
      data='synthetic uint8 batch (the step\'s cost does not depend on the pixels)')


def memory_stats(device) -> dict:
  """Peak and limit of the device's memory (bytes), where the platform reports them."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats:
    return dict(note=f'{device.platform} reports no memory_stats()')
  return {k: int(stats[k]) for k in ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
          if k in stats}


def main(argv):
  if FLAGS.out is None:
    raise app.UsageError('--out=FILE.json is required')
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _ = FLAGS.config.recipe  # loads the config: a bad --config.KEY stops here, not in a part
  if FLAGS.part == 'train_step':
    scale = SCALES['toy' if FLAGS.toy else 'paper']
    files.write_json_atomic(FLAGS.out, train_step_figures(FLAGS.config, scale['timed_steps'],
                                                          FLAGS.peak_tflops))
  elif FLAGS.part:
    raise app.UsageError(f'--part={FLAGS.part}: only train_step runs on its own')
  else:
    print(json.dumps(run_check(sys.argv), indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
