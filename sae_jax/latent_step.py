"""The training step when the latents are split over mesh axis "latent" as
well as the batch over "data" (`--latent-shards M`; `mesh.py`).

Each device holds its F / M latents' columns of W_enc, rows of W_dec, b_enc,
their Adam moments and dead-latent counters, and sees its data shard's
tokens. It encodes them against its own latents, and the selection is
global over both axes (`latent_select.py`). Then:

* BatchTopK, and TopK in the "codes" layout (`TrainConfig.layout`, chosen
  by F / M), keep dense codes within a shard ([b, F / M]: five
  [b, D] x [D, F / M] matmuls a device); the decoder's partial sums are
  added over the latent shards in one order, and autodiff through that
  gives each device its latents' gradients, with b_dec's encoder term
  summed over the shards in one order too.
* TopK in the "entries" layout decodes and differentiates each shard's
  selected entries, as the fast step does (`_topk_entries`).
* Sampled-SAE gathers its pool's P columns of the activations and of W_enc
  and P rows of W_dec on every shard, and decodes and differentiates those,
  as the fast step does (`gradients._sampled`); each shard keeps the pooled
  gradients of its own latents.

AuxK, while latents are dead, adds dense gradients written out
(`_auxk_grads`). The gradients are then averaged over "data" as in
`train.train_step`, whose recipe this follows: the same loss, AuxK,
threshold, dead-latent counters, skipped steps and metrics. It trains TopK,
BatchTopK and Sampled-SAE (every score, kept pools too), SAEs and
transcoders; Matryoshka and JumpReLU are refused
(`runconfig.check_latent_shards`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import collectives
from sae_jax import cut as cut_lib
from sae_jax import gradients
from sae_jax import latent_select
from sae_jax import layouts
from sae_jax import losses
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax import optimizer
from sae_jax import scoring
from sae_jax import train
from sae_jax.config import TrainConfig
from sae_jax.mesh import DATA
from sae_jax.mesh import LATENT

P = jax.sharding.PartitionSpec


def _gradients(params, x_BxD, y_BxD, silent_F, c: TrainConfig):
  """TopK's and BatchTopK's reconstruction gradients by autodiff through
  dense codes: (this device's, for its latents and b_dec's whole;
  `gradients.Outputs`; AuxK, a function () -> its dense gradients and value)."""
  sae = c.sae
  dtype = jnp.dtype(sae.compute_dtype)

  def loss_fn(p):
    centred_BxD = (x_BxD - p["b_dec"][None, :] if sae.centred else x_BxD).astype(dtype)
    centred_BxD = latent_select.to_latent_shards(centred_BxD)
    pre_BxF = jnp.matmul(centred_BxD, p["W_enc"].astype(dtype),
                         preferred_element_type=jnp.float32) + p["b_enc"][None, :]
    a_BxF = jax.nn.relu(pre_BxF)
    seen_BxF = lax.stop_gradient(a_BxF).astype(jnp.float32)
    select = latent_select.topk_mask if sae.selection == "topk" else latent_select.batchtopk_mask
    keep_BxF = select(seen_BxF, sae.k)
    z_BxF = jnp.where(keep_BxF, a_BxF, 0)
    xhat_BxD = latent_select.latent_sum(z_BxF @ p["W_dec"]) + p["b_dec"][None, :]
    mse = losses.mse(y_BxD, xhat_BxD)
    fired_F = lax.psum(jnp.any(keep_BxF, axis=0).astype(jnp.int32), DATA) > 0
    dead_F = losses.dead_latents(silent_F, fired_F, c.dead_steps)
    token_min_B = lax.pmin(jnp.min(jnp.where(keep_BxF, seen_BxF, jnp.inf), axis=1), LATENT)
    n_active = lax.psum(jnp.sum(keep_BxF, dtype=jnp.int32), LATENT)
    out = gradients.Outputs(mse, jnp.sum(y_BxD[:0]), xhat_BxD, n_active, fired_F, token_min_B,
                            dead_F)
    return mse, (out, centred_BxD, pre_BxF)

  params = gradients.varying(params, DATA)
  (_, (out, centred_BxD, pre_BxF)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  auxk = lambda: _auxk_grads(params, centred_BxD.astype(jnp.float32), pre_BxF, out.dead_F,
                             y_BxD - out.xhat_BxD, c.auxk_k, sae.centred)
  return grads, out, auxk


def _auxk_grads(params, centred_BxD, pre_BxF, dead_F, residual_BxD, k_aux: int, centre: bool):
  """AuxK's gradients (dense, this device's latents; b_dec's whole) and this
  device's share of its value (`losses.auxk_loss`), written out."""
  residual_BxD = lax.stop_gradient(residual_BxD)
  a_dead_BxF = jnp.where(dead_F[None, :], jax.nn.relu(pre_BxF), 0)
  keep_BxF = latent_select.topk_mask(a_dead_BxF, k_aux)
  z_BxF = jnp.where(keep_BxF, a_dead_BxF, 0)
  error_BxD = residual_BxD - latent_select.latent_sum(z_BxF @ params["W_dec"])
  scale = losses.auxk_scale(residual_BxD, DATA)
  dehat_BxD = -2 * scale * error_BxD
  dpre_BxF = jnp.where(keep_BxF, dehat_BxD @ params["W_dec"].T, 0)
  db_enc_F = jnp.sum(dpre_BxF, axis=0)
  b_dec_D = (-collectives.ordered_psum(params["W_enc"] @ db_enc_F, LATENT) if centre
             else jnp.zeros_like(params["b_dec"]))
  grads = {"W_enc": centred_BxD.T @ dpre_BxF, "b_enc": db_enc_F, "W_dec": z_BxF.T @ dehat_BxD,
           "b_dec": b_dec_D}
  return grads, scale * jnp.sum(jnp.square(error_BxD))


