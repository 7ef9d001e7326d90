"""The training loss's gradients, two ways: dense autodiff and the fast path.

A dense SAE step costs five B·D·F matmuls, but only the encoder forward has
to be dense: every other term touches just the selected entries, about B·K
of them. The fast path keeps the dense encoder forward and writes the
backward pass by hand:

* Sampled-SAE: every selected entry lies in the pool of P = K·l columns, so
  decoder forward and backward and the encoder weight gradient are small
  dense matmuls over the P gathered rows and columns, scattered back at P
  distinct indices (no contended scatter).
* BatchTopK and TopK: a list of the selected entries (from the tokens' top-k
  offers); the decoder gathers rows, the weight gradients scatter-add them.
  Should the offers miss a selected entry (a token too concentrated for
  them), BatchTopK falls back to the dense formulas, so the result is always
  exact.

AuxK is the same in both: it runs only while some latent is dead, from its
own selection (each token's top k_aux dead latents, B·k_aux entries) among
the dead latents' columns packed together while they are few, by entries
or as dense codes (`LAYOUT`), and then the fast step's gradients are made
dense, or for Sampled-SAE, while few latents can be dead, joined as rows to
the pool's (`train.train_step`'s "packed" form). Which latents are dead is
decided after this step's selection (`losses.dead_latents`), as
dictionary_learning decides it.

Both return this device's gradient of its share of the loss (`pmean` over
the devices gives the global one) and the statistics the step reports.
"""

import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import losses
from sae_jax import model
from sae_jax import optimizer
from sae_jax import selection
from sae_jax.config import TrainConfig


class Outputs(typing.NamedTuple):
  """What a step reports besides the gradients (this device's tokens)."""
  mse: jax.Array  # this device's share of the reconstruction loss (`losses.mse`)
  auxk: jax.Array  # this device's share of the AuxK loss
  xhat_BxD: jax.Array  # the reconstruction
  n_active: jax.Array  # int32 selected entries
  fired_F: jax.Array  # bool, latents the global batch selected at least once
  token_min_B: jax.Array  # each token's smallest selected value (inf when none)
  dead_F: jax.Array  # bool, the latents AuxK treated as dead (global)
  pool_P: typing.Optional[jax.Array] = None  # the kept Sampled-SAE pool after the step


def varying(tree, axis_name):
  """`tree` as values that vary over the devices of `axis_name`.

  Under shard_map, state passed replicated (P()) is invariant, and autodiff
  would sum its gradients over devices by itself. Differentiating a varying
  copy gives this device's gradient under both pmap and shard_map; `pmean`
  then averages it.
  """
  if axis_name is None:
    return tree

  def cast(x):
    try:
      return lax.pcast(x, axis_name, to="varying")
    except ValueError:  # it varies already (pmap maps every argument)
      return x

  return jax.tree.map(cast, tree)


def _fired_and_dead(silent_F, fired_F, config: TrainConfig, axis_name):
  """(latents the global batch selected, the step's dead latents), from
  this device's fired latents."""
  fired_F = fired_F if axis_name is None else lax.psum(fired_F.astype(jnp.int32), axis_name) > 0
  return fired_F, losses.dead_latents(silent_F, fired_F, config.dead_steps)


def dense(params, x_BxD, silent_F, key, config: TrainConfig, axis_name, kept=None):
  """Gradients by autodiff through the SAE as written: the reference.

  `silent_F` holds the steps each latent went without firing before this
  one; `kept` is a kept Sampled-SAE pool and whether to renew it
  (`model.step_pool`).
  """
  c = config
  sae = model.SAE(c.sae)

  def loss_fn(params):
    variables = {"params": params}
    pre_BxF = sae.apply(variables, x_BxD, method=model.SAE.pre)
    pool_P = model.step_pool(jax.nn.relu(pre_BxF), key, c.sae, axis_name, kept)
    z_BxF = sae.apply(variables, jax.nn.relu(pre_BxF), key=key, axis_name=axis_name,
                      pool=pool_P, method=model.SAE.select)
    xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode)
    mse = losses.mse(x_BxD, xhat_BxD)
    n_active, fired_F, token_min_B = _codes_stats(z_BxF)
    fired_F, dead_F = _fired_and_dead(silent_F, fired_F, c, axis_name)
    auxk = losses.auxk_loss(pre_BxF, dead_F, x_BxD - xhat_BxD, params["W_dec"], c.auxk_k,
                            axis_name)
    return mse + c.auxk_weight * auxk, Outputs(mse, auxk, xhat_BxD, n_active, fired_F,
                                               token_min_B, dead_F, pool_P)

  (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying(params, axis_name))
  return grads, out


