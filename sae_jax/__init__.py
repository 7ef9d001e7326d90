"""sae_jax: sparse autoencoders on language-model activations, in JAX."""

from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from sae_jax.model import SAE
from sae_jax.pool import candidate_pool
from sae_jax.scoring import column_scores
from sae_jax.selection import PooledSelection
from sae_jax.selection import batch_topk
from sae_jax.selection import sampled_pool
from sae_jax.selection import sampled_select
from sae_jax.selection import sampled_select_pooled
from sae_jax.selection import topk
from sae_jax.synthetic import SyntheticConfig
from sae_jax.synthetic import SyntheticSource
from sae_jax.train import NonFiniteError
from sae_jax.train import TrainState
from sae_jax.loop import train_loop
from sae_jax.loop import train_many
from sae_jax.train import create_train_state
from sae_jax.train import p_train_step
from sae_jax.train import p_train_step_all_alive
from sae_jax.train import p_train_step_packed
from sae_jax.train import replicate
from sae_jax.train import train_step
from sae_jax.train import unreplicate

__all__ = [
    "NonFiniteError",
    "PooledSelection",
    "SAE",
    "SAEConfig",
    "SyntheticConfig",
    "SyntheticSource",
    "TrainConfig",
    "TrainState",
    "batch_topk",
    "candidate_pool",
    "column_scores",
    "create_train_state",
    "p_train_step",
    "p_train_step_all_alive",
    "p_train_step_packed",
    "replicate",
    "sampled_pool",
    "sampled_select",
    "sampled_select_pooled",
    "topk",
    "train_loop",
    "train_many",
    "train_step",
    "unreplicate",
]