def _encoded(params, x_BxD, sae):
  """(params varying over "data", the encoder's input in float32, pre, relu(pre)
  [b, F / M]) on this device's tokens and latents, as the fast step has them."""
  params = gradients.varying(params, DATA)
  centred_BxD, product_BxF = model.encoder_product(params, x_BxD, sae.compute_dtype,
                                                   sae.centred)
  pre_BxF = product_BxF + params["b_enc"][None, :]
  return params, centred_BxD.astype(jnp.float32), pre_BxF, jax.nn.relu(pre_BxF)


def _topk_entries(params, x_BxD, y_BxD, silent_F, c: TrainConfig):
  """TopK's gradients by its selected entries, as the fast step's "entries"
  layout (`gradients._through_entries`): each shard decodes and
  differentiates its own entries; the partial reconstructions are added
  over the shards in one order, and so is b_dec's encoder term.

  Returns:
    (this device's dense gradients, `gradients.Outputs`, AuxK: a function
    () -> its dense gradients and value).
  """
  sae = c.sae
  params, centred_BxD, pre_BxF, a_BxF = _encoded(params, x_BxD, sae)
  n_rows, n_cols = a_BxF.shape
  values_BxK, cols_BxK = latent_select.topk_entries(a_BxF, sae.k)
  rows_M = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.int32)[:, None],
                            cols_BxK.shape).reshape(-1)
  cols_M, values_M = cols_BxK.reshape(-1), values_BxK.reshape(-1)
  W_dec_MxD = params["W_dec"].at[cols_M].get(mode="promise_in_bounds")
  part_BxD = jax.ops.segment_sum(values_M[:, None] * W_dec_MxD, rows_M, n_rows,
                                 indices_are_sorted=True)
  xhat_BxD = latent_select.latent_sum(part_BxD) + params["b_dec"][None, :]
  mse, dxhat_BxD = gradients._mse_cotangent(y_BxD, xhat_BxD)
  dxhat_MxD = dxhat_BxD.at[rows_M].get(mode="promise_in_bounds")
  dpre_M = jnp.where(values_M > 0, jnp.sum(dxhat_MxD * W_dec_MxD, axis=1), 0)
  grads = layouts.entry_grads(rows_M, cols_M, values_M, dxhat_BxD, dpre_M, centred_BxD, n_cols)
  total_D = jnp.sum(dxhat_BxD, axis=0)
  grads["b_dec"] = (total_D - collectives.ordered_psum(params["W_enc"] @ grads["b_enc"], LATENT)
                    if sae.centred else total_D)

  active_BxK = values_BxK > 0
  fired_F = jnp.zeros(n_cols, jnp.int32).at[cols_M].add(active_BxK.reshape(-1).astype(jnp.int32))
  fired_F = lax.psum(fired_F, DATA) > 0
  dead_F = losses.dead_latents(silent_F, fired_F, c.dead_steps)
  out = gradients.Outputs(
      mse, jnp.sum(y_BxD[:0]), xhat_BxD,
      lax.psum(jnp.sum(active_BxK, dtype=jnp.int32), LATENT), fired_F,
      lax.pmin(jnp.min(jnp.where(active_BxK, values_BxK, jnp.inf), axis=1), LATENT), dead_F)
  auxk = lambda: _auxk_grads(params, centred_BxD, pre_BxF, dead_F, y_BxD - xhat_BxD,
                             c.auxk_k, sae.centred)
  return grads, out, auxk


