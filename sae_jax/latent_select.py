"""Selection with the latents split too: each device holds a [b, F / M] block
of the batch's activations, its tokens one of the "data" axis' shards and
its latents one of the M shards of the "latent" axis (`mesh.py`).

Every rule selects exactly what it selects on the whole [B, F] on one
device, ties broken by global latent index (SPEC.md, "Mesh invariance"):

* TopK: each device offers each token's k largest of its latents; the
  top k of the M·k offers gathered over "latent" give the token's k-th
  value and column, and each device keeps its entries up to them.
* BatchTopK: the budget's threshold by bisection on the float bits,
  counted over both axes; ties by (global token, global latent).
* Sampled-SAE: column scores are local to a latent shard and summed over
  "data" (the leverage score's Gram matrix also over "latent"); the [F]
  scores are gathered and every device draws the same global pool; the
  pool's [b, P] columns are gathered on every shard (`at_pool`), and the
  budget among them is found over "data" as on one device.

What crosses devices: per token k offers (TopK, AuxK), a few scalars per
bisection step (BatchTopK), F scores and the pool's columns (Sampled-SAE).
The decoder's partial sums over latent shards are added in one order
(`latent_sum`).
"""

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import collectives
from sae_jax import cut as cut_lib
from sae_jax import model
from sae_jax import pool as pool_lib
from sae_jax import scoring
from sae_jax import validation
from sae_jax.mesh import DATA
from sae_jax.mesh import LATENT

BOTH = (DATA, LATENT)


@jax.custom_vjp
def latent_sum(x):
  """The sum over the latent shards of each one's part of x (the decoder's
  partial products), in an order fixed by the shards' indices
  (`collectives.ordered_psum`); its gradient reaches every part whole."""
  return collectives.ordered_psum(x, LATENT)


def _latent_sum_fwd(x):
  return latent_sum(x), None


def _latent_sum_bwd(_, ct):
  return (lax.pcast(ct, LATENT, to="varying"),)


latent_sum.defvjp(_latent_sum_fwd, _latent_sum_bwd)


@jax.custom_vjp
def to_latent_shards(x):
  """x, the same on every latent shard, given to each to use with its own
  latents; its gradient is the sum of theirs, added in one order."""
  return lax.pcast(x, LATENT, to="varying")


def _to_latent_shards_fwd(x):
  return to_latent_shards(x), None


def _to_latent_shards_bwd(_, ct):
  return (collectives.ordered_psum(ct, LATENT),)


to_latent_shards.defvjp(_to_latent_shards_fwd, _to_latent_shards_bwd)


def _first_col(n_cols: int):
  return lax.axis_index(LATENT) * n_cols


def _cols(n_cols: int):
  """The global latent index of each local column."""
  return _first_col(n_cols) + jnp.arange(n_cols, dtype=jnp.int32)


def _first_row(n_rows: int):
  return lax.axis_index(DATA) * n_rows


def _kth(offered_BxK, cols_BxK, k: int, n_cols: int):
  """Each token's k-th value over all F and its global column, from each
  shard's offers (its min(k, F / M) largest, lower column first among equals)."""
  # In shard order, each shard's equal entries lower column first: among
  # equal offers, the earlier has the lower global column.
  offered_BxMK = lax.all_gather(offered_BxK, LATENT, axis=1, tiled=True, to="invarying")
  cols_BxMK = lax.all_gather(cols_BxK + _first_col(n_cols), LATENT, axis=1, tiled=True,
                             to="invarying")
  values_BxK, at_BxK = lax.top_k(offered_BxMK, k)
  return values_BxK[:, -1:], jnp.take_along_axis(cols_BxMK, at_BxK[:, -1:], axis=1)


def topk_mask(a_BxF, k: int):
  """TopK's mask: each token's k largest positive entries over all F, ties
  to the lower latent (`selection.topk` on the whole row)."""
  n_rows, n_cols = a_BxF.shape
  kth_Bx1, kth_col_Bx1 = _kth(*cut_lib.top_k(a_BxF, min(k, n_cols)), k, n_cols)
  col_1xF = _cols(n_cols)[None, :]
  keep_BxF = (a_BxF > kth_Bx1) | ((a_BxF == kth_Bx1) & (col_1xF <= kth_col_Bx1))
  return keep_BxF & (a_BxF > 0)


