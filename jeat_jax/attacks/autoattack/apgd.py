"""Auto-PGD (APGD) for l_inf: Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks" (ICML), Alg. 1.

APGD is PGD with momentum whose step size starts at 2 eps and is halved at fixed
checkpoints w_j when either
  1. the loss increased in at most a fraction rho of the iterations since the
     previous checkpoint, or
  2. the step size was not halved at the previous checkpoint and the best loss
     has not improved since then;
a halving restarts the iterate from the best point found so far.

The losses are cross-entropy (`energy.cross_entropy`), the Difference of Logits
Ratio (DLR) and its targeted form, both introduced in that paper. The start is `apgd_start`
(the reference's: a uniform draw rescaled to reach eps in its largest coordinate), the
projection `core.project_linf`. The trace of the best-so-far
loss is returned so that its monotonicity can be checked. Iterations run
through `iterate`: one `lax` loop program, or on CPU a Python loop over one
jitted step (see `use_host_loop`).

Every attack of this package takes the model as `logits_fn`, passed to its jitted steps as
an argument (`core.as_argument`: the variables of `evaluate.model_logits` are arguments of
the compiled steps, not constants), and draws its random numbers per example
(`core.example_keys`), so that an example's attack does not depend on the batch it is in,
its padding or the devices. With a `sharding` the batch is split over its devices
(`on_devices`, `to_host`), and every batch size is a multiple of their number.
"""
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from jeat_jax.attacks.core import (as_argument, cw_margin, example_keys, project_linf,
                                   sign_ascent_step)
from jeat_jax.energy import cross_entropy

LOSSES = ('ce', 'dlr', 'dlr-targeted', 'ce-targeted')


class ApgdResult(NamedTuple):
  x_adv: jax.Array            # last misclassified iterate where one was found, else the best-loss point
  robust: jax.Array           # bool [B]: every iterate (start included) classified correctly
  loss_best: jax.Array        # [B] highest loss reached
  loss_best_trace: jax.Array  # [n_iter + 1, B] best-so-far loss after each iteration (row 0: start)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Untargeted DLR (Croce & Hein 2020): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3).

  pi sorts the logits in decreasing order.
  """
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  margin = cw_margin(logits, labels, kappa=jnp.inf)       # max_{i!=y} z_i - z_y
  return margin / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR (Croce & Hein 2020): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return (z_t - z_y) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def ranked_class(logits: jax.Array, rank) -> jax.Array:
  """The class with the `rank`-th largest logit (rank 1 = the prediction): APGD-T's and FAB-T's targets."""
  return jnp.argsort(logits, axis=-1)[:, -rank]


def loss_of_logits(loss: str, labels: jax.Array, targets: Optional[jax.Array]) -> Callable:
  """logits -> per-example loss to ascend, for the names in `LOSSES`."""
  if loss == 'ce':
    return lambda z: cross_entropy(z, labels)
  if loss == 'dlr':
    return lambda z: dlr_loss(z, labels)
  if loss == 'dlr-targeted':
    return lambda z: dlr_loss_targeted(z, labels, targets)
  if loss == 'ce-targeted':
    return lambda z: -cross_entropy(z, targets)
  raise ValueError(f'apgd: unknown loss {loss!r}; expected one of {LOSSES}')


def step_size_checkpoints(n_iter: int):
  """The iterations (0-based) after which APGD checks its step size, with each window length.

  The checkpoints w_j of APGD: the first window is 0.22 n_iter long, each next one
  0.03 n_iter shorter, but at least 0.06 n_iter (all rounded down, at least 1).
  """
  first, shortest, shrink = (max(int(f * n_iter), 1) for f in (0.22, 0.06, 0.03))
  checks, window, i = [], first, first - 1
  while i < n_iter:
    checks.append((i, window))
    window = max(window - shrink, shortest)
    i += window
  return checks


def _checkpoint_tables(n_iter: int):
  """Per-iteration arrays: is this a checkpoint, and the window length it closes."""
  is_check = np.zeros(n_iter, bool)
  window = np.ones(n_iter, np.float32)
  for i, k in step_size_checkpoints(n_iter):
    is_check[i], window[i] = True, k
  return jnp.asarray(is_check), jnp.asarray(window)


def call_logits(logits_fn: Callable, x: jax.Array, keys: jax.Array, stochastic: bool) -> jax.Array:
  """logits_fn(x), or logits_fn(x, keys) for a randomised model (`stochastic`), with one key
  per example."""
  return logits_fn(x, keys) if stochastic else logits_fn(x)


def fold_in_each(keys: jax.Array, data) -> jax.Array:
  """fold_in(k, data) for each example's key k."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def split_each(keys: jax.Array, num: int) -> tuple:
  """Each example's key split into `num`: a tuple of `num` arrays of per-example keys."""
  split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
  return tuple(split[:, j] for j in range(num))


