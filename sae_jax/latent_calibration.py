"""The calibration's passes with the latents split (`--latent-shards`):
each device encodes its tokens of every calibration batch for its F / M
latents, and selects them by the training rule exactly as the training
step does over the ("data", "latent") mesh (`latent_select.py`), so the
SAE is never put together on one device.

The calibration of the end of a run over the latent groups (issue 41),
where the whole SAE's cannot fit on one device (`memory.splits_end`): n_j
and the training rule's squared error, with each top k′'s error and
firings (`count`, as `thresholds._count` finds them on one device), and θ_j
from them (`per_latent_thresholds`): each device keeps, of each of its
latents' columns in its tokens of each batch, the few largest
(`thresholds._capture_width`, with every (batch, data shard) a group of
its own), joins them over its batches and then over "data", and θ_j is the
(n_j + 1)-th largest wherever that is at least every activation a group
left out; the latents where it may not be are found again with each
group's whole column kept. The thresholds' error comes from a third pass
that decodes the codes above θ on each shard (`calibrate`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from sae_jax import collectives
from sae_jax import cut as cut_lib
from sae_jax import latent_select
from sae_jax import latent_step
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax import thresholds
from sae_jax import transcoder
from sae_jax.mesh import DATA
from sae_jax.mesh import LATENT


def _count_local(params, x_NxbxD, sae: model.SAE, rule_errors: bool):
  """This device's part of the count pass: its tokens [n, b, D] of every
  batch, its latents; the counts [F / M] of its latents and the squared
  error, both summed over the mesh; with `rule_errors`, each top k′'s
  error [k] and its firings of this device's latents [k, F / M]
  (`_top_k_errors`), else None."""
  config = sae.config
  key = jax.random.key(thresholds.CALIBRATION_KEY)
  n_cols = params["b_enc"].shape[0]

  def one(carry, i):
    counts_F, sse, pool_P, top = carry
    x_bxD, y_bxD = transcoder.sides(x_NxbxD[i], config)
    local, _, _, a_bxF = latent_step._encoded(params, x_bxD, config)
    key_i = jax.random.fold_in(key, i)
    if rule_errors:
      top = jax.tree.map(jnp.add, top, _top_k_errors(local, a_bxF, y_bxD, config.k))
    if config.selection == "topk":
      mask_bxF = latent_select.topk_mask(a_bxF, config.k)
    elif config.selection == "batchtopk":
      mask_bxF = latent_select.batchtopk_mask(a_bxF, config.k)
    else:  # a pool renewed on every pool_every-th batch, as in training
      new = lambda: latent_select.sampled_pool(a_bxF, key_i, **config.pool_rule)
      if pool_P is None:
        mask_bxF = latent_select.sampled_mask(a_bxF, config.k, new())
      else:
        pool_P = lax.cond(i % config.pool_every == 0, new, lambda: pool_P)
        mask_bxF = latent_select.sampled_mask(a_bxF, config.k, pool_P)
    z_bxF = jnp.where(mask_bxF, a_bxF, 0)
    xhat_bxD = latent_select.latent_sum(z_bxF @ local["W_dec"]) + local["b_dec"][None, :]
    counts_F = counts_F + lax.psum(jnp.sum(mask_bxF, axis=0, dtype=jnp.int32), DATA)
    error = collectives.ordered_psum(jnp.sum(jnp.square(y_bxD - xhat_bxD)), DATA)
    return (counts_F, sse + error.astype(sse.dtype), pool_P, top), None

  kept_P = jnp.zeros(config.pool_size, jnp.int32) if config.keeps_pool else None
  by_latent = lambda shape: lax.pcast(jnp.zeros(shape, jnp.int32), LATENT, to="varying")
  top = ((jnp.zeros(config.k, jnp.float32), by_latent((config.k, n_cols))) if rule_errors
         else None)
  (counts_F, sse, _, top), _ = lax.scan(
      one, (by_latent(n_cols), jnp.zeros((), jnp.float32), kept_P, top),
      jnp.arange(x_NxbxD.shape[0]))
  return counts_F, sse, top


def _top_k_errors(params, a_bxF, y_bxD, k: int) -> tuple:
  """`inference.top_k_errors` over the mesh: Σ‖y − ŷ‖² over the batch with
  each token's k′ largest codes over all F, for k′ = 1..k (the same on
  every device), and [k, F / M], how often each of this device's latents
  is a token's i-th largest positive code. Each token's k largest come
  from every shard's offers, ties to the lower latent; their decoder rows
  are gathered from the shards that hold them, and the errors peeled off
  in that order, as on one device."""
  n_rows, n_cols = a_bxF.shape
  offered, cols = cut_lib.top_k(a_bxF.astype(jnp.float32), min(k, n_cols))
  first = lax.axis_index(LATENT) * n_cols
  gather = lambda v: lax.all_gather(v, LATENT, axis=1, tiled=True, to="invarying")
  values_bxK, at_bxK = lax.top_k(gather(offered), k)
  local_bxK = jnp.take_along_axis(gather(cols + first), at_bxK, axis=1) - first
  mine_bxK = (local_bxK >= 0) & (local_bxK < n_cols)
  W_dec_FxD = params["W_dec"].astype(jnp.float32)
  rows_bxKxD = lax.psum(jnp.where(mine_bxK[..., None],
                                  W_dec_FxD[jnp.clip(local_bxK, 0, n_cols - 1)], 0), LATENT)

  def peel(error_bxD, i):  # the error once each token's i+1 largest codes are decoded
    error_bxD = error_bxD - values_bxK[:, i, None] * rows_bxKxD[:, i]
    return error_bxD, collectives.ordered_psum(jnp.sum(jnp.square(error_bxD)), DATA)

  _, top_K = lax.scan(peel, y_bxD - params["b_dec"][None, :], jnp.arange(k))
  fired_bxK = ((values_bxK > 0) & mine_bxK).astype(jnp.int32)
  counts_KxF = jnp.zeros((k, n_cols), jnp.int32).at[
      jnp.arange(k)[None, :], local_bxK].add(fired_bxK, mode="drop")
  return top_K.astype(jnp.float32), lax.psum(counts_KxF, DATA)


@functools.lru_cache(maxsize=None)
def _mapped(mesh: jax.sharding.Mesh, sae: model.SAE, rule_errors: bool, treedef,
            leaf_specs: tuple):
  specs = jax.tree.unflatten(treedef, leaf_specs)
  top = (P(), P(None, LATENT)) if rule_errors else None
  return jax.jit(jax.shard_map(
      functools.partial(_count_local, sae=sae, rule_errors=rule_errors), mesh=mesh,
      in_specs=(specs, P(None, DATA)), out_specs=(P(LATENT), P(), top)))


def _check(sae: model.SAE, batch_size, mesh: jax.sharding.Mesh) -> None:
  """Refuses a mesh without a latent axis, a rule not split, and (unless
  None) a batch that does not split over "data"."""
  if LATENT not in mesh.axis_names:
    raise ValueError(f"mesh must have a {LATENT!r} axis (mesh.make_mesh with "
                     f"latent_shards > 1); got axes {mesh.axis_names}")
  if sae.config.selection not in ("topk", "batchtopk", "sampled"):
    raise ValueError(f"the split calibration takes TopK, BatchTopK and Sampled-SAE; got "
                     f"selection {sae.config.selection!r}")
  if batch_size is not None and batch_size % mesh.shape[DATA]:
    raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's "
                     f"{mesh.shape[DATA]} data shards")


def _on(params, mesh: jax.sharding.Mesh):
  """The parameters laid out on `mesh` (`mesh.place`), unless they are already."""
  leaves = jax.tree.leaves(params)
  if all(isinstance(leaf, jax.Array) and getattr(leaf.sharding, "mesh", None) == mesh
         for leaf in leaves):
    return params
  return mesh_lib.place(params, mesh)


def laid_out(array, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  """A host array laid out on `mesh` by `spec` (every process holds it whole,
  as every process runs the end of a run)."""
  array = np.asarray(array)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _rows(x_NxBxD, mesh: jax.sharding.Mesh) -> jax.Array:
  """The batches [n, B, D] on `mesh`, each batch's rows split over "data" in order."""
  return laid_out(x_NxBxD, mesh, P(None, DATA))


