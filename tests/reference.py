"""Slow, obviously-correct versions: the selection rules in NumPy (float64),
and the calibration's thresholds as they were first computed (a bisection)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import model
from sae_jax import thresholds


def tokens(a):
  a = np.asarray(a, np.float64)
  return a.reshape(-1, a.shape[-1])


def leverage(r, ridge=0.01):
  """Ridge leverage scores r_jᵀ (r rᵀ + ridge I)⁻¹ r_j of r's columns, by a solve."""
  r = np.asarray(r, np.float64)
  return np.sum(r * np.linalg.solve(r @ r.T + ridge * np.eye(len(r)), r), axis=0)


def scores(a, method):
  a = np.maximum(tokens(a), 0.0)
  if method == "uniform":
    return np.ones(a.shape[1])
  if method == "leverage":
    return leverage(a)
  if method == "squared_l2":
    return (a * a).sum(0)
  if method == "l2":
    return np.sqrt((a * a).sum(0))
  out = np.empty(a.shape[1])
  for j in range(a.shape[1]):
    mass = a[:, j].sum()
    if mass == 0:
      out[j] = -1.0
      continue
    p = a[:, j][a[:, j] > 0] / mass
    out[j] = -(p * np.log(p)).sum()
  return out


def pool(scores, size):
  """The `size` best columns by (score desc, index asc), in index order."""
  order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
  return np.sort(order[:size])


def batch_topk_mask(a, k, cols=None):
  """Keep the B*k largest positive entries among `cols`; ties by position."""
  a = tokens(a)
  n_rows, n_cols = a.shape
  allowed = np.zeros(n_cols, bool)
  allowed[np.arange(n_cols) if cols is None else cols] = True
  rows, cs = np.nonzero((a > 0) & allowed[None, :])
  values = a[rows, cs]
  order = np.lexsort((cs, rows, -values))[: n_rows * k]
  mask = np.zeros_like(a, bool)
  mask[rows[order], cs[order]] = True
  return mask


def topk_mask(a, k):
  a = tokens(a)
  mask = np.zeros_like(a, bool)
  for b, row in enumerate(a):
    cs = np.nonzero(row > 0)[0]
    order = np.lexsort((cs, -row[cs]))[:k]
    mask[b, cs[order]] = True
  return mask


def apply(a, mask):
  a = np.asarray(a)
  return np.where(mask.reshape(a.shape), a, 0).astype(a.dtype)


def bisected_thresholds(params, x_NxBxD, sae, counts_F):
  """The calibration's thresholds until 2026-12-07: per latent, the smallest
  non-negative float θ with at most n_j activations above it, bisected on
  its bits (which order as the floats do), 32 passes over the tokens."""
  return np.asarray(_bisect(params, jnp.asarray(x_NxBxD), jnp.asarray(counts_F, jnp.int32), sae))


@functools.partial(jax.jit, static_argnames=("sae",))
def _bisect(params, x_NxBxD, counts_F, sae):
  n_batches, F = x_NxBxD.shape[0], sae.config.n_latents
  acts = lambda i: jax.nn.relu(sae.apply({"params": params}, x_NxBxD[i], method=model.SAE.pre))

  def above(bits_F):
    theta_F = jax.lax.bitcast_convert_type(bits_F, jnp.float32)
    return jax.lax.fori_loop(0, n_batches, lambda i, total: total + jnp.sum(
        acts(i) > theta_F[None, :], axis=0, dtype=jnp.int32), jnp.zeros(F, jnp.int32))

  def halve(_, bounds):
    lo_F, hi_F = bounds
    mid_F = lo_F + (hi_F - lo_F) // 2
    ok_F = above(mid_F) <= counts_F
    return jnp.where(ok_F, lo_F, mid_F), jnp.where(ok_F, mid_F, hi_F)

  inf_bits = jax.lax.bitcast_convert_type(jnp.float32(jnp.inf), jnp.int32)
  zero_F = jnp.zeros(F, jnp.int32)
  _, hi_F = jax.lax.fori_loop(0, 31, halve, (zero_F, jnp.full_like(zero_F, inf_bits)))
  theta_F = jnp.where(above(zero_F) <= counts_F, 0.0,
                      jax.lax.bitcast_convert_type(hi_F, jnp.float32))
  return jnp.where(counts_F > 0, theta_F, thresholds.NEVER)
