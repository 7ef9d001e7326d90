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
