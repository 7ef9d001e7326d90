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
or as dense codes (`TrainConfig.layout`; `auxk.py`), and then the fast step's gradients are made
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

from sae_jax import auxk
from sae_jax import cut as cut_lib
from sae_jax import layouts
from sae_jax import losses
from sae_jax import matryoshka
from sae_jax import model
from sae_jax import selection


class Outputs(typing.NamedTuple):
  """What a step reports besides the gradients (this device's tokens)."""
  mse: jax.Array  # this device's share of the reconstruction loss (or `matryoshka.loss`)
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


def _fired_and_dead(silent_F, fired_F, dead_steps: int, axis_name):
  """(latents the global batch selected, the step's dead latents), from
  this device's fired latents."""
  fired_F = fired_F if axis_name is None else lax.psum(fired_F.astype(jnp.int32), axis_name) > 0
  return fired_F, losses.dead_latents(silent_F, fired_F, dead_steps)


def dense(params, x_BxD, silent_F, key, sae: model.SAE, axis_name, kept=None, *,
          dead_steps: int, auxk_k: int, auxk_weight: float, nested=None, target_BxD=None):
  """Gradients by autodiff through the SAE module as written: the reference.

  x_BxD is what the encoder reads, and `target_BxD` what the decoder
  reconstructs (a transcoder's; None: x itself).

  `silent_F` holds the steps each latent went without firing before this
  one; a latent silent for `dead_steps` after this step is dead, and AuxK
  (each token's top `auxk_k` dead latents, weighted `auxk_weight`) is added.
  `kept` is a kept Sampled-SAE pool and whether to renew it
  (`model.step_pool`). With `nested` (`matryoshka.Nested`) the
  reconstruction loss is Matryoshka's (`matryoshka.loss`).
  """

  y_BxD = x_BxD if target_BxD is None else target_BxD

  def loss_fn(params):
    variables = {"params": params}
    pre_BxF = sae.apply(variables, x_BxD, method=model.SAE.pre)
    pool_P = model.step_pool(jax.nn.relu(pre_BxF), key, kept, axis_name=axis_name,
                             **sae.config.pool_rule)
    z_BxF = sae.apply(variables, jax.nn.relu(pre_BxF), key=key, axis_name=axis_name,
                      pool=pool_P, method=model.SAE.select)
    if nested is None:
      xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode)
      mse = losses.mse(y_BxD, xhat_BxD)
    else:
      mse, xhat_BxD = matryoshka.loss(y_BxD, z_BxF, params["W_dec"], params["b_dec"], nested)
    n_active, fired_F, token_min_B = _codes_stats(z_BxF)
    fired_F, dead_F = _fired_and_dead(silent_F, fired_F, dead_steps, axis_name)
    auxk_value = losses.auxk_loss(pre_BxF, dead_F, y_BxD - xhat_BxD, params["W_dec"], auxk_k,
                                  axis_name)
    return mse + auxk_weight * auxk_value, Outputs(mse, auxk_value, xhat_BxD, n_active,
                                                     fired_F, token_min_B, dead_F, pool_P)

  (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying(params, axis_name))
  return grads, out


def _mse_cotangent(x_BxD, xhat_BxD):
  """(`losses.mse`, its gradient with respect to xhat)."""
  error_BxD = xhat_BxD - x_BxD
  n_tokens = error_BxD.shape[0]
  return jnp.sum(jnp.square(error_BxD)) / n_tokens, (2 / n_tokens) * error_BxD


def _through_codes(x_BxD, centred_BxD, z_BxP, W_enc_DxP, W_dec_PxD, b_dec_D, nested=None,
                   pool_P=None, centre=True):
  """The MSE's gradients when the codes z are given on P columns (all of
  them, or the pool `pool_P`), each selected where it is positive; with
  `nested` (`matryoshka.Nested`), the nested loss's. x is the target, and
  `centred_BxD` what the encoder read: x - b_dec when `centre`.

  Returns:
    xhat_BxD, mse, and the gradients (W_enc [D, P], b_enc [P], W_dec [P, D],
    b_dec [D]) restricted to those columns.
  """
  if nested is not None:
    group_P = None if pool_P is None else matryoshka.group_of(pool_P, nested.sizes)
    return matryoshka.through_codes(x_BxD, centred_BxD, z_BxP, W_enc_DxP, W_dec_PxD, b_dec_D,
                                    nested, group_P, centre)
  xhat_BxD = z_BxP @ W_dec_PxD + b_dec_D[None, :]
  mse, dxhat_BxD = _mse_cotangent(x_BxD, xhat_BxD)
  dpre_BxP = jnp.where(z_BxP > 0, dxhat_BxD @ W_dec_PxD.T, 0)
  db_enc_P = jnp.sum(dpre_BxP, axis=0)
  grads = {"W_enc": centred_BxD.T @ dpre_BxP, "b_enc": db_enc_P,
           "W_dec": z_BxP.T @ dxhat_BxD,
           "b_dec": layouts.b_dec_grad(dxhat_BxD, W_enc_DxP, db_enc_P, centre)}
  return xhat_BxD, mse, grads


