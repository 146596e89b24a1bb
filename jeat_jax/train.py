"""The one train loop of jeat-jax: every recipe is a configuration of it.

batch (uint8 -> [0, 1], augmented) -> perturbation -> x_perturbed;
replay buffer -> SGLD -> x_neg, buffer';
recipes.step_loss(params, x, x_perturbed, y, x_neg) -> grads -> update.

x_perturbed is the recipe's perturbed batch (an adversarial example, noisy x, x itself, or
EB-JDAT's negatives x~: see recipes.py); recipes.py composes every recipe's loss, this module
runs the steps.

Two optional mechanisms: a second, unaugmented minibatch for the energy terms
(`data.energy_batch_size`, EB-JDAT's x+), and SAM (`optimizer.sam_rho`), whose second
pass recomputes the same loss at the perturbed weights on the same batches and
negatives, its BatchNorm statistics discarded.

Randomness of step t is `fold_in(state.rng, t)` and the data order is a pure
function of (seed, epoch), so a run resumed from a checkpoint continues
exactly as if it had never stopped.
"""
import functools
import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import data as data_lib
from jeat_jax import energy
from jeat_jax import evaluate
from jeat_jax import files
from jeat_jax import generation
from jeat_jax import models
from jeat_jax import parallel
from jeat_jax import recipes
from jeat_jax import sampling
from jeat_jax.errors import Preempted, UserError
from jeat_jax.files import read_json, write_json_atomic
from jeat_jax.logs import format_eta, tensorboard_writer
# The run's state and model functions, importable from here as before (README, notebook).
from jeat_jax.state import (  # pylint: disable=unused-import
    BEST_SUBDIR, TrainState, class_gaussian_starts, create_optimizer, create_train_state,
    learning_rate_schedule, load_trained, make_logits_fn, model_variables, state_shardings,
    train_forward, updates_per_train_step, with_linear_warmup)

ROBUST_WATCH_RECORD = 'robust_watch.json'
VALIDATION_FILE = 'validation.json'  # the held-out training images (data.validation_size)
ENERGY_BATCH_SEED_OFFSET = 1_000_003  # the energy batch's order stream: seed + this


class TrainingDiverged(UserError):
  """The loss kept diverging after every allowed rollback."""


# ----------------------------------------------------------------------------- train step

def _energy_stats(prefix, values):
  return {f'{prefix}_mean': jnp.mean(values), f'{prefix}_std': jnp.std(values)}


def energy_dynamics(logits_old_clean, logits_old_perturbed, logits_new_perturbed,
                    y) -> Dict[str, jax.Array]:
  """Eq. 15: Dx E(x,y) = E_t(x_adv,y) - E_t(x,y); Dtheta E(x,y) = E_t'(x_adv,y) - E_t(x_adv,y);
  and the same for E(x), x_adv the step's x_perturbed. Mean and std over the batch."""
  old, new = logits_old_perturbed, logits_new_perturbed
  metrics = {}
  metrics.update(_energy_stats('dx_energy_xy', energy.energy_xy(old, y)
                               - energy.energy_xy(logits_old_clean, y)))
  metrics.update(_energy_stats('dtheta_energy_xy', energy.energy_xy(new, y)
                               - energy.energy_xy(old, y)))
  metrics.update(_energy_stats('dx_energy_x', energy.energy_x(old)
                               - energy.energy_x(logits_old_clean)))
  metrics.update(_energy_stats('dtheta_energy_x', energy.energy_x(new)
                               - energy.energy_x(old)))
  return metrics


def _accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, -1) == y)


def energy_batch(x_uint8: jax.Array, key: jax.Array, noise_std: float) -> jax.Array:
  """The energy terms' minibatch: unaugmented, plus N(0, noise_std^2), not clipped (JEM's
  and EB-JDAT's data noise)."""
  x = data_lib.to_float(x_uint8)
  if noise_std > 0:
    x = x + noise_std * jax.random.normal(key, x.shape, x.dtype)
  return x


def step_batch(ds, step: int, config) -> Tuple[np.ndarray, ...]:
  """The host arrays `train_step` takes after the state at `step`: (x uint8, y), and where
  `data.energy_batch_size` > 0 the second minibatch's images (their own order stream)."""
  batch = data_lib.train_batch(ds, step, config.batch_size, config.seed)
  if config.data.energy_batch_size > 0:  # labels unused
    batch += data_lib.train_batch(ds, step, config.data.energy_batch_size,
                                  config.seed + ENERGY_BATCH_SEED_OFFSET)[:1]
  return batch