def _mse_cotangent(x_BxD, xhat_BxD):
  """(`losses.mse`, its gradient with respect to xhat)."""
  error_BxD = xhat_BxD - x_BxD
  n_tokens = error_BxD.shape[0]
  return jnp.sum(jnp.square(error_BxD)) / n_tokens, (2 / n_tokens) * error_BxD


def _through_codes(x_BxD, centred_BxD, z_BxP, W_enc_DxP, W_dec_PxD, b_dec_D):
  """The MSE's gradients when the codes z are given on P columns (all of
  them, or a pool), each selected where it is positive.

  Returns:
    xhat_BxD, mse, and the gradients (W_enc [D, P], b_enc [P], W_dec [P, D],
    b_dec [D]) restricted to those columns.
  """
  xhat_BxD = z_BxP @ W_dec_PxD + b_dec_D[None, :]
  mse, dxhat_BxD = _mse_cotangent(x_BxD, xhat_BxD)
  dpre_BxP = jnp.where(z_BxP > 0, dxhat_BxD @ W_dec_PxD.T, 0)
  db_enc_P = jnp.sum(dpre_BxP, axis=0)
  grads = {"W_enc": centred_BxD.T @ dpre_BxP, "b_enc": db_enc_P,
           "W_dec": z_BxP.T @ dxhat_BxD,
           "b_dec": jnp.sum(dxhat_BxD, axis=0) - W_enc_DxP @ db_enc_P}
  return xhat_BxD, mse, grads


def _entry_grads(rows_M, cols_M, values_M, dxhat_BxD, dpre_M, centred_BxD, n_latents):
  """The weight gradients of codes given as entries (token rows_M, latent
  cols_M, value values_M), from the reconstruction's cotangent dxhat and the
  entries' pre-activation cotangents dpre_M: W_enc [D, F], b_enc [F] and
  W_dec [F, D] (b_dec's encoder term is the caller's)."""
  D = dxhat_BxD.shape[1]
  # One scatter for both weight gradients: rows [dW_dec | dW_enc^T] per latent.
  updates_Mx2D = jnp.concatenate(
      [values_M[:, None] * dxhat_BxD.at[rows_M].get(mode="promise_in_bounds"),
       dpre_M[:, None] * centred_BxD.at[rows_M].get(mode="promise_in_bounds")], axis=1)
  both_Fx2D = jnp.zeros((n_latents, 2 * D), jnp.float32).at[cols_M].add(
      updates_Mx2D, mode="promise_in_bounds")
  db_enc_F = jnp.zeros(n_latents, jnp.float32).at[cols_M].add(dpre_M, mode="promise_in_bounds")
  return {"W_enc": both_Fx2D[:, D:].T, "b_enc": db_enc_F, "W_dec": both_Fx2D[:, :D]}


