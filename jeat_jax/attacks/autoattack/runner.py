"""AutoAttack (Croce & Hein 2020): the attacks in sequence, each on the points still robust.

Versions, as in fra31/auto-attack:
  standard: APGD-CE (100 iterations, no restarts), APGD-T (targeted DLR, 9 target
            classes), FAB-T (9 targets, 100 iterations), Square (5000 queries,
            p_init 0.8, the p schedule not rescaled to the query budget);
  plus:     AutoAttack+: APGD-CE and APGD-DLR with 5 restarts each, untargeted FAB
            with 5 restarts, Square (5000 queries), APGD-T and FAB-T (9 targets);
  rand:     APGD-CE and APGD-DLR, each with Expectation over Transformation
            (20 gradient draws per step), for randomised defences.

Between attacks, restarts and target classes the still-robust points are
compacted in numpy and processed in chunks of at most `batch_size`; a chunk is
padded (`apgd.padded_size`) so that only a few shapes are compiled, to a multiple of
the number of devices of the mesh, and split over all of them (every process runs the
host loop on the same points and places the shards of its own devices; the results are
gathered on every process). The model's variables are arguments of every compiled step
(`core.as_argument`), and each point draws its random numbers from a key of its own
(the pass's key folded with the point's index), so a point's verdict does not depend on
the chunk it is in, its padding or the number of devices. Inside an
attack every step is jitted; the steps run in one `lax` loop, or on CPU from a
Python loop (`apgd.use_host_loop`), which also sets aside the points broken
along the way (APGD: misclassified once; FAB: an image within eps found), as
Square does between segments of its queries. A point counts as broken only if
the model misclassifies the returned image and the image lies in the eps-ball
and in [0, 1].
"""
import concurrent.futures
import functools
import os
import time
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jeat_jax import parallel
from jeat_jax.attacks.autoattack.apgd import (apgd_run, call_logits, on_devices, pad_indices,
                                              to_host)
from jeat_jax.attacks.autoattack.fab import fab_run
from jeat_jax.attacks.autoattack.square import square
from jeat_jax.attacks.core import as_argument

VERSIONS = {
    'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
    'plus': ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'),
    'rand': ('apgd-ce', 'apgd-dlr'),
}
RESTARTS = {'plus': {'apgd-ce': 5, 'apgd-dlr': 5, 'fab': 5}}   # every other attack: 1
ATTACKS = ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square')
BALL_TOLERANCE = 1e-5