def train_step(state: TrainState, x_uint8: jax.Array, y: jax.Array,
               x_energy_uint8: Optional[jax.Array] = None, *, model, config,
               with_dynamics: bool = False):
  """One step of any recipe. Returns the new state and a dict of scalar metrics.

  `x_energy_uint8`: the second minibatch of `data.energy_batch_size` (None: off)."""
  key = jax.random.fold_in(state.rng, state.step)
  k_aug, k_pos, k_neg, k_loss = jax.random.split(key, 4)
  x_energy = None
  if x_energy_uint8 is not None:
    x_energy = energy_batch(x_energy_uint8, jax.random.fold_in(key, 1),
                            config.data.energy_noise_std)
  x = data_lib.to_float(x_uint8)
  if config.data.augment:
    x = data_lib.augment(k_aug, x, pad_mode=config.data.pad_mode)
  if config.perturbation.name == 'free':
    return free_train_step(state, x, y, k_loss, model=model, config=config)

  attack_logits = make_logits_fn(model, state.params, state.batch_stats,
                                 config.perturbation.bn_mode)
  x_perturbed = recipes.perturb(config.perturbation, attack_logits, x, y, k_pos)
  sampler_logits = attack_logits
  if config.sampler.bn_mode != config.perturbation.bn_mode:
    sampler_logits = make_logits_fn(model, state.params, state.batch_stats, config.sampler.bn_mode)
  # As many negatives as data in the energy terms: the energy batch where there is one.
  num_neg = x.shape[0] if x_energy is None else x_energy.shape[0]
  x_neg, buffer = recipes.sample_negatives(config.sampler, sampler_logits,
                                           state.extra.get('buffer'), num_neg, k_neg,
                                           pool=state.extra.get('reinit_pool'))
  # Its metrics keep the historical tags energy_xy_pos / energy_x_pos (analysis.py and existing
  # event files read them): the energies of x_perturbed (EB-JDAT: of its negatives x~).
  loss_fn = functools.partial(recipes.step_loss, config, model, batch_stats=state.batch_stats,
                              x=x, x_perturbed=x_perturbed, y=y, x_neg=x_neg, key=k_loss,
                              x_energy=x_energy)
  (loss, (logits_train, batch_stats, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  extra = dict(state.extra, buffer=buffer) if buffer is not None else state.extra
  grad_fn = None
  if config.optimizer.sam_rho > 0:  # SAM's second pass: its BatchNorm statistics are dropped
    grad_fn = jax.grad(lambda params: loss_fn(params)[0])
  new_state = apply_update(state, grads, batch_stats, extra, grad_fn)
  metrics.update(loss=loss, train_accuracy=_accuracy(logits_train, y),
                 grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(state.params))
  if with_dynamics:
    new_logits = make_logits_fn(model, new_state.params, new_state.batch_stats,
                                config.perturbation.bn_mode)
    metrics.update(energy_dynamics(attack_logits(x), attack_logits(x_perturbed),
                                   new_logits(x_perturbed), y))
  return new_state, metrics


def apply_update(state: TrainState, grads, batch_stats, extra, grad_fn=None) -> TrainState:
  """One optimizer update; `grad_fn` (params -> gradient of the same loss) for SAM."""
  if grad_fn is None:
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  else:
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, batch_stats=batch_stats, extra=extra)


def free_train_step(state: TrainState, x, y, key, *, model, config):
  """Free AT (Shafahi et al.): m replays of the minibatch; each replay takes one
  gradient of CE(x + delta, y) for both the parameters (a descent step) and delta
  (a sign ascent step of size eps), delta carried across replays and minibatches."""
  eps = config.perturbation.eps

  def replay(carry, k):
    params, opt_state, batch_stats, delta = carry

    def loss_fn(p, d):
      logits, bs = train_forward(model, p, batch_stats, jnp.clip(x + d, 0.0, 1.0), k)
      return recipes.ce_loss(logits, y), (logits, bs)

    (loss, (logits, batch_stats)), (g_params, g_delta) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, delta)
    updates, opt_state = state.tx.update(g_params, opt_state, params)
    params = optax.apply_updates(params, updates)
    delta = jnp.clip(delta + eps * jnp.sign(g_delta), -eps, eps)
    return (params, opt_state, batch_stats, delta), (loss, _accuracy(logits, y))

  keys = jax.random.split(key, config.perturbation.free_replays)
  carry = (state.params, state.opt_state, state.batch_stats, state.extra['free_delta'])
  # On XLA:CPU a scan over the replays runs its conv weight gradients several times
  # slower than straight-line code: `perturbation.unroll` is the scan's unroll factor.
  (params, opt_state, batch_stats, delta), (losses, accs) = jax.lax.scan(
      replay, carry, keys, unroll=config.perturbation.unroll)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats, extra=dict(state.extra, free_delta=delta))
  return new_state, {'loss': losses[-1], 'train_accuracy': accs[-1],
                     'param_norm': optax.tree.norm(params)}


