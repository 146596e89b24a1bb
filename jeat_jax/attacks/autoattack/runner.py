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
padded (`apgd.padded_size`) so that only a few shapes are compiled. Inside an
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

from jeat_jax.attacks.autoattack.apgd import apgd_run, call_logits, pad_indices
from jeat_jax.attacks.autoattack.fab import fab_run
from jeat_jax.attacks.autoattack.square import square

VERSIONS = {
    'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
    'plus': ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'),
    'rand': ('apgd-ce', 'apgd-dlr'),
}
RESTARTS = {'plus': {'apgd-ce': 5, 'apgd-dlr': 5, 'fab': 5}}   # every other attack: 1
ATTACKS = ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square')
BALL_TOLERANCE = 1e-5


def _chunks(idx: np.ndarray, batch_size: int, streams: int = 1):
  """(indices, padded indices) per chunk of at most batch_size, and at least `streams` chunks
  where there are as many points."""
  size = min(batch_size, max(1, -(-len(idx) // streams)))
  for start in range(0, len(idx), size):
    sel = idx[start:start + size]
    yield sel, pad_indices(sel, batch_size)


def host_streams(streams: Optional[int] = None) -> int:
  """How many chunks run at once, each from its own host thread.

  On CPU a small batch (the few points still robust late in AutoAttack) keeps only
  ~1.5 of 2 cores busy: XLA:CPU parallelises within a convolution poorly at batch 5, and
  two batches of 5 from two threads ran at 1.37x the throughput of one (WRN-16-4 forward,
  2 cores; benchmarks/RESULTS.md). Each point's attack does not depend on the others', so
  splitting a pass into chunks changes no verdict. Default (None): one stream per core on
  CPU (at most 4), one elsewhere.
  """
  if streams is not None:
    return max(1, int(streams))
  return min(os.cpu_count() or 1, 4) if jax.default_backend() == 'cpu' else 1


@functools.partial(jax.jit, static_argnames=('logits_fn', 'stochastic'))
def _broken(logits_fn: Callable, x_adv: jax.Array, x: jax.Array, y: jax.Array, eps: float,
            key: jax.Array, stochastic: bool = False) -> jax.Array:
  """Misclassified, inside the eps-ball and inside [0, 1]."""
  wrong = jnp.argmax(call_logits(logits_fn, x_adv, key, stochastic), -1) != y
  dist = jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1)
  in_box = jnp.all(((x_adv >= 0.0) & (x_adv <= 1.0)).reshape(x.shape[0], -1), axis=1)
  return wrong & (dist <= eps + BALL_TOLERANCE) & in_box


@functools.partial(jax.jit, static_argnames=('logits_fn', 'stochastic'))
def _correct(logits_fn: Callable, x: jax.Array, y: jax.Array, key: jax.Array,
             stochastic: bool = False) -> jax.Array:
  logits = call_logits(logits_fn, x, key, stochastic)
  return jnp.argmax(logits, -1) == y


def _attack_chunk(logits_fn: Callable, attack: str, settings: Dict, x: jax.Array, y: jax.Array,
                  key: jax.Array, rank, restart: int, eps: float) -> jax.Array:
  """One pass (one target rank, one restart) of one attack on a chunk: adversarial candidates."""
  s = settings
  if attack == 'square':
    return square(logits_fn, x, y, key, eps, s['n_queries'], s['p_init'], s['square_segment'],
                  rescale_schedule=False)  # as fra31/auto-attack's Square
  if attack in ('fab', 'fab-t'):
    adv, norm = fab_run(logits_fn, x, y, rank, s['fab_n_iter'], host_loop=s['host_loop'],
                        stop_norm=eps, key=key, start_eps=eps if restart else 0.0)
    return jnp.where((norm <= eps)[:, None, None, None], adv, x)
  loss = {'apgd-ce': 'ce', 'apgd-dlr': 'dlr', 'apgd-t': 'dlr-targeted'}[attack]
  return apgd_run(logits_fn, x, y, key, eps, s['n_iter'], loss, rank, s['rho'], 0.75,
                  s['eot_iter'], s['stochastic'], s['host_loop'], drop_broken=True).x_adv


def _attack_robust_points(logits_fn, attack, settings, x, y, robust, x_adv, *, eps, key, rank,
                          restart, batch_size, stochastic, streams):
  """Runs one pass of `attack` on the robust points; updates `robust` and `x_adv` in place.
  The chunks run `streams` at a time, each from its own thread (`host_streams`)."""
  def attack_chunk(c, sel, padded):
    k_attack, k_check = jax.random.split(jax.random.fold_in(key, c))
    xb, yb = jnp.asarray(x[padded]), jnp.asarray(y[padded])
    adv = _attack_chunk(logits_fn, attack, settings, xb, yb, k_attack, rank, restart, eps)
    broken = np.asarray(_broken(logits_fn, adv, xb, yb, eps, k_check, stochastic))[:len(sel)]
    return sel, broken, np.asarray(adv)[:len(sel)]

  chunks = list(_chunks(np.flatnonzero(robust), batch_size, streams))
  if streams > 1 and len(chunks) > 1:
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
      results = list(pool.map(lambda c: attack_chunk(c, *chunks[c]), range(len(chunks))))
  else:
    results = [attack_chunk(c, *chunk) for c, chunk in enumerate(chunks)]
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
                   streams: Optional[int] = None) -> Dict:
  """AutoAttack on (x, y): NHWC float images in [0, 1] and integer labels (numpy or jax).

  `logits_fn(images) -> logits` is pure and jax-traceable; with `stochastic`
  (version 'rand') it is `logits_fn(images, key)`. Pass the same function object
  again to reuse compiled code. `attacks` overrides the version's list (names in
  `ATTACKS`); the iteration counts default to the reference's. `n_restarts`
  (attack -> restarts) overrides the version's (`RESTARTS`); each restart attacks
  the points the previous ones left robust. `eot_iter` applies to version 'rand'
  only. `host_loop`: see `apgd.use_host_loop`; `streams`: see `host_streams`.

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
  streams = host_streams(streams)
  if stochastic and set(attacks) - {'apgd-ce', 'apgd-dlr'}:
    raise ValueError('run_autoattack: a stochastic logits_fn is supported by APGD only (version rand)')
  log = log_fn or (lambda _: None)
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  n = len(x)
  settings = dict(n_iter=n_iter, rho=rho, fab_n_iter=fab_n_iter, stochastic=stochastic,
                  eot_iter=eot_iter if version == 'rand' else 1, host_loop=host_loop,
                  n_queries=n_queries, p_init=p_init, square_segment=square_segment)
  t_start = time.time()

  key, key_clean = jax.random.split(key)
  robust = np.zeros(n, bool)
  for c, (sel, padded) in enumerate(_chunks(np.arange(n), batch_size)):
    robust[sel] = np.asarray(_correct(logits_fn, jnp.asarray(x[padded]), jnp.asarray(y[padded]),
                                      jax.random.fold_in(key_clean, c), stochastic))[:len(sel)]
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
                                stochastic=stochastic, streams=streams)
    seconds = time.time() - t0
    records.append(dict(name=attack, robust_accuracy=float(robust.mean()), seconds=seconds,
                        n_attacked=n_attacked))
    log(f'autoattack {attack}: robust accuracy {robust.mean():.2%} ({robust.sum()}/{n}), '
        f'{seconds:.1f} s on {n_attacked} points')

  return dict(version=version, eps=eps, clean_accuracy=clean_accuracy,
              robust_accuracy=float(robust.mean()), robust=robust, x_adv=x_adv, records=records,
              seconds=time.time() - t_start)