def topk_entries(a_BxF, k: int) -> tuple:
  """TopK's selection on this shard as entries: each token's offers (its
  min(k, F / M) largest here, [b, k'], values and local columns), those
  `topk_mask` does not keep set to 0. Every kept entry is an offer: a
  shard's share of a token's top k is a prefix of its own order."""
  n_rows, n_cols = a_BxF.shape
  offered_BxK, cols_BxK = cut_lib.top_k(a_BxF, min(k, n_cols))
  kth_Bx1, kth_col_Bx1 = _kth(offered_BxK, cols_BxK, k, n_cols)
  keep_BxK = (offered_BxK > kth_Bx1) | ((offered_BxK == kth_Bx1)
                                        & (cols_BxK + _first_col(n_cols) <= kth_col_Bx1))
  return jnp.where(keep_BxK & (offered_BxK > 0), offered_BxK, 0), cols_BxK


def _saturating_cumsum(counts_B, cap: int):
  """Running sums of non-negative counts, each clipped at `cap` (no overflow)."""
  return lax.associative_scan(lambda x, y: jnp.minimum(x + y, cap), jnp.minimum(counts_B, cap))


def _tie_cut(a_BxF, value, n: int, n_above, n_equal):
  """(global row, global col) of the last tie at `value` to keep, so that
  exactly min(n, #positive) entries are kept: the earliest ties in (token,
  latent) order. n_above and n_equal are global counts (clipped)."""
  n_rows, n_cols = a_BxF.shape
  need = n - n_above
  cap = n + 1

  def find():
    ties_BxF = a_BxF == value
    ties_B = lax.psum(jnp.sum(ties_BxF, axis=1, dtype=jnp.int32), LATENT)  # a row's, all F
    incl_B = _saturating_cumsum(ties_B, cap)
    excl_B = jnp.concatenate([jnp.zeros(1, jnp.int32), incl_B[:-1]])
    totals_N = lax.all_gather(incl_B[-1], DATA, to="invarying")
    earlier = jnp.minimum(jnp.sum(jnp.where(jnp.arange(totals_N.shape[0]) < lax.axis_index(DATA),
                                            totals_N, 0)), cap)
    crossing_B = (excl_B + earlier < need) & (incl_B + earlier >= need)
    r = jnp.argmax(crossing_B)
    # The row's ties, in latent order: the shards before this one hold `before`.
    row_ties_1xF = ties_BxF[r]
    mine = jnp.sum(row_ties_1xF, dtype=jnp.int32)
    per_shard_M = lax.all_gather(mine, LATENT, to="invarying")
    before = jnp.sum(jnp.where(jnp.arange(per_shard_M.shape[0]) < lax.axis_index(LATENT),
                               per_shard_M, 0))
    m = need - (excl_B[r] + earlier) - before
    here = jnp.any(crossing_B) & (m >= 1) & (m <= mine)
    c = jnp.argmax(jnp.cumsum(row_ties_1xF, dtype=jnp.int32) >= m).astype(jnp.int32)
    row = jnp.where(here, _first_row(n_rows) + r.astype(jnp.int32), 0)
    col = jnp.where(here, _first_col(n_cols) + c, 0)
    return lax.psum(row, BOTH), lax.psum(col, BOTH)

  rows = n_rows * lax.axis_size(DATA)
  return lax.cond((value > 0) & (n_equal > need), find,
                  lambda: (jnp.int32(rows), jnp.int32(0)))


