"""The exact cut of BatchTopK: which entries the batch's N = B·k budget
keeps, found without sorting all B·F entries, ties broken by position.

Each token offers its 2k largest entries as candidates (a per-row top-k,
cheap on every backend), and the eighth of the tokens whose 2k-th entry is
largest offer 8k. The N-th largest offer t is the answer whenever no token
could hold an entry above t that it did not offer — checked exactly, for
every token. Then the tie counts also come from the offers, and no
further pass over the B·F activations is needed. Only when a token is more
concentrated than that does an exact bisection on the float bits run (and
always, under `search="bisect"` or on small inputs). Across devices only
the offers and a few scalars travel (O(B·k) values), never the B·F
activations.
"""

import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import scoring
from sae_jax import validation


# Entries each token offers as a candidate, in units of k; the 1/WIDE_SHARE
# most concentrated tokens offer WIDE_FACTOR * k. An eighth, not a 32nd as
# until 2026-12-08: on synthetic D=768 rows (8192 true directions, 32 active)
# at F=24576, k=64, 111 of 1024 tokens held more than 2k entries above the
# cut, the offers could not certify it, and the bisection over all B·F
# entries and the dense step ran (docs/speed.md).
CANDIDATE_FACTOR = 2


WIDE_FACTOR = 8


WIDE_SHARE = 8


# Up to this many entries per device, ~31 counting passes over `a` cost less
# than the per-token top-k on CPU (docs/speed.md has the measurements).
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


def row_offset(n_rows: int, axis_name):
  """Global index of this shard's first token."""
  return 0 if axis_name is None else lax.axis_index(axis_name) * n_rows


def psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def varying_like(x, ref):
  """x, made to vary over shard_map's devices wherever int `ref` does.

  Without `axis_name`, the data in a shard_map varies over devices in a way
  we are not told; loop carries and cond branches must agree on it.
  """
  return x + 0 * ref


def selected_at(values, rows, cols, cut: Cut):
  """Whether entries `values` at global (token, latent) positions (`rows`,
  `cols`) are selected by `cut`; all three broadcast together."""
  before = (rows < cut.row) | ((rows == cut.row) & (cols <= cut.col))
  tie = (values == cut.value) & (cut.value > 0) & before
  return (values > cut.value) | tie


def selected(a_BxF, cut: Cut, first_row, col_F=None):
  """The boolean mask of `cut` on `a_BxF` (columns numbered by `col_F`)."""
  n_rows, n_cols = a_BxF.shape
  row_Bx1 = (first_row + jnp.arange(n_rows, dtype=jnp.int32))[:, None]
  col_1xF = (jnp.arange(n_cols, dtype=jnp.int32) if col_F is None else col_F)[None, :]
  return selected_at(a_BxF, row_Bx1, col_1xF, cut)


# A long row's top k is taken among the columns of its k groups of GROUP
# columns with the largest maxima, where F ≥ GROUP · LONG · k.
GROUP = 16
LONG = 16
# Where it was measured faster (`benchmarks/accelerator.py` can tell on others).
TWO_STAGE_BACKENDS = ("cpu",)


