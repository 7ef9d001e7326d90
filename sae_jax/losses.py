"""Losses and reconstruction metrics, global over a batch split on `axis_name`.

The scale is dictionary_learning's and SAELens': the reconstruction loss is
the squared error summed over the D dimensions and averaged over tokens, so
that a global-norm clip of 1.0 binds as it does in those trainers. AuxK is a
ratio of two such sums, so it has no scale.

Each device returns its share of the global value, so that the mean over
devices of the values (and of their gradients, as `lax.pmean` takes it) is
the value on the concatenated batch. Shards must be the same size, as under
`pmap`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import collectives
from sae_jax import scoring
from sae_jax import selection


def _psum(x, axis_name):
  return collectives.ordered_psum(x, axis_name)


def _total_variance(x_BxD, axis_name):
  """Σ_b ||x_b - mean_b x||² over the global batch."""
  n_tokens = scoring.global_tokens(x_BxD.shape[0], axis_name)
  mean_D = _psum(jnp.sum(x_BxD, axis=0), axis_name) / n_tokens
  return _psum(jnp.sum(jnp.square(x_BxD - mean_D[None, :])), axis_name)


def mse(x_BxD: jax.Array, xhat_BxD: jax.Array) -> jax.Array:
  """Squared error summed over D, averaged over this device's tokens:
  mean_b ||x_b - xhat_b||² (dictionary_learning's `l2_loss`, SAELens' `mse_loss`).

  >>> float(mse(jnp.array([[1., 2.], [0., 0.]]), jnp.zeros((2, 2))))
  2.5
  """
  return jnp.sum(jnp.square(x_BxD - xhat_BxD)) / x_BxD.shape[0]


def dead_latents(silent_F: jax.Array, fired_F: jax.Array, dead_steps: int) -> jax.Array:
  """The latents that count as dead on a step, as dictionary_learning counts
  them: silent for `dead_steps` steps, this one included, so a latent that
  fires in this batch is never dead in it.

  Args:
    silent_F: int, steps each latent went without firing before this step.
    fired_F: bool, the latents this step's global batch selected.
    dead_steps: steps without firing after which a latent is dead.
  """
  return ~fired_F & (silent_F + 1 >= dead_steps)


def fvu(x_BxD: jax.Array, xhat_BxD: jax.Array, axis_name=None) -> jax.Array:
  """Fraction of variance unexplained, Σ||x - xhat||² / Σ||x - mean(x)||², over
  the global batch (the same on every device).

  >>> x = jnp.array([[1., 0.], [-1., 0.]])
  >>> float(fvu(x, 0.5 * x))
  0.25
  """
  error = _psum(jnp.sum(jnp.square(x_BxD - xhat_BxD)), axis_name)
  return error / _total_variance(x_BxD, axis_name)


def auxk_loss(pre_BxF: jax.Array, dead_F: jax.Array, residual_BxD: jax.Array,
              W_dec_FxD: jax.Array, k_aux: int, axis_name=None) -> jax.Array:
  """AuxK: how well the top `k_aux` dead latents of each token reconstruct the
  residual the live ones left, normalised by the residual's variance.

  Args:
    pre_BxF: encoder pre-activations.
    dead_F: bool, the latents that count as dead (the same on every device).
    residual_BxD: x - xhat, the target; no gradient flows into it.
    W_dec_FxD: decoder rows.
    k_aux: dead latents per token.
    axis_name: mapped axis the tokens are split over.

  Returns:
    This device's share of Σ||e - ê||² / Σ||e - mean(e)||² over the global
    batch; 0 when no latent is dead.
  """
  residual_BxD = lax.stop_gradient(residual_BxD)

  def error():
    a_dead_BxF = jnp.where(dead_F[None, :], jax.nn.relu(pre_BxF), 0)
    ehat_BxD = selection.topk(a_dead_BxF, k_aux) @ W_dec_FxD
    return jnp.sum(jnp.square(residual_BxD - ehat_BxD))

  # Skipping the top-k while nothing is dead (most of training) is free. The
  # zero is a sum over no tokens, so under shard_map it varies as the data does.
  error = lax.cond(jnp.any(dead_F), error, lambda: jnp.sum(residual_BxD[:0]))
  return auxk_scale(residual_BxD, axis_name) * error


def auxk_scale(residual_BxD: jax.Array, axis_name=None) -> jax.Array:
  """What turns this device's Σ||e - ê||² into its share of `auxk_loss`:
  devices / Σ||e - mean(e)||² over the global batch."""
  devices = scoring.global_tokens(1, axis_name)
  variance = _total_variance(residual_BxD, axis_name)
  return devices / jnp.maximum(variance, jnp.finfo(jnp.float32).tiny)
