"""Square attack, l_inf: Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack:
a query-efficient black-box adversarial attack via random search" (ECCV), Alg. 1-2.

A score-based random search on the vertices of the eps-ball. It starts from
vertical stripes of +-eps (one sign per example, column and channel) and at
every query proposes to overwrite one random square window, of side
s = round(sqrt(p * H * W)), with +-2 eps per channel (then projected back
onto the ball and [0, 1]); the proposal is kept when it lowers the margin
loss z_y - max_{k!=y} z_k, or misclassifies. The fraction p starts at p_init
and halves at fixed query counts (the schedule of the paper, for 10000 queries; with
`rescale_schedule`, as the reference's Square class by default, stretched to n_queries;
AutoAttack's 5000-query Square does not rescale). Each example draws its own window and signs,
from its own key (`core.example_keys`), whatever batch it is in.
The search is a forward-only `lax.while_loop` (no gradient, so XLA:CPU's slow
path for convolution gradients in loops does not apply) that stops once every
example is misclassified; only examples with a positive margin change.
"""
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jeat_jax.attacks.autoattack.apgd import (fold_in_each, num_devices, on_devices, pad_indices,
                                              split_each, to_host)
from jeat_jax.attacks.core import as_argument, cw_margin, example_keys, project_linf

P_SCHEDULE_QUERIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)   # of 10000


class SquareState(NamedTuple):
  x_best: jax.Array      # current point of the search, a vertex of the ball (up to [0, 1])
  margin: jax.Array      # [B] z_y - max_{k!=y} z_k at x_best; <= 0 means fooled
  query: jax.Array       # number of proposals made so far


def margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{k!=y} z_k: positive while correctly classified (Square's loss, to minimise)."""
  return -cw_margin(logits, labels, kappa=jnp.inf)


def window_sides(n_queries: int, p_init: float, height: int, width: int) -> np.ndarray:
  """Side of the square at each level of the p schedule (level = halvings of p)."""
  p = p_init / 2.0 ** np.arange(len(P_SCHEDULE_QUERIES) + 1)
  return np.maximum(np.round(np.sqrt(p * height * width)).astype(np.int32), 1)


def schedule_level(query: jax.Array, n_queries: int, rescale: bool) -> jax.Array:
  """How many times p has been halved at this query: the schedule's query counts are of
  10000 queries; `rescale` maps n_queries onto them (a 5000-query run halves twice as
  fast), else they are taken as they are (a 5000-query run stops half way through)."""
  if rescale:
    query = (query * 10000) // n_queries
  return jnp.sum(query > jnp.asarray(P_SCHEDULE_QUERIES, jnp.int32))


def stripes_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """x + eps * (+-1 per example, column and channel), clipped to [0, 1] (vertical stripes).
  `key`: one, or one per example."""
  _, _, width, channels = x.shape
  signs = jax.vmap(lambda k: jnp.where(jax.random.bernoulli(k, 0.5, (1, width, channels)),
                                       1.0, -1.0))(example_keys(key, x.shape[0]))
  return jnp.clip(x + eps * signs, 0.0, 1.0)


def square_proposal(key: jax.Array, x_best: jax.Array, x: jax.Array, eps: float,
                    side: jax.Array) -> jax.Array:
  """x_best with one random s x s window per example set to +-2 eps per channel, projected.
  `key`: one, or one per example."""
  _, height, width, channels = x.shape
  rows = jnp.arange(height).reshape(height, 1, 1)
  cols = jnp.arange(width).reshape(1, width, 1)

  def window_step(k):
    k_row, k_col, k_sign = jax.random.split(k, 3)
    row = jax.random.randint(k_row, (), 0, jnp.maximum(height - side, 1))
    col = jax.random.randint(k_col, (), 0, jnp.maximum(width - side, 1))
    signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (1, 1, channels)), 1.0, -1.0)
    window = (rows >= row) & (rows < row + side) & (cols >= col) & (cols < col + side)
    return window * (2.0 * eps) * signs

  return project_linf(x_best + jax.vmap(window_step)(example_keys(key, x.shape[0])), x, eps)


