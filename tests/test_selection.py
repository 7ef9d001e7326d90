"""Selection rules against the NumPy reference, and their exact semantics."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import cut as cut_lib
from sae_jax import selection
from sae_jax import validation
from tests import reference
from tests.helpers import activations
from tests.helpers import run_shard_map


# (shape, k, l): odd B, F not a multiple of anything, k*l > F, leading axes.
CASES = [
    ((7, 37), 3, 2.0),
    ((13, 29), 5, 1.5),
    ((2, 5, 23), 4, 8.0),  # k*l > F: the pool is everything
    ((33, 64), 1, 3.0),
    ((16, 41), 7, 1.0),
    ((9, 11), 11, 1.0),  # k = F
    ((25, 50), 2, 4.3),
]
# Each shape compiles every rule again: the inner loop (-m "not slow") keeps
# one ordinary shape and the two edges.
INNER = (0, 2, 5)


@pytest.mark.parametrize("shape,k,l", [
    case if i in INNER else pytest.param(*case, marks=pytest.mark.slow)
    for i, case in enumerate(CASES)])
@pytest.mark.parametrize("data", ["dense", "sparse", "ties"])
def test_rules_match_reference(shape, k, l, data, threshold_path):
  kwargs = {"dense": dict(zeros=0.1), "sparse": dict(zeros=0.9, zero_rows=3),
            "ties": dict(zeros=0.3, zero_rows=1, levels=3)}[data]
  a = activations(shape, seed=zlib.crc32(repr((shape, k, data)).encode()), **kwargs)

  np.testing.assert_array_equal(
      sae_jax.topk(a, k), reference.apply(a, reference.topk_mask(a, k)))
  np.testing.assert_array_equal(sae_jax.batch_topk(a, k, search=threshold_path),
                                reference.apply(a, reference.batch_topk_mask(a, k)))

  for score in ("l2", "entropy"):
    scores = np.asarray(sae_jax.column_scores(a, score))
    np.testing.assert_allclose(scores, reference.scores(a, score), rtol=2e-6, atol=1e-6)
    size = validation.pool_size(k, l, shape[-1])
    pool = reference.pool(scores, size)
    np.testing.assert_array_equal(sae_jax.candidate_pool(jnp.asarray(scores), size), pool)
    want = reference.apply(a, reference.batch_topk_mask(a, k, cols=pool))
    np.testing.assert_array_equal(
        sae_jax.sampled_select(a, k, l, score=score, search=threshold_path), want)
    compact = sae_jax.sampled_select_pooled(a, k, l, score=score, search=threshold_path)
    np.testing.assert_array_equal(compact.pool, pool)
    np.testing.assert_array_equal(compact.values, want[..., pool])


def test_take_columns_is_indexing():
  """The column gather the fast step uses is NumPy's x[:, cols], in any
  order and with repeats; a column past the last is the fill value."""
  x = np.arange(5 * 9, dtype=np.float32).reshape(5, 9) - 20
  cols = np.array([8, 0, 3, 3, 7], np.int32)
  take = jax.jit(selection.take_columns, static_argnames="fill_value")
  np.testing.assert_array_equal(take(x, cols), x[:, cols])
  padded = np.array([2, 9, 5, 12], np.int32)
  np.testing.assert_array_equal(take(x, padded, fill_value=0),
                                np.where(padded < 9, x[:, np.minimum(padded, 8)], 0))
  assert np.isnan(take(x, padded)[:, 1]).all()


def _top_k_reference(x, k):
  """Each row's k first entries in the floats' total order (NaN first, 0
  before -0), equal ones lower column first: NumPy, one row at a time."""
  bits = x.view(np.int32).astype(np.int64)
  key = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
  rows = [np.lexsort((np.arange(x.shape[-1]), -row))[:k] for row in key.reshape(-1, x.shape[-1])]
  at = np.array(rows, np.int32).reshape(*x.shape[:-1], k)
  return np.take_along_axis(x, at, axis=-1), at


# (shape, k): long rows (F ≥ 256 k, a multiple of 16) take two stages; the
# last two do not.
TOP_K_CASES = [((6, 256), 1), ((5, 768), 3), ((2, 3, 512), 2), ((4, 1024), 4),
               ((4, 512), 4), ((4, 520), 2)]


@pytest.mark.parametrize("shape,k", TOP_K_CASES)
def test_top_k_is_lax_top_k(shape, k):
  """`cut.top_k` gives lax.top_k's values and indices, bit for bit, against
  a NumPy reference: on ReLU-like rows, on rows of few levels (ties within
  and across groups), with ±inf, NaN and -NaN, -0 beside 0, all-zero and
  all-negative-zero rows, a row whose top k is all negative and one whose
  top k reaches -0, and on a tie across groups of unequal maxima; long
  rows by way of the groups' maxima. The values' gradient is lax.top_k's."""
  rng = np.random.default_rng(zlib.crc32(repr(shape).encode()))
  top = jax.jit(cut_lib.top_k, static_argnums=1)
  stages = str(jax.make_jaxpr(cut_lib.top_k, static_argnums=1)(np.zeros(shape, np.float32), k))
  assert stages.count("top_k[") == (2 if shape[-1] >= 256 * k and shape[-1] % 16 == 0 else 1)
  odd = activations(shape, seed=1, zeros=0.5)
  specials = np.array([np.inf, -np.inf, np.nan, -np.nan, -0.0, 0.0], np.float32)
  special = rng.random(shape) < 0.02
  odd[special] = rng.choice(specials, size=special.sum())
  rows = odd.reshape(-1, shape[-1])
  rows[0] = 0.0
  rows[1] = -0.0
  rows[2] = -np.abs(rows[2]) - 1.0  # the top k all negative
  # -0 everywhere, 0 in fewer than k columns: one late, one in an early group.
  rows[3] = -0.0
  rows[3, [shape[-1] - 1, 5]] = 0.0
  # A tie at the k-th entry between a group of larger maximum and one of a
  # lower column: the latter comes first.
  tie = np.zeros(shape, np.float32)
  tie[..., [200, 201, 40]] = [5.0, 2.0, 2.0]
  for x in (activations(shape, seed=0, zeros=0.3), activations(shape, seed=2, levels=3), odd,
            tie):
    got, want, reference = top(x, k), jax.lax.top_k(x, k), _top_k_reference(x, k)
    for a, b, c in zip(got, want, reference):
      np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))
      np.testing.assert_array_equal(np.asarray(a).view(np.int32), c.view(np.int32))
  # The gradient of the values flows to the same entries.
  x = activations(shape, seed=3, zeros=0.3)
  weights = np.arange(1, k + 1, dtype=np.float32).reshape((1,) * (len(shape) - 1) + (k,))
  grads = [jax.grad(lambda x, f=f: jnp.sum(f(x, k)[0] * weights))(x)
           for f in (cut_lib.top_k, jax.lax.top_k)]
  np.testing.assert_array_equal(*grads)