# ---------------------------------------------------------------- placement

def on_devices(sharding: Optional[NamedSharding], *arrays):
  """Host arrays (the same on every process) split on their first axis over the devices of
  `sharding`, each process placing the shards of its own devices; on the default device
  without a sharding. One array for one, else a tuple."""
  if sharding is None:
    out = tuple(jnp.asarray(a) for a in arrays)
  else:
    out = tuple(jax.make_array_from_callback(np.shape(a), sharding, lambda i, a=np.asarray(a): a[i])
                for a in arrays)
  return out if len(out) > 1 else out[0]


def to_host(tree):
  """Device arrays (split over the devices of every process, or on one) whole in numpy on
  every process: a collective, every process calls it."""
  return multihost_utils.process_allgather(tree, tiled=True)


def num_devices(sharding: Optional[NamedSharding]) -> int:
  """How many devices a batch split with `sharding` is on (1 without one)."""
  return 1 if sharding is None else sharding.num_devices


# ---------------------------------------------------------------- iteration driver

def use_host_loop(host_loop: Optional[bool] = None) -> bool:
  """Whether attack iterations are driven from Python, one jitted step per call.

  XLA:CPU compiles convolution gradients inside a `lax` while-loop to a slow
  path (jax-ml/jax#12868): on a WRN-16-4 an input-gradient step ran 3x slower in
  `lax.fori_loop` than as a jitted step called from Python. So the default
  (None) is the host loop on CPU and one `lax.fori_loop` program elsewhere.
  """
  return jax.default_backend() == 'cpu' if host_loop is None else bool(host_loop)


