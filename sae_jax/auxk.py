"""AuxK in the fast step: the residual reconstructed from each token's top
k_aux dead latents, on the dead latents' columns packed together while they
are few (`auxk_capacities`), so that its cost follows the dead latents, not
F. Its gradients are added to the step's dense ones (`dense_grads`), or
joined as rows to a Sampled-SAE pool's (`rows`)."""

import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import cut as cut_lib
from sae_jax import layouts
from sae_jax import losses
from sae_jax import optimizer
from sae_jax import selection


def auxk_entries(a_dead_BxC, k_aux: int):
  """AuxK's selection as entries: each token's k_aux largest positive
  activations among the columns (zero where a latent is not dead), (values
  [B, k_aux], columns [B, k_aux]), a slot with value 0 unused. lax.top_k
  takes equal values lower index first, as `selection.topk` (the dense
  AuxK's selection) does."""
  values_BxK, cols_BxK = cut_lib.top_k(a_dead_BxC, min(k_aux, a_dead_BxC.shape[1]))
  return jnp.maximum(values_BxK, 0), cols_BxK


# AuxK packs the dead latents' columns into F/64, F/16, F/4 or F/2 columns
# (`auxk_capacities`) when that many hold them, so that its cost follows the
# dead latents, not F; a switch picks the packing, or skips AuxK while none
# is dead. Before, AuxK was the dense branch of train_step's cond on whether
# any latent is dead, and XLA ran its work on every step, dead latents or
# not. Packing into F/2 columns pays for itself; into 3F/4 it gains almost
# nothing over dense gradients, so packing stops at F/2 (docs/speed.md has
# the measurements).
PACK_SHIFTS = (6, 4, 2, 1)


def auxk_capacities(n_latents: int, k_aux: int) -> tuple:
  """The sizes, smallest first, that AuxK packs the dead latents into: it
  works on the smallest that holds them all, on every latent past the
  largest. Each is at least k_aux (the top-k_aux needs that many columns).

  >>> auxk_capacities(24576, 384)
  (384, 1536, 6144, 12288)
  """
  if k_aux >= n_latents:
    return ()
  return tuple(sorted({max(k_aux, n_latents >> shift) for shift in PACK_SHIFTS} - {n_latents}))


class AuxK(typing.NamedTuple):
  """AuxK's gradients added to the fast step's, two ways (see `fast`)."""
  dense: typing.Callable  # dense grads -> (them plus AuxK's, AuxK's value)
  # (pooled grads, pool_P, capacity) -> (grads at rows, rows, AuxK's value)
  rows: typing.Callable


class _Setup(typing.NamedTuple):
  """What AuxK needs from the step (this device's tokens)."""
  params: dict
  centred_BxD: jax.Array
  residual_BxD: jax.Array  # e; no gradient flows into it
  pre_BxF: jax.Array  # pre-activations (or relu of them), no gradient
  dead_F: jax.Array
  k_aux: int
  weight: jax.Array  # ê's cotangent is weight·(e - ê)
  scale: jax.Array  # turns Σ||e - ê||² into this device's share of the loss
  layout: str  # `TrainConfig.layout`
  centre: bool  # the encoder read x - b_dec (`SAEConfig.centred`)


def _setup(params, centred_BxD, residual_BxD, pre_BxF, dead_F, k_aux: int, weight: float,
           axis_name, layout: str, centre: bool) -> _Setup:
  residual_BxD = lax.stop_gradient(residual_BxD)
  scale = losses.auxk_scale(residual_BxD, axis_name)  # collectives stay outside conds
  return _Setup(params, centred_BxD, residual_BxD, lax.stop_gradient(pre_BxF), dead_F,
                min(k_aux, pre_BxF.shape[1]), -2 * weight * scale, scale, layout, centre)


