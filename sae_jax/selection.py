"""Selection rules: TopK, BatchTopK, and Sampled-SAE (BatchTopK inside a pool).

All rules keep only strictly positive entries and break ties by position: the
earlier token, then the lower latent index, wins. Every leading axis of `a` is
tokens; with `axis_name`, the tokens are split over that mapped axis (device
order = token order) and the result equals the single-device one on the
concatenated batch, bit for bit. BatchTopK's budget is applied by its exact
cut (`cut.py`), inside the pool for Sampled-SAE.
"""

import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import cut as cut_lib
from sae_jax import pool as pool_lib
from sae_jax import scoring
from sae_jax import validation


class PooledSelection(typing.NamedTuple):
  """Sampled-SAE output in compact form: the pool and the values inside it."""
  pool: jax.Array  # [P] int32 latent indices, increasing
  values: jax.Array  # [..., P], zero outside the selection


def _f32(a_BxF):
  """The values selection looks at: float32, no gradient (it is discrete)."""
  return lax.stop_gradient(a_BxF).astype(jnp.float32)


def take_columns(x_RxF, cols_C, fill_value=None):
  """x_RxF[:, cols_C] ([R, C]); a column past the last is `fill_value`
  (None: jnp.take's, NaN for floats).

  Written as a gather of each row's own entries (take_along_axis), which
  XLA:CPU writes row by row. `x[:, cols]` gathers column by column into a
  transposed [C, R] buffer and copies it back, which is slower on CPU
  (docs/speed.md has the measurements).
  """
  cols_RxC = jnp.broadcast_to(cols_C[None, :], (x_RxF.shape[0], cols_C.shape[0]))
  return jnp.take_along_axis(x_RxF, cols_RxC, axis=1, mode="fill", fill_value=fill_value)


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
  return topk_columns(a, k)[0]


def topk_columns(a: jax.Array, k: int) -> tuple:
  """`topk`'s codes, and each token's k columns that hold them ([..., k],
  int32, the order of `cut.top_k`): every code it keeps is in one."""
  a_BxF = _tokens_by_latents(a)
  k = validation.check_k(k, a.shape[-1])
  x_BxF = _f32(a_BxF)
  values_BxK, index_BxK = cut_lib.top_k(x_BxF, k)
  kth_Bx1, kth_col_Bx1 = values_BxK[:, -1:], index_BxK[:, -1:]
  col_1xF = jnp.arange(a.shape[-1], dtype=jnp.int32)[None, :]
  # lax.top_k takes equal entries lower index first, so the tied entries it
  # kept are exactly those up to the column of the k-th.
  keep_BxF = (x_BxF > kth_Bx1) | ((x_BxF == kth_Bx1) & (col_1xF <= kth_col_Bx1))
  keep_BxF &= x_BxF > 0
  return (jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape),
          index_BxK.reshape(*a.shape[:-1], k))


# Bytes of float32 rows one block of `topk_by_bits` takes on CPU: its
# counting passes then read from cache (on other backends, one block).
BITS_BLOCK_BYTES = 3 * 2**19