def flat_specs(params, mesh: jax.sharding.Mesh) -> tuple:
  """(treedef, leaves) of the parameters' specs on `mesh`: hashable, for the
  compiled functions' caches."""
  leaves, treedef = jax.tree.flatten(mesh_lib.specs(params, mesh),
                                     is_leaf=lambda spec: isinstance(spec, P))
  return treedef, tuple(leaves)


def count(params, x_NxD, sae: model.SAE, *, batch_size: int, mesh: jax.sharding.Mesh,
          rule_errors: bool = False):
  """`thresholds.calibrate`'s first pass over a ("data", "latent") mesh: n_j
  per latent (int64 [F]) and the training rule's Σ‖x − x̂‖² on x, cut into
  batches of `batch_size` as on one device, each batch's rows split over
  "data" in order; with `rule_errors` also each top k′'s error [k] and
  firings [k, F] (`inference.choose`'s), else None.

  Args:
    params: the SAE's parameters (scaled units), on the host or laid out
      on `mesh` (`mesh.place`).
    x_NxD: calibration tokens, already scaled (`transcoder.scaled`).
    sae: the SAE module (TopK, BatchTopK or Sampled-SAE).
    batch_size: tokens per batch, as in training.
    mesh: `mesh.make_mesh(latent_shards=M)`, M > 1.
  """
  _check(sae, batch_size, mesh)
  return _count(_on(params, mesh), _rows(thresholds.batches(x_NxD, batch_size), mesh), sae,
                mesh, rule_errors)