def _through_entries(x_BxD, centred_BxD, entries: cut_lib.Entries, params, sorted_rows: bool,
                     nested=None, centre=True):
  """The MSE's (or with `nested` the nested loss's) gradients when the codes
  are a list of selected entries."""
  n_rows, _ = x_BxD.shape
  n_latents = params["W_dec"].shape[0]
  rows_M, cols_M, values_M = entries.rows, entries.cols, entries.values
  if nested is not None:
    xhat_BxD, mse, grads = matryoshka.through_entries(x_BxD, centred_BxD, rows_M, cols_M,
                                                      values_M, params, nested, centre)
  else:
    W_dec_MxD = params["W_dec"].at[cols_M].get(mode="promise_in_bounds")
    xhat_BxD = jax.ops.segment_sum(values_M[:, None] * W_dec_MxD, rows_M, n_rows,
                                   indices_are_sorted=sorted_rows) + params["b_dec"][None, :]
    mse, dxhat_BxD = _mse_cotangent(x_BxD, xhat_BxD)
    dxhat_MxD = dxhat_BxD.at[rows_M].get(mode="promise_in_bounds")
    dpre_M = jnp.where(values_M > 0, jnp.sum(dxhat_MxD * W_dec_MxD, axis=1), 0)
    grads = layouts.entry_grads(rows_M, cols_M, values_M, dxhat_BxD, dpre_M, centred_BxD,
                                n_latents)
    grads["b_dec"] = layouts.b_dec_grad(dxhat_BxD, params["W_enc"], grads["b_enc"], centre)
  active_M = values_M > 0
  fired_F = jnp.zeros(n_latents, jnp.int32).at[cols_M].add(active_M.astype(jnp.int32)) > 0
  token_min_B = jax.ops.segment_min(jnp.where(active_M, values_M, jnp.inf), rows_M, n_rows,
                                    indices_are_sorted=sorted_rows)
  stats = (jnp.sum(active_M, dtype=jnp.int32), fired_F, token_min_B)
  return xhat_BxD, mse, grads, stats


def _codes_stats(z_BxF):
  """(selected entries, latents that fired, each token's smallest selected value)."""
  active_BxF = z_BxF > 0
  return (jnp.sum(active_BxF, dtype=jnp.int32), jnp.any(active_BxF, axis=0),
          jnp.min(jnp.where(active_BxF, z_BxF, jnp.inf), axis=1))


def _sampled(params, x_BxD, centred_BxD, product_BxF, a_BxF, key, axis_name, kept, nested,
             centre, *, k: int, l: float, **options):
  """Gradients of W_enc, b_enc and W_dec at the pool only (see
  `optimizer.dense_grads`); `options` are `model.sampled_options`'s."""
  # The pool is scored from the encoder's product and b_enc, the same bits:
  # on CPU the scores' block sums then read the product in place, where
  # relu(pre) had to be written out for them (docs/speed.md).
  rule = dict(k=k, l=l, axis_name=axis_name, bias=params["b_enc"], **options)
  pool = (model.new_pool(product_BxF, key, **rule) if kept is None else
          model.step_pool(product_BxF, key, kept, **rule))
  pool_P, z_BxP = selection.sampled_select_pooled(
      a_BxF, k, l, axis_name=axis_name, pool=pool, **model.sampled_options(key, **options))
  xhat_BxD, mse, grads = _through_codes(
      x_BxD, centred_BxD, z_BxP, selection.take_columns(params["W_enc"], pool_P),
      params["W_dec"][pool_P], params["b_dec"], nested, pool_P, centre)
  n_active, fired_P, token_min_B = _codes_stats(z_BxP)
  fired_F = jnp.zeros(a_BxF.shape[1], bool).at[pool_P].set(fired_P)
  return xhat_BxD, mse, grads, pool_P, (n_active, fired_F, token_min_B)


def _topk(params, x_BxD, centred_BxD, a_BxF, k: int, layout: str, nested, centre):
  n_rows, n_latents = a_BxF.shape
  if layouts.layout(n_latents, k, layout) == "codes":
    z_BxF = selection.topk(a_BxF, k)
    xhat_BxD, mse, grads = _through_codes(x_BxD, centred_BxD, z_BxF, params["W_enc"],
                                          params["W_dec"], params["b_dec"], nested, None, centre)
    return xhat_BxD, mse, grads, _codes_stats(z_BxF)
  values_BxK, cols_BxK = cut_lib.top_k(lax.stop_gradient(a_BxF), k)
  # lax.top_k breaks ties by the lower index, as `selection.topk` does.
  rows_BxK = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.int32)[:, None], (n_rows, k))
  entries = cut_lib.Entries(rows_BxK.reshape(-1), cols_BxK.reshape(-1),
                              jnp.maximum(values_BxK, 0).reshape(-1), jnp.bool_(True))
  return _through_entries(x_BxD, centred_BxD, entries, params, sorted_rows=True, nested=nested,
                          centre=centre)