def _pooled(params, x_BxD, y_BxD, silent_F, key, kept, c: TrainConfig):
  """Sampled-SAE's gradients at its pool only, as the fast step takes them
  (`gradients._sampled`): the pool's P columns of the activations, W_enc and
  W_dec gathered on every shard, then decoder, loss and backward on those.

  Returns:
    (the pooled gradients, zero at the pool's latents other shards hold;
    the pool as this shard's columns (`latent_select.local_index`);
    `gradients.Outputs`; AuxK, a function () -> its dense gradients and value).
  """
  sae = c.sae
  params, centred_BxD, pre_BxF, a_BxF = _encoded(params, x_BxD, sae)
  new = lambda: latent_select.sampled_pool(a_BxF, key, **sae.pool_rule)
  pool_P = new() if kept is None else lax.cond(kept[1], new, lambda: kept[0])
  # The pool's columns on every shard, then the budget among them as on
  # one device (`selection.sampled_select_pooled`).
  a_BxP = latent_select.at_pool(a_BxF, pool_P, axis=1)
  cut = cut_lib.batch_topk_cut(a_BxP, sae.k, DATA)
  keep_BxP = cut_lib.selected(a_BxP, cut, cut_lib.row_offset(x_BxD.shape[0], DATA))
  z_BxP = jnp.where(keep_BxP, a_BxP, 0)
  xhat_BxD, mse, grads = gradients._through_codes(
      y_BxD, centred_BxD, z_BxP, latent_select.at_pool(params["W_enc"], pool_P, axis=1),
      latent_select.at_pool(params["W_dec"], pool_P, axis=0), params["b_dec"], None, pool_P,
      sae.centred)

  n_latents = a_BxF.shape[1]
  local_P = latent_select.local_index(pool_P, n_latents)
  mine_P = local_P < n_latents
  grads = {"W_enc": jnp.where(mine_P[None, :], grads["W_enc"], 0),
           "b_enc": jnp.where(mine_P, grads["b_enc"], 0),
           "W_dec": jnp.where(mine_P[:, None], grads["W_dec"], 0), "b_dec": grads["b_dec"]}
  fired_P = lax.psum(jnp.any(keep_BxP, axis=0).astype(jnp.int32), DATA) > 0
  fired_F = jnp.zeros(n_latents, bool).at[local_P].set(fired_P, mode="drop")
  dead_F = losses.dead_latents(silent_F, fired_F, c.dead_steps)
  out = gradients.Outputs(
      mse, jnp.sum(y_BxD[:0]), xhat_BxD, jnp.sum(keep_BxP, dtype=jnp.int32), fired_F,
      jnp.min(jnp.where(keep_BxP, a_BxP, jnp.inf), axis=1), dead_F, pool_P)
  auxk = lambda: _auxk_grads(params, centred_BxD, pre_BxF, dead_F, y_BxD - xhat_BxD,
                             c.auxk_k, sae.centred)
  return grads, local_P, out, auxk


FORMS = ("general", "all_alive")
"""The compiled forms of the step (see `step`)."""


