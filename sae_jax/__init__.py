"""sae_jax: sparse autoencoders on language-model activations, in JAX."""

from sae_jax.pool import candidate_pool
from sae_jax.scoring import column_scores
from sae_jax.selection import PooledSelection
from sae_jax.selection import batch_topk
from sae_jax.selection import sampled_select
from sae_jax.selection import sampled_select_pooled
from sae_jax.selection import topk

__all__ = [
    "PooledSelection",
    "batch_topk",
    "candidate_pool",
    "column_scores",
    "sampled_select",
    "sampled_select_pooled",
    "topk",
]
