"""Matryoshka SAEs: the reconstruction loss of nested prefixes of the dictionary.

The latents are cut, in index order, into groups of sizes s_1..s_G. Prefix i
holds groups 1..i, and reconstructs x by itself:
xhat_i = b_dec + Σ_{g ≤ i} z_g W_dec,g. The loss is dictionary_learning's
(`MatryoshkaBatchTopKTrainer.loss`): the mean over prefixes of their
weighted squared errors,

    L = (1/G) Σ_i w_i · mean_b ||x_b − xhat_i,b||²,

plus AuxK on the residual of the whole dictionary (prefix G), as for the
other rules. The selection is unchanged (BatchTopK, Sampled-SAE's pooled
BatchTopK, or TopK, over all F latents), so the saved SAE is an ordinary
one: prefix G is its reconstruction, and inference thresholds are calibrated
as for the rule alone.

The gradient of xhat_i is d_i = (2 w_i / (B G)) (xhat_i − x); a latent of
group g is in every prefix i ≥ g, so its codes and decoder row see the
suffix sum R_g = Σ_{i ≥ g} d_i where the plain loss has one cotangent. The
fast step's gradients below use R_g in place of that cotangent.
"""

import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import layouts


class Nested(typing.NamedTuple):
  """The groups' sizes in latents (in index order) and the prefixes' weights."""
  sizes: tuple
  weights: tuple


def group_sizes(fractions: typing.Sequence[float], n_latents: int) -> tuple:
  """Latents per group, as dictionary_learning cuts F: floor(f · F) for all
  groups but the last, which takes the rest.

  >>> group_sizes((0.25, 0.25, 0.5), 10)
  (2, 2, 6)
  """
  sizes = [int(f * n_latents) for f in fractions[:-1]]
  return tuple(sizes + [n_latents - sum(sizes)])


def check(fractions, weights, n_latents: int, name: str = "TrainConfig.matryoshka_groups"
          ) -> None:
  """Raises ValueError, naming the field, unless the fractions cut F into
  non-empty groups and the weights are one non-negative number per group."""
  if (not isinstance(fractions, tuple) or not fractions
      or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1
                 for f in fractions)):
    raise ValueError(f"{name} must be fractions of the dictionary in (0, 1], in order; "
                     f"got {fractions!r}")
  if not math.isclose(sum(fractions), 1.0):
    raise ValueError(f"{name} must sum to 1 (fractions of the dictionary); got "
                     f"{list(fractions)}, which sum to {sum(fractions):.6g}")
  sizes = group_sizes(fractions, n_latents)
  if min(sizes) < 1:
    raise ValueError(f"{name} {list(fractions)} cut the {n_latents} latents into groups of "
                     f"{list(sizes)}: every group needs at least one latent")
  if weights is None:
    return
  weights_name = name.replace("groups", "weights")
  if (not isinstance(weights, tuple) or len(weights) != len(fractions)
      or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < math.inf
                 for w in weights)):
    raise ValueError(f"{weights_name} must be one non-negative number per group "
                     f"({len(fractions)}); got {weights!r}")
  if not sum(weights) > 0:
    raise ValueError(f"{weights_name} {list(weights)} are all 0: the loss would have no "
                     f"reconstruction term")


def default_weights(n_groups: int) -> tuple:
  """dictionary_learning's default: 1/G for every prefix."""
  return (1.0 / n_groups,) * n_groups


def group_of(latents, sizes: tuple) -> jax.Array:
  """The group index of each latent index.

  >>> group_of(jnp.array([0, 1, 2, 5, 9]), (2, 2, 6)).tolist()
  [0, 0, 1, 2, 2]
  """
  ends = jnp.asarray(np.cumsum(sizes), jnp.int32)
  return jnp.searchsorted(ends, latents, side="right").astype(jnp.int32)


def loss(x_BxD, z_BxF, W_dec_FxD, b_dec_D, nested: Nested) -> tuple:
  """(L, xhat of the whole dictionary), by the definition: the autodiff reference.

  >>> nested = Nested((1, 1), (1.0, 1.0))
  >>> x, z = jnp.array([[1., 2.]]), jnp.array([[1., 2.]])
  >>> L, xhat = loss(x, z, jnp.eye(2), jnp.zeros(2), nested)  # prefix 1 misses the 2
  >>> float(L), xhat.tolist()
  (2.0, [[1.0, 2.0]])
  """
  xhat_BxD = jnp.broadcast_to(b_dec_D[None, :], x_BxD.shape)
  total, start = 0.0, 0
  for size, weight in zip(nested.sizes, nested.weights):
    xhat_BxD = xhat_BxD + z_BxF[:, start:start + size] @ W_dec_FxD[start:start + size]
    total = total + weight * jnp.sum(jnp.square(x_BxD - xhat_BxD)) / x_BxD.shape[0]
    start += size
  return total / len(nested.sizes), xhat_BxD