def _count(params, x, sae: model.SAE, mesh: jax.sharding.Mesh, rule_errors: bool) -> tuple:
  """`count` of the parameters and batches laid out on `mesh`."""
  counts_F, sse, top = _mapped(mesh, sae, rule_errors, *flat_specs(params, mesh))(params, x)
  if top is not None:
    top = tuple(mesh_lib.host(part) for part in top)
  return mesh_lib.host(counts_F).astype(np.int64), float(mesh_lib.host(sse)), top


@functools.lru_cache(maxsize=None)
def _capture_mapped(mesh: jax.sharding.Mesh, sae: model.SAE, treedef, leaf_specs: tuple,
                    widths: tuple, keeps: tuple):
  specs = jax.tree.unflatten(treedef, leaf_specs)
  local = functools.partial(_capture_local, sae=sae, widths=widths, keeps=keeps)
  return jax.jit(jax.shard_map(local, mesh=mesh,
                               in_specs=(specs, P(None, DATA), P(LATENT)),
                               out_specs=P(LATENT)))


def _capture_local(params, x_NxbxD, latents, sae: model.SAE, widths: tuple, keeps: tuple):
  """For each tier t of this shard's latents (latents[t], local columns,
  padded to one length on every shard): the keeps[t] largest activations
  of each over all tokens, the tokens they are at, and the largest any
  group (a batch's rows on one data shard) left out of the widths[t] it
  kept; the same on every data shard."""
  n_batches, n_rows, _ = x_NxbxD.shape
  batch_size = n_rows * lax.axis_size(DATA)
  first_row = lax.axis_index(DATA) * n_rows

  def one(i):
    x_bxD = transcoder.sides(x_NxbxD[i], sae.config)[0]
    a_bxF = latent_step._encoded(params, x_bxD, sae.config)[3]
    return thresholds.kept_columns(a_bxF, i * batch_size + first_row, latents, widths)

  out = []
  for (values, tokens), width, keep in zip(lax.map(one, jnp.arange(n_batches)), widths, keeps):
    values, tokens, left_out = thresholds.joined(values, tokens, keep, width == n_rows)
    gather = lambda v: lax.all_gather(v, DATA, axis=1, tiled=True, to="invarying")
    values, top = lax.top_k(gather(values), min(keep, values.shape[1] * lax.axis_size(DATA)))
    out.append((values, jnp.take_along_axis(gather(tokens), top, axis=1),
                lax.pmax(left_out, DATA)))
  return tuple(out)