# AuxK's TopK runs by bisection on the bits (`selection.topk_by_bits`)
# while k_aux is at least 1/BITS_UP_TO of the columns, by a per-row top-k
# past that: bisection's counting passes grow with the columns faster than
# a per-row top-k does, and on CPU the two cross near 32 columns per kept
# entry (docs/speed.md has the measurements). The crossing moves past 32 as
# k grows, and bisection stops early on rows with fewer than k positive
# entries. Not measured on an accelerator.
BITS_UP_TO = 32


def _auxk_on(s: _Setup, a_BxC, W_dec_CxD, W_enc_DxC):
  """AuxK from C columns of activations (zero where a latent is not dead),
  each token's top k_aux entries among them, by entries or as dense codes
  (`layouts.layout`): its gradients at those columns (W_enc [D, C], b_enc [C],
  W_dec [C, D]) and b_dec's, and Σ||e - ê||²."""
  n_rows, n_cols = a_BxC.shape
  if layouts.layout(n_cols, s.k_aux, s.layout) == "codes":
    # With no more columns than k_aux, each token keeps all its positive entries.
    if s.k_aux >= n_cols:
      z_BxC = a_BxC
    elif n_cols <= BITS_UP_TO * s.k_aux:
      z_BxC = selection.topk_by_bits(a_BxC, s.k_aux)
    else:
      z_BxC = selection.topk(a_BxC, s.k_aux)
    error_BxD = s.residual_BxD - z_BxC @ W_dec_CxD
    dehat_BxD = s.weight * error_BxD
    dpre_BxC = jnp.where(z_BxC > 0, dehat_BxD @ W_dec_CxD.T, 0)
    grads = {"W_enc": s.centred_BxD.T @ dpre_BxC, "b_enc": jnp.sum(dpre_BxC, axis=0),
             "W_dec": z_BxC.T @ dehat_BxD}
  else:
    values_BxK, cols_BxK = auxk_entries(a_BxC, s.k_aux)
    # A slot of value 0 is unused; pointing it at column 0 keeps it in range.
    cols_BxK = jnp.where(values_BxK > 0, cols_BxK, 0)
    # Gathered rows feed reductions only, which XLA may fuse with the gather.
    W_dec_BxKxD = W_dec_CxD.at[cols_BxK].get(mode="promise_in_bounds")
    error_BxD = s.residual_BxD - jnp.sum(values_BxK[:, :, None] * W_dec_BxKxD, axis=1)
    dehat_BxD = s.weight * error_BxD
    dpre_BxK = jnp.where(values_BxK > 0,
                         jnp.sum(dehat_BxD[:, None, :] * W_dec_BxKxD, axis=2), 0)
    rows_M = jnp.repeat(jnp.arange(n_rows, dtype=jnp.int32), values_BxK.shape[1])
    grads = layouts.entry_grads(rows_M, cols_BxK.reshape(-1), values_BxK.reshape(-1), dehat_BxD,
                         dpre_BxK.reshape(-1), s.centred_BxD, n_cols)
  # ê has no b_dec: b_dec's gradient is the encoder's centring term alone.
  grads["b_dec"] = (-(W_enc_DxC @ grads["b_enc"]) if s.centre
                    else jnp.zeros(W_enc_DxC.shape[0], jnp.float32))
  return grads, jnp.sum(jnp.square(error_BxD))


def _packed(s: _Setup, capacity: int):
  """AuxK on the dead latents packed into `capacity` columns, in ascending
  latent order and padded with zero columns past the last latent (so that
  ties break as `selection.topk` breaks them): (their latents cols_C,
  AuxK's gradients at them, Σ||e - ê||²)."""
  n_latents = s.pre_BxF.shape[1]
  cols_C = jnp.nonzero(s.dead_F, size=capacity, fill_value=n_latents)[0]
  columns = lambda x_RxF: selection.take_columns(x_RxF, cols_C, fill_value=0)
  # relu after the gather: relu(pre) over all F columns is then never
  # written out (the fast step without AuxK fuses it into its readers).
  grads, error = _auxk_on(s, jax.nn.relu(columns(s.pre_BxF)),
                          s.params["W_dec"].at[cols_C].get(mode="fill", fill_value=0),
                          columns(s.params["W_enc"]))
  return cols_C, grads, error


