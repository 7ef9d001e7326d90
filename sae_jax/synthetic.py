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

import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import validation

FREQUENT, RARE, PARENT, CHILD = 0, 1, 2, 3
CLASS_NAMES = {FREQUENT: "frequent", RARE: "rare", PARENT: "parent", CHILD: "child"}
NO_PARENT = -1


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
  parents: int = 0
  """Features that have children (0: no hierarchy); they follow the rare ones."""
  children: int = 4
  """Children per parent; they follow the parents, grouped by parent."""
  child_given_parent: float = 0.5
  """When a parent fires, the probability that one of its children fires too."""
  parent_rate: float = 1.0
  """A parent fires this many times as often as a frequent feature (its
  children with it)."""
  seed: int = 0
  """Seeds the dictionary and every batch."""

  def __post_init__(self):
    owner = "SyntheticConfig"
    validation.check_int_field(owner, "d_model", self.d_model)
    validation.check_int_field(owner, "n_features", self.n_features)
    if isinstance(self.active, (int, float)) and self.active > self.n_features:
      raise ValueError(f"SyntheticConfig: {self.n_features} features (--synthetic-features) "
                       f"cannot have {self.active:g} active per token on average: give at "
                       f"least {math.ceil(self.active)} features")
    validation.check_real_field(owner, "active", self.active, 0, self.n_features)
    for name, hi in (("magnitude", math.inf), ("spread", 1), ("noise", math.inf),
                     ("rare_fraction", 1), ("rare_rate", math.inf),
                     ("rare_magnitude", math.inf)):
      validation.check_real_field(owner, name, getattr(self, name), 0, hi)
    validation.check_int_field(owner, "parents", self.parents, minimum=0)
    validation.check_int_field(owner, "children", self.children)
    validation.check_real_field(owner, "child_given_parent", self.child_given_parent, 0, 1)
    validation.check_real_field(owner, "parent_rate", self.parent_rate, 0, math.inf,
                                lo_open=True)
    if self.n_rare + self.parents * (1 + self.children) > self.n_features:
      raise ValueError(
          f"SyntheticConfig: {self.n_rare} rare features and {self.parents} parents with "
          f"{self.children} children each need {self.n_rare + self.parents * (1 + self.children)} "
          f"features; n_features is {self.n_features}")
    validation.check_int_field(owner, "seed", self.seed, minimum=0,
                               maximum=validation.MAX_SEED)
    if self.firing_rates().max() > 1:
      raise ValueError(
          f"SyntheticConfig: active={self.active} with rare_fraction={self.rare_fraction} "
          f"and rare_rate={self.rare_rate} needs a firing probability above 1")

  @property
  def n_rare(self) -> int:
    return round(self.rare_fraction * self.n_features)

  def feature_class(self) -> np.ndarray:
    """[n_features] int: RARE for the first n_rare features, then PARENT and
    CHILD for the hierarchy's, FREQUENT after."""
    i = np.arange(self.n_features)
    first_child = self.n_rare + self.parents
    return np.select([i < self.n_rare, i < first_child,
                      i < first_child + self.parents * self.children],
                     [RARE, PARENT, CHILD], FREQUENT)

  def parent_of(self) -> np.ndarray:
    """[n_features] int: each child's parent feature, NO_PARENT for the others."""
    i = np.arange(self.n_features)
    first_child = self.n_rare + self.parents
    return np.where(self.feature_class() == CHILD,
                    self.n_rare + (i - first_child) // self.children, NO_PARENT)

  def firing_rates(self) -> np.ndarray:
    """[n_features] probability that each feature fires in a token (a
    child's: its parent's rate times child_given_parent / children)."""
    kind = self.feature_class()
    relative = np.select([kind == RARE, kind == PARENT, kind == CHILD],
                         [self.rare_rate, self.parent_rate,
                          self.parent_rate * (self.child_given_parent / self.children)], 1.0)
    return relative * (self.active / relative.sum()) if relative.sum() else relative

  def magnitudes(self) -> np.ndarray:
    """[n_features] mean coefficient of each feature when it fires."""
    rare = self.feature_class() == RARE
    return self.magnitude * np.where(rare, self.rare_magnitude, 1.0)


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