def per_latent_thresholds(params, x_NxD, sae: model.SAE, counts_F, *, batch_size: int,
                          mesh: jax.sharding.Mesh) -> np.ndarray:
  """`thresholds.per_latent_thresholds` over a ("data", "latent") mesh: θ_j,
  latent j's (n_j + 1)-th largest activation on x (0 where n_j is every
  token or that activation is 0, NEVER where n_j = 0), from `count`'s n_j.

  Args:
    params, x_NxD, sae, batch_size, mesh: as `count`'s.
    counts_F: n_j per latent, int [F].

  Returns:
    float32 θ [F].
  """
  _check(sae, batch_size, mesh)
  return _thresholds(_on(params, mesh), _rows(thresholds.batches(x_NxD, batch_size), mesh), sae,
                     counts_F, mesh)


def _thresholds(params, x, sae: model.SAE, counts_F, mesh: jax.sharding.Mesh) -> np.ndarray:
  """`per_latent_thresholds` of the parameters and batches laid out on `mesh`."""
  n_batches, batch_size, _ = x.shape
  rows = batch_size // mesh.shape[DATA]
  counts_F = np.asarray(counts_F, np.int64)
  theta_F = np.where(counts_F > 0, 0.0, thresholds.NEVER).astype(np.float32)
  needed = np.flatnonzero((counts_F > 0) & (counts_F < n_batches * batch_size))
  if not len(needed):
    return theta_F
  groups = n_batches * mesh.shape[DATA]
  widths = thresholds._capture_width(counts_F[needed] + 1, groups, rows)
  found, left = _captured(params, x, sae, counts_F, needed, widths, mesh)
  if len(left):  # more of their largest in one group than it kept: each group's whole column
    more, _ = _captured(params, x, sae, counts_F, left, np.full(len(left), rows), mesh)
    found += more
  for index, values in found:
    theta_F[index] = thresholds.threshold_of(values[np.arange(len(index)), counts_F[index]])
  return theta_F


def _captured(params, x, sae: model.SAE, counts_F, needed, width_L, mesh) -> tuple:
  """(latents, their kept activations) per tier for the `needed` latents
  whose n_j + 1 largest the capture holds for certain, and the others."""
  n_shards, n_cols = mesh.shape[LATENT], sae.config.n_latents // mesh.shape[LATENT]
  groups = x.shape[0] * mesh.shape[DATA]
  widths, keeps, latents, where = [], [], [], []
  for width in np.unique(width_L):
    index = needed[width_L == width]
    shard = index // n_cols
    length = thresholds._rounded_up(int(np.bincount(shard, minlength=n_shards).max()))
    local = np.zeros((n_shards, length), np.int32)  # padded with each shard's first
    global_ = np.full((n_shards, length), -1)
    for s in range(n_shards):
      mine = index[shard == s] - s * n_cols
      if len(mine):
        local[s] = np.concatenate([mine, np.full(length - len(mine), mine[0])])
        global_[s, :len(mine)] = mine + s * n_cols
    widths.append(int(width))
    keeps.append(int(min(width * groups, thresholds._power_of_two(counts_F[index].max() + 1))))
    latents.append(local.reshape(-1))
    where.append(global_.reshape(-1))
  run = _capture_mapped(mesh, sae, *flat_specs(params, mesh), tuple(widths), tuple(keeps))
  placed = [laid_out(i, mesh, P(LATENT)) for i in latents]
  found, left = [], []
  for index, (values, _, left_out) in zip(where, run(params, x, placed)):
    values, left_out = mesh_lib.host(values), mesh_lib.host(left_out)
    real = index >= 0
    index, values, left_out = index[real], values[real], left_out[real]
    sure = thresholds.held_for_certain(values, left_out, counts_F[index])
    found.append((index[sure], values[sure]))
    left.append(index[~sure])
  return found, np.concatenate(left)


