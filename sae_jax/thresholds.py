"""Inference thresholds: one θ_j per latent, calibrated so that the saved SAE
fires each latent as often as training did (SPEC.md, "Inference").

BatchTopK and Sampled-SAE select over a whole batch, which a saved SAE
cannot do token by token; it keeps a_j > θ_j instead. `calibrate` runs the
training rule over calibration batches with the final parameters, counting
n_j, the tokens on which it selects latent j, and sets θ_j to latent j's
(n_j + 1)-th largest activation on the same tokens: exactly n_j of them lie
above it (fewer only on ties), so on those tokens inference fires every
latent exactly as often as the training rule. A latent the training rule
never selects gets θ_j = the largest float32, so it never fires.

The alternative, each latent's EMA of its smallest selected activation, is
measured against this in docs/inference-thresholds.md: inside a small pool
the budget takes almost every positive entry, so that minimum sits near 0,
and a latent that is in the pool on a few batches then fires on nearly all
its positive activations at inference.
"""

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax import model

NEVER = float(np.finfo(np.float32).max)  # θ of a latent that must never fire
# The Sampled-SAE pools of `sample_pool` runs, drawn during calibration.
CALIBRATION_KEY = 0x51A7


class Calibration(typing.NamedTuple):
  """What `calibrate` found on its tokens."""
  threshold_F: np.ndarray  # float32 θ_j (scaled units)
  counts_F: np.ndarray  # int64 n_j: tokens the training rule selected latent j on
  tokens: int  # calibration tokens
  training_sse: float  # Σ‖x − x̂‖² of the training rule on them (scaled units)


def batches(x_NxD, batch_size: int) -> np.ndarray:
  """x cut into floor(N / batch_size) whole batches [n, batch_size, D] (float32)."""
  n_batches = len(x_NxD) // batch_size
  if n_batches < 1:
    raise ValueError(f"calibration needs at least one batch of {batch_size} tokens; "
                     f"got {len(x_NxD)}")
  return np.asarray(x_NxD[:n_batches * batch_size], np.float32).reshape(
      n_batches, batch_size, -1)


@functools.partial(jax.jit, static_argnames=("sae", "per_latent"))
def _calibrate(params, x_NxBxD, sae: model.SAE, per_latent: bool):
  config = sae.config
  variables = {"params": params}
  n_batches, _, _ = x_NxBxD.shape
  key = jax.random.key(CALIBRATION_KEY)
  acts = lambda i: jax.nn.relu(sae.apply(variables, x_NxBxD[i], method=model.SAE.pre))

  def count_selected(i, carry):
    """The counts and squared error with batch i's, and the pool kept for
    the next (`pool_every`)."""
    total_F, sse, pool_P = carry
    a_BxF, key_i = acts(i), jax.random.fold_in(key, i)
    # Renewed on every pool_every-th batch, as in training.
    pool_P = model.step_pool(a_BxF, key_i,
                             None if pool_P is None else (pool_P, i % config.pool_every == 0),
                             **config.pool_rule)
    z_BxF = sae.apply(variables, a_BxF, key=key_i, pool=pool_P, method=model.SAE.select)
    error = x_NxBxD[i] - sae.apply(variables, z_BxF, method=model.SAE.decode)
    return (total_F + jnp.sum(z_BxF > 0, axis=0, dtype=jnp.int32),
            sse + jnp.sum(jnp.square(error)).astype(sse.dtype), pool_P)

  kept_P = jnp.zeros(config.pool_size, jnp.int32) if config.keeps_pool else None
  counts_F, sse, _ = lax.fori_loop(
      0, n_batches, count_selected,
      (jnp.zeros(config.n_latents, jnp.int32), jnp.zeros((), jnp.float32), kept_P))
  if not per_latent:
    return counts_F, sse, jnp.zeros(config.n_latents, jnp.float32)

  def above(bits_F):
    theta_F = lax.bitcast_convert_type(bits_F, jnp.float32)
    return lax.fori_loop(0, n_batches, lambda i, total: total + jnp.sum(
        acts(i) > theta_F[None, :], axis=0, dtype=jnp.int32), jnp.zeros(config.n_latents, jnp.int32))

  # The smallest non-negative float θ_j with at most n_j activations above
  # it, bisected on its bits (which order as the floats do): hi always
  # qualifies (nothing is above +inf), lo = 0 is checked last.
  def halve(_, bounds):
    lo_F, hi_F = bounds
    mid_F = lo_F + (hi_F - lo_F) // 2
    ok_F = above(mid_F) <= counts_F
    return jnp.where(ok_F, lo_F, mid_F), jnp.where(ok_F, mid_F, hi_F)

  inf_bits = lax.bitcast_convert_type(jnp.float32(jnp.inf), jnp.int32)
  zero_F = jnp.zeros(config.n_latents, jnp.int32)
  _, hi_F = lax.fori_loop(0, 31, halve, (zero_F, jnp.full_like(zero_F, inf_bits)))
  theta_F = jnp.where(above(zero_F) <= counts_F, 0.0,
                      lax.bitcast_convert_type(hi_F, jnp.float32))
  return counts_F, sse, jnp.where(counts_F > 0, theta_F, NEVER)


def calibrate(params, x_NxD, sae: model.SAE, *, batch_size: int,
              per_latent: bool = True) -> Calibration:
  """Per-latent inference thresholds from the training rule on x.

  Args:
    params: the SAE's parameters (scaled units).
    x_NxD: calibration tokens, already multiplied by the input scale; cut
      into floor(N / batch_size) batches of `batch_size`, the training batch
      (the rule's budget is batch_size · k).
    sae: the SAE module; TopK needs no thresholds (its counts are still found).
    batch_size: tokens per batch, as in training.
    per_latent: False only counts (for `--inference global`); threshold_F is 0.

  Returns:
    Calibration(threshold_F, counts_F, tokens, training_sse).

  >>> from sae_jax import SAEConfig
  >>> sae = model.SAE(SAEConfig(2, 3, k=1, selection="batchtopk"))
  >>> params = {"W_enc": jnp.eye(2, 3), "b_enc": jnp.zeros(3), "W_dec": jnp.eye(3, 2),
  ...           "b_dec": jnp.zeros(2)}
  >>> x = jnp.array([[4., 0.], [0., 3.], [2., 0.], [1., 1.]])
  >>> c = calibrate(params, x, sae, batch_size=4)  # keeps 4, 3, 2 and one 1
  >>> c.counts_F.tolist(), c.threshold_F[:2].tolist(), bool(c.threshold_F[2] == NEVER)
  ([3, 1, 0], [0.0, 1.0], True)
  """
  x_NxBxD = batches(x_NxD, batch_size)
  per_latent = per_latent and sae.config.selection != "topk"
  counts_F, sse, theta_F = _calibrate(params, jnp.asarray(x_NxBxD), sae, per_latent)
  return Calibration(np.asarray(theta_F), np.asarray(counts_F).astype(np.int64),
                     x_NxBxD.shape[0] * batch_size, float(sse))


def log10_density(counts_F, tokens: int) -> np.ndarray:
  """log10 of each latent's firing frequency, as SAELens' sparsity.safetensors
  holds it (log10(frequency + 1e-10))."""
  return np.log10(np.asarray(counts_F, np.float64) / tokens + 1e-10).astype(np.float32)
