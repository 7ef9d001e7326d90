"""Synthetic activations with a known dictionary: an offline source with ground truth.

    x_D = Σ_i c_i · d_i + noise,   c_i = fires_i · m_i · u,   u ~ Uniform(1 - s, 1 + s)

Feature i fires independently with probability p_i. Frequent features share
one rate and magnitude; with `rare_fraction > 0`, the first features are rare
and strong instead — the "activation lottery" regime, where under BatchTopK
the few large activations crowd out the many small ones.
"""

import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import validation

FREQUENT, RARE = 0, 1


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The generating process."""
  d_model: int = 64
  """D, the width of the activations."""
  n_features: int = 512
  """Number of true dictionary directions (random unit vectors)."""
  active: float = 4.0
  """Expected number of features firing per token."""
  magnitude: float = 1.0
  """Mean coefficient of a frequent feature when it fires."""
  spread: float = 0.5
  """Coefficients are uniform in magnitude · (1 ± spread)."""
  noise: float = 0.01
  """Standard deviation of isotropic Gaussian noise per dimension."""
  rare_fraction: float = 0.0
  """Fraction of features that are rare and strong (0: no activation lottery)."""
  rare_rate: float = 0.05
  """A rare feature fires this many times as often as a frequent one."""
  rare_magnitude: float = 8.0
  """... with this many times the coefficient."""
  seed: int = 0
  """Seeds the dictionary and every batch."""

  def __post_init__(self):
    owner = "SyntheticConfig"
    validation.check_int_field(owner, "d_model", self.d_model)
    validation.check_int_field(owner, "n_features", self.n_features)
    validation.check_real_field(owner, "active", self.active, 0, self.n_features)
    for name, hi in (("magnitude", math.inf), ("spread", 1), ("noise", math.inf),
                     ("rare_fraction", 1), ("rare_rate", math.inf),
                     ("rare_magnitude", math.inf)):
      validation.check_real_field(owner, name, getattr(self, name), 0, hi)
    validation.check_int_field(owner, "seed", self.seed, minimum=0)
    if self.firing_rates().max() > 1:
      raise ValueError(
          f"SyntheticConfig: active={self.active} with rare_fraction={self.rare_fraction} "
          f"and rare_rate={self.rare_rate} needs a firing probability above 1")

  @property
  def n_rare(self) -> int:
    return round(self.rare_fraction * self.n_features)

  def feature_class(self) -> np.ndarray:
    """[n_features] int: RARE for the first n_rare features, FREQUENT after."""
    return np.where(np.arange(self.n_features) < self.n_rare, RARE, FREQUENT)

  def firing_rates(self) -> np.ndarray:
    """[n_features] probability that each feature fires in a token."""
    rare = self.feature_class() == RARE
    relative = np.where(rare, self.rare_rate, 1.0)
    return relative * (self.active / relative.sum()) if relative.sum() else relative

  def magnitudes(self) -> np.ndarray:
    """[n_features] mean coefficient of each feature when it fires."""
    rare = self.feature_class() == RARE
    return self.magnitude * np.where(rare, self.rare_magnitude, 1.0)


@functools.partial(jax.jit, static_argnames=("n_tokens",))
def _sample(key, n_tokens: int, dictionary_NxD, rate_N, magnitude_N, spread, noise):
  fire_key, size_key, noise_key = jax.random.split(key, 3)
  n_features, d_model = dictionary_NxD.shape
  fires_TxN = jax.random.bernoulli(fire_key, rate_N[None, :], (n_tokens, n_features))
  u_TxN = jax.random.uniform(size_key, (n_tokens, n_features), minval=1 - spread,
                             maxval=1 + spread)
  codes_TxN = jnp.where(fires_TxN, magnitude_N[None, :] * u_TxN, 0.0)
  return codes_TxN @ dictionary_NxD + noise * jax.random.normal(noise_key, (n_tokens, d_model))


class SyntheticSource:
  """Batches from `config`'s process; batch `step` is the same on every call."""

  def __init__(self, config: SyntheticConfig):
    self.config = config
    dictionary_key, self._key = jax.random.split(jax.random.key(config.seed))
    directions = np.asarray(jax.random.normal(dictionary_key, (config.n_features, config.d_model)))
    self.dictionary = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    self.feature_class = config.feature_class()
    self._arrays = (jnp.asarray(self.dictionary, jnp.float32),
                    jnp.asarray(config.firing_rates(), jnp.float32),
                    jnp.asarray(config.magnitudes(), jnp.float32))

  def sample(self, step: int, n_tokens: int) -> np.ndarray:
    """Tokens [n_tokens, D] of batch `step`."""
    key = jax.random.fold_in(self._key, step)
    return np.asarray(_sample(key, n_tokens, *self._arrays, self.config.spread,
                              self.config.noise))

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