@pytest.mark.parametrize("rows_per_block", [None, 3])
def test_topk_by_bits_is_topk(rows_per_block, monkeypatch):
  """AuxK's TopK by bisection on the bits against the NumPy reference, with
  ties inside and across the k-th entry, rows with fewer than k positive
  entries, negative zeros, and (on CPU) in blocks of 3 rows, the last one
  padded."""
  if rows_per_block is None:
    monkeypatch.setattr(selection, "BITS_BLOCK_BYTES", 2**40)  # one block
  for shape, k, _ in CASES:
    n_cols = shape[-1]
    if rows_per_block is not None:
      monkeypatch.setattr(selection, "BITS_BLOCK_BYTES", 4 * n_cols * rows_per_block)
    select = jax.jit(lambda a: selection.topk_by_bits(a, k))  # a new trace per block size
    for data in ("dense", "sparse", "ties"):
      kwargs = {"dense": dict(zeros=0.1), "sparse": dict(zeros=0.9, zero_rows=3),
                "ties": dict(zeros=0.3, zero_rows=1, levels=3)}[data]
      a = activations(shape, seed=zlib.crc32(repr((shape, k, data)).encode()), **kwargs)
      a = a.reshape(-1, n_cols)
      np.testing.assert_array_equal(select(a), reference.apply(a, reference.topk_mask(a, k)),
                                    err_msg=f"{shape} k={k} {data}")