def batch_cut(a_BxF, k: int) -> cut_lib.Cut:
  """BatchTopK's exact cut of the global batch: its B·k largest positive
  entries (`cut.batch_topk_cut` on the whole [B, F])."""
  n_rows, n_cols = a_BxF.shape
  if n_rows * n_cols >= 2**31:
    raise ValueError(
        f"a holds {n_rows} x {n_cols} entries per device; at most 2**31 - 1 are supported "
        f"(int32 counts): split the batch or the latents further")
  rows = n_rows * lax.axis_size(DATA)
  if k >= n_cols * lax.axis_size(LATENT):
    return cut_lib.Cut(jnp.float32(0), jnp.int32(rows), jnp.int32(0))
  n = rows * k
  if n >= 2**30:
    raise ValueError(f"a budget of {rows} tokens x k={k} entries is more than 2**30 (int32 "
                     f"counts)")
  bits_BxF = lax.bitcast_convert_type(a_BxF, jnp.int32)
  top = lax.pmax(jnp.max(bits_BxF), BOTH)
  value = cut_lib.to_float(cut_lib.bisect(bits_BxF, n, jnp.int32(0), top + 1, BOTH))
  count = lambda x, cap: lax.psum(jnp.minimum(jnp.sum(x, dtype=jnp.int32), cap), BOTH)
  n_above, n_equal = count(a_BxF > value, n), count(a_BxF == value, n + 1)
  row, col = _tie_cut(a_BxF, value, n, n_above, n_equal)
  return cut_lib.Cut(value, row, col)


def batchtopk_mask(a_BxF, k: int):
  """BatchTopK's mask (`batch_cut`)."""
  n_rows, n_cols = a_BxF.shape
  return cut_lib.selected(a_BxF, batch_cut(a_BxF, k), _first_row(n_rows), _cols(n_cols))


def sampled_pool(a_BxF, key, *, k: int, l: float, score: str, sample_pool: bool,
                 ridge: float, sketch):
  """The Sampled-SAE pool [P] (global latents, increasing) of the global
  batch, the same on every device (`selection.sampled_pool`); the keywords
  are `SAEConfig.pool_rule`'s."""
  n_cols = a_BxF.shape[1]
  size = validation.pool_size(k, l, n_cols * lax.axis_size(LATENT))
  options = model.sampled_options(key, score=score, sample_pool=sample_pool, ridge=ridge,
                                  sketch=sketch)
  scores_F = scoring.column_scores(a_BxF, score, axis_name=DATA, ridge=ridge, sketch=sketch,
                                   key=options["sketch_key"], latent_axis=LATENT)
  scores_F = lax.all_gather(scores_F, LATENT, tiled=True, to="invarying")
  return pool_lib.candidate_pool(scores_F, size, key=scoring.shared_key(options["key"], DATA))


def local_index(pool_P, n_cols: int):
  """Each global latent of pool_P as a column of this shard's n_cols, or
  n_cols (one past the last, left out by scatters) where another shard holds it."""
  first = _first_col(n_cols)
  here_P = (pool_P >= first) & (pool_P < first + n_cols)
  return jnp.where(here_P, pool_P - first, n_cols)


def sampled_mask(a_BxF, k: int, pool_P):
  """Sampled-SAE's mask on this device's block: the pool's [b, P] columns
  gathered on every shard, then BatchTopK's budget among them over "data"
  as on one device (`selection.sampled_select` with `pool`)."""
  n_rows, n_cols = a_BxF.shape
  a_BxP = at_pool(a_BxF, pool_P, axis=1)
  cut = cut_lib.batch_topk_cut(a_BxP, k, DATA)
  keep_BxP = cut_lib.selected(a_BxP, cut, cut_lib.row_offset(n_rows, DATA))
  return jnp.zeros((n_rows, n_cols), bool).at[:, local_index(pool_P, n_cols)].set(
      keep_BxP, mode="drop")


def at_pool(x, pool_P, axis: int):
  """x's entries at the global latents pool_P along its latent `axis`
  (W_enc's columns, W_dec's rows), the same on every shard: each from the
  shard that holds it, summed with the others' zeros (exact)."""
  index_P = local_index(pool_P, x.shape[axis])
  return lax.psum(jnp.take(x, index_P, axis=axis, mode="fill", fill_value=0), LATENT)