def dense_grads(params, centred_BxD, residual_BxD, pre_BxF, dead_F, k_aux: int, weight: float,
                axis_name, into=None, *, layout: str = "auto", centre: bool = True):
  """AuxK's value (this device's share, `losses.auxk_loss`) and `into` (dense
  gradients; zeros when None) plus the gradients of auxk_weight times it.

  Its selection is each token's top k_aux among the dead latents, taken from
  the dead latents' columns packed into the smallest of `auxk_capacities`
  that holds them (`_packed`), or from all F columns; by entries or codes
  as `layout` (`TrainConfig.layout`) says; `centre` as `SAEConfig.centred`."""
  s = _setup(params, centred_BxD, residual_BxD, pre_BxF, dead_F, k_aux, weight, axis_name,
             layout, centre)
  if into is None:
    into = jax.tree.map(jnp.zeros_like, params)

  def packed(capacity):
    def run(into):
      cols_C, grads, error = _packed(s, capacity)
      return optimizer.add_pooled(into, grads, cols_C), error
    return run

  def every(into):
    grads, error = _auxk_on(s, jnp.where(dead_F[None, :], jax.nn.relu(s.pre_BxF), 0),
                            params["W_dec"], params["W_enc"])
    return jax.tree.map(jnp.add, into, grads), error

  def none(into):  # nothing dead: the gradients are `into`; a sum over no tokens
    return into, jnp.sum(s.residual_BxD[:0])

  capacities = auxk_capacities(pre_BxF.shape[1], s.k_aux)
  n_dead = jnp.sum(dead_F, dtype=jnp.int32)
  which = jnp.where(n_dead == 0, 0, 1 + jnp.searchsorted(jnp.array(capacities, jnp.int32), n_dead))
  grads, error = lax.switch(which, [none] + [packed(cap) for cap in capacities] + [every], into)
  return grads, s.scale * error


def rows(params, centred_BxD, residual_BxD, pre_BxF, dead_F, k_aux: int, weight: float,
         axis_name, pooled, pool_P, capacity: int, *, layout: str = "auto",
         centre: bool = True):
  """The pooled gradients plus AuxK's, as gradients at rows [P + C] (W_enc
  [D, P + C], b_enc [P + C], W_dec [P + C, D], b_dec [D]), for a step on which
  at most C = `capacity` latents are dead (the caller's promise):
  (grads, rows, AuxK's value). The numbers of `dense_grads` on the pooled
  gradients made dense, without an [F, D] gradient. A dead latent of the
  pool was not selected, so its pooled gradient is zero and its row is
  AuxK's. The rows are distinct; those past the last latent are left out
  (`optimizer.update`), and while none is dead AuxK's C rows are all such."""
  s = _setup(params, centred_BxD, residual_BxD, pre_BxF, dead_F, k_aux, weight, axis_name,
             layout, centre)
  n_latents = pre_BxF.shape[1]

  # No cond on whether any latent is dead: a conditional that reads the
  # parameters makes XLA copy them, which costs more than AuxK on C columns
  # (docs/speed.md). While none is dead the columns are all padding, every
  # gradient is zero, and the value is zeroed here.
  cols_C, grads, error = _packed(s, capacity)
  error = jnp.where(jnp.any(dead_F), error, 0)
  n_pool = pool_P.shape[0]
  rows_R = jnp.concatenate([
      jnp.where(dead_F[pool_P], n_latents + jnp.arange(n_pool), pool_P),
      jnp.where(cols_C < n_latents, cols_C, n_latents + n_pool + jnp.arange(capacity))])
  both = {"W_enc": jnp.concatenate([pooled["W_enc"], grads["W_enc"]], axis=1),
          "b_enc": jnp.concatenate([pooled["b_enc"], grads["b_enc"]]),
          "W_dec": jnp.concatenate([pooled["W_dec"], grads["W_dec"]]),
          "b_dec": pooled["b_dec"] + grads["b_dec"]}
  return both, rows_R, s.scale * error