def test_topk_by_bits_at_the_ends_of_the_floats(monkeypatch):
  """The bisection's early stop against the NumPy reference on values at
  the ends of its range: the least subnormals, entries one ulp apart at the
  k-th, the largest float and infinity, in blocks of 3 rows that mix rows
  that stop early with rows that need every halving or none."""
  monkeypatch.setattr(selection, "BITS_BLOCK_BYTES", 4 * 12 * 3)
  tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
  special = np.array([tiny, 2 * tiny, 3 * tiny, 1.0, np.nextafter(np.float32(1), 2),
                      np.nextafter(np.float32(1), 0), np.finfo(np.float32).max, np.inf,
                      0.0, -0.0, -1.0, 2.0], np.float32)
  rng = np.random.default_rng(7)
  a = rng.choice(special, size=(40, 12))
  a[:8] = rng.standard_normal((8, 12)).astype(np.float32)  # rows that stop early
  a[8] = [tiny] * 6 + [1.0, 1.0] + [0.0] * 4  # the k-th among ties at the least bits
  a[9] = np.array([3, 1, 2, 1, 2, 0, 1, 3, 0, 0, -1, 1], np.float32) * tiny
  for k in (1, 4, 11):
    got = jax.jit(lambda a: selection.topk_by_bits(a, k))(a)
    np.testing.assert_array_equal(got, reference.apply(a, reference.topk_mask(a, k)),
                                  err_msg=f"k={k}")


@pytest.mark.parametrize("score", ["l2", "squared_l2", "entropy"])
def test_selects_exactly_min_of_budget_and_positives(score, threshold_path):
  for seed, zeros in [(0, 0.2), (1, 0.97), (2, 0.995)]:
    a = activations((19, 31), seed, zeros=zeros, zero_rows=4)
    k, l = 3, 2.0
    sel = sae_jax.sampled_select_pooled(a, k, l, score=score, search=threshold_path)
    pooled = np.maximum(reference.tokens(a)[:, np.asarray(sel.pool)], 0)
    values = np.asarray(sel.values)
    assert np.all(values >= 0)
    assert np.all(pooled[values > 0] == values[values > 0])
    assert (values > 0).sum() == min(19 * k, (pooled > 0).sum())
    out = np.asarray(sae_jax.batch_topk(a, k, search=threshold_path))
    assert (out > 0).sum() == min(19 * k, (reference.tokens(a) > 0).sum())
    assert np.all(out >= 0)


@pytest.mark.parametrize("score", ["l2", "squared_l2", "entropy", "uniform"])
def test_pool_of_everything_is_batch_topk(score):
  a = activations((21, 40), seed=3, zeros=0.4, levels=5)
  k = 3
  key = jax.random.key(0) if score == "uniform" else None
  want = sae_jax.batch_topk(a, k)
  for l in (40 / 3, 14.0, 100.0):
    got = sae_jax.sampled_select(a, k, l, score=score, key=key)
    np.testing.assert_array_equal(got, want)


def test_l1_uses_at_most_k_latents():
  a = activations((64, 50), seed=4, zeros=0.2)
  for k in (1, 4, 9):
    for key in (None, jax.random.key(k)):
      out = np.asarray(sae_jax.sampled_select(a, k, 1, key=key))
      assert len(np.nonzero(out.any(axis=0))[0]) <= k