def _topk_mask_by_bits(x_BxF, k: int):
  """`topk`'s mask on float32 rows, each row's k-th largest entry found by
  bisection on its bits."""
  # Non-negative floats order as their bits do; negative ones (and -0) have
  # negative bits and are never counted or kept.
  bits_BxF = lax.bitcast_convert_type(x_BxF, jnp.int32)
  # Counted in int32: jaxlib 0.10.2 sends a float sum to a library
  # reduction on CPU, and writes the compared rows out for it (docs/speed.md).
  count = lambda t_B: jnp.sum(bits_BxF >= t_B[:, None], axis=1, dtype=jnp.int32)

  # A row's k-th largest entry is the largest t with at least k entries >= t:
  # lo has (n_lo of them), hi has fewer. A row is done when n_lo is k (its
  # entries >= lo are its top k) or the range holds one value, t; a block
  # stops when all its rows are done, after at most 31 halvings of
  # [1, 2**31 - 1). A row with fewer than k positive entries keeps them all
  # (lo = 0: no ties are kept at 0).
  # (The bounds vary over shard_map's devices as the data does.)
  one_B = 1 + 0 * bits_BxF[:, 0]
  n_lo_B = count(one_B)
  enough_B = n_lo_B >= k
  bounds = (jnp.where(enough_B, 1, 0), jnp.where(enough_B, 2**31 - 1, 1), n_lo_B)

  def halve(bounds):
    lo_B, hi_B, n_lo_B = bounds
    mid_B = lo_B + (hi_B - lo_B) // 2
    n_mid_B = count(mid_B)
    ge_B = n_mid_B >= k
    return (jnp.where(ge_B, mid_B, lo_B), jnp.where(ge_B, hi_B, mid_B),
            jnp.where(ge_B, n_mid_B, n_lo_B))

  running = lambda bounds: jnp.any((bounds[2] != k) & (bounds[1] - bounds[0] > 1))
  # Entries above the final lo are kept, and those at it while there is room.
  cut_Bx1 = lax.while_loop(running, halve, bounds)[0][:, None]
  above_BxF = bits_BxF > cut_Bx1
  tie_BxF = (bits_BxF == cut_Bx1) & (cut_Bx1 > 0)
  room_Bx1 = k - jnp.sum(above_BxF, axis=1, keepdims=True, dtype=jnp.int32)
  # Equal entries are taken lower index first, as `topk` takes them; the
  # running count is needed only where a row has more ties than room.
  tie_BxF = lax.cond(
      jnp.any(jnp.sum(tie_BxF, axis=1, keepdims=True, dtype=jnp.int32) > room_Bx1),
      lambda t: t & (jnp.cumsum(t, axis=1, dtype=jnp.int32) <= room_Bx1), lambda t: t, tie_BxF)
  return above_BxF | tie_BxF


