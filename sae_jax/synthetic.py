"""Synthetic activations with a known dictionary: an offline source with ground truth.

    x_D = Σ_i c_i · d_i + noise,   c_i = fires_i · m_i · u,   u ~ Uniform(1 - s, 1 + s)

Feature i fires independently with probability p_i. Frequent features share
one rate and magnitude; with `rare_fraction > 0`, the first features are rare
and strong instead — the "activation lottery" regime, where under BatchTopK
the few large activations crowd out the many small ones.

With `parents > 0`, features after the rare ones form a hierarchy (Chanin et
al. 2024, "A is for Absorption"): each parent fires at the frequent rate and
has `children` children; when it fires, one of them fires with it with
probability `child_given_parent` (each child equally likely), and otherwise
it fires alone. A child never fires without its parent. This is where feature
absorption appears: a latent for a child can take in its parent's direction,
and the parent's latent then stays silent whenever a child fires.
"""

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import config

# The generating process is a config like the others, in config.py (which
# imports no JAX, so that the scripts' parsers read its defaults at once).
SyntheticConfig = config.SyntheticConfig
FREQUENT, RARE, PARENT, CHILD = config.FREQUENT, config.RARE, config.PARENT, config.CHILD
CLASS_NAMES, NO_PARENT = config.CLASS_NAMES, config.NO_PARENT


@functools.partial(jax.jit, static_argnames=("n_tokens",))
def _sample(key, n_tokens: int, dictionary_NxD, rate_N, magnitude_N, spread, noise,
            hierarchy=None):
  """(activations [T, D], true coefficients [T, N]) of one batch."""
  fire_key, size_key, noise_key = jax.random.split(key, 3)
  n_features, d_model = dictionary_NxD.shape
  fires_TxN = jax.random.bernoulli(fire_key, rate_N[None, :], (n_tokens, n_features))
  if hierarchy is not None:  # a child fires when its parent's draw lands in its slot
    parent_N, low_N, high_N = hierarchy
    parent_at_N = jnp.maximum(parent_N, 0)
    draw_TxN = jax.random.uniform(jax.random.fold_in(key, 3), (n_tokens, n_features))
    draw_TxN = draw_TxN[:, parent_at_N]
    child_TxN = (fires_TxN[:, parent_at_N] & (draw_TxN >= low_N[None, :])
                 & (draw_TxN < high_N[None, :]))
    fires_TxN = jnp.where(parent_N[None, :] >= 0, child_TxN, fires_TxN)
  u_TxN = jax.random.uniform(size_key, (n_tokens, n_features), minval=1 - spread,
                             maxval=1 + spread)
  codes_TxN = jnp.where(fires_TxN, magnitude_N[None, :] * u_TxN, 0.0)
  x_TxD = codes_TxN @ dictionary_NxD + noise * jax.random.normal(noise_key, (n_tokens, d_model))
  return x_TxD, codes_TxN


class SyntheticSource:
  """Batches from `config`'s process; batch `step` is the same on every call."""

  def __init__(self, config: SyntheticConfig):
    self.config = config
    dictionary_key, self._key = jax.random.split(jax.random.key(config.seed))
    directions = np.asarray(jax.random.normal(dictionary_key, (config.n_features, config.d_model)))
    self.dictionary = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    self.feature_class = config.feature_class()
    self.parent_of = config.parent_of()
    rates = config.firing_rates()
    hierarchy = None
    if config.parents:  # children draw from their parent's firing, not on their own
      child = self.parent_of != NO_PARENT
      slot = np.where(child, (np.arange(config.n_features) - config.n_rare - config.parents)
                      % config.children, 0)
      width = config.child_given_parent / config.children
      hierarchy = (jnp.asarray(self.parent_of, jnp.int32), jnp.asarray(slot * width, jnp.float32),
                   jnp.asarray((slot + 1) * width, jnp.float32))
      rates = np.where(child, 0.0, rates)
    self._arrays = (jnp.asarray(self.dictionary, jnp.float32), jnp.asarray(rates, jnp.float32),
                    jnp.asarray(config.magnitudes(), jnp.float32))
    self._hierarchy = hierarchy

  def sample_with_codes(self, step: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n_tokens, D] of batch `step`, and their true coefficients
    [n_tokens, n_features] (a feature is present where its coefficient is > 0)."""
    key = jax.random.fold_in(self._key, step)
    x, codes = _sample(key, n_tokens, *self._arrays, self.config.spread, self.config.noise,
                       self._hierarchy)
    return np.asarray(x), np.asarray(codes)

  def sample(self, step: int, n_tokens: int) -> np.ndarray:
    """Tokens [n_tokens, D] of batch `step`."""
    return self.sample_with_codes(step, n_tokens)[0]

  def batches(self, batch_size: int, n_devices: int = 1,
              start_step: int = 0) -> typing.Iterator[np.ndarray]:
    """Endless batches [n_devices, batch_size / n_devices, D] from `start_step` on."""
    if batch_size % n_devices:
      raise ValueError(f"batch_size {batch_size} must be divisible by n_devices={n_devices}")
    step = start_step
    while True:
      yield self.sample(step, batch_size).reshape(n_devices, -1, self.config.d_model)
      step += 1


def best_cosines(W_dec_FxD, dictionary_NxD) -> np.ndarray:
  """[N] for each true direction, its largest cosine with any decoder row."""
  w = np.asarray(W_dec_FxD, np.float64)
  d = np.asarray(dictionary_NxD, np.float64)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  d = d / np.linalg.norm(d, axis=1, keepdims=True)
  return (d @ w.T).max(axis=1)
