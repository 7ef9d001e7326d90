"""The calibration's two passes with the latents split (`--latent-shards`):
each device encodes its tokens of every calibration batch for its F / M
latents, and selects them by the training rule exactly as the training
step does over the ("data", "latent") mesh (`latent_select.py`), so the
SAE is never put together on one device.

The first part of the end of a run over the latent groups (issue 41): n_j
and the training rule's squared error (`count`, as `thresholds._count`
finds them on one device), and θ_j from them (`per_latent_thresholds`):
each device keeps, of each of its latents' columns in its tokens of each
batch, the few largest (`thresholds._capture_width`, with every (batch,
data shard) a group of its own), joins them over its batches and then over
"data", and θ_j is the (n_j + 1)-th largest wherever that is at least
every activation a group left out; the latents where it may not be are
found again with each group's whole column kept. Not split yet, so still
run on the whole SAE by `finish.py`: the top-k′ errors, the choice of
rule and the evaluation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from sae_jax import collectives
from sae_jax import latent_select
from sae_jax import latent_step
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax import thresholds
from sae_jax import transcoder
from sae_jax.mesh import DATA
from sae_jax.mesh import LATENT


def _count_local(params, x_NxbxD, sae: model.SAE):
  """This device's part of the count pass: its tokens [n, b, D] of every
  batch, its latents; the counts [F / M] of its latents and the squared
  error, both summed over the mesh."""
  config = sae.config
  key = jax.random.key(thresholds.CALIBRATION_KEY)
  n_cols = params["b_enc"].shape[0]

  def one(carry, i):
    counts_F, sse, pool_P = carry
    x_bxD, y_bxD = transcoder.sides(x_NxbxD[i], config)
    local, _, _, a_bxF = latent_step._encoded(params, x_bxD, config)
    key_i = jax.random.fold_in(key, i)
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
    return (counts_F, sse + error.astype(sse.dtype), pool_P), None

  kept_P = jnp.zeros(config.pool_size, jnp.int32) if config.keeps_pool else None
  counts_F = lax.pcast(jnp.zeros(n_cols, jnp.int32), LATENT, to="varying")  # each its latents'
  (counts_F, sse, _), _ = lax.scan(one, (counts_F, jnp.zeros((), jnp.float32), kept_P),
                                   jnp.arange(x_NxbxD.shape[0]))
  return counts_F, sse


@functools.lru_cache(maxsize=None)
def _mapped(mesh: jax.sharding.Mesh, sae: model.SAE, treedef, leaf_specs: tuple):
  specs = jax.tree.unflatten(treedef, leaf_specs)
  return jax.jit(jax.shard_map(
      functools.partial(_count_local, sae=sae), mesh=mesh,
      in_specs=(specs, P(None, DATA)), out_specs=(P(LATENT), P())))


def _check(sae: model.SAE, batch_size: int, mesh: jax.sharding.Mesh) -> None:
  if LATENT not in mesh.axis_names:
    raise ValueError(f"mesh must have a {LATENT!r} axis (mesh.make_mesh with "
                     f"latent_shards > 1); got axes {mesh.axis_names}")
  if sae.config.selection not in ("topk", "batchtopk", "sampled"):
    raise ValueError(f"the split calibration takes TopK, BatchTopK and Sampled-SAE; got "
                     f"selection {sae.config.selection!r}")
  if batch_size % mesh.shape[DATA]:
    raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's "
                     f"{mesh.shape[DATA]} data shards")


def _on(params, mesh: jax.sharding.Mesh):
  """The parameters laid out on `mesh` (`mesh.place`), unless they are already."""
  leaves = jax.tree.leaves(params)
  if all(isinstance(leaf, jax.Array) and getattr(leaf.sharding, "mesh", None) == mesh
         for leaf in leaves):
    return params
  return mesh_lib.place(params, mesh)


def _rows(x_NxBxD, mesh: jax.sharding.Mesh) -> jax.Array:
  """The batches [n, B, D] on `mesh`, each batch's rows split over "data" in
  order (every process holds them all, as every process calibrates)."""
  sharding = jax.sharding.NamedSharding(mesh, P(None, DATA))
  return jax.make_array_from_callback(x_NxBxD.shape, sharding, lambda index: x_NxBxD[index])


def count(params, x_NxD, sae: model.SAE, *, batch_size: int, mesh: jax.sharding.Mesh):
  """`thresholds.calibrate`'s first pass over a ("data", "latent") mesh: n_j
  per latent (int64 [F]) and the training rule's Σ‖x − x̂‖² on x, cut into
  batches of `batch_size` as on one device, each batch's rows split over
  "data" in order.

  Args:
    params: the SAE's parameters (scaled units), on the host or laid out
      on `mesh` (`mesh.place`).
    x_NxD: calibration tokens, already scaled (`transcoder.scaled`).
    sae: the SAE module (TopK, BatchTopK or Sampled-SAE).
    batch_size: tokens per batch, as in training.
    mesh: `mesh.make_mesh(latent_shards=M)`, M > 1.
  """
  _check(sae, batch_size, mesh)
  x_NxBxD = thresholds.batches(x_NxD, batch_size)
  params = _on(params, mesh)
  specs = mesh_lib.specs(params, mesh)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, P))
  x = _rows(x_NxBxD, mesh)
  counts_F, sse = _mapped(mesh, sae, treedef, tuple(leaves))(params, x)
  return mesh_lib.host(counts_F).astype(np.int64), float(mesh_lib.host(sse))


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
    a_FxB = latent_step._encoded(params, x_bxD, sae.config)[3].T
    a_FxB = jnp.where(jnp.isnan(a_FxB), -jnp.inf, a_FxB)  # never above θ, as in a count
    out = []
    for index, width in zip(latents, widths):
      values, rows = lax.top_k(a_FxB[index], width)
      out.append((values, rows + i * batch_size + first_row))
    return tuple(out)

  out = []
  for (values, tokens), width, keep in zip(lax.map(one, jnp.arange(n_batches)), widths, keeps):
    n_latents = values.shape[1]
    left_out = (jnp.max(values[:, :, -1], axis=0) if width < n_rows
                else jnp.full(n_latents, -jnp.inf, values.dtype))
    join = lambda v: jnp.moveaxis(v, 0, 1).reshape(n_latents, -1)
    values, top = lax.top_k(join(values), min(keep, n_batches * width))
    tokens = jnp.take_along_axis(join(tokens), top, axis=1)
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
  x_NxBxD = thresholds.batches(x_NxD, batch_size)
  n_batches, _, _ = x_NxBxD.shape
  rows = batch_size // mesh.shape[DATA]
  counts_F = np.asarray(counts_F, np.int64)
  theta_F = np.where(counts_F > 0, 0.0, thresholds.NEVER).astype(np.float32)
  needed = np.flatnonzero((counts_F > 0) & (counts_F < n_batches * batch_size))
  if not len(needed):
    return theta_F
  params = _on(params, mesh)
  x = _rows(x_NxBxD, mesh)
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
  specs = mesh_lib.specs(params, mesh)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda spec: isinstance(spec, P))
  run = _capture_mapped(mesh, sae, treedef, tuple(leaves), tuple(widths), tuple(keeps))
  sharding = jax.sharding.NamedSharding(mesh, P(LATENT))
  placed = [jax.make_array_from_callback(i.shape, sharding, lambda index, i=i: i[index])
            for i in latents]
  found, left = [], []
  for index, (values, _, left_out) in zip(where, run(params, x, placed)):
    values, left_out = mesh_lib.host(values), mesh_lib.host(left_out)
    real = index >= 0
    index, values, left_out = index[real], values[real], left_out[real]
    n_L, keep = counts_F[index], values.shape[1]
    # Held for certain where the (n_j + 1)-th largest kept is at least every
    # activation a group left out: then it is the (n_j + 1)-th largest of all.
    sure = (n_L < keep) & (values[np.arange(len(index)), np.minimum(n_L, keep - 1)] >= left_out)
    found.append((index[sure], values[sure]))
    left.append(index[~sure])
  return found, np.concatenate(left)