def _through_entries(x_BxD, centred_BxD, entries: selection.Entries, params, sorted_rows: bool):
  """The MSE's gradients when the codes are a list of selected entries."""
  n_rows, _ = x_BxD.shape
  n_latents = params["W_dec"].shape[0]
  rows_M, cols_M, values_M = entries.rows, entries.cols, entries.values
  W_dec_MxD = params["W_dec"].at[cols_M].get(mode="promise_in_bounds")
  xhat_BxD = jax.ops.segment_sum(values_M[:, None] * W_dec_MxD, rows_M, n_rows,
                                 indices_are_sorted=sorted_rows) + params["b_dec"][None, :]
  mse, dxhat_BxD = _mse_cotangent(x_BxD, xhat_BxD)
  dxhat_MxD = dxhat_BxD.at[rows_M].get(mode="promise_in_bounds")
  dpre_M = jnp.where(values_M > 0, jnp.sum(dxhat_MxD * W_dec_MxD, axis=1), 0)
  grads = _entry_grads(rows_M, cols_M, values_M, dxhat_BxD, dpre_M, centred_BxD, n_latents)
  grads["b_dec"] = jnp.sum(dxhat_BxD, axis=0) - params["W_enc"] @ grads["b_enc"]
  active_M = values_M > 0
  fired_F = jnp.zeros(n_latents, jnp.int32).at[cols_M].add(active_M.astype(jnp.int32)) > 0
  token_min_B = jax.ops.segment_min(jnp.where(active_M, values_M, jnp.inf), rows_M, n_rows,
                                    indices_are_sorted=sorted_rows)
  stats = (jnp.sum(active_M, dtype=jnp.int32), fired_F, token_min_B)
  return xhat_BxD, mse, grads, stats


def auxk_entries(a_dead_BxC, k_aux: int):
  """AuxK's selection as entries: each token's k_aux largest positive
  activations among the columns (zero where a latent is not dead), (values
  [B, k_aux], columns [B, k_aux]), a slot with value 0 unused. lax.top_k
  takes equal values lower index first, as `selection.topk` (the dense
  AuxK's selection) does."""
  values_BxK, cols_BxK = selection.top_k(a_dead_BxC, min(k_aux, a_dead_BxC.shape[1]))
  return jnp.maximum(values_BxK, 0), cols_BxK


# How the gradients of a selection given as entries (TopK's, BatchTopK's,
# AuxK's) are computed: "entries" (gathers and scatters over the selected
# entries, work independent of F), "codes" (the selection as a dense [B, F]
# array and B·F·D matmuls), or "auto": codes while F is below
# `CODES_UP_TO` entries per token for the backend, entries past that. On
# CPU XLA's gathers and scatters run 30 to 150x below its matmuls per flop,
# so codes win up to about 200 entries per token (measured on this 2-core
# CPU at B=1024, D=768, k=64, TopK and BatchTopK steps: codes 1.4x faster at
# F=8192, entries 1.4x faster at F=24576; AuxK's D/2 = 384 entries per token
# at F=24576, 64 per token, by codes 2.6x faster). Elsewhere entries from 16
# per token, where gathers run near memory bandwidth; not measured yet on an
# accelerator (benchmarks/train_step.py prints both layouts on any backend).
# Read at trace time.
LAYOUT = "auto"
CODES_UP_TO = {"cpu": 200}
"""F per selected entry per token below which "auto" takes codes, by
backend (16 for any other)."""


def layout(n_latents: int, per_token: int) -> str:
  """The layout `LAYOUT` picks on the default backend for a selection of
  `per_token` entries per token (on average) among `n_latents`."""
  if LAYOUT != "auto":
    return LAYOUT
  if n_latents < CODES_UP_TO.get(jax.default_backend(), 16) * per_token:
    return "codes"
  return "entries"


# AuxK packs the dead latents' columns into F/64, F/16, F/4 or F/2 columns
# (`auxk_capacities`) when that many hold them, so that its cost follows the
# dead latents, not F; a switch picks the packing, or skips AuxK while none
# is dead. Before, AuxK was the dense branch of train_step's cond on whether
# any latent is dead, and XLA ran its work on every step: measured at B=1024,
# D=768, F=24576 (Sampled l=8, 2-core CPU), a step with none dead took 1.47 s
# with AuxK in that branch and 0.48 s without it. With 1/2 of the latents
# dead, packing into F/2 takes 0.72 s a step against 1.18 s unpacked; into
# 3F/4 with 3/4 dead, 1.20 s against 1.27 s, so packing stops at F/2.
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