def eval_step(state: TrainState, x_uint8, y, mask, *, model):
  """Number of correctly classified (unmasked) examples, BatchNorm in inference mode."""
  logits = make_logits_fn(model, state.params, state.batch_stats, 'running')(data_lib.to_float(x_uint8))
  return jnp.sum((jnp.argmax(logits, -1) == y) & mask)


def evaluate_accuracy(eval_fn, state, mesh, x, y, batch_size: int) -> float:
  correct = 0
  for xb, yb, mb in data_lib.eval_batches(x, y, batch_size):
    correct += int(eval_fn(state, *parallel.global_batch(mesh, xb, yb, mb)))
  return correct / x.shape[0]


# ----------------------------------------------------------------------------- the loop

def is_diverged(metrics, max_abs_loss: float) -> bool:
  values = [float(v) for v in metrics.values()]
  return not all(np.isfinite(values)) or abs(float(metrics['loss'])) > max_abs_loss


def count_rollback(divergence: np.ndarray, step: int, window_steps: int) -> np.ndarray:
  """The guard's budget [window, rollbacks in that window, rollbacks in all] after a
  rollback at `step`. The budget counts per window of `window_steps` steps (0: the
  whole run is one window), so a week-long run is not stopped by three rollbacks
  spread over a hundred thousand steps, while a run that keeps diverging is."""
  window = step // window_steps if window_steps > 0 else 0
  in_window = int(divergence[1]) + 1 if window == int(divergence[0]) else 1
  return np.asarray([window, in_window, int(divergence[2]) + 1], np.int32)