@functools.partial(jax.jit, static_argnums=(0, 1))
def jit_call(fn: Callable, static, *args):
  """fn(static, *args), jitted; `static` is hashable (a NamedTuple of settings)."""
  return fn(static, *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _device_loop(body, until, static, n_iter, args, carry):
  def cond(ic):
    i, c = ic
    return (i < n_iter) if until is None else (i < n_iter) & ~until(static, c)

  def step(ic):
    i, c = ic
    return i + 1, body(static, *args, i, c)

  return jax.lax.while_loop(cond, step, (jnp.asarray(0), carry))[1]


def padded_size(n: int, cap: int, multiple: int = 1) -> int:
  """Batch size for n examples: n itself up to 8, then the next of 10, 12, 14, 16, 20, 24,
  28, 32, 40, ... (steps of a quarter of a power of two), at most cap, then rounded up to a
  multiple of `multiple` (the number of devices the batch is split over).

  At most a fifth of a batch is padding (beyond the rounding), and only a few shapes get
  compiled as the examples still being attacked dwindle. Below 8 every size is its own
  shape: on CPU a step's cost is proportional to the batch, and the last few robust
  points take most of AutoAttack's steps.
  """
  size = max(n, 1)
  if size > 8:
    size = 8
    while size < n:
      size += (1 << (size.bit_length() - 1)) // 4
  return -(-min(size, cap) // multiple) * multiple


def pad_indices(idx: np.ndarray, cap: int, multiple: int = 1) -> np.ndarray:
  """idx padded (repeating its first entry) to `padded_size`."""
  size = padded_size(len(idx), cap, multiple)
  return np.concatenate([idx, np.full(size - len(idx), idx[0], idx.dtype)])


def _constrain(tree, sharding: Optional[NamedSharding]):
  return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(tree, rows, sharding):
  return _constrain(jax.tree_util.tree_map(lambda a: a[rows], tree), sharding)


@functools.partial(jax.jit, static_argnums=3)
def _put_rows(tree, rows, values, sharding):
  return _constrain(jax.tree_util.tree_map(lambda a, v: a.at[rows].set(v[:rows.shape[0]]),
                                           tree, values), sharding)


def iterate(body: Callable, static, args: tuple, carry, n_iter: int, host_loop: bool,
            until: Optional[Callable] = None, active: Optional[Callable] = None,
            per_example_args: int = 0, check_every: int = 5,
            sharding: Optional[NamedSharding] = None):
  """carry after `body(static, *args, i, carry)` for i = 0 .. n_iter - 1.

  Stops early once `until(static, carry)` holds (checked before each step).
  `body` and `until` are module-level functions, `static` a hashable settings
  tuple, so compiled steps are reused across calls with the same settings.

  With `active(static, carry) -> bool [B]` (host loop only), every
  `check_every` steps the examples no longer active are set aside: the rest of
  the carry (every leaf has the examples on its leading axis) and the first
  `per_example_args` of `args` are gathered to the active examples, padded to
  `padded_size`, and the later steps cost only those. A set-aside example's
  carry stays as it was when it was set aside. Each example's steps do not
  depend on the others', so the active examples end as without compaction. With a
  `sharding` (the batch split over its devices) the gathered examples are split the same
  way, padded to a multiple of the number of devices.
  """
  if not host_loop:
    return _device_loop(body, until, static, n_iter, args, carry)
  full, rows = None, np.arange(len(jax.tree_util.tree_leaves(carry)[0]))
  for i in range(n_iter):
    if until is not None and bool(jit_call(until, static, carry)):
      break
    if active is not None and i and i % check_every == 0:
      keep = np.flatnonzero(to_host(jit_call(active, static, carry))[:len(rows)])
      size = padded_size(len(keep), len(rows), num_devices(sharding))
      if size < len(jax.tree_util.tree_leaves(carry)[0]):
        full = _put_rows(carry if full is None else full, rows, carry, sharding)
        if not len(keep):
          return full
        take = pad_indices(keep, len(rows), num_devices(sharding))
        carry = _take_rows(carry, take, sharding)
        args = _take_rows(args[:per_example_args], take, sharding) + args[per_example_args:]
        rows = rows[keep]
    carry = jit_call(body, static, *args, i, carry)
  return carry if full is None else _put_rows(full, rows, carry, sharding)


# ---------------------------------------------------------------- APGD

def eot_value_and_grad(logits_fn: Callable, loss_fn: Callable, x: jax.Array, keys: jax.Array,
                       eot_iter: int = 1, stochastic: bool = False):
  """(loss [B], logits, grad) at x; the gradient is averaged over `eot_iter` draws of the model
  (`keys`: one per example).

  Expectation over Transformation (Athalye et al. 2018) as AutoAttack's 'rand'
  version uses it; loss and logits are those of the last draw, as in the
  reference. A deterministic model (not `stochastic`) gives identical draws, so
  one is computed.
  """
  def one(k):
    def total(z):
      logits = call_logits(logits_fn, z, k, stochastic)
      values = loss_fn(logits)
      return jnp.sum(values), (values, logits)
    (_, (values, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return values, logits, grad

  if eot_iter == 1 or not stochastic:
    return one(keys)

  def body(j, carry):
    values, logits, grad = one(fold_in_each(keys, j))
    return values, logits, carry[2] + grad

  values, logits = jax.eval_shape(lambda: one(keys)[:2])
  init = (jnp.zeros(values.shape, values.dtype), jnp.zeros(logits.shape, logits.dtype),
          jnp.zeros_like(x))
  values, logits, grad = jax.lax.fori_loop(0, eot_iter, body, init)
  return values, logits, grad / eot_iter


def where_per_example(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-example select: mask [B] broadcast over the trailing axes."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


class ApgdSettings(NamedTuple):
  n_iter: int = 100
  loss: str = 'ce'
  rho: float = 0.75
  momentum: float = 0.75
  eot_iter: int = 1
  stochastic: bool = False


def apgd_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """x + eps t / max|t|, t ~ U(-1, 1) per coordinate, clipped to [0, 1]: APGD's random start
  in fra31/auto-attack, on the boundary of the eps-ball in each example's largest coordinate
  (not uniform in the ball). Each example draws from its own key (`example_keys`)."""
  t = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0))(
      example_keys(key, x.shape[0]))
  largest = jnp.max(jnp.abs(t).reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.clip(x + eps * t / largest, 0.0, 1.0)


def _apgd_value_and_grad(s: ApgdSettings, logits_fn, x_adv, y, targets, keys):
  return eot_value_and_grad(logits_fn, loss_of_logits(s.loss, y, targets), x_adv, keys,
                            s.eot_iter, s.stochastic)


def _apgd_init(s: ApgdSettings, logits_fn, x, y, keys, eps, target_rank):
  """Start point, its loss and gradient, the targets, and the loop state (`keys`: one per
  example)."""
  key_start, key_grad, key_clean = split_each(keys, 3)
  targets = jnp.zeros_like(y)
  if s.loss.endswith('targeted'):
    targets = ranked_class(call_logits(logits_fn, x, key_clean, s.stochastic), target_rank)
  x_start = apgd_start(key_start, x, eps)
  loss0, logits0, grad0 = _apgd_value_and_grad(s, logits_fn, x_start, y, targets,
                                               fold_in_each(key_grad, 0))
  batch = x.shape[0]
  carry = dict(
      x_cur=x_start, x_prev=x_start, grad=grad0,
      x_best=x_start, grad_best=grad0, loss_best=loss0, loss_prev=loss0,
      x_best_adv=x_start, robust=jnp.argmax(logits0, -1) == y,
      step=jnp.full((batch,), 2.0 * eps, jnp.float32),
      n_increase=jnp.zeros((batch,), jnp.float32),
      loss_best_last_check=loss0, reduced_last_check=jnp.ones((batch,), bool),
      trace=jnp.zeros((batch, s.n_iter + 1), jnp.float32).at[:, 0].set(loss0))
  return carry, targets, key_grad


def _apgd_body(s: ApgdSettings, x, y, targets, key_grad, eps, logits_fn, i, c):
  """One APGD iteration (Alg. 1): momentum step, bookkeeping, step-size checkpoint."""
  is_check, window = _checkpoint_tables(s.n_iter)
  a = jnp.where(i > 0, s.momentum, 1.0)
  z = project_linf(sign_ascent_step(c['x_cur'], c['grad'], c['step'][:, None, None, None]), x, eps)
  x_new = project_linf(c['x_cur'] + a * (z - c['x_cur']) + (1.0 - a) * (c['x_cur'] - c['x_prev']),
                       x, eps)
  values, logits, grad = _apgd_value_and_grad(s, logits_fn, x_new, y, targets,
                                              fold_in_each(key_grad, i + 1))
  correct = jnp.argmax(logits, -1) == y
  improved = values > c['loss_best']
  loss_best = jnp.where(improved, values, c['loss_best'])
  x_best = where_per_example(improved, x_new, c['x_best'])
  grad_best = where_per_example(improved, grad, c['grad_best'])
  n_increase = c['n_increase'] + (values > c['loss_prev'])

  # Step-size checkpoint: halve and restart from the best point.
  check = is_check[i]
  oscillating = n_increase <= window[i] * s.rho
  stalled = ~c['reduced_last_check'] & (c['loss_best_last_check'] >= loss_best)
  reduce = check & (oscillating | stalled)
  return dict(
      x_cur=where_per_example(reduce, x_best, x_new), x_prev=c['x_cur'],
      grad=where_per_example(reduce, grad_best, grad),
      x_best=x_best, grad_best=grad_best, loss_best=loss_best, loss_prev=values,
      x_best_adv=where_per_example(correct, c['x_best_adv'], x_new), robust=c['robust'] & correct,
      step=jnp.where(reduce, 0.5 * c['step'], c['step']),
      n_increase=jnp.where(check, 0.0, n_increase),
      loss_best_last_check=jnp.where(check, loss_best, c['loss_best_last_check']),
      reduced_last_check=jnp.where(check, reduce, c['reduced_last_check']),
      trace=c['trace'].at[:, i + 1].set(loss_best))


def _apgd_unbroken(_, c):
  return c['robust']


def apgd_run(logits_fn: Callable, x: jax.Array, y: jax.Array, key: jax.Array, eps: float = 8 / 255,
             n_iter: int = 100, loss: str = 'ce', target_rank=None, rho: float = 0.75,
             momentum: float = 0.75, eot_iter: int = 1, stochastic: bool = False,
             host_loop: Optional[bool] = None, drop_broken: bool = False,
             sharding: Optional[NamedSharding] = None) -> ApgdResult:
  """One APGD run (Croce & Hein 2020, Alg. 1) on a batch; one restart.

  `target_rank` (2..num_classes) selects the target of the targeted losses: the
  class with that rank in the clean logits. `momentum` is APGD's alpha (0.75;
  the first step has none). `rho` is the oscillation threshold of checkpoint
  condition 1. Condition 1 compares the first step's loss with the start's (the
  reference code compares it with 0). `host_loop`: see `use_host_loop`.
  `drop_broken` (host loop only): examples misclassified once stop being iterated
  (their x_adv and `robust` are final; their loss and trace stop there), as
  AutoAttack needs only the verdict. `key`: one key, or one per example (`example_keys`).
  `sharding`: the one x, y and the keys are split with (the compacted batches are split the
  same way).
  """
  if loss not in LOSSES:
    raise ValueError(f'apgd: unknown loss {loss!r}; expected one of {LOSSES}')
  s = ApgdSettings(n_iter, loss, rho, momentum, eot_iter, stochastic)
  logits_fn = as_argument(logits_fn)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  keys = example_keys(jnp.asarray(key), x.shape[0])
  eps = jnp.asarray(eps, jnp.float32)
  rank = jnp.asarray(2 if target_rank is None else target_rank, jnp.int32)
  carry, targets, key_grad = jit_call(_apgd_init, s, logits_fn, x, y, keys, eps, rank)
  c = iterate(_apgd_body, s, (x, y, targets, key_grad, eps, logits_fn), carry, n_iter,
              use_host_loop(host_loop), active=_apgd_unbroken if drop_broken else None,
              per_example_args=4, sharding=sharding)
  x_adv = where_per_example(c['robust'], c['x_best'], c['x_best_adv'])
  return ApgdResult(jax.lax.stop_gradient(x_adv), c['robust'], c['loss_best'], c['trace'].T)