def _setup(params, centred_BxD, residual_BxD, pre_BxF, dead_F, config: TrainConfig,
           axis_name) -> _Setup:
  residual_BxD = lax.stop_gradient(residual_BxD)
  scale = losses.auxk_scale(residual_BxD, axis_name)  # collectives stay outside conds
  return _Setup(params, centred_BxD, residual_BxD, lax.stop_gradient(pre_BxF), dead_F,
                min(config.auxk_k, pre_BxF.shape[1]), -2 * config.auxk_weight * scale, scale)


# AuxK's TopK runs by bisection on the bits (`selection.topk_by_bits`)
# while k_aux is at least 1/BITS_UP_TO of the columns, by a per-row top-k
# past that. Measured on this 2-core CPU, jaxlib 0.10.2, normal data (ms,
# per-row top-k / bisection): B=1024, k=384: 72 / 15 at 1536 columns,
# 122 / 51 at 6144, 164 / 101 at 12288, 216 / 249 at 24576; k=256: 106 / 93
# at 8192, 137 / 192 at 16384; k=128: 35 / 25 at 2048, 45 / 48 at 4096;
# k=64: 20 / 25 at 2048; B=512, k=32: 2.7 / 1.4 at 256, 4.5 / 8.1 at 1024.
# (The crossing moves past 32 as k grows, and bisection stops early on rows
# with fewer than k positive entries.) Not measured on an accelerator.
BITS_UP_TO = 32


def _auxk_on(s: _Setup, a_BxC, W_dec_CxD, W_enc_DxC):
  """AuxK from C columns of activations (zero where a latent is not dead),
  each token's top k_aux entries among them, by entries or as dense codes
  (`LAYOUT`): its gradients at those columns (W_enc [D, C], b_enc [C],
  W_dec [C, D]) and b_dec's, and Σ||e - ê||²."""
  n_rows, n_cols = a_BxC.shape
  if layout(n_cols, s.k_aux) == "codes":
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
    grads = _entry_grads(rows_M, cols_BxK.reshape(-1), values_BxK.reshape(-1), dehat_BxD,
                         dpre_BxK.reshape(-1), s.centred_BxD, n_cols)
  grads["b_dec"] = -(W_enc_DxC @ grads["b_enc"])
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


def _auxk(params, centred_BxD, residual_BxD, pre_BxF, dead_F, config: TrainConfig, axis_name,
          into=None):
  """AuxK's value (this device's share, `losses.auxk_loss`) and `into` (dense
  gradients; zeros when None) plus the gradients of auxk_weight times it.

  Its selection is each token's top k_aux among the dead latents, taken from
  the dead latents' columns packed into the smallest of `auxk_capacities`
  that holds them (`_packed`), or from all F columns."""
  s = _setup(params, centred_BxD, residual_BxD, pre_BxF, dead_F, config, axis_name)
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


