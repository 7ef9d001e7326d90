"""Selection rules: TopK, BatchTopK, and Sampled-SAE (BatchTopK inside a pool).

All rules keep only strictly positive entries and break ties by position: the
earlier token, then the lower latent index, wins. Every leading axis of `a` is
tokens; with `axis_name`, the tokens are split over that mapped axis (device
order = token order) and the result equals the single-device one on the
concatenated batch, bit for bit.

How the exact BatchTopK threshold is found without sorting all B·F entries:
each token offers its 2k largest entries as candidates (a per-row top-k, cheap
on every backend), and the N-th largest candidate t is the answer whenever no
token could have more entries above t than it offered — checked exactly, for
every token. Only when a token is that concentrated does an exact bisection on
the float bits run. Across devices only the B·2k candidates and a few scalars
travel, never the B·F activations.
"""

import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import pool as pool_lib
from sae_jax import scoring
from sae_jax import validation

# Candidates offered per token, in units of k.
CANDIDATE_FACTOR = 2


class Cut(typing.NamedTuple):
  """A selection by threshold: entries above `value`, plus entries equal to it
  at positions up to and including (`row`, `col`) in (token, latent) order."""
  value: jax.Array  # float32 scalar >= 0; 0 means "every positive entry"
  row: jax.Array  # int32, global token index
  col: jax.Array  # int32, latent index


class PooledSelection(typing.NamedTuple):
  """Sampled-SAE output in compact form: the pool and the values inside it."""
  pool: jax.Array  # [P] int32 latent indices, increasing
  values: jax.Array  # [..., P], zero outside the selection


def _axis_size(axis_name) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def _row_offset(n_rows: int, axis_name):
  """Global index of this shard's first token."""
  return 0 if axis_name is None else lax.axis_index(axis_name) * n_rows


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def _positive_f32(a_BxF):
  """+a where a > 0, else +0, as float32 (no gradient: selection is discrete)."""
  a_BxF = lax.stop_gradient(a_BxF).astype(jnp.float32)
  return jnp.where(a_BxF > 0, a_BxF, 0.0)


def selected(a_BxF, cut: Cut, row_offset, col_F=None):
  """The boolean mask of `cut` on `a_BxF` (columns numbered by `col_F`)."""
  n_rows, n_cols = a_BxF.shape
  row_Bx1 = (row_offset + jnp.arange(n_rows, dtype=jnp.int32))[:, None]
  col_1xF = (jnp.arange(n_cols, dtype=jnp.int32) if col_F is None else col_F)[None, :]
  before = (row_Bx1 < cut.row) | ((row_Bx1 == cut.row) & (col_1xF <= cut.col))
  tie = (a_BxF == cut.value) & (cut.value > 0) & before
  return (a_BxF > cut.value) | tie


def _bisect_threshold(a_BxF, n: int, lower, axis_name):
  """The n-th largest entry of a >= 0 by bisection on its float bits, or 0
  when fewer than n entries are positive. `lower` is a known lower bound."""
  bits_BxF = lax.bitcast_convert_type(a_BxF, jnp.int32)  # monotone for a >= +0

  def count_ge(t):  # clipped at n: only "is it >= n" matters, and no overflow
    return _psum(jnp.minimum(jnp.sum(bits_BxF >= t, dtype=jnp.int32), n), axis_name)

  lo = jnp.maximum(lax.bitcast_convert_type(lower, jnp.int32), 1)
  hi = jnp.max(bits_BxF) + 1
  hi = hi if axis_name is None else lax.pmax(hi, axis_name)

  def halve(bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ge = count_ge(mid) >= n
    return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid)

  lo, _ = lax.while_loop(lambda b: b[1] - b[0] > 1, halve, (lo, hi))
  return jnp.where(count_ge(lo) >= n, lax.bitcast_convert_type(lo, jnp.float32), 0.0)


def _nth_largest(a_BxF, k: int, axis_name):
  """The (B·k)-th largest entry of a >= 0 over the global batch, or 0 when
  fewer entries are positive."""
  n_rows, n_cols = a_BxF.shape
  n = n_rows * _axis_size(axis_name) * k
  c = min(n_cols, CANDIDATE_FACTOR * k)
  cand_BxC = lax.top_k(a_BxF, c)[0]
  cand = cand_BxC.reshape(-1)
  if axis_name is not None:
    cand = lax.all_gather(cand, axis_name, tiled=True, to="invarying")
  t = jnp.sort(cand)[cand.shape[0] - n]
  if c == n_cols:  # every entry is a candidate
    return t
  # An entry a token did not offer is at most its smallest offer, so if that
  # is <= t everywhere, no hidden entry lies above t and t is exact.
  smallest_offer_B = cand_BxC[:, -1]
  doubtful = jnp.sum(smallest_offer_B > t, dtype=jnp.int32)
  certified = _psum(doubtful, axis_name) == 0
  return lax.cond(certified, lambda: t,
                  lambda: _bisect_threshold(a_BxF, n, t, axis_name))


