"""A run's state and the functions of its model: below train and evaluate, used by both.

TrainState (saved and restored whole), the optimizer and learning-rate schedule of a
config, the model passes (`make_logits_fn` for attacks, SGLD and evaluation;
`train_forward` for the loss) and `load_trained`, which restores a trained run for
evaluation, sampling and analysis.
"""
from typing import Any, Callable, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from jeat_jax import checkpoint as ckpt_lib
from jeat_jax import data as data_lib
from jeat_jax import models
from jeat_jax import parallel
from jeat_jax import sam
from jeat_jax import sampling
from jeat_jax.errors import WorkdirError

BEST_SUBDIR = 'best'                      # robust_watch's best state, inside the workdir


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue: saved and restored as one pytree.

  `extra` holds recipe state: 'buffer' (the SGLD replay buffer), 'reinit_pool'
  (pre-drawn class-Gaussian chain starts, `sampler.reinit = class_gaussian`) and
  'free_delta' (Free AT's perturbation carried across minibatches).
  `divergence` is the divergence guard's budget, int32 [window, rollbacks in that
  window, rollbacks in all] (`count_rollback`): saved, so a resumed run keeps it.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  extra: Dict[str, jax.Array]
  divergence: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def checkpoint_items(self) -> Dict[str, Any]:
    return dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                opt_state=self.opt_state, rng=self.rng, extra=self.extra,
                divergence=self.divergence)


# ----------------------------------------------------------------------------- optimizer

ONECYCLE_DIV_FACTOR = 25.0         # torch OneCycleLR's defaults (WEAT passes neither):
ONECYCLE_FINAL_DIV_FACTOR = 1e4     # initial lr = max / 25, final lr = initial / 1e4


@flax.struct.dataclass
class CycleSchedule:
  """A one-cycle learning rate (`lr`, count -> lr) with its cycle position (`position`,
  count -> x in [0, 1], 0 at the ends of the cycle, 1 at the peak), from which
  `cycled_momentum` moves the momentum inversely to the lr. Called, it is the lr schedule."""
  lr: optax.Schedule = flax.struct.field(pytree_node=False)
  position: optax.Schedule = flax.struct.field(pytree_node=False)

  def __call__(self, count):
    return self.lr(count)


def linear_onecycle(total: int, peak_lr: float, peak_fraction: float) -> CycleSchedule:
  """Fast AT's cyclic schedule: 0 -> peak_lr -> 0, linear, peak at `peak_fraction` of `total`
  (locuslab/fast_adversarial, CIFAR10/train_fgsm.py: torch's CyclicLR from lr_min 0)."""
  peak = max(1, int(peak_fraction * total))
  lr = optax.join_schedules([optax.linear_schedule(0.0, peak_lr, peak),
                             optax.linear_schedule(peak_lr, 0.0, max(1, total - peak))], [peak])
  return CycleSchedule(lr=lr, position=lambda count: lr(count) / peak_lr)


