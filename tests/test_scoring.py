"""Column scores: exact, order-free sums and the SPEC's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import scoring
from tests import reference


def wide_range(shape, seed, signed=False):
  """Values over ~12 orders of magnitude, as hard as sums get."""
  rng = np.random.default_rng(seed)
  v = np.exp(rng.uniform(-14, 14, shape)).astype(np.float32)
  return v * rng.choice([-1, 1], shape) if signed else v


@pytest.mark.parametrize("signed", [False, True])
def test_exact_sum_is_order_free_and_float32_accurate(signed):
  v = wide_range((301, 17), seed=0, signed=signed)
  total = np.asarray(scoring.exact_column_sum(jnp.asarray(v)))
  for seed in range(3):
    shuffled = v[np.random.default_rng(seed).permutation(len(v))]
    np.testing.assert_array_equal(scoring.exact_column_sum(jnp.asarray(shuffled)), total)
  want = v.astype(np.float64).sum(0)
  scale = np.abs(v).astype(np.float64).sum(0)
  assert np.all(np.abs(total - want) <= 1e-6 * scale)


def test_exact_sum_refuses_batches_beyond_int32_digits():
  too_many = jax.ShapeDtypeStruct((scoring.MAX_TOKENS + 1, 2), jnp.float32)
  with pytest.raises(ValueError, match="at most 4194304 tokens"):
    jax.eval_shape(scoring.exact_column_sum, too_many)


@pytest.mark.parametrize("method", ["l2", "squared_l2", "entropy", "uniform"])
def test_scores_match_reference(method):
  rng = np.random.default_rng(1)
  a = rng.standard_normal((3, 7, 45)).astype(np.float32)
  a[rng.random(a.shape) < 0.6] = 0
  a[..., :3] = 0  # never fires
  got = np.asarray(sae_jax.column_scores(a, method))
  assert got.shape == (45,) and got.dtype == np.float32
  np.testing.assert_allclose(got, reference.scores(a, method), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("method,options", [
    ("l2", {}), ("squared_l2", {}), ("entropy", {}), ("uniform", {}), ("leverage", {}),
    ("leverage", dict(sketch=4, key=jax.random.key(5)))])
def test_a_bias_scores_the_sum_bit_for_bit(method, options):
  """column_scores(p, bias=b) is column_scores(p + b): the fast step scores
  the encoder's product and b_enc so. The same holds for the pool."""
  rng = np.random.default_rng(4)
  product = rng.standard_normal((45, 13)).astype(np.float32)
  bias = rng.standard_normal(13).astype(np.float32)
  bias[:2] = -9.0  # never fires
  summed = product + bias[None, :]
  got = sae_jax.column_scores(product, method, bias=jnp.asarray(bias), **options)
  np.testing.assert_array_equal(got, sae_jax.column_scores(summed, method, **options))
  if method != "uniform":
    assert np.all(np.asarray(got)[:2] <= 0) and np.all(np.asarray(got)[2:] > 0)
    pool = sae_jax.sampled_pool(product, 2, 2.5, score=method, bias=jnp.asarray(bias),
                                sketch=options.get("sketch"), sketch_key=options.get("key"))
    np.testing.assert_array_equal(pool, sae_jax.sampled_pool(
        summed, 2, 2.5, score=method, sketch=options.get("sketch"),
        sketch_key=options.get("key")))


def test_entropy_edge_cases():
  a = np.zeros((8, 4), np.float32)
  a[3, 1] = 2.5  # fires once: entropy exactly 0
  a[:, 2] = 0.7  # fires evenly on every token: log 8
  a[:, 3] = -1.0  # negative counts as zero: never fires
  s = np.asarray(sae_jax.column_scores(a, "entropy"))
  assert s[0] == -1.0 and s[3] == -1.0
  assert s[1] == 0.0
  np.testing.assert_allclose(s[2], np.log(8), rtol=1e-6)


@pytest.mark.parametrize("n_tokens", [1, 7, 8, 45, 64])
def test_cpu_and_accelerator_reductions_agree_bit_for_bit(n_tokens):
  # On CPU, reductions over tokens run blockwise; elsewhere in one go. Both
  # are exact (max, integer sums), so they must agree to the bit.
  rng = np.random.default_rng(n_tokens)
  v = jnp.asarray(wide_range((n_tokens, 13), seed=n_tokens))
  np.testing.assert_array_equal(scoring._fold_max(v), jnp.max(v, axis=0))
  digits = lambda x: [jnp.sum(jnp.floor(x * 3.0).astype(jnp.int32), axis=0),
                      jnp.sum((x > 1.0).astype(jnp.int32), axis=0)]
  v = jnp.asarray(rng.random((n_tokens, 13)).astype(np.float32) * 1000)
  for got, want in zip(scoring._scan_sums(v, digits), digits(v)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(3, 7, 45), (64, 300)])
def test_leverage_equals_float64_reference(shape):
  rng = np.random.default_rng(2)
  a = (3 * rng.standard_normal(shape)).astype(np.float32)
  a[rng.random(a.shape) < 0.8] = 0
  a[..., :3] = 0  # never fires: exactly 0, below every column that does
  a[..., 3] = -1.0
  got = np.asarray(sae_jax.column_scores(a, "leverage"))
  want = reference.scores(a, "leverage")
  assert got.shape == (shape[-1],) and got.dtype == np.float32
  assert np.all(got[:4] == 0) and np.all(got[4:][want[4:] > 0] > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * want.max())
  ridge = np.asarray(sae_jax.column_scores(a, "leverage", ridge=3.0))
  np.testing.assert_allclose(ridge, reference.leverage(np.maximum(a.reshape(-1, shape[-1]), 0),
                                                       3.0), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sketched_leverage_is_that_of_an_exact_count_sketch():
  rng = np.random.default_rng(3)
  a = np.maximum(rng.standard_normal((96, 50)), 0).astype(np.float32) * wide_range((96, 1), 4)
  m, key = 16, jax.random.key(5)
  # The sketch's rows and signs as count_sketch draws them, summed in float64.
  bucket_key, sign_key = jax.random.split(key)
  bucket = np.asarray(jax.random.randint(bucket_key, (96,), 0, m))
  sign = np.asarray(jax.random.rademacher(sign_key, (96,), jnp.float32), np.float64)
  want = np.zeros((m, 50))
  np.add.at(want, bucket, sign[:, None] * a)
  got = np.asarray(scoring.count_sketch(jnp.asarray(a), m, key))
  # Each value rounded to 2^-(30 - 7) of its column's maximum (B = 96), then summed exactly.
  unit = 2.0 ** (np.frexp(np.abs(a).max(0))[1] - 23)
  assert np.all(np.abs(got - want) <= np.bincount(bucket, minlength=m)[:, None] * unit / 2)
  np.testing.assert_array_equal(  # which is the exact sum of the rounded values
      got, np.stack([np.round(sign[bucket == i, None] * a[bucket == i] / unit).sum(0) * unit
                     for i in range(m)]))
  scores = np.asarray(sae_jax.column_scores(a, "leverage", sketch=m, key=key))
  np.testing.assert_allclose(scores, reference.leverage(got), rtol=1e-5, atol=1e-7)
  default = sae_jax.column_scores(a, "leverage", sketch=m)  # key 0 when none is given
  np.testing.assert_array_equal(default, sae_jax.column_scores(a, "leverage", sketch=m,
                                                               key=jax.random.key(0)))