def _chunks(idx: np.ndarray, batch_size: int, streams: int = 1, multiple: int = 1):
  """(indices, padded indices) per chunk of at most batch_size, and at least `streams` chunks
  where there are as many points; padded to a multiple of `multiple` (the devices)."""
  size = min(batch_size, max(1, -(-len(idx) // streams)))
  for start in range(0, len(idx), size):
    sel = idx[start:start + size]
    yield sel, pad_indices(sel, batch_size, multiple)


def host_streams(streams: Optional[int] = None, devices: int = 1) -> int:
  """How many chunks run at once, each from its own host thread.

  On CPU a small batch (the few points still robust late in AutoAttack) keeps only
  ~1.5 of 2 cores busy: XLA:CPU parallelises within a convolution poorly at batch 5, and
  two batches of 5 from two threads ran at 1.37x the throughput of one (WRN-16-4 forward,
  2 cores; benchmarks/RESULTS.md). Each point's attack does not depend on the others', so
  splitting a pass into chunks changes no verdict. Default (None): one stream per core on
  CPU (at most 4), one elsewhere. On a mesh of several `devices` one: every chunk is split
  over all of them, and every process must issue its computations in the same order.
  """
  if devices > 1:
    return 1
  if streams is not None:
    return max(1, int(streams))
  return min(os.cpu_count() or 1, 4) if jax.default_backend() == 'cpu' else 1


@jax.jit
def point_keys(key: jax.Array, points: jax.Array) -> jax.Array:
  """fold_in(key, i) for each point index i: the key of each point in a pass."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(points)


@functools.partial(jax.jit, static_argnames=('stochastic',))
def _broken(logits_fn: Callable, x_adv: jax.Array, x: jax.Array, y: jax.Array, eps: float,
            keys: jax.Array, stochastic: bool = False) -> jax.Array:
  """Misclassified, inside the eps-ball and inside [0, 1]."""
  wrong = jnp.argmax(call_logits(logits_fn, x_adv, keys, stochastic), -1) != y
  dist = jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1)
  in_box = jnp.all(((x_adv >= 0.0) & (x_adv <= 1.0)).reshape(x.shape[0], -1), axis=1)
  return wrong & (dist <= eps + BALL_TOLERANCE) & in_box


@functools.partial(jax.jit, static_argnames=('stochastic',))
def _correct(logits_fn: Callable, x: jax.Array, y: jax.Array, keys: jax.Array,
             stochastic: bool = False) -> jax.Array:
  logits = call_logits(logits_fn, x, keys, stochastic)
  return jnp.argmax(logits, -1) == y


@jax.jit
def _within_eps(adv: jax.Array, norm: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  return jnp.where((norm <= eps)[:, None, None, None], adv, x)


def _attack_chunk(logits_fn: Callable, attack: str, settings: Dict, x: np.ndarray, y: np.ndarray,
                  keys: np.ndarray, check_keys: np.ndarray, rank, restart: int, eps: float,
                  sharding) -> Tuple[np.ndarray, np.ndarray]:
  """One pass (one target rank, one restart) of one attack on a chunk (host arrays, one key
  per point), split over the devices of `sharding`: (broken, adversarial candidates) in
  numpy on every process."""
  s = settings
  xd, yd, kd, cd = on_devices(sharding, x, y, keys, check_keys)
  if attack == 'square':
    adv = on_devices(sharding, square(logits_fn, x, y, keys, eps, s['n_queries'], s['p_init'],
                                      s['square_segment'], rescale_schedule=False,  # as fra31's
                                      sharding=sharding))
  elif attack in ('fab', 'fab-t'):
    adv, norm = fab_run(logits_fn, xd, yd, rank, s['fab_n_iter'], host_loop=s['host_loop'],
                        stop_norm=eps, key=kd, start_eps=eps if restart else 0.0,
                        sharding=sharding)
    adv = _within_eps(adv, norm, xd, eps)
  else:
    loss = {'apgd-ce': 'ce', 'apgd-dlr': 'dlr', 'apgd-t': 'dlr-targeted'}[attack]
    adv = apgd_run(logits_fn, xd, yd, kd, eps, s['n_iter'], loss, rank, s['rho'], 0.75,
                   s['eot_iter'], s['stochastic'], s['host_loop'], drop_broken=True,
                   sharding=sharding).x_adv
  return to_host((_broken(logits_fn, adv, xd, yd, eps, cd, s['stochastic']), adv))


def _attack_robust_points(logits_fn, attack, settings, x, y, robust, x_adv, *, eps, key, rank,
                          restart, batch_size, streams, sharding):
  """Runs one pass of `attack` on the robust points; updates `robust` and `x_adv` in place.
  The chunks run `streams` at a time, each from its own thread (`host_streams`). Point i
  draws from fold_in(key, i)."""
  k_attack, k_check = jax.random.split(key)

  def attack_chunk(sel, padded):
    keys, check_keys = (np.asarray(point_keys(k, padded)) for k in (k_attack, k_check))
    broken, adv = _attack_chunk(logits_fn, attack, settings, x[padded], y[padded], keys,
                                check_keys, rank, restart, eps, sharding)
    return sel, broken[:len(sel)], adv[:len(sel)]

  chunks = list(_chunks(np.flatnonzero(robust), batch_size, streams, sharding.num_devices))
  if streams > 1 and len(chunks) > 1:
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
      results = list(pool.map(lambda chunk: attack_chunk(*chunk), chunks))
  else:
    results = [attack_chunk(*chunk) for chunk in chunks]
  for sel, broken, adv in results:
    robust[sel[broken]] = False
    x_adv[sel[broken]] = adv[broken]


def run_autoattack(logits_fn: Callable, x, y, *, eps: float = 8 / 255, key: jax.Array,
                   version: str = 'standard', batch_size: int = 500,
                   log_fn: Optional[Callable[[str], None]] = None, attacks: Tuple[str, ...] = None,
                   n_iter: int = 100, n_target_classes: int = 9, fab_n_iter: int = 100,
                   n_queries: int = 5000, p_init: float = 0.8, rho: float = 0.75,
                   eot_iter: int = 20, stochastic: bool = False,
                   square_segment: int = 250, host_loop: Optional[bool] = None,
                   n_restarts: Optional[Dict[str, int]] = None,
                   streams: Optional[int] = None, mesh: Optional[Mesh] = None) -> Dict:
  """AutoAttack on (x, y): NHWC float images in [0, 1] and integer labels (numpy or jax; the
  same on every process).

  `logits_fn(images) -> logits` is pure and jax-traceable; with `stochastic`
  (version 'rand') it is `logits_fn(images, keys)`, one key per image. A
  `jax.tree_util.Partial` (`evaluate.model_logits`) passes its bound variables to the
  compiled steps as arguments; pass the same object again to reuse compiled code.
  `attacks` overrides the version's list (names in `ATTACKS`); the iteration counts
  default to the reference's. `n_restarts` (attack -> restarts) overrides the version's
  (`RESTARTS`); each restart attacks the points the previous ones left robust.
  `eot_iter` applies to version 'rand' only. `host_loop`: see `apgd.use_host_loop`;
  `streams`: see `host_streams`. `mesh` (default: every device, `parallel.make_mesh`):
  each chunk is split over its devices.

  Returns a dict: clean_accuracy, robust_accuracy, robust (bool [N] per-example
  mask), x_adv (adversarial images where found, else x), records (one per
  stage: name, robust_accuracy after it, seconds, points attacked), seconds,
  version, eps.
  """
  if version not in VERSIONS:
    raise ValueError(f'run_autoattack: version must be one of {tuple(VERSIONS)}, got {version!r}')
  attacks = tuple(attacks or VERSIONS[version])
  unknown = sorted(set(attacks) - set(ATTACKS))
  if unknown:
    raise ValueError(f'run_autoattack: unknown attacks {unknown}; expected names in {ATTACKS}')
  restarts = {**RESTARTS.get(version, {}), **(n_restarts or {})}
  sharding = parallel.sharded_on_first_axis(mesh or parallel.make_mesh())
  streams = host_streams(streams, sharding.num_devices)
  if stochastic and set(attacks) - {'apgd-ce', 'apgd-dlr'}:
    raise ValueError('run_autoattack: a stochastic logits_fn is supported by APGD only (version rand)')
  log = log_fn or (lambda _: None)
  logits_fn = as_argument(logits_fn)
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  n = len(x)
  settings = dict(n_iter=n_iter, rho=rho, fab_n_iter=fab_n_iter, stochastic=stochastic,
                  eot_iter=eot_iter if version == 'rand' else 1, host_loop=host_loop,
                  n_queries=n_queries, p_init=p_init, square_segment=square_segment)
  t_start = time.time()

  key, key_clean = jax.random.split(key)
  robust = np.zeros(n, bool)
  for sel, padded in _chunks(np.arange(n), batch_size, multiple=sharding.num_devices):
    xd, yd, kd = on_devices(sharding, x[padded], y[padded],
                            np.asarray(point_keys(key_clean, padded)))
    robust[sel] = to_host(_correct(logits_fn, xd, yd, kd, stochastic))[:len(sel)]
  clean_accuracy = float(robust.mean())
  records = [dict(name='clean', robust_accuracy=clean_accuracy, seconds=time.time() - t_start,
                  n_attacked=n)]
  log(f'autoattack {version} eps={eps:.5f}: clean accuracy {clean_accuracy:.2%} ({robust.sum()}/{n})')
  x_adv = x.copy()
  num_classes = None

  for a, attack in enumerate(attacks):
    t0, n_attacked = time.time(), int(robust.sum())
    k_attack = jax.random.fold_in(key, a)
    if n_attacked:
      if attack in ('apgd-t', 'fab-t'):
        if num_classes is None:
          num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + x.shape[1:],
                                                                       jnp.float32)).shape[-1]
        ranks = range(2, min(n_target_classes, num_classes - 1) + 2)
      else:
        ranks = (None,)
      for rank in ranks:
        for restart in range(restarts.get(attack, 1)):
          if not robust.any():
            break
          _attack_robust_points(logits_fn, attack, settings, x, y, robust, x_adv, eps=eps,
                                key=jax.random.fold_in(k_attack, 100 * restart + (rank or 0)),
                                rank=rank, restart=restart, batch_size=batch_size,
                                streams=streams, sharding=sharding)
    seconds = time.time() - t0
    records.append(dict(name=attack, robust_accuracy=float(robust.mean()), seconds=seconds,
                        n_attacked=n_attacked))
    log(f'autoattack {attack}: robust accuracy {robust.mean():.2%} ({robust.sum()}/{n}), '
        f'{seconds:.1f} s on {n_attacked} points')

  return dict(version=version, eps=eps, clean_accuracy=clean_accuracy,
              robust_accuracy=float(robust.mean()), robust=robust, x_adv=x_adv, records=records,
              seconds=time.time() - t_start)