def cosine_onecycle(total: int, peak_lr: float, pct_start: float) -> CycleSchedule:
  """torch's `OneCycleLR(max_lr=peak_lr, total_steps=total, pct_start)` with its defaults
  (anneal_strategy 'cos', three_phase False, div_factor 25, final_div_factor 1e4), as
  WEAT's main.py builds it: cosine from peak_lr / 25 up to peak_lr over the steps
  0 .. pct_start * total - 1, then down to peak_lr / 25e4 at step total - 1 (torch's phase
  ends; `optax.cosine_onecycle_schedule` ends them one step later). Counts past the end keep
  the final lr (torch raises there)."""
  initial = peak_lr / ONECYCLE_DIV_FACTOR
  final = initial / ONECYCLE_FINAL_DIV_FACTOR
  warm_end = pct_start * total - 1.0
  end = total - 1.0

  def position(count):
    up = jnp.clip(count / max(warm_end, 1.0), 0.0, 1.0)
    down = jnp.clip((count - warm_end) / max(end - warm_end, 1.0), 0.0, 1.0)
    rising = count <= warm_end
    return jnp.where(rising, 1.0 - jnp.cos(jnp.pi * up), 1.0 + jnp.cos(jnp.pi * down)) / 2.0

  def lr(count):
    floor = jnp.where(count <= warm_end, initial, final)
    return floor + (peak_lr - floor) * position(count)

  return CycleSchedule(lr=lr, position=position)


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning rate per optimizer update, from `config.schedule`."""
  lr, sched = config.optimizer.lr, config.schedule
  updates_per_step = updates_per_train_step(config)
  per_epoch = steps_per_epoch * updates_per_step
  total = total_steps * updates_per_step
  if sched.name == 'constant':
    schedule = optax.constant_schedule(lr)
  elif sched.name == 'multistep':
    boundaries = {int(e * per_epoch): sched.decay_factor for e in sched.decay_epochs}
    schedule = optax.piecewise_constant_schedule(lr, boundaries)
  elif sched.name == 'onecycle':
    schedule = linear_onecycle(total, lr, sched.peak_fraction)
  elif sched.name == 'cosine_onecycle':
    schedule = cosine_onecycle(max(1, total), lr, sched.peak_fraction)
  elif sched.name == 'cosine':
    schedule = optax.cosine_decay_schedule(lr, max(1, total))
  else:
    raise ValueError(sched.name)
  if sched.warmup_steps > 0:
    schedule = with_linear_warmup(schedule, sched.warmup_steps * updates_per_step)
  return schedule


def with_linear_warmup(schedule: optax.Schedule, warmup: int) -> optax.Schedule:
  """JEM's warm-up: the schedule scaled by min(1, count / warmup).

  The schedule keeps its own clock, so every decay boundary falls at the step the
  config names (`optax.join_schedules` would restart it at 0 after the warm-up and
  move every boundary `warmup` steps later).
  """
  return lambda count: jnp.minimum(1.0, count / warmup) * schedule(count)


def cycled_momentum(sched, schedule: optax.Schedule) -> optax.Schedule:
  """`schedule.cycle_momentum`: SGD's momentum moved inversely to a one-cycle lr, from
  `max_momentum` at the ends of the cycle to `base_momentum` at its peak, as torch's
  OneCycleLR (0.95 / 0.85, cosine, WEAT) and CyclicLR (0.9 / 0.8, linear, Fast AT) do by
  default (cycle_momentum=True); both replace the optimizer's own momentum."""
  if not isinstance(schedule, CycleSchedule):
    raise ValueError(f'schedule.cycle_momentum needs a one-cycle schedule.name (onecycle, '
                     f'cosine_onecycle) without warm-up; got {sched.name!r}')
  spread = sched.max_momentum - sched.base_momentum
  return lambda count: sched.max_momentum - spread * schedule.position(count)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (coupled L2 weight decay, as PyTorch) or Adam; with
  `optimizer.sam_rho` > 0 wrapped in SAM/ASAM (`sam.sam`), whose update then needs
  `grad_fn=` (the train step passes it). Under `schedule.cycle_momentum` SGD's momentum
  follows `cycled_momentum` (optax's trace with its decay injected per update, then the lr:
  optax.sgd's two parts)."""
  opt = config.optimizer
  if opt.name == 'sgd' and config.schedule.cycle_momentum:
    trace = optax.inject_hyperparams(optax.trace, static_args=('nesterov',))(
        decay=cycled_momentum(config.schedule, schedule), nesterov=opt.nesterov)
    base = optax.chain(trace, optax.scale_by_learning_rate(schedule))
  elif opt.name == 'sgd':
    base = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
  else:
    base = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
  parts = []
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  tx = optax.chain(*parts, base)
  if opt.sam_rho > 0:
    tx = sam.sam(tx, opt.sam_rho, opt.sam_adaptive)
  return tx


def updates_per_train_step(config) -> int:
  """Free AT replays each minibatch m times, one parameter update per replay."""
  return config.perturbation.free_replays if config.perturbation.name == 'free' else 1


# ----------------------------------------------------------------------------- model passes

def model_variables(params, batch_stats):
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def make_logits_fn(model, params, batch_stats, bn_mode: str = 'batch'):
  """x -> logits for attacks and SGLD: no dropout, BatchNorm running averages untouched.

  bn_mode 'batch' normalises with the batch's own statistics (the reference
  PyTorch AT code attacks in train mode), 'running' with the running averages.
  """
  variables = model_variables(params, batch_stats)
  if not batch_stats or bn_mode == 'running':
    return lambda x: model.apply(variables, x, train=False)

  def logits_fn(x):
    logits, _ = model.apply(variables, x, train=False, use_running_average=False,
                            mutable=['batch_stats'])
    return logits
  return logits_fn


def train_forward(model, params, batch_stats, x, dropout_key):
  """Train-mode pass: returns logits and the updated BatchNorm statistics."""
  variables = model_variables(params, batch_stats)
  rngs = {'dropout': dropout_key}
  if not batch_stats:
    return model.apply(variables, x, train=True, rngs=rngs), batch_stats
  logits, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=['batch_stats'])
  return logits, updates['batch_stats']


