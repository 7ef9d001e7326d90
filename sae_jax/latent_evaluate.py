"""The held-out evaluation with the latents split (`--latent-shards`):
`evaluate.both_modes` over the ("data", "latent") mesh, the SAE never put
together on one device. Each device encodes its rows of each batch for its
F / M latents; the inference rule (each token's top k′ over all F, or the
thresholds of its latents) and the training rule select as the split
training step does (`latent_select.py`); the decoder's partial sums are
added over the latent shards in one order (`latent_select.latent_sum`).
The codes come back to the host whole ([N, F], as one device gives them).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from sae_jax import evaluate
from sae_jax import latent_calibration
from sae_jax import latent_select
from sae_jax import latent_step
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax.mesh import DATA
from sae_jax.mesh import LATENT


def _both_local(params, theta_F, scales, x_bxD, key, pool_P, sae: model.SAE,
                inference_sae: model.SAE):
  """One batch, this device's rows and latents: the inference codes [b, F / M]
  and reconstruction, the batch mode's reconstruction and codes per token,
  and the pool of top scores (Sampled-SAE), as `evaluate._both`."""
  config = sae.config
  local, _, _, a_bxF = latent_step._encoded(params, x_bxD * scales[0], config)
  decode = lambda z: (latent_select.latent_sum(z @ local["W_dec"])
                      + local["b_dec"][None, :]) / scales[1]
  if inference_sae.config.selection == "topk":
    z_bxF = jnp.where(latent_select.topk_mask(a_bxF, inference_sae.config.k), a_bxF, 0)
  else:
    z_bxF = jnp.where(a_bxF > theta_F[None, :], a_bxF, 0)
  top = None
  if config.selection == "topk":
    mask_bxF = latent_select.topk_mask(a_bxF, config.k)
  elif config.selection == "batchtopk":
    mask_bxF = latent_select.batchtopk_mask(a_bxF, config.k)
  else:
    if pool_P is None:  # chosen on this batch, as training chooses it
      pool_P = latent_select.sampled_pool(a_bxF, key, **config.pool_rule)
    mask_bxF = latent_select.sampled_mask(a_bxF, config.k, pool_P)
    # The pool of top scores, even for a `sample_pool` SAE (drawn for "uniform").
    top = latent_select.sampled_pool(a_bxF, key, **(config.pool_rule | {
        "sample_pool": config.sample_pool and config.score == "uniform"}))
  l0_b = lax.psum(jnp.sum(mask_bxF, axis=1, dtype=jnp.int32), LATENT)
  return z_bxF, decode(z_bxF), decode(jnp.where(mask_bxF, a_bxF, 0)), l0_b, top


@functools.lru_cache(maxsize=None)
def _mapped(mesh: jax.sharding.Mesh, sae: model.SAE, inference_sae: model.SAE, treedef,
            leaf_specs: tuple, kept: bool):
  specs = jax.tree.unflatten(treedef, leaf_specs)
  top = P() if sae.config.selection == "sampled" else None
  local = functools.partial(_both_local, sae=sae, inference_sae=inference_sae)
  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(specs, P(LATENT), P(), P(DATA), P(), P() if kept else None),
      out_specs=(P(DATA, LATENT), P(DATA), P(DATA), P(DATA), top)))


@functools.lru_cache(maxsize=None)
def _pool_mapped(mesh: jax.sharding.Mesh, sae: model.SAE, treedef, leaf_specs: tuple):
  specs = jax.tree.unflatten(treedef, leaf_specs)

  def local(params, scales, x_bxD, key):
    a_bxF = latent_step._encoded(params, x_bxD * scales[0], sae.config)[3]
    return latent_select.sampled_pool(a_bxF, key, **sae.config.pool_rule)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P(DATA), P()),
                               out_specs=P()))


def both_modes(params, threshold, input_scale, x_BxD, sae: model.SAE,
               inference_sae: model.SAE, batch_size: int,
               mesh: jax.sharding.Mesh) -> evaluate.Modes:
  """`evaluate.both_modes` over a ("data", "latent") mesh: the codes and the
  reconstructions up to the rounding of sums over the latent shards (the
  same entries, but one within that rounding of θ can fall on the other
  side). Every batch, a shorter last one too, must split evenly over
  "data" (`finish.py` trims the held-out rows so that it does).

  Args:
    params: the SAE's parameters on the host; threshold: θ [F] or one for
      all; the rest as `evaluate.both_modes`'s; mesh: with a "latent" axis.
  """
  latent_calibration._check(sae, None, mesh)
  n_latents = sae.config.n_latents
  theta_F = np.broadcast_to(np.asarray(threshold, np.float32), (n_latents,))
  scales = np.asarray(evaluate._scales(input_scale))
  key = jax.random.key(evaluate.BATCH_MODE_KEY)
  shards = mesh.shape[DATA]
  last = len(x_BxD) % batch_size
  if batch_size % shards or last % shards:
    raise ValueError(f"every batch must split over the mesh's {shards} data shards; got "
                     f"batches of {batch_size}" + (f" and a last one of {last}" if last else ""))
  params = latent_calibration._on(params, mesh)
  theta = latent_calibration.laid_out(theta_F, mesh, P(LATENT))
  specs = latent_calibration.flat_specs(params, mesh)
  run = _mapped(mesh, sae, inference_sae, *specs, sae.config.keeps_pool)
  parts, pools, pool_P = [], [], None
  for i, start in enumerate(range(0, len(x_BxD), batch_size)):
    rows = latent_calibration.laid_out(
        np.asarray(x_BxD[start:start + batch_size], np.float32), mesh, P(DATA))
    key_i = jax.random.fold_in(key, i)
    if sae.config.keeps_pool and i % sae.config.pool_every == 0:
      pool_P = _pool_mapped(mesh, sae, *specs)(params, scales, rows, key_i)
    *out, top = run(params, theta, scales, rows, key_i, pool_P)
    parts.append([mesh_lib.host(array) for array in out])
    if top is not None:
      pools.append(mesh_lib.host(top))
  return evaluate.Modes(*(np.concatenate(arrays) for arrays in zip(*parts)), pools)