@functools.lru_cache(maxsize=None)
def _thresholded_mapped(mesh: jax.sharding.Mesh, sae: model.SAE, treedef, leaf_specs: tuple):
  specs = jax.tree.unflatten(treedef, leaf_specs)
  return jax.jit(jax.shard_map(
      functools.partial(_thresholded_local, sae=sae), mesh=mesh,
      in_specs=(specs, P(None, DATA), P(LATENT)), out_specs=P()))


def _thresholded_local(params, x_NxbxD, theta_F, sae: model.SAE):
  """Σ‖x − x̂‖² over every batch of the codes above θ (float32, as the saved
  SAE compares and decodes them), each shard decoding its latents'."""

  def one(sse, x_bxW):
    x_bxD, y_bxD = transcoder.sides(x_bxW, sae.config)
    local, _, _, a_bxF = latent_step._encoded(params, x_bxD, sae.config)
    a_bxF = a_bxF.astype(jnp.float32)
    z_bxF = jnp.where(a_bxF > theta_F[None, :], a_bxF, 0)
    xhat_bxD = (latent_select.latent_sum(z_bxF @ local["W_dec"].astype(jnp.float32))
                + local["b_dec"][None, :].astype(jnp.float32))
    return sse + collectives.ordered_psum(jnp.sum(jnp.square(y_bxD - xhat_bxD)), DATA), None

  sse, _ = lax.scan(one, jnp.zeros((), jnp.float32), x_NxbxD)
  return sse


def calibrate(params, x_NxD, sae: model.SAE, *, batch_size: int, mesh: jax.sharding.Mesh,
              per_latent: bool = True, rule_errors: bool = False,
              global_threshold=None) -> thresholds.Calibration:
  """`thresholds.calibrate` over a ("data", "latent") mesh: the counts
  (`count`), the thresholds (`per_latent_thresholds`) and with
  `rule_errors` `inference.choose`'s errors, the thresholds' from a third
  pass that decodes the codes above θ on each shard. Without `per_latent`
  (--inference global), `global_threshold`, the one θ for every latent,
  is the one the errors judge (on one device `inference.choose` finds
  them in a pass of its own, over the whole SAE)."""
  can = sae.config.selection != "topk" or sae.config.transcoder
  per_latent = per_latent and can
  rule_errors = rule_errors and can and (per_latent or global_threshold is not None)
  _check(sae, batch_size, mesh)
  params = _on(params, mesh)
  x = _rows(thresholds.batches(x_NxD, batch_size), mesh)  # laid out once for every pass
  counts_F, sse, top = _count(params, x, sae, mesh, rule_errors)
  tokens = x.shape[0] * batch_size
  theta_F = (_thresholds(params, x, sae, counts_F, mesh) if per_latent
             else np.zeros(sae.config.n_latents, np.float32))
  if not rule_errors:
    return thresholds.Calibration(theta_F, counts_F, tokens, sse)
  judged_F = theta_F if per_latent else np.full(theta_F.shape, global_threshold, np.float32)
  thresholded = _thresholded_mapped(mesh, sae, *flat_specs(params, mesh))(
      params, x, laid_out(judged_F, mesh, P(LATENT)))
  return thresholds.Calibration(theta_F, counts_F, tokens, sse,
                                (float(mesh_lib.host(thresholded)), *top))