def _tie_cut(a_BxF, value, n: int, axis_name) -> Cut:
  """Where the ties at `value` stop, so that exactly min(n, #positive) entries
  are selected: the earliest ties by (token, latent) position are taken."""
  n_rows, _ = a_BxF.shape
  n_rows_global = n_rows * _axis_size(axis_name)
  n_above = _psum(jnp.minimum(jnp.sum(a_BxF > value, dtype=jnp.int32), n), axis_name)
  n_equal = _psum(jnp.minimum(jnp.sum(a_BxF == value, dtype=jnp.int32), n + 1), axis_name)
  need = n - n_above
  # Built from `need` so that, inside shard_map, it varies over devices
  # exactly when find_cut's result does.
  take_all = (need * 0 + n_rows_global, need * 0)

  def find_cut():
    ties_B = jnp.sum(a_BxF == value, axis=1, dtype=jnp.int32)
    incl_B = jnp.cumsum(ties_B)
    earlier = jnp.int32(0)
    if axis_name is not None:
      totals_D = lax.all_gather(jnp.minimum(incl_B[-1], n), axis_name, to="invarying")
      earlier = jnp.minimum(jnp.sum(jnp.where(
          jnp.arange(totals_D.shape[0]) < lax.axis_index(axis_name), totals_D, 0)), n)
    # Clipping at n >= need keeps every comparison with need and avoids overflow.
    excl_B = jnp.minimum(incl_B - ties_B, n) + earlier
    incl_B = jnp.minimum(incl_B, n) + earlier
    crossing_B = (excl_B < need) & (incl_B >= need)
    here = jnp.any(crossing_B)
    r = jnp.argmax(crossing_B)
    m = need - excl_B[r]
    c = jnp.argmax(jnp.cumsum(a_BxF[r] == value, dtype=jnp.int32) >= m).astype(jnp.int32)
    row = jnp.where(here, _row_offset(n_rows, axis_name) + r.astype(jnp.int32), 0)
    return _psum(row, axis_name), _psum(jnp.where(here, c, 0), axis_name)

  break_ties = (value > 0) & (n_equal > need)
  row, col = lax.cond(break_ties, find_cut, lambda: take_all)
  return Cut(value, row, col)


def batch_topk_cut(a_BxF, k: int, axis_name=None) -> Cut:
  """The exact cut of BatchTopK on a >= 0 float32 [B, F] (see `batch_topk`)."""
  n_rows, n_cols = a_BxF.shape
  if n_rows * n_cols >= 2**31:
    raise ValueError(
        f"a holds {n_rows} x {n_cols} entries per device; at most 2**31 - 1 are "
        "supported (int32 counts): split the batch further")
  n_rows_global = n_rows * _axis_size(axis_name)
  if k >= n_cols:  # the budget covers everything: keep every positive entry
    return Cut(jnp.float32(0), jnp.int32(n_rows_global), jnp.int32(0))
  value = _nth_largest(a_BxF, k, axis_name)
  return _tie_cut(a_BxF, value, n_rows_global * k, axis_name)


def _tokens_by_latents(a):
  validation.check_activations(a)
  return a.reshape(-1, a.shape[-1])


@functools.partial(jax.jit, static_argnames=("k",))
def topk(a: jax.Array, k: int) -> jax.Array:
  """TopK: each token keeps its own k largest positive entries.

  Args:
    a: [..., F] pre-selection activations; every leading axis is tokens.
    k: latents per token, an int in [1, F].

  Returns:
    An array like `a`, zero outside the selection.

  >>> topk(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 2)
  Array([[0., 3., 2.],
         [0., 0., 5.]], dtype=float32)
  """
  a_BxF = _tokens_by_latents(a)
  k = validation.check_k(k, a.shape[-1])
  pos_BxF = _positive_f32(a_BxF)
  values_BxK, index_BxK = lax.top_k(pos_BxF, k)
  kth_Bx1, kth_col_Bx1 = values_BxK[:, -1:], index_BxK[:, -1:]
  col_1xF = jnp.arange(a.shape[-1], dtype=jnp.int32)[None, :]
  # lax.top_k takes equal entries lower index first, so the tied entries it
  # kept are exactly those up to the column of the k-th.
  keep_BxF = (pos_BxF > kth_Bx1) | ((pos_BxF == kth_Bx1) & (col_1xF <= kth_col_Bx1))
  keep_BxF &= pos_BxF > 0
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)