def _batchtopk(params, x_BxD, centred_BxD, a_BxF, k: int, axis_name, layout: str, nested,
               centre):
  n_rows, n_latents = a_BxF.shape

  def from_dense_codes(cut):
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * n_rows
    z_BxF = jnp.where(cut_lib.selected(a_BxF, cut, offset), a_BxF, 0)
    xhat_BxD, mse, grads = _through_codes(x_BxD, centred_BxD, z_BxF, params["W_enc"],
                                          params["W_dec"], params["b_dec"], nested, None, centre)
    return xhat_BxD, mse, grads, _codes_stats(z_BxF)

  if layouts.layout(n_latents, k, layout) == "codes":
    return from_dense_codes(cut_lib.batch_topk_cut(lax.stop_gradient(a_BxF), k, axis_name))
  cut, entries = cut_lib.batch_topk_entries(a_BxF, k, axis_name)

  def from_entries():
    return _through_entries(x_BxD, centred_BxD, entries, params, sorted_rows=False,
                            nested=nested, centre=centre)

  return lax.cond(entries.complete, from_entries, lambda: from_dense_codes(cut))


def fast(params, x_BxD, silent_F, key, axis_name, kept=None, *, selection: str, k: int,
         pool_rule: dict, compute_dtype: str, layout: str, dead_steps: int, auxk_k: int,
         auxk_weight: float, nested=None, target_BxD=None, centre: bool = True):
  """The same gradients and outputs as `dense`, with only the encoder
  forward dense.

  The SAE is given by its `selection`, `k`, `pool_rule`
  (`SAEConfig.pool_rule`, Sampled-SAE only), `compute_dtype` and `centre`
  (`SAEConfig.centred`); `layout` is `TrainConfig.layout`, the rest as for
  `dense`.

  Returns:
    (grads, pool_P, outputs, with_auxk). For Sampled-SAE, `grads` of W_enc,
    b_enc and W_dec are given at the pool `pool_P` only (see
    `optimizer.dense_grads`);
    otherwise pool_P is None. The AuxK loss is not included:
    `with_auxk.dense(dense_grads)` returns (dense_grads + its gradients, its
    value; 0 while no latent is dead), and for Sampled-SAE
    `with_auxk.rows(grads, pool_P, capacity)` the same gradients at rows
    (grads, rows, value), for a step on which at most `capacity` (one of
    `auxk.auxk_capacities(F, k_aux)`) latents are dead.
  """
  params = varying(params, axis_name)
  centred_BxD, product_BxF = model.encoder_product(params, x_BxD, compute_dtype, centre)
  x_BxD = x_BxD if target_BxD is None else target_BxD  # what xhat reconstructs
  pre_BxF = product_BxF + params["b_enc"][None, :]  # as `model.encoder` adds it
  centred_BxD = centred_BxD.astype(jnp.float32)
  # AuxK, like the rest, only looks at positive pre-activations, and has the
  # same gradient with respect to a = relu(pre); it takes pre and applies the
  # relu to the columns it gathers.
  a_BxF = jax.nn.relu(pre_BxF)
  pool_P = None
  if selection == "sampled":
    xhat_BxD, mse, grads, pool_P, stats = _sampled(params, x_BxD, centred_BxD, product_BxF,
                                                   a_BxF, key, axis_name, kept, nested,
                                                   centre, **pool_rule)
  elif selection == "topk":
    xhat_BxD, mse, grads, stats = _topk(params, x_BxD, centred_BxD, a_BxF, k, layout, nested,
                                        centre)
  else:
    xhat_BxD, mse, grads, stats = _batchtopk(params, x_BxD, centred_BxD, a_BxF, k,
                                             axis_name, layout, nested, centre)
  n_active, fired_F, token_min_B = stats
  fired_F, dead_F = _fired_and_dead(silent_F, fired_F, dead_steps, axis_name)

  residual_BxD = x_BxD - xhat_BxD
  aux = (params, centred_BxD, residual_BxD, pre_BxF, dead_F, auxk_k, auxk_weight, axis_name)
  options = dict(layout=layout, centre=centre)
  with_auxk = auxk.AuxK(lambda grads: auxk.dense_grads(*aux, grads, **options),
                        lambda pooled, pool_P, capacity: auxk.rows(*aux, pooled, pool_P, capacity,
                                                                   **options))

  # A sum over no tokens: zero, and under shard_map it varies as the data does.
  no_auxk = jnp.sum(x_BxD[:0])
  return (grads, pool_P,
          Outputs(mse, no_auxk, xhat_BxD, n_active, fired_F, token_min_B, dead_F,
                  None if kept is None else pool_P), with_auxk)
