"""Candidate pools: deterministic top scores and Gumbel-top-k sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import sae_jax


def draw(scores, size, n_draws, seed=0):
  keys = jax.random.split(jax.random.key(seed), n_draws)
  sample = jax.jit(jax.vmap(lambda k: sae_jax.candidate_pool(scores, size, key=k)))
  return np.asarray(sample(keys))


def within_binomial_noise(counts, p, n):
  # Each count is Binomial(n, p): allow 5 standard deviations, a false alarm
  # about once in 1.7 million per entry; the draws are seeded, so the test
  # is deterministic and cannot flake.
  return np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_top_scores_without_key():
  scores = jnp.array([0.5, 2.0, 2.0, -1.0, 7.0, 2.0])
  np.testing.assert_array_equal(sae_jax.candidate_pool(scores, 3), [1, 2, 4])
  np.testing.assert_array_equal(sae_jax.candidate_pool(scores, 6), np.arange(6))


def test_sampled_pool_is_distinct_sorted_and_in_range():
  pools = draw(jnp.arange(1.0, 41.0), 7, 200)
  assert np.all(np.diff(pools, axis=1) > 0)
  assert pools.min() >= 0 and pools.max() < 40


def test_single_draw_follows_scores():
  scores = np.array([1.0, 2.0, 3.0, 0.0, 4.0, 10.0], np.float32)
  n = 40_000
  counts = np.bincount(draw(jnp.asarray(scores), 1, n)[:, 0], minlength=6)
  assert counts[3] == 0
  assert within_binomial_noise(counts, scores / scores.sum(), n)


def test_two_draws_follow_sampling_without_replacement():
  scores = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
  p = scores / scores.sum()
  # P(i in pool) = p_i + sum_{j != i} p_j * p_i / (1 - p_j)
  inclusion = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i)
                        for i in range(5)])
  n = 40_000
  pools = draw(jnp.asarray(scores, jnp.float32), 2, n, seed=1)
  counts = np.bincount(pools.reshape(-1), minlength=5)
  assert within_binomial_noise(counts, inclusion, n)
  # And each pair {i, j}: drawn as i then j, or j then i.
  pairs = list(itertools.combinations(range(5), 2))
  pair_p = np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
  pair_counts = np.array([np.sum((pools[:, 0] == i) & (pools[:, 1] == j)) for i, j in pairs])
  assert within_binomial_noise(pair_counts, pair_p, n)


def test_too_few_drawable_columns_fill_by_rank():
  scores = jnp.array([0.0, 3.0, -1.0, 0.0, 2.0])
  pools = draw(scores, 4, 50)
  np.testing.assert_array_equal(pools, np.broadcast_to([0, 1, 3, 4], (50, 4)))