def _cotangents(x_BxD, partial_GxBxD, b_dec_D, weights: tuple) -> tuple:
  """(L, xhat of the whole dictionary, R [G, B, D]) from each group's
  decoded codes."""
  n_groups, n_tokens, _ = partial_GxBxD.shape
  error_GxBxD = jnp.cumsum(partial_GxBxD, axis=0) + (b_dec_D[None, :] - x_BxD)[None]
  w_G = jnp.asarray(weights, jnp.float32)
  squared_G = jnp.sum(jnp.square(error_GxBxD), axis=(1, 2))
  value = jnp.sum(w_G * squared_G) / n_tokens / n_groups
  d_GxBxD = (2 / (n_tokens * n_groups)) * w_G[:, None, None] * error_GxBxD
  R_GxBxD = jnp.flip(jnp.cumsum(jnp.flip(d_GxBxD, 0), axis=0), 0)
  return value, x_BxD + error_GxBxD[-1], R_GxBxD


def through_codes(x_BxD, centred_BxD, z_BxP, W_enc_DxP, W_dec_PxD, b_dec_D, nested: Nested,
                  group_P=None, centre=True):
  """`gradients._through_codes` for the nested loss: codes on P columns,
  either all F in order (`group_P` None: the groups are slices) or a pool
  whose columns' groups are `group_P`.

  Returns:
    xhat_BxD (the whole dictionary), L, and the gradients on those columns.
  """
  G = len(nested.sizes)
  if group_P is None:
    bounds = np.cumsum((0,) + nested.sizes)
    cols = lambda z, g: z[:, bounds[g]:bounds[g + 1]]  # group g's codes
    rows = lambda W, g: W[bounds[g]:bounds[g + 1]]  # group g's decoder rows
    partial = jnp.stack([cols(z_BxP, g) @ rows(W_dec_PxD, g) for g in range(G)])
  else:
    in_group = lambda g, a: jnp.where(group_P == g, a, 0)
    partial = jnp.stack([in_group(g, z_BxP) @ W_dec_PxD for g in range(G)])
  value, xhat_BxD, R_GxBxD = _cotangents(x_BxD, partial, b_dec_D, nested.weights)
  if group_P is None:
    dz_BxP = jnp.concatenate([R_GxBxD[g] @ rows(W_dec_PxD, g).T for g in range(G)], axis=1)
    dW_dec_PxD = jnp.concatenate([cols(z_BxP, g).T @ R_GxBxD[g] for g in range(G)], axis=0)
  else:
    dz_BxP = sum(in_group(g, R_GxBxD[g] @ W_dec_PxD.T) for g in range(G))
    dW_dec_PxD = sum(in_group(g, z_BxP).T @ R_GxBxD[g] for g in range(G))
  dpre_BxP = jnp.where(z_BxP > 0, dz_BxP, 0)
  db_enc_P = jnp.sum(dpre_BxP, axis=0)
  grads = {"W_enc": centred_BxD.T @ dpre_BxP, "b_enc": db_enc_P, "W_dec": dW_dec_PxD,
           "b_dec": layouts.b_dec_grad(R_GxBxD[0], W_enc_DxP, db_enc_P, centre)}
  return xhat_BxD, value, grads


def through_entries(x_BxD, centred_BxD, rows_M, cols_M, values_M, params, nested: Nested,
                    centre=True):
  """`gradients._through_entries`' reconstruction and gradients for the
  nested loss: each entry is decoded into its (group, token) slot.

  Returns:
    xhat_BxD (the whole dictionary), L, and the gradients (all F).
  """
  G, (B, D) = len(nested.sizes), x_BxD.shape
  n_latents = params["W_dec"].shape[0]
  slot_M = group_of(cols_M, nested.sizes) * B + rows_M
  W_dec_MxD = params["W_dec"].at[cols_M].get(mode="promise_in_bounds")
  partial = jax.ops.segment_sum(values_M[:, None] * W_dec_MxD, slot_M, G * B).reshape(G, B, D)
  value, xhat_BxD, R_GxBxD = _cotangents(x_BxD, partial, params["b_dec"], nested.weights)
  R_SxD = R_GxBxD.reshape(G * B, D)
  R_MxD = R_SxD.at[slot_M].get(mode="promise_in_bounds")
  dpre_M = jnp.where(values_M > 0, jnp.sum(R_MxD * W_dec_MxD, axis=1), 0)
  grads = layouts.entry_grads(slot_M, cols_M, values_M, R_SxD, dpre_M,
                              jnp.tile(centred_BxD, (G, 1)), n_latents)
  grads["b_dec"] = layouts.b_dec_grad(R_GxBxD[0], params["W_enc"], grads["b_enc"], centre)
  return xhat_BxD, value, grads