@functools.partial(jax.jit, static_argnames=("k", "axis_name"))
def batch_topk(a: jax.Array, k: int, *, axis_name=None) -> jax.Array:
  """BatchTopK: the batch keeps its N = B·k largest positive entries.

  Exactly min(N, number of positive entries) entries are kept; a token may
  keep more or fewer than k.

  Args:
    a: [..., F] pre-selection activations; every leading axis is tokens.
    k: latents per token on average, an int in [1, F].
    axis_name: mapped axis the tokens are split over; with it, B and the
      selection span the whole (concatenated) batch.

  Returns:
    An array like `a`, zero outside the selection.

  >>> batch_topk(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1)
  Array([[0., 3., 0.],
         [0., 0., 5.]], dtype=float32)
  """
  a_BxF = _tokens_by_latents(a)
  k = validation.check_k(k, a.shape[-1])
  pos_BxF = _positive_f32(a_BxF)
  cut = batch_topk_cut(pos_BxF, k, axis_name)
  keep_BxF = selected(pos_BxF, cut, _row_offset(a_BxF.shape[0], axis_name))
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)


def _shared_key(key, axis_name):
  """Under `axis_name`, every device uses the first device's key."""
  if key is None or axis_name is None:
    return key
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(key) if typed else key
  data = lax.all_gather(data, axis_name, to="invarying")[0]
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


def _sampled_cut(a, k, l, score, key, axis_name):
  """Validates, then returns (a_BxF, pool_P, cut in pool positions)."""
  a_BxF = _tokens_by_latents(a)
  n_latents = a.shape[-1]
  k = validation.check_k(k, n_latents)
  l = validation.check_l(l)
  validation.check_score(score, key)
  pos_BxF = _positive_f32(a_BxF)
  scores_F = scoring.column_scores(pos_BxF, score, axis_name=axis_name)
  pool_P = pool_lib.candidate_pool(
      scores_F, validation.pool_size(k, l, n_latents), key=_shared_key(key, axis_name))
  cut = batch_topk_cut(jnp.take(pos_BxF, pool_P, axis=1), k, axis_name)
  return a_BxF, pool_P, cut


@functools.partial(jax.jit, static_argnames=("k", "l", "score", "axis_name"))
def sampled_select_pooled(a: jax.Array, k: int, l: float, *, score: str = "l2",
                          key=None, axis_name=None) -> PooledSelection:
  """Sampled-SAE in compact form: the pool and the [..., P] selected values.

  Same selection as `sampled_select`, without scattering into [..., F]: a
  training step can decode with `values @ W_dec[pool]`.

  >>> sel = sampled_select_pooled(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1, 2)
  >>> sel.pool, sel.values
  (Array([1, 2], dtype=int32), Array([[3., 0.],
         [0., 5.]], dtype=float32))
  """
  a_BxF, pool_P, cut = _sampled_cut(a, k, l, score, key, axis_name)
  a_BxP = jnp.take(a_BxF, pool_P, axis=1)
  keep_BxP = selected(_positive_f32(a_BxP), cut, _row_offset(a_BxF.shape[0], axis_name))
  values_BxP = jnp.where(keep_BxP, a_BxP, 0)
  return PooledSelection(pool_P, values_BxP.reshape(a.shape[:-1] + pool_P.shape))


@functools.partial(jax.jit, static_argnames=("k", "l", "score", "axis_name"))
def sampled_select(a: jax.Array, k: int, l: float, *, score: str = "l2",
                   key=None, axis_name=None) -> jax.Array:
  """Sampled-SAE: score columns, pool P = min(F, ceil(k·l)), BatchTopK inside.

  Args:
    a: [..., F] pre-selection activations; every leading axis is tokens.
    k: latents per token on average, an int in [1, F].
    l: pool size factor, a finite float >= 1. l = 1: the pool is k columns;
      l >= F / k: the pool is everything and this is `batch_topk`.
    score: column score, one of "l2", "squared_l2", "entropy", "uniform".
    key: PRNG key. Without it the pool is the P top-scoring columns; with it
      P columns are drawn without replacement with probability proportional
      to score. Under `axis_name` the first device's key is used everywhere.
    axis_name: mapped axis the tokens are split over; with it, scores, pool
      and budget span the whole (concatenated) batch.

  Returns:
    An array like `a`, zero outside the selection. The gradient flows to the
    selected entries only.

  >>> sampled_select(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1, 1)
  Array([[0., 0., 0.],
         [0., 0., 5.]], dtype=float32)
  """
  a_BxF, pool_P, cut = _sampled_cut(a, k, l, score, key, axis_name)
  # Apply the pooled cut to the dense array: no scatter, columns renamed.
  in_pool_F = jnp.zeros(a.shape[-1], bool).at[pool_P].set(True)
  cut = cut._replace(col=pool_P[cut.col])
  keep_BxF = in_pool_F[None, :] & selected(
      _positive_f32(a_BxF), cut, _row_offset(a_BxF.shape[0], axis_name))
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)
