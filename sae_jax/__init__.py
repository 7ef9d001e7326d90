"""sae_jax: sparse autoencoders on language-model activations, in JAX.

The public names below are imported when first used (PEP 562), so that a
script can import a light module such as `sae_jax.hostmem` without starting
JAX (1.6 s): `from sae_jax import sampled_select` works as ever.
"""

import importlib

# Each public name, and the module that defines it.
_PUBLIC = {
    "NonFiniteError": "train",
    "PooledSelection": "selection",
    "SAE": "model",
    "SAEConfig": "config",
    "SyntheticConfig": "synthetic",
    "SyntheticSource": "synthetic",
    "TrainConfig": "config",
    "TrainState": "train",
    "batch_topk": "selection",
    "candidate_pool": "pool",
    "column_scores": "scoring",
    "create_train_state": "train",
    "p_train_step": "train",
    "p_train_step_all_alive": "train",
    "p_train_step_packed": "train",
    "replicate": "train",
    "sampled_pool": "selection",
    "sampled_select": "selection",
    "sampled_select_pooled": "selection",
    "topk": "selection",
    "train_loop": "loop",
    "train_many": "loop",
    "train_step": "train",
    "unreplicate": "train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'sae_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"sae_jax.{_PUBLIC[name]}"), name)
  globals()[name] = value  # the next use is a plain lookup
  return value


def __dir__() -> list:
  return sorted(set(globals()) | set(_PUBLIC))
