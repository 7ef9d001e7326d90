"""Candidate pools: the columns a Sampled-SAE batch may select from."""

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import validation


def candidate_pool(scores: jax.Array, size: int, *, key=None) -> jax.Array:
  """Chooses `size` columns from their scores.

  Without a key: the `size` highest scores (ties: the lower column wins).
  With a key: `size` columns drawn without replacement with probability
  proportional to max(score, 0) (Gumbel-top-k). If fewer than `size` columns
  have a positive probability, all of those are taken and the rest are filled
  by rank of score, deterministically.

  Args:
    scores: [F] float scores, e.g. from `column_scores`.
    size: number of columns P, in [1, F]; a static int.
    key: optional PRNG key for a sampled pool.

  Returns:
    [P] int32 column indices in increasing order, so that selecting inside the
    pool breaks ties by column exactly as `batch_topk` does.

  >>> candidate_pool(jnp.array([0.1, 3.0, 2.0, 0.5]), 2)
  Array([1, 2], dtype=int32)
  """
  if getattr(scores, "ndim", None) != 1 or not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(
        "scores must be a 1-D float array [F]; got "
        f"shape {getattr(scores, 'shape', None)}, dtype {getattr(scores, 'dtype', None)}")
  size = validation.check_k(size, scores.shape[0], name="size")
  if key is None:
    return jnp.sort(lax.top_k(scores, size)[1])
  weight_F = jnp.maximum(scores.astype(jnp.float32), 0.0)
  drawable_F = weight_F > 0
  gumbel_F = jax.random.gumbel(key, weight_F.shape, jnp.float32)
  log_weight_F = jnp.log(jnp.where(drawable_F, weight_F, 1.0))
  sampled_P = lax.top_k(jnp.where(drawable_F, log_weight_F + gumbel_F, -jnp.inf), size)[1]
  # Every drawable column first, then the others by score.
  ranked_P = lax.top_k(jnp.where(drawable_F, jnp.inf, scores), size)[1]
  enough = jnp.sum(drawable_F) >= size
  return jnp.sort(jnp.where(enough, sampled_P, ranked_P))