def _auxk_rows(params, centred_BxD, residual_BxD, pre_BxF, dead_F, config: TrainConfig,
               axis_name, pooled, pool_P, capacity: int):
  """The pooled gradients plus AuxK's, as gradients at rows [P + C] (W_enc
  [D, P + C], b_enc [P + C], W_dec [P + C, D], b_dec [D]), for a step on which
  at most C = `capacity` latents are dead (the caller's promise):
  (grads, rows, AuxK's value). The numbers of `_auxk` on the pooled
  gradients made dense, without an [F, D] gradient. A dead latent of the
  pool was not selected, so its pooled gradient is zero and its row is
  AuxK's. The rows are distinct; those past the last latent are left out
  (`optimizer.update`), and while none is dead AuxK's C rows are all such."""
  s = _setup(params, centred_BxD, residual_BxD, pre_BxF, dead_F, config, axis_name)
  n_latents = pre_BxF.shape[1]

  # No cond on whether any latent is dead: a conditional that reads the
  # parameters makes XLA copy them (20 ms a step at D=768, F=24576 on CPU),
  # more than AuxK on C columns costs. While none is dead the columns are
  # all padding, every gradient is zero, and the value is zeroed here.
  cols_C, grads, error = _packed(s, capacity)
  error = jnp.where(jnp.any(dead_F), error, 0)
  n_pool = pool_P.shape[0]
  rows = jnp.concatenate([
      jnp.where(dead_F[pool_P], n_latents + jnp.arange(n_pool), pool_P),
      jnp.where(cols_C < n_latents, cols_C, n_latents + n_pool + jnp.arange(capacity))])
  both = {"W_enc": jnp.concatenate([pooled["W_enc"], grads["W_enc"]], axis=1),
          "b_enc": jnp.concatenate([pooled["b_enc"], grads["b_enc"]]),
          "W_dec": jnp.concatenate([pooled["W_dec"], grads["W_dec"]]),
          "b_dec": pooled["b_dec"] + grads["b_dec"]}
  return both, rows, s.scale * error


def _codes_stats(z_BxF):
  """(selected entries, latents that fired, each token's smallest selected value)."""
  active_BxF = z_BxF > 0
  return (jnp.sum(active_BxF, dtype=jnp.int32), jnp.any(active_BxF, axis=0),
          jnp.min(jnp.where(active_BxF, z_BxF, jnp.inf), axis=1))


def _sampled(params, x_BxD, centred_BxD, product_BxF, a_BxF, key, config: TrainConfig,
             axis_name, kept):
  """Gradients of W_enc, b_enc and W_dec at the pool only (see
  `optimizer.dense_grads`)."""
  s = config.sae
  # The pool is scored from the encoder's product and b_enc, the same bits:
  # on CPU the scores' block sums then read the product in place, where
  # relu(pre) had to be written out for them (B=1024, D=768, F=24576 on this
  # 2-core CPU: a Sampled l=8 step 306 -> 286 ms, measured interleaved; with
  # pool_every=4, where a kept pool's cond took relu(pre), 259 -> 249 ms).
  pool = (model.new_pool(product_BxF, key, s, axis_name, params["b_enc"]) if kept is None else
          model.step_pool(product_BxF, key, s, axis_name, kept, params["b_enc"]))
  pool_P, z_BxP = selection.sampled_select_pooled(
      a_BxF, s.k, s.l, axis_name=axis_name, pool=pool, **model.sampled_options(s, key))
  xhat_BxD, mse, grads = _through_codes(
      x_BxD, centred_BxD, z_BxP, selection.take_columns(params["W_enc"], pool_P),
      params["W_dec"][pool_P], params["b_dec"])
  n_active, fired_P, token_min_B = _codes_stats(z_BxP)
  fired_F = jnp.zeros(a_BxF.shape[1], bool).at[pool_P].set(fired_P)
  return xhat_BxD, mse, grads, pool_P, (n_active, fired_F, token_min_B)


def _topk(params, x_BxD, centred_BxD, a_BxF, config: TrainConfig):
  n_rows, n_latents = a_BxF.shape
  k = config.sae.k
  if layout(n_latents, k) == "codes":
    z_BxF = selection.topk(a_BxF, k)
    xhat_BxD, mse, grads = _through_codes(x_BxD, centred_BxD, z_BxF, params["W_enc"],
                                          params["W_dec"], params["b_dec"])
    return xhat_BxD, mse, grads, _codes_stats(z_BxF)
  values_BxK, cols_BxK = selection.top_k(lax.stop_gradient(a_BxF), k)
  # lax.top_k breaks ties by the lower index, as `selection.topk` does.
  rows_BxK = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.int32)[:, None], (n_rows, k))
  entries = selection.Entries(rows_BxK.reshape(-1), cols_BxK.reshape(-1),
                              jnp.maximum(values_BxK, 0).reshape(-1), jnp.bool_(True))
  return _through_entries(x_BxD, centred_BxD, entries, params, sorted_rows=True)