# ----------------------------------------------------------------------------- state

StartImages = Callable[[jax.Array, int], jax.Array]  # (key, n) -> (n, H, W, C)


def class_gaussian_starts(gaussian: 'sampling.ClassConditionalGaussian',
                          image_shape) -> StartImages:
  """Draws of the class Gaussians, each of a random class."""
  return lambda key, n: sampling.class_gaussian_images(gaussian, key, n, image_shape)


def placeholder_starts(image_shape) -> StartImages:
  """Zeros of the right shape: for a state that a checkpoint is restored into."""
  return lambda key, n: jnp.zeros((n, *image_shape), jnp.float32)


def create_train_state(config, model, key: jax.Array, image_shape, tx, num_devices: int,
                       start_images: Optional[StartImages] = None) -> TrainState:
  """A fresh state. `sampler.reinit = class_gaussian` needs `start_images` (the buffer and the
  re-initialisation pool are drawn from it: `class_gaussian_starts`, or `placeholder_starts`
  for a state to restore into); the full-covariance Gaussians (10 x D x D) stay out of the
  state, which carries `sampler.reinit_pool_size` pre-drawn images instead. The pools hold
  the same images on any `num_devices`, padded to a multiple of it."""
  k_init, k_buffer, k_run = jax.random.split(key, 3)
  variables = model.init({'params': k_init, 'dropout': k_init},
                         jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  extra = {}
  s = config.sampler
  if s.name == 'sgld_buffer' and s.reinit == 'class_gaussian':
    if start_images is None:
      raise ValueError('sampler.reinit=class_gaussian: create_train_state needs start_images '
                       '(state.class_gaussian_starts of the training data)')
    k_buffer, k_pool = jax.random.split(k_buffer)
    for name, k in (('buffer', k_buffer), ('reinit_pool', k_pool)):
      size = s[ckpt_lib.DEVICE_POOLS[name]]
      extra[name] = sampling.pad_rows(start_images(k, size),
                                      sampling.padded_size(size, num_devices))
  elif s.name == 'sgld_buffer':
    extra['buffer'] = sampling.init_replay_buffer(k_buffer, s.buffer_size, image_shape,
                                                  *s.init_range, num_devices=num_devices)
  if config.perturbation.name == 'free':
    extra['free_delta'] = jnp.zeros((config.batch_size, *image_shape), jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=k_run, extra=extra,
                    divergence=jnp.zeros((3,), jnp.int32), tx=tx)


def state_shardings(mesh, state: TrainState):
  """Everything replicated but the replay buffer, its re-initialisation pool and Free AT's
  delta (sharded on axis 0, like the batch)."""
  rep, shard = parallel.replicated(mesh), parallel.sharded_on_first_axis(mesh)
  shardings = jax.tree.map(lambda _: rep, state)
  return shardings.replace(extra={k: shard for k in state.extra})


def load_trained(config, workdir: str):
  """The model, the latest checkpointed state of `workdir` (of WORKDIR/best/, robust_watch's
  best state, with eval.checkpoint='best'), the dataset and the mesh."""
  subdir = BEST_SUBDIR if config.eval.checkpoint == 'best' else 'checkpoints'
  with ckpt_lib.Checkpointer(workdir, config, for_training=False, subdir=subdir) as checkpointer:
    ds = data_lib.load_dataset(config)
    mesh = parallel.make_mesh()
    model = models.create_model(config.model, ds.num_classes, jnp.dtype(config.model.dtype))
    steps_per_epoch = ds.x_train.shape[0] // config.batch_size
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch, steps_per_epoch))
    state = create_train_state(config, model, jax.random.PRNGKey(config.seed),
                               ds.x_train.shape[1:], tx, mesh.size,
                               placeholder_starts(ds.x_train.shape[1:]))
    state = jax.device_put(state, state_shardings(mesh, state))
    restored = checkpointer.restore_latest(state)
  if restored is None:
    raise WorkdirError(f'no checkpoint in {workdir}/{subdir}: train there first'
                       + (' with robust_watch.enabled' if subdir == BEST_SUBDIR else ''))
  return model, restored, ds, mesh
