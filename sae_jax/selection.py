"""Selection rules: TopK, BatchTopK, and Sampled-SAE (BatchTopK inside a pool).

All rules keep only strictly positive entries and break ties by position: the
earlier token, then the lower latent index, wins. Every leading axis of `a` is
tokens; with `axis_name`, the tokens are split over that mapped axis (device
order = token order) and the result equals the single-device one on the
concatenated batch, bit for bit.

How the exact BatchTopK threshold is found without sorting all B·F entries:
each token offers its 2k largest entries as candidates (a per-row top-k, cheap
on every backend), and the few tokens whose 2k-th entry is largest offer 8k.
The N-th largest offer t is the answer whenever no token could hold an entry
above t that it did not offer — checked exactly, for every token. Then the
tie counts also come from the offers, and no further pass over the B·F
activations is needed. Only when a token is more concentrated than that does
an exact bisection on the float bits run. Across devices only the offers and
a few scalars travel (O(B·k) values), never the B·F activations.
"""

import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import pool as pool_lib
from sae_jax import scoring
from sae_jax import validation

# Entries each token offers as a candidate, in units of k; the few most
# concentrated tokens offer WIDE_FACTOR * k.
CANDIDATE_FACTOR = 2
WIDE_FACTOR = 8
# Up to this many entries per device, ~31 counting passes over `a` cost less
# than the per-token top-k (measured on CPU: 5 ms vs 50 ms at [1024, 512]).
BISECT_ENTRIES = 2**20
# How the BatchTopK threshold is found; the same bits every way. "auto":
# bisection up to BISECT_ENTRIES entries per device, else the tokens' offers.
SEARCHES = ("auto", "bisect", "offers")


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


def _row_offset(n_rows: int, axis_name):
  """Global index of this shard's first token."""
  return 0 if axis_name is None else lax.axis_index(axis_name) * n_rows


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def _varying_like(x, ref):
  """x, made to vary over shard_map's devices wherever int `ref` does.

  Without `axis_name`, the data in a shard_map varies over devices in a way
  we are not told; loop carries and cond branches must agree on it.
  """
  return x + 0 * ref


def _f32(a_BxF):
  """The values selection looks at: float32, no gradient (it is discrete)."""
  return lax.stop_gradient(a_BxF).astype(jnp.float32)


def take_columns(x_RxF, cols_C, fill_value=None):
  """x_RxF[:, cols_C] ([R, C]); a column past the last is `fill_value`
  (None: jnp.take's, NaN for floats).

  Written as a gather of each row's own entries (take_along_axis), which
  XLA:CPU writes row by row. `x[:, cols]` gathers column by column into a
  transposed [C, R] buffer and copies it back. Measured on this 2-core CPU
  at B=1024, D=768, F=24576 (the gather as a matmul's operand, less the
  matmul): 10.2 ms against 4.3 for 1536 columns of a [B, F] array, 4.1
  against 2.1 for 512; W_enc's 1536 columns for a matvec, 4.8 against 1.8.
  """
  cols_RxC = jnp.broadcast_to(cols_C[None, :], (x_RxF.shape[0], cols_C.shape[0]))
  return jnp.take_along_axis(x_RxF, cols_RxC, axis=1, mode="fill", fill_value=fill_value)


def selected_at(values, rows, cols, cut: Cut):
  """Whether entries `values` at global (token, latent) positions (`rows`,
  `cols`) are selected by `cut`; all three broadcast together."""
  before = (rows < cut.row) | ((rows == cut.row) & (cols <= cut.col))
  tie = (values == cut.value) & (cut.value > 0) & before
  return (values > cut.value) | tie


def selected(a_BxF, cut: Cut, row_offset, col_F=None):
  """The boolean mask of `cut` on `a_BxF` (columns numbered by `col_F`)."""
  n_rows, n_cols = a_BxF.shape
  row_Bx1 = (row_offset + jnp.arange(n_rows, dtype=jnp.int32))[:, None]
  col_1xF = (jnp.arange(n_cols, dtype=jnp.int32) if col_F is None else col_F)[None, :]
  return selected_at(a_BxF, row_Bx1, col_1xF, cut)


def top_k(x, k: int):
  """lax.top_k behind an optimization barrier.

  XLA:CPU rewrites a top_k whose result feeds several ops into a full sort
  of every row (measured: 4.3 s instead of 0.1 s at [1024, 24576], k=128);
  the barrier keeps it a top_k. It costs nothing on any backend.
  """
  values, indices = lax.top_k(x, k)
  # One barrier per array: a barrier over the (values, indices) tuple crashes
  # XLA:CPU's TopkDecomposer under pmap.
  return lax.optimization_barrier(values), lax.optimization_barrier(indices)