class PreemptionWatch:
  """Whether the run must stop now: a preemption notice was received.

  One process: SIGTERM (what spot and preemptible VMs, Kubernetes and SLURM send before
  they stop a job) sets a flag; the loop checks it after every step. Several processes:
  JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`): the
  coordination service hears the notice on any host (its own SIGTERM handler, or a TPU
  VM's maintenance event) and names one step at which every process returns True, so
  that all save the same step together. Use as a context manager: the previous SIGTERM
  handler comes back at exit.
  """

  def __init__(self):
    self._received = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._received = True

  def __call__(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class RobustWatch:
  """`robust_watch`: PGD-k robust accuracy (Eq. 3 on CE, BatchNorm running statistics) on
  the first `num_examples` validation points (training images held out by
  `data.validation_size`, never trained on: no test point chooses a checkpoint), measured
  every `eval_every_steps`.

  Single-step recipes (JEAT, PreJEAT, Fast AT) can overfit catastrophically: robust
  accuracy collapses within an epoch while clean accuracy keeps rising (Wong et al.
  2020). The watch logs the robust accuracy, warns once when it falls below
  `collapse_fraction` of its best, and keeps the state with the best robust accuracy
  in WORKDIR/best/ (early stopping, Rice et al. 2020), with best/robust_watch.json.
  """

  def __init__(self, config, workdir: str, model, mesh, ds):
    cfg = config.robust_watch
    self.num_examples = n = min(cfg.num_examples, ds.x_val.shape[0])
    self._x, self._y = ds.x_val[:n], ds.y_val[:n]
    self._mesh, self._batch_size, self._key = mesh, config.eval.batch_size, jax.random.PRNGKey(cfg.seed)
    self._fraction = cfg.collapse_fraction
    self._correct = jax.jit(functools.partial(robust_watch_correct, model=model, cfg=cfg))
    self._checkpointer = ckpt_lib.Checkpointer(workdir, config, subdir=BEST_SUBDIR, max_to_keep=1,
                                               primary=False)
    self._record_path = os.path.join(workdir, BEST_SUBDIR, ROBUST_WATCH_RECORD)
    self.best = read_json(self._record_path)
    self.last: Optional[float] = None
    self._warned = False

  def measure(self, state) -> float:
    correct = 0
    for i, (xb, yb, mb) in enumerate(data_lib.eval_batches(self._x, self._y, self._batch_size)):
      correct += int(self._correct(state, *parallel.global_batch(self._mesh, xb, yb, mb),
                                   jax.random.fold_in(self._key, i)))
    return correct / self._x.shape[0]

  def __call__(self, state, step: int) -> float:
    """Measures `state` (never a diverged one: the loop checks first), keeps it if best."""
    self.last = accuracy = self.measure(state)
    if self.best is None or accuracy > self.best['robust_accuracy']:
      self.best = {'step': step, 'robust_accuracy': accuracy,
                   'num_examples': int(self._x.shape[0]), 'split': 'validation'}
      self._checkpointer.save(state, last=True)  # committed before its record names it
      if jax.process_index() == 0:
        write_json_atomic(self._record_path, self.best)
    collapsed = accuracy < self._fraction * self.best['robust_accuracy']
    if collapsed and not self._warned:
      logging.warning('robust_watch: PGD robust accuracy %.4f at step %d is below %.0f%% of its '
                      'best %.4f (step %d): catastrophic overfitting? The best state is in %s/',
                      accuracy, step, 100 * self._fraction, self.best['robust_accuracy'],
                      self.best['step'], BEST_SUBDIR)
    self._warned = collapsed
    return accuracy


def robust_watch_correct(state: TrainState, x_uint8, y, mask, key, *, model, cfg):
  """Number of (unmasked) validation points still correct under the watch's PGD."""
  logits_fn = make_logits_fn(model, state.params, state.batch_stats, 'running')
  return evaluate.pgd_correct(logits_fn, x_uint8, y, mask, key, eps=cfg.eps,
                              step_size=cfg.step_size, num_steps=cfg.num_steps)


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns results.json.

  The workdir is locked while the run lasts; a workdir of another run, a live holder of
  the lock or a changed config is refused (jeat_jax/checkpoint.py). A preemption notice
  (`PreemptionWatch`) saves a checkpoint at the step reached and raises `Preempted`.
  """
  with ckpt_lib.Checkpointer(workdir, config) as checkpointer, PreemptionWatch() as preempted:
    return train_in_workdir(config, workdir, checkpointer, preempted)


def train_in_workdir(config, workdir: str, checkpointer,
                     preempted=lambda step: False) -> Dict[str, Any]:
  ds = data_lib.load_dataset(config)
  ckpt_lib.check_data(workdir, ds.provenance,
                      has_checkpoints=checkpointer.latest_step() is not None)
  if ds.validation_indices.size and jax.process_index() == 0:
    record_validation_split(workdir, ds)
  mesh = parallel.make_mesh()
  n_train = ds.x_train.shape[0]
  steps_per_epoch = n_train // config.batch_size
  total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  image_shape = ds.x_train.shape[1:]
  logging.info('data %s: %d train / %d test images, %d classes; %d devices; %d steps '
               '(%d per epoch)', ds.source, n_train, ds.x_test.shape[0], ds.num_classes,
               mesh.size, total_steps, steps_per_epoch)

  model = models.create_model(config.model, ds.num_classes, jnp.dtype(config.model.dtype))
  tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch, total_steps))
  start_images = None
  if config.sampler.name == 'sgld_buffer' and config.sampler.reinit == 'class_gaussian':
    gaussian = sampling.ClassConditionalGaussian.cached(
        generation.gaussian_cache_path(config, workdir), ds.x_train, ds.y_train, ds.num_classes)
    start_images = class_gaussian_starts(gaussian, image_shape)
  state = create_train_state(config, model, jax.random.PRNGKey(config.seed), image_shape, tx,
                             mesh.size, start_images)
  shardings = state_shardings(mesh, state)
  state = jax.device_put(state, shardings)

  state = checkpointer.restore_latest(state) or state
  start_step = int(state.step)
  seconds_before = earlier_wall_seconds(checkpointer, workdir, start_step)

  batch_sharding = parallel.sharded_on_first_axis(mesh)
  batch_shardings = (batch_sharding,) * (3 if config.data.energy_batch_size > 0 else 2)
  step_fns = {
      dyn: jax.jit(functools.partial(train_step, model=model, config=config, with_dynamics=dyn),
                   in_shardings=(shardings, *batch_shardings),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
      for dyn in (False, True)}
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  n_eval = min(config.eval.num_examples, ds.x_test.shape[0]) if config.eval.num_examples > 0 else ds.x_test.shape[0]
  x_eval, y_eval = ds.x_test[:n_eval], ds.y_test[:n_eval]
  watch = RobustWatch(config, workdir, model, mesh, ds) if config.robust_watch.enabled else None

  writer = tensorboard_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                         for k, v in ckpt_lib.flat_config(config).items()})
  guard = config.divergence
  nan_injected = set()
  test_accuracy = None
  last_log_time, last_log_step = time.time(), start_step
  start_time = time.time()
  step = start_step
  while step < total_steps:
    batch = parallel.global_batch(mesh, *step_batch(ds, step, config))
    with_dynamics = config.dynamics_every_steps > 0 and (step + 1) % config.dynamics_every_steps == 0
    if step in config.debug_inject_nan_at_steps and step not in nan_injected:
      nan_injected.add(step)
      state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    state, metrics = step_fns[with_dynamics](state, *batch)
    step += 1
    is_last = step == total_steps
    checkpoint_now = step % config.checkpoint_every_steps == 0 or is_last
    eval_now = step % config.eval_every_steps == 0 or is_last
    # The guard looks at every step whose state is logged, evaluated or saved: no diverged
    # state reaches a checkpoint (nor best/).
    if step % config.log_every_steps == 0 or checkpoint_now or eval_now or with_dynamics:
      metrics = jax.device_get(metrics)
      if is_diverged(metrics, guard.max_abs_loss):
        counts = count_rollback(np.asarray(state.divergence), step, guard.window_steps)
        if counts[1] > guard.max_retries:
          raise TrainingDiverged(
              f'training diverged at step {step} (loss {metrics["loss"]}) after '
              f'{guard.max_retries} rollbacks within {guard.window_steps or "all"} steps; '
              'see divergence.* in the config')
        state = rollback(checkpointer, config, model, tx, image_shape, mesh.size, shardings,
                         int(counts[2]), start_images)
        state = state.replace(divergence=jax.device_put(jnp.asarray(counts), shardings.divergence))
        logging.warning('divergence at step %d (loss %s): rolled back to step %d with seed '
                        'stream %d (rollback %d/%d of this window, %d in all)', step,
                        metrics['loss'], int(state.step), counts[2], counts[1], guard.max_retries,
                        counts[2])
        writer.write_scalars(step, {'divergence_rollbacks': int(counts[2])})
        step = int(state.step)
        last_log_time, last_log_step = time.time(), step
        continue
    if step % config.log_every_steps == 0 or checkpoint_now or with_dynamics:
      now = time.time()
      rate = (step - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9)
      eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
      writer.write_scalars(step, {**{k: float(v) for k, v in metrics.items()},
                                  'images_per_second': rate})
      robust = f' | PGD-{config.robust_watch.num_steps} {watch.last:.3f}' if watch and watch.last is not None else ''
      logging.info('step %d/%d (%.1f%%) | %.1f img/s | loss %.4f | train acc %.3f%s | ETA %s',
                   step, total_steps, 100 * step / total_steps, rate, float(metrics['loss']),
                   float(metrics['train_accuracy']), robust, format_eta(eta))
      last_log_time, last_log_step = now, step
    if eval_now:
      test_accuracy = evaluate_accuracy(eval_fn, state, mesh, x_eval, y_eval, config.eval.batch_size)
      scalars = {'test_accuracy': test_accuracy}
      message = f'step {step}: test accuracy {test_accuracy:.4f} on {n_eval} images'
      if watch:
        scalars['robust_watch_accuracy'] = watch(state, step)
        message += (f'; PGD-{config.robust_watch.num_steps} robust accuracy {watch.last:.4f} on '
                    f'{watch.num_examples} validation images (best '
                    f'{watch.best["robust_accuracy"]:.4f} at step {watch.best["step"]})')
      writer.write_scalars(step, scalars)
      logging.info(message)
      if 'buffer' in state.extra and jax.process_index() == 0:
        samples = parallel.first_local_shard(state.extra['buffer'])[:64]
        writer.write_images(step, {'replay_buffer': generation.image_grid(samples, 8)[None]})
    if checkpoint_now:
      checkpointer.save(state, wall_seconds=seconds_before + time.time() - start_time,
                        last=is_last)
      writer.flush()  # the events up to the checkpoint reach the workdir (uploaded if remote)
    if not is_last and preempted(step):
      save_on_preemption(checkpointer, state, metrics, step, guard.max_abs_loss,
                         seconds_before + time.time() - start_time)
      writer.close()
      raise Preempted(f'preempted at step {step}: checkpoint saved')
  writer.close()

  if test_accuracy is None:  # resumed a finished run
    test_accuracy = evaluate_accuracy(eval_fn, state, mesh, x_eval, y_eval, config.eval.batch_size)
  session_seconds = time.time() - start_time
  results = {'config': config.recipe, 'step': int(state.step), 'test_accuracy': test_accuracy,
             'test_examples': int(n_eval), 'data_source': ds.source, 'data': ds.provenance,
             'model': models.model_name(config.model),
             'wall_seconds_this_session': round(session_seconds, 1),
             'wall_seconds': round(seconds_before + session_seconds, 1),  # over all sessions
             'divergence_rollbacks': int(np.asarray(state.divergence)[2])}
  if watch and watch.best:
    results['robust_watch_best'] = watch.best
  if config.perturbation.name not in ('none', 'gaussian'):  # adversarial recipes
    logits_fn = evaluate.model_logits(model, state.params, state.batch_stats)
    results['robust_accuracy_pgd10'] = evaluate.robust_accuracy_pgd(
        logits_fn, mesh, x_eval, y_eval, config.eval.batch_size, jax.random.PRNGKey(config.seed))
    logging.info('PGD-10 (eps 8/255) robust accuracy %.4f on %d images',
                 results['robust_accuracy_pgd10'], n_eval)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, 'results.json'), results)
  return results


def record_validation_split(workdir: str, ds) -> None:
  """WORKDIR/validation.json: which training images were held out (their rows in the training
  split of the data named in data.json), written at the first start; data.json's
  `validation_sha256` is checked on every resume."""
  path = os.path.join(workdir, VALIDATION_FILE)
  if not files.exists(path):
    write_json_atomic(path, {'size': int(ds.validation_indices.size),
                             'seed': data_lib.VALIDATION_SEED,
                             'sha256': ds.provenance['validation_sha256'],
                             'indices': ds.validation_indices.tolist()})


def save_on_preemption(checkpointer, state, metrics, step: int, max_abs_loss: float,
                       wall_seconds: float) -> None:
  """The checkpoint of a preempted run at `step`, written before the process goes (the
  divergence guard's check first: a diverged state is not saved, the run resumes from the
  last good checkpoint)."""
  if is_diverged(jax.device_get(metrics), max_abs_loss):
    logging.warning('preempted at step %d with a diverged state: not saved; the run resumes '
                    'from step %s', step, checkpointer.latest_step())
  else:
    checkpointer.save(state, wall_seconds=wall_seconds, last=True)


def earlier_wall_seconds(checkpointer, workdir: str, step: int) -> float:
  """The training seconds of the sessions before this one, up to checkpoint `step` (recorded
  with it; for a checkpoint of an older version, its results.json's at that step; else 0)."""
  if step == 0:
    return 0.0
  seconds = checkpointer.wall_seconds(step)
  if seconds is None:
    earlier = read_json(os.path.join(workdir, 'results.json')) or {}
    if earlier.get('step') == step:
      seconds = earlier.get('wall_seconds', earlier.get('wall_seconds_this_session'))
  return float(seconds or 0.0)


def rollback(checkpointer, config, model, tx, image_shape, num_devices, shardings, retry: int,
             start_images=None):
  """The last good checkpoint (or a fresh init) with the step rng stream changed by `retry`."""
  fresh = jax.device_put(create_train_state(config, model, jax.random.PRNGKey(config.seed),
                                            image_shape, tx, num_devices, start_images), shardings)
  state = checkpointer.restore_latest(fresh) or fresh
  return state.replace(rng=jax.random.fold_in(state.rng, 1_000_003 + retry))