@jax.jit
def square_init(logits_fn: Callable, x: jax.Array, y: jax.Array, keys: jax.Array,
                eps: float) -> SquareState:
  """The stripes start and its margin (`keys`: one per example)."""
  x_best = stripes_start(keys, x, eps)
  return SquareState(x_best, margin_loss(logits_fn(x_best), y), jnp.asarray(0, jnp.int32))


@functools.partial(jax.jit, static_argnames=('n_queries', 'p_init', 'max_steps',
                                             'rescale_schedule'))
def square_steps(logits_fn: Callable, x: jax.Array, y: jax.Array, keys: jax.Array,
                 state: SquareState, eps: float = 8 / 255, n_queries: int = 5000,
                 p_init: float = 0.8, max_steps: int = None,
                 rescale_schedule: bool = True) -> SquareState:
  """Random-search steps from `state` until n_queries proposals, all examples fooled,
  or `max_steps` more steps (a segment, so that a caller can drop fooled examples in
  between). As in the reference, the start's evaluation is not counted. An example's
  proposal at query q is drawn from fold_in(its key, q).
  """
  sides = jnp.asarray(window_sides(n_queries, p_init, x.shape[1], x.shape[2]))
  stop = n_queries if max_steps is None else jnp.minimum(state.query + max_steps, n_queries)

  def cond(s):
    return (s.query < stop) & jnp.any(s.margin > 0)

  def body(s):
    side = sides[schedule_level(s.query, n_queries, rescale_schedule)]
    x_new = square_proposal(fold_in_each(keys, s.query), s.x_best, x, eps, side)
    margin = margin_loss(logits_fn(x_new), y)
    accept = (s.margin > 0) & (margin < s.margin)        # lower margin (<= 0: fooled)
    x_best = jnp.where(accept[:, None, None, None], x_new, s.x_best)
    return SquareState(x_best, jnp.where(accept, margin, s.margin), s.query + 1)

  return jax.lax.while_loop(cond, body, state)


def square(logits_fn: Callable, x, y, key: jax.Array, eps: float = 8 / 255,
           n_queries: int = 5000, p_init: float = 0.8, segment: int = 250,
           rescale_schedule: bool = True,
           sharding: Optional[NamedSharding] = None) -> np.ndarray:
  """Square attack (l_inf, margin loss, one restart); returns the adversarial images
  (numpy, on every process). `rescale_schedule` as the reference class (default on;
  AutoAttack turns it off). x, y: host arrays (the same on every process); `key`: one, or
  one per example.

  The queries run in segments of `segment` (each one `lax.while_loop`); between
  segments the examples already fooled are dropped in numpy and the rest padded
  (`padded_size`), so that late queries cost only the unfooled examples. With a
  `sharding` every segment is split over its devices (x padded to a multiple of their
  number). Examples never fooled return the last point of their search (in the ball).
  """
  logits_fn = as_argument(logits_fn)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  k_init, k_steps = (np.asarray(k) for k in split_each(example_keys(jnp.asarray(key), len(x)), 2))
  state = square_init(logits_fn, *on_devices(sharding, x, y, k_init), eps)
  x_best, margin = (np.array(a) for a in to_host((state.x_best, state.margin)))
  for query in range(0, n_queries, segment):
    active = np.flatnonzero(margin > 0)
    if not len(active):
      break
    idx = pad_indices(active, len(x), num_devices(sharding))
    xs, ys, ks, x_start, margin_start = on_devices(sharding, x[idx], y[idx], k_steps[idx],
                                                   x_best[idx], margin[idx])
    state = square_steps(logits_fn, xs, ys, ks,
                         SquareState(x_start, margin_start, jnp.asarray(query, jnp.int32)), eps,
                         n_queries, p_init, segment, rescale_schedule)
    found, margins = to_host((state.x_best, state.margin))
    x_best[active], margin[active] = found[:len(active)], margins[:len(active)]
  return x_best