class Offers(typing.NamedTuple):
  """The entries each token offers as a candidate for BatchTopK (`_offers`)."""
  values_U: jax.Array  # the offered values, each entry of `a` at most once
  rows_U: jax.Array  # int32 local token of each offer
  cols_U: jax.Array  # int32 latent of each offer
  floor_B: jax.Array  # per token, an upper bound on every entry it did not offer
  ties_at: typing.Callable  # value -> [B] per-token count of offers equal to it


def _offers(a_BxF, k: int) -> Offers:
  """The entries each token offers as candidates, largest first.

  Every token offers its 2k largest entries; the few tokens whose 2k-th entry
  is largest (those most likely to need more) offer their 8k largest.
  """
  n_rows, n_cols = a_BxF.shape
  c = min(n_cols, CANDIDATE_FACTOR * k)
  offers_BxC, cols_BxC = top_k(a_BxF, c)
  rows_BxC = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.int32)[:, None], (n_rows, c))
  floor_B = offers_BxC[:, -1] if c < n_cols else jnp.zeros(n_rows, jnp.float32)
  c_wide = min(n_cols, WIDE_FACTOR * k)
  n_wide = min(n_rows, max(4, -(-n_rows // 32))) if c_wide > c else 0
  if not n_wide:
    return Offers(offers_BxC.reshape(-1), rows_BxC.reshape(-1), cols_BxC.reshape(-1), floor_B,
                  lambda v: jnp.sum(offers_BxC == v, axis=1, dtype=jnp.int32))
  wide_R = top_k(floor_B, n_wide)[1]
  wide_RxW, wide_cols_RxW = top_k(a_BxF[wide_R], c_wide)  # starts with the same c
  values_U = jnp.concatenate([offers_BxC.reshape(-1), wide_RxW[:, c:].reshape(-1)])
  wide_rows = jnp.broadcast_to(wide_R[:, None], (n_wide, c_wide - c)).astype(jnp.int32)
  rows_U = jnp.concatenate([rows_BxC.reshape(-1), wide_rows.reshape(-1)])
  cols_U = jnp.concatenate([cols_BxC.reshape(-1), wide_cols_RxW[:, c:].reshape(-1)])
  wide_floor_R = wide_RxW[:, -1] if c_wide < n_cols else jnp.zeros(n_wide, jnp.float32)
  floor_B = floor_B.at[wide_R].set(wide_floor_R)

  def ties_at(v):
    ties_B = jnp.sum(offers_BxC == v, axis=1, dtype=jnp.int32)
    return ties_B.at[wide_R].set(jnp.sum(wide_RxW == v, axis=1, dtype=jnp.int32))

  return Offers(values_U, rows_U, cols_U, floor_B, ties_at)


def _bisect(bits_BxF, n: int, lo, hi, axis_name):
  """The largest bit pattern T in [lo, hi) with at least n entries >= T,
  given that hi has not; lo when no T in between has. No passes at all when
  hi <= lo + 1."""

  def count_ge(t):  # clipped at n: only "is it >= n" matters, and no overflow
    return _psum(jnp.minimum(jnp.sum(bits_BxF >= t, dtype=jnp.int32), n), axis_name)

  def halve(bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ge = count_ge(mid) >= n
    return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid)

  lo, hi = _varying_like(lo, hi), _varying_like(hi, lo)
  return lax.while_loop(lambda b: b[1] - b[0] > 1, halve, (lo, hi))[0]


def _tie_cut(a_BxF, value, n: int, n_above, n_equal, ties_B, axis_name):
  """(row, col) of the last tie at `value` to take, so that exactly
  min(n, #positive) entries are selected: the earliest ties by (token,
  latent) position. n_above, n_equal (clipped at n + 1) are global counts
  of entries above and at `value`; ties_B is this shard's count per token."""
  n_rows, _ = a_BxF.shape
  need = n - n_above
  take_all = (_varying_like(scoring.global_tokens(n_rows, axis_name), need), _varying_like(0, need))

  def find_cut():
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

  return lax.cond((value > 0) & (n_equal > need), find_cut, lambda: take_all)


def batch_topk_cut(a_BxF, k: int, axis_name=None, offers=None, search: str = "auto") -> Cut:
  """The exact cut of BatchTopK on float32 [B, F] (see `batch_topk`); reuses
  `offers` (`_offers(a_BxF, k)`) when given. `search`: one of `SEARCHES`."""
  n_rows, n_cols = a_BxF.shape
  if search not in SEARCHES:
    raise ValueError(f"search must be one of {', '.join(SEARCHES)}; got {search!r}")
  if n_rows * n_cols >= 2**31:
    raise ValueError(
        f"a holds {n_rows} x {n_cols} entries per device; at most 2**31 - 1 are "
        "supported (int32 counts): split the batch further")
  n_rows_global = scoring.global_tokens(n_rows, axis_name)
  if k >= n_cols:  # the budget covers everything: keep every positive entry
    return Cut(jnp.float32(0), jnp.int32(n_rows_global), jnp.int32(0))
  n = n_rows_global * k
  # Non-negative floats order as their bits do; negative ones have negative
  # bits and are never counted against a threshold >= 0.
  bits_BxF = lax.bitcast_convert_type(a_BxF, jnp.int32)
  top = jnp.max(bits_BxF)
  top = top if axis_name is None else lax.pmax(top, axis_name)
  if search == "bisect" or (search == "auto" and n_rows * n_cols <= BISECT_ENTRIES):
    value = _to_float(_bisect(bits_BxF, n, jnp.int32(0), top + 1, axis_name))
    counts = _count_all(a_BxF, value, n, axis_name)
  else:
    value, counts, _ = _threshold_from_offers(a_BxF, bits_BxF, top, k, n, axis_name, offers)
  row, col = _tie_cut(a_BxF, value, n, *counts, axis_name)
  return Cut(value, row, col)


def _to_float(bits):
  return lax.bitcast_convert_type(bits, jnp.float32)


def _count_all(a_BxF, value, n: int, axis_name):
  """Global counts of entries above and at `value` (clipped at n and n + 1,
  which keeps every comparison with the budget), and ties per local token."""
  count = lambda x, cap: _psum(jnp.minimum(jnp.sum(x, dtype=jnp.int32), cap), axis_name)
  ties_BxF = a_BxF == value
  return (count(a_BxF > value, n), count(ties_BxF, n + 1),
          jnp.sum(ties_BxF, axis=1, dtype=jnp.int32))


def _threshold_from_offers(a_BxF, bits_BxF, top, k: int, n: int, axis_name, offers=None):
  """The n-th largest entry (or 0) and `_count_all`'s counts, from the
  tokens' offers; passes over `a` only when the offers cannot certify it
  (the third result says whether they could)."""
  offers = _offers(a_BxF, k) if offers is None else offers
  values_U, floor_B, ties_at = offers.values_U, offers.floor_B, offers.ties_at
  if axis_name is not None:
    values_U = lax.all_gather(values_U, axis_name, tiled=True, to="invarying")
  union_bits_U = lax.bitcast_convert_type(values_U, jnp.int32)
  # At least n entries are >= t; t = +0 when fewer than n offers are positive.
  t = _to_float(_bisect(union_bits_U, n, jnp.int32(0), jnp.max(union_bits_U) + 1, None))
  # An entry a token did not offer is at most its floor. If no floor is above
  # t, t is exactly the n-th largest entry; if none equals it either, the
  # offers also hold every tie and the counts need no pass over `a`.
  certified = _psum(jnp.sum(floor_B > t, dtype=jnp.int32), axis_name) == 0
  hidden_ties = _psum(jnp.sum((floor_B == t) & (t > 0), dtype=jnp.int32), axis_name) > 0
  lo = lax.bitcast_convert_type(t, jnp.int32)
  value = _to_float(_bisect(bits_BxF, n, lo, jnp.where(certified, lo + 1, top + 1), axis_name))

  def count_offers():
    return (jnp.sum(values_U > value, dtype=jnp.int32),
            jnp.minimum(jnp.sum(values_U == value, dtype=jnp.int32), n + 1),
            ties_at(value))

  counts = lax.cond(certified & ~hidden_ties, count_offers,
                    lambda: _count_all(a_BxF, value, n, axis_name))
  return value, counts, certified


class Entries(typing.NamedTuple):
  """A selection on this device's tokens as a list of M entries (a slot with
  value 0 is unused)."""
  rows: jax.Array  # [M] int32 local token index
  cols: jax.Array  # [M] int32 latent index
  values: jax.Array  # [M] float32 selected value, or 0
  complete: jax.Array  # bool, the same on every device: the list holds every selected entry


def batch_topk_entries(a_BxF: jax.Array, k: int, axis_name=None,
                       capacity: typing.Optional[int] = None) -> tuple[Cut, Entries]:
  """BatchTopK's cut and its selected entries as a list, without a pass that
  compacts all B·F entries.

  The entries come from the tokens' offers (see the module docstring): a
  token's selected entries are all among its offers unless some entry it did
  not offer could pass the cut. `complete` is False when that happens on any
  device, or when this device selects more than `capacity` entries; the
  caller then uses the cut (`selected`) on the dense array instead.

  Args:
    a_BxF: [B, F] non-negative activations (this device's tokens).
    k: latents per token on average.
    axis_name: mapped axis the tokens are split over, as in `batch_topk`.
    capacity: list length M. Default: B·k without `axis_name` (always
      enough); with it, 5/4 of this device's share, since one device may
      hold more than B·k of the global batch's entries.
  """
  n_rows, _ = a_BxF.shape
  k = validation.check_k(k, a_BxF.shape[-1])
  x_BxF = _f32(jnp.asarray(a_BxF))
  offers = _offers(x_BxF, k)
  n_offers = offers.values_U.shape[0]
  if capacity is None:
    capacity = n_rows * k if axis_name is None else -(-5 * n_rows * k // 4)
  capacity = min(capacity, n_offers)
  cut = batch_topk_cut(x_BxF, k, axis_name, offers=offers)
  row_offset = _row_offset(n_rows, axis_name)
  keep_U = selected_at(offers.values_U, row_offset + offers.rows_U, offers.cols_U, cut)
  # An entry a token did not offer is at most its floor, so it can pass the
  # cut only if the floor is positive and above the cut's value, or equal to
  # it in a token not after the cut's.
  floor_B = offers.floor_B
  row_B = row_offset + jnp.arange(n_rows, dtype=jnp.int32)
  missed = jnp.sum((floor_B > 0) & ((floor_B > cut.value) |
                                    ((floor_B == cut.value) & (row_B <= cut.row))),
                   dtype=jnp.int32)
  missed += jnp.sum(keep_U, dtype=jnp.int32) > capacity
  (slot_M,) = jnp.nonzero(keep_U, size=capacity, fill_value=0)
  used_M = jnp.arange(capacity) < jnp.sum(keep_U)
  entries = Entries(rows=offers.rows_U[slot_M], cols=offers.cols_U[slot_M],
                    values=jnp.where(used_M, offers.values_U[slot_M], 0),
                    complete=_psum(missed, axis_name) == 0)
  return cut, entries


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
  x_BxF = _f32(a_BxF)
  values_BxK, index_BxK = top_k(x_BxF, k)
  kth_Bx1, kth_col_Bx1 = values_BxK[:, -1:], index_BxK[:, -1:]
  col_1xF = jnp.arange(a.shape[-1], dtype=jnp.int32)[None, :]
  # lax.top_k takes equal entries lower index first, so the tied entries it
  # kept are exactly those up to the column of the k-th.
  keep_BxF = (x_BxF > kth_Bx1) | ((x_BxF == kth_Bx1) & (col_1xF <= kth_col_Bx1))
  keep_BxF &= x_BxF > 0
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)


# Bytes of float32 rows one block of `topk_by_bits` takes on CPU: its
# counting passes then read from cache (on other backends, one block).
BITS_BLOCK_BYTES = 3 * 2**19


def _topk_mask_by_bits(x_BxF, k: int):
  """`topk`'s mask on float32 rows, each row's k-th largest entry found by
  bisection on its bits."""
  # Non-negative floats order as their bits do; negative ones (and -0) have
  # negative bits and are never counted or kept.
  bits_BxF = lax.bitcast_convert_type(x_BxF, jnp.int32)
  # Counted in int32: on this 2-core CPU 13 ms against 15 by float32 at
  # [1024, 1536], k=384 (jaxlib 0.10.2 sends a float sum to a library
  # reduction, and writes the compared rows out for it).
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
  latents is (`gradients.BITS_UP_TO` has the measurements). On CPU the rows
  run in blocks of about `BITS_BLOCK_BYTES`.
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
    search: how the threshold is found (`SEARCHES`): "auto" bisects over
      every entry when a device holds at most `BISECT_ENTRIES` (passes over
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
  cut = batch_topk_cut(x_BxF, k, axis_name, search=search)
  keep_BxF = selected(x_BxF, cut, _row_offset(a_BxF.shape[0], axis_name))
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
  cut = batch_topk_cut(_f32(a_BxP), k, axis_name, search=search)
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
  keep_BxP = selected(_f32(a_BxP), cut, _row_offset(a_BxF.shape[0], axis_name))
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
  keep_BxF = in_pool_F[None, :] & selected(
      _f32(a_BxF), cut, _row_offset(a_BxF.shape[0], axis_name))
  return jnp.where(keep_BxF, a_BxF, 0).reshape(a.shape)