def topk_by_bits(a_BxF: jax.Array, k: int) -> jax.Array:
  """`topk` of [B, F], bit for bit, by bisection on the float bits (at
  most 32 counting passes over each row) instead of a per-row top-k. A
  block of rows stops as soon as each of its rows has found its top k or
  has fewer than k positive entries.

  Cheaper when k is a large share of F, as AuxK's D/2 among the dead
  latents is (`auxk.BITS_UP_TO`; docs/speed.md has the measurements). On
  CPU the rows run in blocks of about `BITS_BLOCK_BYTES`.
  """
  n_rows, n_cols = a_BxF.shape
  k = validation.check_k(k, n_cols)
  x_BxF = _f32(a_BxF)
  if k == n_cols:
    return jnp.where(x_BxF > 0, a_BxF, 0)
  rows = n_rows
  if jax.default_backend() == "cpu":
    rows = max(1, min(n_rows, BITS_BLOCK_BYTES // (4 * n_cols)))
  if rows == n_rows:
    keep_BxF = _topk_mask_by_bits(x_BxF, k)
  else:
    n_blocks = -(-n_rows // rows)
    padded_NxRxF = jnp.pad(x_BxF, ((0, n_blocks * rows - n_rows), (0, 0))).reshape(
        n_blocks, rows, n_cols)
    keep_BxF = lax.map(lambda x_RxF: _topk_mask_by_bits(x_RxF, k), padded_NxRxF).reshape(
        -1, n_cols)[:n_rows]
  return jnp.where(keep_BxF, a_BxF, 0)


@functools.partial(jax.jit, static_argnames=("k", "axis_name", "search"))
def batch_topk(a: jax.Array, k: int, *, axis_name=None, search: str = "auto") -> jax.Array:
  """BatchTopK: the batch keeps its N = B·k largest positive entries.

  Exactly min(N, number of positive entries) entries are kept; a token may
  keep more or fewer than k.

  Args:
    a: [..., F] pre-selection activations; every leading axis is tokens.
    k: latents per token on average, an int in [1, F].
    axis_name: mapped axis the tokens are split over; with it, B and the
      selection span the whole (concatenated) batch.
    search: how the threshold is found (`cut.SEARCHES`): "auto" bisects over
      every entry when a device holds at most `cut.BISECT_ENTRIES` (passes over
      `a` are cheap then), else certifies it from each token's offers;
      "bisect" and "offers" force one way. The result is the same.

  Returns:
    An array like `a`, zero outside the selection.

  >>> batch_topk(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1)
  Array([[0., 3., 0.],
         [0., 0., 5.]], dtype=float32)
  """
  a_BxF = _tokens_by_latents(a)
  k = validation.check_k(k, a.shape[-1])
  x_BxF = _f32(a_BxF)
  cut = cut_lib.batch_topk_cut(x_BxF, k, axis_name, search=search)
  keep_BxF = cut_lib.selected(x_BxF, cut, cut_lib.row_offset(a_BxF.shape[0], axis_name))
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)


def _pool(a_BxF, k: int, l: float, score, key, axis_name, ridge, sketch, sketch_key, bias=None):
  """The Sampled-SAE pool [P] of a validated [B, F] (see `sampled_pool`)."""
  scores_F = scoring.column_scores(_f32(a_BxF), score, axis_name=axis_name, ridge=ridge,
                                   sketch=sketch, key=sketch_key,
                                   bias=None if bias is None else _f32(bias))
  return pool_lib.candidate_pool(scores_F, validation.pool_size(k, l, a_BxF.shape[-1]),
                                 key=scoring.shared_key(key, axis_name))


def _check_sampled(a, k, l, score, key):
  a_BxF = _tokens_by_latents(a)
  k = validation.check_k(k, a.shape[-1])
  l = validation.check_l(l)
  validation.check_score(score, key)
  return a_BxF, k, l


@functools.partial(jax.jit, static_argnames=("k", "l", "score", "axis_name", "ridge", "sketch"))
def sampled_pool(a: jax.Array, k: int, l: float, *, score: str = "l2", key=None,
                 axis_name=None, ridge: float = scoring.LEVERAGE_RIDGE,
                 sketch: typing.Optional[int] = None, sketch_key=None,
                 bias=None) -> jax.Array:
  """The Sampled-SAE candidate pool alone: [P] int32 latents, increasing.

  The arguments are `sampled_select`'s. Pass the result as `pool=` to
  select in it on later batches without scoring them (the authors'
  `sampling_update_freq`). With `bias` [F], the pool of a + bias
  (`column_scores`' bias): the fast step scores the encoder's product and
  b_enc so.

  >>> sampled_pool(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1, 2)
  Array([1, 2], dtype=int32)
  """
  a_BxF, k, l = _check_sampled(a, k, l, score, key)
  validation.check_bias(bias, a.shape[-1])
  return _pool(a_BxF, k, l, score, key, axis_name, ridge, sketch, sketch_key, bias)


def _sampled_cut(a, k, l, score, key, axis_name, ridge, sketch, sketch_key, pool, search):
  """Validates, then returns (a_BxF, pool_P, a_BxP = a_BxF[:, pool_P], cut in
  pool positions)."""
  a_BxF, k, l = _check_sampled(a, k, l, score, key)
  size = validation.pool_size(k, l, a.shape[-1])
  if pool is None:
    pool_P = _pool(a_BxF, k, l, score, key, axis_name, ridge, sketch, sketch_key)
  else:
    if getattr(pool, "shape", None) != (size,) or not jnp.issubdtype(pool.dtype, jnp.integer):
      raise ValueError(f"pool must be an int array of shape ({size},) (P = min(F, ceil(k·l))); "
                       f"got shape {getattr(pool, 'shape', None)}, dtype "
                       f"{getattr(pool, 'dtype', None)}")
    pool_P = jnp.sort(pool.astype(jnp.int32))  # in column order: ties break as batch_topk's
  a_BxP = take_columns(a_BxF, pool_P)
  cut = cut_lib.batch_topk_cut(_f32(a_BxP), k, axis_name, search=search)
  return a_BxF, pool_P, a_BxP, cut


_SAMPLED_STATIC = ("k", "l", "score", "axis_name", "ridge", "sketch", "search")


@functools.partial(jax.jit, static_argnames=_SAMPLED_STATIC)
def sampled_select_pooled(a: jax.Array, k: int, l: float, *, score: str = "l2",
                          key=None, axis_name=None, ridge: float = scoring.LEVERAGE_RIDGE,
                          sketch: typing.Optional[int] = None, sketch_key=None,
                          pool=None, search: str = "auto") -> PooledSelection:
  """Sampled-SAE in compact form: the pool and the [..., P] selected values.

  Same selection as `sampled_select`, without scattering into [..., F]: a
  training step can decode with `values @ W_dec[pool]`.

  >>> sel = sampled_select_pooled(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1, 2)
  >>> sel.pool, sel.values
  (Array([1, 2], dtype=int32), Array([[3., 0.],
         [0., 5.]], dtype=float32))
  """
  a_BxF, pool_P, a_BxP, cut = _sampled_cut(a, k, l, score, key, axis_name, ridge, sketch,
                                           sketch_key, pool, search)
  keep_BxP = cut_lib.selected(_f32(a_BxP), cut, cut_lib.row_offset(a_BxF.shape[0], axis_name))
  values_BxP = jnp.where(keep_BxP, a_BxP, 0)
  return PooledSelection(pool_P, values_BxP.reshape(a.shape[:-1] + pool_P.shape))


@functools.partial(jax.jit, static_argnames=_SAMPLED_STATIC)
def sampled_select(a: jax.Array, k: int, l: float, *, score: str = "l2",
                   key=None, axis_name=None, ridge: float = scoring.LEVERAGE_RIDGE,
                   sketch: typing.Optional[int] = None, sketch_key=None,
                   pool=None, search: str = "auto") -> jax.Array:
  """Sampled-SAE: score columns, pool P = min(F, ceil(k·l)), BatchTopK inside.

  Args:
    a: [..., F] pre-selection activations; every leading axis is tokens.
    k: latents per token on average, an int in [1, F].
    l: pool size factor, a finite float >= 1. l = 1: the pool is k columns;
      l >= F / k: the pool is everything and this is `batch_topk`.
    score: column score, one of "l2", "squared_l2", "entropy", "uniform",
      "leverage" (see `column_scores`).
    key: PRNG key. Without it the pool is the P top-scoring columns; with it
      P columns are drawn without replacement with probability proportional
      to score. Under `axis_name` the first device's key is used everywhere.
    axis_name: mapped axis the tokens are split over; with it, scores, pool
      and budget span the whole (concatenated) batch.
    ridge, sketch, sketch_key: the "leverage" score's ridge λ, CountSketch
      rows (None: exact) and the key that draws the sketch (`column_scores`).
    pool: [P] latents to select in (from `sampled_pool`, e.g. of an earlier
      batch) instead of scoring this batch; the score arguments are unused.
    search: how the budget's threshold is found (see `batch_topk`).

  Returns:
    An array like `a`, zero outside the selection. The gradient flows to the
    selected entries only.

  With l = 1 every token draws from the same k latents (here latent 2, the
  column with the largest L2 norm):

  >>> sampled_select(jnp.array([[1., 3., 2.], [0., -1., 5.]]), 1, 1)
  Array([[0., 0., 2.],
         [0., 0., 5.]], dtype=float32)
  """
  a_BxF, pool_P, _, cut = _sampled_cut(a, k, l, score, key, axis_name, ridge, sketch,
                                       sketch_key, pool, search)
  # Apply the pooled cut to the dense array: no scatter, columns renamed.
  in_pool_F = jnp.zeros(a.shape[-1], bool).at[pool_P].set(True)
  cut = cut._replace(col=pool_P[cut.col])
  keep_BxF = in_pool_F[None, :] & cut_lib.selected(
      _f32(a_BxF), cut, cut_lib.row_offset(a_BxF.shape[0], axis_name))
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)