def offers_certify(a, k):
  """Runs the offers path alone; returns (value, certified)."""
  x = jnp.asarray(a, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  value, _, certified = cut_lib._threshold_from_offers(
      x, bits, jnp.max(bits), k, x.shape[0] * k, None)
  return float(value), bool(certified)


def test_offers_certify_unless_a_token_is_too_concentrated():
  rng = np.random.default_rng(5)
  k = 2  # every token offers 2k = 4 entries; the 8 widest (an eighth) offer 8k = 16

  def tokens(concentrated, wants):
    """Each token has 2 entries in [2, 3); `concentrated` ones have `wants`
    entries in [10, 11) instead; the rest lie in [0, 0.5)."""
    a = rng.random((64, 60)).astype(np.float32) * 0.5
    for b in range(64):
      cols = rng.permutation(60)
      if b < concentrated:
        a[b, cols[:wants]] += 10.0
      else:
        a[b, cols[:2]] += 2.0
    return a

  want = lambda x: float(np.sort(x.reshape(-1))[-x.shape[0] * k])
  a = tokens(2, 10)  # 2 tokens need 10 entries: within 8k
  assert offers_certify(a, k) == (want(a), True)
  a = tokens(1, 60)  # 1 token needs all 60: more than 8k
  assert offers_certify(a, k) == (want(a), False)
  a = tokens(8, 10)  # 8 tokens need 10: the 8 widest cover them
  assert offers_certify(a, k) == (want(a), True)
  a = tokens(9, 10)  # 9 tokens need 10: more than the 8 widest can cover
  assert offers_certify(a, k) == (want(a), False)


def test_uncertified_offers_fall_back_to_exact_bisection():
  rng = np.random.default_rng(5)
  a = rng.random((20, 60)).astype(np.float32)
  a[0] += 10.0  # token 0 wants min(60, B*k) = 40 or 60 entries: uncertified
  for k in (2, 3):
    np.testing.assert_array_equal(sae_jax.batch_topk(a, k, search="offers"),
                                  reference.apply(a, reference.batch_topk_mask(a, k)))
  with_ties = np.floor(a * 4) / 4
  np.testing.assert_array_equal(
      sae_jax.batch_topk(with_ties, 2, search="offers"),
      reference.apply(with_ties, reference.batch_topk_mask(with_ties, 2)))


def test_ties_break_by_position():
  a = np.ones((6, 8), np.float32)
  out = np.asarray(sae_jax.batch_topk(a, 3))
  assert np.array_equal(out.reshape(-1) > 0, np.arange(48) < 18)
  out = np.asarray(sae_jax.topk(a, 3))
  assert np.array_equal(out > 0, np.broadcast_to(np.arange(8) < 3, (6, 8)))
  out = np.asarray(sae_jax.sampled_select(a, 3, 2))
  assert np.array_equal(out.reshape(-1) > 0,
                        np.broadcast_to(np.arange(8) < 6, (6, 8)).reshape(-1)
                        & (np.arange(48) < 24))
  # Deterministic: repeated calls agree bit for bit.
  b = activations((17, 23), seed=6, levels=2, zeros=0.3)
  first = np.asarray(sae_jax.sampled_select(b, 2, 3, score="entropy"))
  for _ in range(3):
    np.testing.assert_array_equal(sae_jax.sampled_select(b, 2, 3, score="entropy"), first)


def test_gradient_flows_to_selected_entries_only():
  a = jnp.asarray(activations((12, 30), seed=7, zeros=0.3))
  g = jnp.asarray(np.random.default_rng(8).standard_normal((12, 30)), jnp.float32)
  for fn in (lambda x: sae_jax.sampled_select(x, 3, 2.5),
             lambda x: sae_jax.sampled_select(x, 3, 2.5, key=jax.random.key(1)),
             lambda x: sae_jax.batch_topk(x, 3),
             lambda x: sae_jax.topk(x, 3)):
    grad = jax.grad(lambda x: jnp.sum(fn(x) * g))(a)
    keep = np.asarray(fn(a)) != 0
    np.testing.assert_array_equal(grad, np.where(keep, g, 0))
  pooled = lambda x: sae_jax.sampled_select_pooled(x, 3, 2.5)
  sel = pooled(a)
  g_pool = g[:, sel.pool]
  grad = jax.grad(lambda x: jnp.sum(pooled(x).values * g_pool))(a)
  want = np.zeros((12, 30), np.float32)
  want[:, np.asarray(sel.pool)] = np.where(np.asarray(sel.values) != 0, g_pool, 0)
  np.testing.assert_array_equal(grad, want)


def test_bfloat16_input():
  a = activations((10, 24), seed=9, zeros=0.3).astype(jnp.bfloat16)
  out = sae_jax.sampled_select(a, 2, 3)
  assert out.dtype == jnp.bfloat16
  pool = np.asarray(sae_jax.sampled_select_pooled(a, 2, 3).pool)
  np.testing.assert_array_equal(
      np.asarray(out, np.float32),
      reference.apply(np.asarray(a, np.float32),
                      reference.batch_topk_mask(np.asarray(a, np.float32), 2, cols=pool)))


def test_repeated_calls_do_not_retrace():
  shape = (11, 19)  # used by no other test
  fns = [lambda x: sae_jax.sampled_select(x, 2, 3.0),
         lambda x: sae_jax.sampled_select(x, 2, 3.0, key=jax.random.key(0)),
         lambda x: sae_jax.batch_topk(x, 2),
         lambda x: sae_jax.topk(x, 2),
         lambda x: sae_jax.column_scores(x, "entropy")]
  jitted = [sae_jax.sampled_select, sae_jax.batch_topk, sae_jax.topk,
            sae_jax.column_scores]
  for fn in fns:
    fn(activations(shape, seed=0))
  before = [f._cache_size() for f in jitted]
  for seed in range(1, 4):
    for fn in fns:
      fn(activations(shape, seed=seed))
  assert [f._cache_size() for f in jitted] == before


BAD_INPUTS = [
    (lambda a: sae_jax.batch_topk(a, 0), "k must be an integer in [1, 8]"),
    (lambda a: sae_jax.batch_topk(a, 9), "got 9"),
    (lambda a: sae_jax.topk(a, 2.5), "k must be an integer"),
    (lambda a: sae_jax.sampled_select(a, True, 2), "k must be an integer"),
    (lambda a: sae_jax.sampled_select(a, 2, 0.5), "l must be a finite number >= 1; got 0.5"),
    (lambda a: sae_jax.sampled_select(a, 2, math.nan), "got nan"),
    (lambda a: sae_jax.sampled_select(a, 2, math.inf), "got inf"),
    (lambda a: sae_jax.sampled_select(a, 2, 2, score="l1"),
     "score must be one of 'l2', 'squared_l2', 'entropy', 'uniform', 'leverage'; got 'l1'"),
    (lambda a: sae_jax.column_scores(a, "leverage", ridge=0.0), "ridge must be a finite number > 0"),
    (lambda a: sae_jax.sampled_select(a, 2, 2, score="leverage", sketch=0),
     "sketch must be None (exact leverage scores) or an integer >= 1"),
    (lambda a: sae_jax.sampled_select(a, 2, 2, pool=jnp.arange(3)),
     "pool must be an int array of shape (4,)"),
    (lambda a: sae_jax.column_scores(a, "cosine"), "got 'cosine'"),
    (lambda a: sae_jax.column_scores(a, bias=jnp.ones(7)),
     "bias must be a float array of shape (8,) (one per latent); got shape (7,)"),
    (lambda a: sae_jax.sampled_pool(a, 2, 2, bias=jnp.arange(8)), "got shape (8,), dtype int32"),
    (lambda a: sae_jax.sampled_select(a, 2, 2, score="uniform"), "pass key="),
    (lambda a: sae_jax.sampled_select(a[0], 2, 2), "at least 2 dimensions"),
    (lambda a: sae_jax.batch_topk(a.astype(jnp.int32), 2), "floating dtype"),
    (lambda a: sae_jax.candidate_pool(a[0], 9), "size must be an integer in [1, 8]"),
    (lambda a: sae_jax.candidate_pool(a, 2), "1-D float array"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS)
def test_bad_input_is_refused_with_a_clear_error(call, message):
  a = jnp.ones((4, 8))
  with pytest.raises(ValueError) as info:
    call(a)
  assert message in str(info.value)


def test_pool_size_reads_l_as_written():
  assert validation.pool_size(10, 1.1, 100) == 11
  assert validation.pool_size(64, 8, 65536) == 512
  assert validation.pool_size(3, 1.5, 4) == 4
  assert validation.pool_size(5, 1.01, 100) == 6


def entry_set(entries, row_offset=0):
  """{(global row, col): value} of an Entries list's used slots."""
  rows, cols, values = (np.asarray(x) for x in entries[:3])
  return {(int(r) + row_offset, int(c)): float(v) for r, c, v in zip(rows, cols, values) if v > 0}


def dense_set(z):
  return {(int(r), int(c)): float(z[r, c]) for r, c in zip(*np.nonzero(z))}


@pytest.mark.parametrize("data", ["dense", "ties"])
def test_batch_topk_entries_list_exactly_the_selection(data):
  # 40 tokens x 300 latents, k = 5: tokens offer 10 entries, the widest 40.
  # With ties, many tokens hold entries equal to the cut beyond their offers.
  a = np.maximum(activations((40, 300), 30, levels=40 if data == "ties" else None), 0)
  cut, entries = jax.jit(cut_lib.batch_topk_entries, static_argnums=1)(a, 5)
  assert bool(entries.complete)
  assert entries.rows.shape == (40 * 5,)
  assert entry_set(entries) == dense_set(np.asarray(sae_jax.batch_topk(a, 5)))


def test_batch_topk_entries_say_when_the_offers_miss_some():
  # 8 tokens hold all of the top 40 x 2 entries, 10 each: more than their 4
  # offers, and only 4 tokens offer 16.
  a = np.random.default_rng(31).random((40, 60)).astype(np.float32)
  a[:8, :10] += 10
  _, entries = cut_lib.batch_topk_entries(a, 2)
  assert not bool(entries.complete)


def test_batch_topk_entries_under_an_axis():
  a = np.maximum(activations((48, 300), 32), 0)

  def local(a):
    _, entries = cut_lib.batch_topk_entries(a, 5, axis_name="data")
    offset = jax.lax.axis_index("data") * a.shape[0]
    return entries.rows + offset, entries.cols, entries.values, entries.complete[None]

  rows, cols, values, complete = run_shard_map(local, a)
  assert complete.all()
  got = {(int(r), int(c)): float(v) for r, c, v in zip(rows, cols, values) if v > 0}
  assert got == dense_set(np.asarray(sae_jax.batch_topk(a, 5)))