def top_k(x, k: int):
  """lax.top_k over x's last axis, the same values and indices (larger first,
  equal ones lower index first), behind an optimization barrier.

  XLA:CPU rewrites a top_k whose result feeds several ops into a full sort
  of every row, many times slower (docs/speed.md); the barrier keeps it a
  top_k. It costs nothing on any backend.

  A long float32 row (F ≥ GROUP · LONG · k, a multiple of GROUP) first
  takes its k groups of GROUP consecutive entries with the largest maxima
  (equal maxima, lower group first), then its top k among their k · GROUP
  entries, in column order. Every entry of the row's top k is there: one in a group
  left out has, in each of the k groups taken, a maximum that comes before
  it (larger, or equal and at a lower column). On the CPU it takes 2.3x less
  time at B = 4096, F = 65536, k = 64 (docs/speed.md); other backends,
  where it is not measured yet, keep one stage (TWO_STAGE_BACKENDS).

  >>> x = jnp.tile(jnp.array([0., 2., 1., 2.] * 256), (2, 1)).at[1, 100].set(3.)
  >>> [a.tolist() for a in top_k(x, 3)]
  [[[2.0, 2.0, 2.0], [3.0, 2.0, 2.0]], [[1, 3, 5], [100, 1, 3]]]
  """
  n = x.shape[-1]
  if (jax.default_backend() not in TWO_STAGE_BACKENDS or x.dtype != jnp.float32 or k < 1
      or n % GROUP or n < GROUP * LONG * k):
    return _barrier(*lax.top_k(x, k))
  *rows, _ = x.shape
  # The groups' maxima in lax.top_k's order of floats (NaN first, 0 before
  # -0), taken on integers (XLA:CPU's max does not always keep a NaN) and
  # ranked as floats (its top_k of integers is a sort, 5x slower).
  maxima = jnp.max(_total_order(x).reshape(*rows, n // GROUP, GROUP), axis=-1)
  maxima = lax.bitcast_convert_type(_total_order(maxima), jnp.float32)
  groups = jnp.sort(_barrier(*lax.top_k(maxima, k))[1], axis=-1)
  within = jnp.arange(GROUP, dtype=groups.dtype).reshape((1,) * groups.ndim + (GROUP,))
  columns = (groups[..., None] * GROUP + within).reshape(*rows, k * GROUP)
  values, at = _barrier(*lax.top_k(jnp.take_along_axis(x, columns, axis=-1), k))
  return values, jnp.take_along_axis(columns, at, axis=-1)


def _total_order(x):
  """float32 x as int32 in the total order of floats: -NaN < -inf < ... < -0
  < 0 < ... < inf < NaN; and such int32 back to their floats' bits."""
  bits = lax.bitcast_convert_type(x, jnp.int32) if x.dtype == jnp.float32 else x
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _barrier(values, indices):
  # One barrier per array: a barrier over the (values, indices) tuple crashes
  # XLA:CPU's TopkDecomposer under pmap.
  return lax.optimization_barrier(values), lax.optimization_barrier(indices)


class Offers(typing.NamedTuple):
  """The entries each token offers as a candidate for BatchTopK (`offers_of`)."""
  values_U: jax.Array  # the offered values, each entry of `a` at most once
  rows_U: jax.Array  # int32 local token of each offer
  cols_U: jax.Array  # int32 latent of each offer
  floor_B: jax.Array  # per token, an upper bound on every entry it did not offer
  ties_at: typing.Callable  # value -> [B] per-token count of offers equal to it


def offers_of(a_BxF, k: int) -> Offers:
  """The entries each token offers as candidates, largest first.

  Every token offers its 2k largest entries; the 1/WIDE_SHARE of the tokens
  whose 2k-th entry is largest (those most likely to need more) offer their
  8k largest.
  """
  n_rows, n_cols = a_BxF.shape
  c = min(n_cols, CANDIDATE_FACTOR * k)
  offers_BxC, cols_BxC = top_k(a_BxF, c)
  rows_BxC = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.int32)[:, None], (n_rows, c))
  floor_B = offers_BxC[:, -1] if c < n_cols else jnp.zeros(n_rows, jnp.float32)
  c_wide = min(n_cols, WIDE_FACTOR * k)
  n_wide = min(n_rows, max(4, -(-n_rows // WIDE_SHARE))) if c_wide > c else 0
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


def bisect(bits_BxF, n: int, lo, hi, axis_name):
  """The largest bit pattern T in [lo, hi) with at least n entries >= T,
  given that hi has not; lo when no T in between has. No passes at all when
  hi <= lo + 1."""

  def count_ge(t):  # clipped at n: only "is it >= n" matters, and no overflow
    return psum(jnp.minimum(jnp.sum(bits_BxF >= t, dtype=jnp.int32), n), axis_name)

  def halve(bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ge = count_ge(mid) >= n
    return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid)

  lo, hi = varying_like(lo, hi), varying_like(hi, lo)
  return lax.while_loop(lambda b: b[1] - b[0] > 1, halve, (lo, hi))[0]


def _tie_cut(a_BxF, value, n: int, n_above, n_equal, ties_B, axis_name):
  """(row, col) of the last tie at `value` to take, so that exactly
  min(n, #positive) entries are selected: the earliest ties by (token,
  latent) position. n_above, n_equal (clipped at n + 1) are global counts
  of entries above and at `value`; ties_B is this shard's count per token."""
  n_rows, _ = a_BxF.shape
  need = n - n_above
  take_all = (varying_like(scoring.global_tokens(n_rows, axis_name), need), varying_like(0, need))

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
    row = jnp.where(here, row_offset(n_rows, axis_name) + r.astype(jnp.int32), 0)
    return psum(row, axis_name), psum(jnp.where(here, c, 0), axis_name)

  return lax.cond((value > 0) & (n_equal > need), find_cut, lambda: take_all)


def batch_topk_cut(a_BxF, k: int, axis_name=None, offers=None, search: str = "auto") -> Cut:
  """The exact cut of BatchTopK on float32 [B, F] (see `batch_topk`); reuses
  `offers` (`offers_of(a_BxF, k)`) when given. `search`: one of `SEARCHES`."""
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
    value = to_float(bisect(bits_BxF, n, jnp.int32(0), top + 1, axis_name))
    counts = _count_all(a_BxF, value, n, axis_name)
  else:
    value, counts, _ = _threshold_from_offers(a_BxF, bits_BxF, top, k, n, axis_name, offers)
  row, col = _tie_cut(a_BxF, value, n, *counts, axis_name)
  return Cut(value, row, col)


def to_float(bits):
  return lax.bitcast_convert_type(bits, jnp.float32)


def _count_all(a_BxF, value, n: int, axis_name):
  """Global counts of entries above and at `value` (clipped at n and n + 1,
  which keeps every comparison with the budget), and ties per local token."""
  count = lambda x, cap: psum(jnp.minimum(jnp.sum(x, dtype=jnp.int32), cap), axis_name)
  ties_BxF = a_BxF == value
  return (count(a_BxF > value, n), count(ties_BxF, n + 1),
          jnp.sum(ties_BxF, axis=1, dtype=jnp.int32))


def _threshold_from_offers(a_BxF, bits_BxF, top, k: int, n: int, axis_name, offers=None):
  """The n-th largest entry (or 0) and `_count_all`'s counts, from the
  tokens' offers; passes over `a` only when the offers cannot certify it
  (the third result says whether they could)."""
  offers = offers_of(a_BxF, k) if offers is None else offers
  values_U, floor_B, ties_at = offers.values_U, offers.floor_B, offers.ties_at
  if axis_name is not None:
    values_U = lax.all_gather(values_U, axis_name, tiled=True, to="invarying")
  union_bits_U = lax.bitcast_convert_type(values_U, jnp.int32)
  # At least n entries are >= t; t = +0 when fewer than n offers are positive.
  t = to_float(bisect(union_bits_U, n, jnp.int32(0), jnp.max(union_bits_U) + 1, None))
  # An entry a token did not offer is at most its floor. If no floor is above
  # t, t is exactly the n-th largest entry; if none equals it either, the
  # offers also hold every tie and the counts need no pass over `a`.
  certified = psum(jnp.sum(floor_B > t, dtype=jnp.int32), axis_name) == 0
  hidden_ties = psum(jnp.sum((floor_B == t) & (t > 0), dtype=jnp.int32), axis_name) > 0
  lo = lax.bitcast_convert_type(t, jnp.int32)
  value = to_float(bisect(bits_BxF, n, lo, jnp.where(certified, lo + 1, top + 1), axis_name))

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
  x_BxF = lax.stop_gradient(jnp.asarray(a_BxF)).astype(jnp.float32)
  offers = offers_of(x_BxF, k)
  n_offers = offers.values_U.shape[0]
  if capacity is None:
    capacity = n_rows * k if axis_name is None else -(-5 * n_rows * k // 4)
  capacity = min(capacity, n_offers)
  cut = batch_topk_cut(x_BxF, k, axis_name, offers=offers)
  offset = row_offset(n_rows, axis_name)
  keep_U = selected_at(offers.values_U, offset + offers.rows_U, offers.cols_U, cut)
  # An entry a token did not offer is at most its floor, so it can pass the
  # cut only if the floor is positive and above the cut's value, or equal to
  # it in a token not after the cut's.
  floor_B = offers.floor_B
  row_B = offset + jnp.arange(n_rows, dtype=jnp.int32)
  missed = jnp.sum((floor_B > 0) & ((floor_B > cut.value) |
                                    ((floor_B == cut.value) & (row_B <= cut.row))),
                   dtype=jnp.int32)
  missed += jnp.sum(keep_U, dtype=jnp.int32) > capacity
  (slot_M,) = jnp.nonzero(keep_U, size=capacity, fill_value=0)
  used_M = jnp.arange(capacity) < jnp.sum(keep_U)
  entries = Entries(rows=offers.rows_U[slot_M], cols=offers.cols_U[slot_M],
                    values=jnp.where(used_M, offers.values_U[slot_M], 0),
                    complete=psum(missed, axis_name) == 0)
  return cut, entries