def _batchtopk(params, x_BxD, centred_BxD, a_BxF, config: TrainConfig, axis_name):
  n_rows, n_latents = a_BxF.shape

  def from_dense_codes(cut):
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * n_rows
    z_BxF = jnp.where(selection.selected(a_BxF, cut, offset), a_BxF, 0)
    xhat_BxD, mse, grads = _through_codes(x_BxD, centred_BxD, z_BxF, params["W_enc"],
                                          params["W_dec"], params["b_dec"])
    return xhat_BxD, mse, grads, _codes_stats(z_BxF)

  if layout(n_latents, config.sae.k) == "codes":
    return from_dense_codes(selection.batch_topk_cut(lax.stop_gradient(a_BxF), config.sae.k,
                                                     axis_name))
  cut, entries = selection.batch_topk_entries(a_BxF, config.sae.k, axis_name)

  def from_entries():
    return _through_entries(x_BxD, centred_BxD, entries, params, sorted_rows=False)

  return lax.cond(entries.complete, from_entries, lambda: from_dense_codes(cut))


def fast(params, x_BxD, silent_F, key, config: TrainConfig, axis_name, kept=None):
  """The same gradients and outputs as `dense`, with only the encoder
  forward dense.

  Returns:
    (grads, pool_P, outputs, with_auxk). For Sampled-SAE, `grads` of W_enc,
    b_enc and W_dec are given at the pool `pool_P` only (see
    `optimizer.dense_grads`);
    otherwise pool_P is None. The AuxK loss is not included:
    `with_auxk.dense(dense_grads)` returns (dense_grads + its gradients, its
    value; 0 while no latent is dead), and for Sampled-SAE
    `with_auxk.rows(grads, pool_P, capacity)` the same gradients at rows
    (grads, rows, value), for a step on which at most `capacity` (one of
    `auxk_capacities(F, k_aux)`) latents are dead.
  """
  c = config
  params = varying(params, axis_name)
  centred_BxD, product_BxF = model.encoder_product(params, x_BxD, c.sae.compute_dtype)
  pre_BxF = product_BxF + params["b_enc"][None, :]  # as `model.encoder` adds it
  centred_BxD = centred_BxD.astype(jnp.float32)
  # AuxK, like the rest, only looks at positive pre-activations, and has the
  # same gradient with respect to a = relu(pre); it takes pre and applies the
  # relu to the columns it gathers.
  a_BxF = jax.nn.relu(pre_BxF)
  pool_P = None
  if c.sae.selection == "sampled":
    xhat_BxD, mse, grads, pool_P, stats = _sampled(params, x_BxD, centred_BxD, product_BxF,
                                                   a_BxF, key, c, axis_name, kept)
  elif c.sae.selection == "topk":
    xhat_BxD, mse, grads, stats = _topk(params, x_BxD, centred_BxD, a_BxF, c)
  else:
    xhat_BxD, mse, grads, stats = _batchtopk(params, x_BxD, centred_BxD, a_BxF, c, axis_name)
  n_active, fired_F, token_min_B = stats
  fired_F, dead_F = _fired_and_dead(silent_F, fired_F, c, axis_name)

  residual_BxD = x_BxD - xhat_BxD
  with_auxk = AuxK(
      lambda grads: _auxk(params, centred_BxD, residual_BxD, pre_BxF, dead_F, c, axis_name,
                          grads),
      lambda pooled, pool_P, capacity: _auxk_rows(params, centred_BxD, residual_BxD, pre_BxF,
                                                  dead_F, c, axis_name, pooled, pool_P,
                                                  capacity))

  # A sum over no tokens: zero, and under shard_map it varies as the data does.
  no_auxk = jnp.sum(x_BxD[:0])
  return (grads, pool_P,
          Outputs(mse, no_auxk, xhat_BxD, n_active, fired_F, token_min_B, dead_F,
                  None if kept is None else pool_P), with_auxk)
