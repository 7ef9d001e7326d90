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

It encodes the tokens twice: pass 1 counts n_j, pass 2 keeps each latent's
n_j + 1 largest activations in a buffer of its own (`_tiers`: at most about
four times the training rule's codes on those tokens). Until 2026-12-07 it
bisected θ_j on its float bits, encoding the tokens 32 times after the count
(33 passes in all); the tests keep that bisection as their reference, and
the thresholds are the same bits.

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
from sae_jax import selection
from sae_jax import transcoder

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


def _activations(params, x_NxBxD, sae: model.SAE):
  """i -> batch i's activations relu(pre) [B, F], as training computes them
  (a transcoder's from the input half of its rows)."""
  inputs = lambda i: transcoder.sides(x_NxBxD[i], sae.config)[0]
  return lambda i: jax.nn.relu(sae.apply({"params": params}, inputs(i), method=model.SAE.pre))


@functools.partial(jax.jit, static_argnames=("sae",))
def _count(params, x_NxBxD, sae: model.SAE):
  """Pass 1: n_j, the tokens the training rule selects latent j on, and the
  rule's squared error, batch by batch as in training."""
  config = sae.config
  variables = {"params": params}
  n_batches, _, _ = x_NxBxD.shape
  key = jax.random.key(CALIBRATION_KEY)
  acts = _activations(params, x_NxBxD, sae)

  def count_selected(i, carry):
    """The counts and squared error with batch i's, and the pool kept for
    the next (`pool_every`)."""
    total_F, sse, pool_P = carry
    a_BxF, key_i = acts(i), jax.random.fold_in(key, i)
    # Renewed on every pool_every-th batch, as in training.
    pool_P = model.step_pool(a_BxF, key_i,
                             None if pool_P is None else (pool_P, i % config.pool_every == 0),
                             **config.pool_rule)
    if config.selection == "sampled":  # the selection in the pool's P columns, as training
      rule = config.pool_rule
      chosen = selection.sampled_select_pooled(a_BxF, rule.pop("k"), rule.pop("l"), pool=pool_P,
                                               **model.sampled_options(key_i, **rule))
      xhat_BxD = sae.apply(variables, chosen.values, chosen.pool, method=model.SAE.decode_pooled)
      total_F = total_F.at[chosen.pool].add(jnp.sum(chosen.values > 0, axis=0, dtype=jnp.int32))
    else:
      z_BxF = sae.apply(variables, a_BxF, key=key_i, pool=pool_P, method=model.SAE.select)
      xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode)
      total_F = total_F + jnp.sum(z_BxF > 0, axis=0, dtype=jnp.int32)
    error = transcoder.sides(x_NxBxD[i], config)[1] - xhat_BxD
    return total_F, sse + jnp.sum(jnp.square(error)).astype(sse.dtype), pool_P

  kept_P = jnp.zeros(config.pool_size, jnp.int32) if config.keeps_pool else None
  counts_F, sse, _ = lax.fori_loop(
      0, n_batches, count_selected,
      (jnp.zeros(config.n_latents, jnp.int32), jnp.zeros((), jnp.float32), kept_P))
  return counts_F, sse


@functools.partial(jax.jit, static_argnames=("sae", "widths"))
def _largest(params, x_NxBxD, latents, sae: model.SAE, widths: tuple):
  """Pass 2: for each tier t, the widths[t] largest activations of each of
  its latents (latents[t], int32) over all tokens, in descending order,
  -inf where there are fewer. A latent's buffer merges each batch's column
  into it: top widths[t] of (buffer, column)."""
  n_batches, _, _ = x_NxBxD.shape
  acts = _activations(params, x_NxBxD, sae)
  dtype = jax.eval_shape(acts, 0).dtype  # float64 under jax_enable_x64

  def merge(i, buffers):
    a_BxF = acts(i)
    a_BxF = jnp.where(jnp.isnan(a_BxF), -jnp.inf, a_BxF)  # never above θ, as in a count
    return tuple(lax.top_k(jnp.concatenate([buffer, a_BxF[:, index].T], axis=1), width)[0]
                 for buffer, index, width in zip(buffers, latents, widths))

  return lax.fori_loop(0, n_batches, merge, tuple(
      jnp.full((len(index), width), -jnp.inf, dtype)
      for index, width in zip(latents, widths)))