def step(state: train.TrainState, x_BxD: jax.Array, form: str = "general") -> tuple:
  """`train.train_step` on a ("data", "latent") mesh: this device's tokens
  x_BxD (raw activations) and latents; the same recipe and metrics.

  `form` (static), for Sampled-SAE: "general" makes the pool's gradients
  dense and adds AuxK's (skipped while no latent is dead); "all_alive", a
  promise that no latent can be dead on this step, updates the pool's
  latents alone, without AuxK (`loop.train_loop` picks it from the state's
  `dead_at_most`). The same numbers up to rounding. TopK and BatchTopK have
  one form.
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}; got {form!r}")
  c = state.config
  x_BxD, y_BxD = train.scaled(state, x_BxD)
  silent_F = state.steps_since_fired_F
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  lr = train._learning_rate(c, state.step)
  kept = (state.pool_P, state.step % c.sae.pool_every == 0) if c.sae.keeps_pool else None

  def apply(grads, auxk_loss, local_P):
    """The mean over "data" (in one order), then the optimiser (at the pool's
    latents only with `local_P`); a non-finite step on any shard changes
    nothing on every shard."""
    grads, auxk_loss = collectives.ordered_pmean((grads, auxk_loss), DATA)
    finite = jnp.isfinite(mse + c.auxk_weight * auxk_loss)
    for g in jax.tree.leaves(grads):
      finite &= jnp.all(jnp.isfinite(g))
    finite = lax.psum((~finite).astype(jnp.int32), LATENT) == 0
    params, opt_state = optimizer.update(
        state.params, grads, state.opt_state, lr, b1=c.b1, b2=c.b2, clip_norm=c.clip_norm,
        pool_P=local_P, apply=finite, latent_axis=LATENT)
    return params, opt_state, auxk_loss, optimizer.global_norm(grads, LATENT), finite

  def with_auxk(dense, out, auxk):
    """Dense gradients with AuxK's added while some latent is dead."""
    any_dead = lax.psum(jnp.any(out.dead_F).astype(jnp.int32), LATENT) > 0
    zeros = jax.tree.map(jnp.zeros_like, gradients.varying(state.params, DATA))
    grads, value = lax.cond(any_dead, auxk, lambda: (zeros, out.auxk))
    return apply(jax.tree.map(lambda g, a: g + c.auxk_weight * a, dense, grads), value, None)

  local_latents = state.params["W_enc"].shape[1]
  if c.sae.selection == "sampled":
    pooled, local_P, out, auxk = _pooled(state.params, x_BxD, y_BxD, silent_F, key, kept, c)
    mse = collectives.ordered_pmean(out.mse, DATA)
    if form == "all_alive":
      params, opt_state, auxk_loss, grad_norm, finite = apply(pooled, out.auxk, local_P)
    else:
      params, opt_state, auxk_loss, grad_norm, finite = with_auxk(
          optimizer.dense_grads(pooled, local_P, state.params), out, auxk)
  elif (c.sae.selection == "topk"
        and layouts.layout(local_latents, c.sae.k, c.layout) == "entries"):
    grads, out, auxk = _topk_entries(state.params, x_BxD, y_BxD, silent_F, c)
    mse = collectives.ordered_pmean(out.mse, DATA)
    params, opt_state, auxk_loss, grad_norm, finite = with_auxk(grads, out, auxk)
  else:
    grads, out, auxk = _gradients(state.params, x_BxD, y_BxD, silent_F, c)
    mse = collectives.ordered_pmean(out.mse, DATA)
    params, opt_state, auxk_loss, grad_norm, finite = with_auxk(grads, out, auxk)

  since_F = jnp.where(out.fired_F, 0, jnp.minimum(silent_F + 1, c.dead_steps))
  threshold = train.next_threshold(state, out.token_min_B)
  all_latents = lambda n: lax.psum(n, LATENT)
  state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      threshold=jnp.where(finite, threshold, state.threshold),
      steps_since_fired_F=jnp.where(finite, since_F, state.steps_since_fired_F),
      bad_streak=jnp.where(finite, 0, state.bad_streak + 1),
      dead_at_most=all_latents(train.can_be_dead(silent_F, c.dead_steps, 1)),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
      pool_P=None if kept is None else jnp.where(finite, out.pool_P, state.pool_P))

  since_F = state.steps_since_fired_F
  metrics = {
      "loss": mse + c.auxk_weight * auxk_loss,
      "mse": mse,
      "fvu": losses.fvu(y_BxD, out.xhat_BxD, DATA),
      "l0": lax.psum(out.n_active, DATA) / scoring.global_tokens(x_BxD.shape[0], DATA),
      "dead_fraction": all_latents(jnp.sum(since_F >= c.dead_steps, dtype=jnp.int32))
                       / c.sae.n_latents,
      "most_silent_steps": lax.pmax(jnp.max(since_F), LATENT),
      "dead_soon": all_latents(train.can_be_dead(since_F, c.dead_steps, 1)),
      "auxk_loss": auxk_loss,
      "threshold": state.threshold,
      "lr": lr,
      "grad_norm": grad_norm,
      "skipped_steps": state.skipped_steps,
      "bad_streak": state.bad_streak,
  }
  return state, metrics


@functools.lru_cache(maxsize=None)
def _mapped(mesh: jax.sharding.Mesh, treedef, leaf_specs: tuple, form: str):
  """`step` over `mesh`: the state laid out by `mesh.specs`, the batch split on "data"."""
  state_specs = jax.tree.unflatten(treedef, leaf_specs)

  def local(state, x_1xbxD):
    return step(state, x_1xbxD[0], form)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(state_specs, P(DATA)),
                               out_specs=(state_specs, P())), donate_argnums=0)


def p_train_step(state: train.TrainState, batch, form: str = "general") -> tuple:
  """`step`'s `form` on every device of the state's ("data", "latent") mesh
  (`train.replicate` with latent_shards > 1); `batch` is this process's
  [local data shards, b, D]. The state is donated."""
  mesh = state.step.sharding.mesh
  specs = mesh_lib.specs(state, mesh)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, P))
  form = form if state.config.sae.selection == "sampled" else "general"  # (one compile)
  return _mapped(mesh, treedef, tuple(leaves), form)(state, mesh_lib.global_batch(batch, mesh))