def _tiers(counts_F: np.ndarray, tokens: int) -> tuple:
  """The latents whose θ needs pass 2 (selected on some tokens, not all),
  grouped by the buffer each needs, n_j + 1 rounded up to a power of two:
  (widths, latents per tier, padded to a power of two by repeating its first
  so that few shapes compile). The two roundings keep at most about four
  times Σ (n_j + 1) floats, and Σ n_j is at most tokens · k for every
  k-budget rule; each batch also gathers its [B, F] activations once more,
  tier by tier."""
  needed = np.flatnonzero((counts_F > 0) & (counts_F < tokens))
  width_F = 2 ** np.ceil(np.log2(counts_F[needed] + 1)).astype(np.int64)
  widths, latents = [], []
  for width in np.unique(width_F):
    index = needed[width_F == width]
    padded = 2 ** int(np.ceil(np.log2(len(index))))
    widths.append(int(width))
    latents.append(np.concatenate([index, np.full(padded - len(index), index[0])]).astype(np.int32))
  return tuple(widths), latents


def per_latent_thresholds(params, x_NxBxD, sae: model.SAE, counts_F: np.ndarray) -> np.ndarray:
  """θ_j = latent j's (n_j + 1)-th largest activation on the tokens x, 0 where
  n_j is every token or that activation is 0, NEVER where n_j = 0: the
  smallest non-negative float32 with at most n_j activations above it, found
  in one pass with a buffer per latent of its n_j + 1 largest.

  Args:
    params: the SAE's parameters (scaled units).
    x_NxBxD: the tokens as batches [n, B, D] (scaled units).
    sae: the SAE module.
    counts_F: n_j per latent (`calibrate`'s first pass), int.

  Returns:
    float32 θ [F].
  """
  n_batches, batch_size, _ = x_NxBxD.shape
  counts_F = np.asarray(counts_F, np.int64)
  theta_F = np.where(counts_F > 0, 0.0, NEVER).astype(np.float32)
  widths, latents = _tiers(counts_F, n_batches * batch_size)
  if not widths:
    return theta_F
  buffers = _largest(params, x_NxBxD, [jnp.asarray(i) for i in latents], sae, widths)
  for index, buffer in zip(latents, buffers):
    value = np.asarray(buffer)[np.arange(len(index)), counts_F[index]]
    # The float32 at or just above it: under x64 the activations are float64.
    theta = value.astype(np.float32)
    theta = np.where(theta < value, np.nextafter(theta, np.float32(np.inf)), theta)
    theta_F[index] = np.where(value > 0, theta, np.float32(0.0))  # 0, never -0
  return theta_F


def calibrate(params, x_NxD, sae: model.SAE, *, batch_size: int,
              per_latent: bool = True) -> Calibration:
  """Per-latent inference thresholds from the training rule on x.

  Args:
    params: the SAE's parameters (scaled units).
    x_NxD: calibration tokens, already multiplied by the input scale (a
      transcoder's pairs by theirs, `transcoder.scaled`); cut into
      floor(N / batch_size) batches of `batch_size`, the training batch (the
      rule's budget is batch_size · k).
    sae: the SAE module; TopK needs no thresholds (its counts are still
      found), but a TopK transcoder does (`saelens.py`).
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
  x_NxBxD = jnp.asarray(batches(x_NxD, batch_size))
  counts_F, sse = _count(params, x_NxBxD, sae)
  counts_F = np.asarray(counts_F).astype(np.int64)
  theta_F = (per_latent_thresholds(params, x_NxBxD, sae, counts_F)
             if per_latent and (sae.config.selection != "topk" or sae.config.transcoder)
             else np.zeros(sae.config.n_latents, np.float32))
  return Calibration(theta_F, counts_F, x_NxBxD.shape[0] * batch_size, float(sse))


def log10_density(counts_F, tokens: int) -> np.ndarray:
  """log10 of each latent's firing frequency, as SAELens' sparsity.safetensors
  holds it (log10(frequency + 1e-10))."""
  return np.log10(np.asarray(counts_F, np.float64) / tokens + 1e-10).astype(np.float32)
