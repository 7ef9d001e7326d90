"""Held-out evaluation: reconstruction and sparsity on raw activations, in
inference mode (a token's code never depends on the other tokens: what a
saved SAE computes in SAELens) and in batch mode (the training rule itself,
over whole batches)."""

import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import model
from sae_jax import selection

MODES = ("inference", "batch")
BATCH_MODE_KEY = 0xBA7C  # draws the pools of `sample_pool` SAEs in batch mode


def _scales(input_scale) -> jax.Array:
  """(c_in, c_out) [2] float32 from one scale (an SAE's) or a transcoder's
  two (`train.scales`)."""
  return jnp.broadcast_to(jnp.asarray(input_scale, jnp.float32), (2,))


@functools.partial(jax.jit, static_argnames=("sae",))
def _reconstruct(params, threshold, scales, x_BxD, sae: model.SAE):
  variables = {"params": params}
  z_BxF = sae.apply(variables, x_BxD * scales[0], threshold, method=model.SAE.encode_inference)
  xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode) / scales[1]
  return z_BxF, xhat_BxD


@functools.partial(jax.jit, static_argnames=("sae",))
def _reconstruct_batch(params, scales, x_BxD, key, sae: model.SAE, pool_P=None):
  variables = {"params": params}
  z_BxF = sae.apply(variables, x_BxD * scales[0], key=key, pool=pool_P,
                    method=model.SAE.encode)
  return z_BxF, sae.apply(variables, z_BxF, method=model.SAE.decode) / scales[1]


def reconstruct(params, threshold, input_scale, x_BxD, sae: model.SAE,
                chunk: int = 4096, *, mode: str = "inference",
                batch_size: typing.Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Codes [B, F] (scaled units) and reconstructions [B, D] (raw units) of
  raw activations (a transcoder's inputs; its reconstructions are of the
  target).

  Args:
    threshold: θ, one per latent [F] or one for all (inference mode only).
    input_scale: c, or a transcoder's (c_in, c_out) (`train.scales`).
    sae: the SAE module (`model.SAE(config)`).
    mode: "inference": token by token, a_j > θ_j (TopK: each token's top k),
      `chunk` tokens at a time; what the saved SAE does in SAELens, and what
      splicing, probing or reading single tokens needs. "batch": the training
      rule over consecutive batches of `batch_size` tokens (a shorter last
      one is a batch of its own; a kept pool, `pool_every`, is renewed on
      every pool_every-th batch); the codes training would have given, for
      evaluating on whole batches like the training ones.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
  if mode == "batch" and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                          or batch_size < 1):
    raise ValueError(f"mode='batch' needs batch_size, an integer >= 1; got {batch_size!r}")
  step = chunk if mode == "inference" else batch_size
  key = jax.random.key(BATCH_MODE_KEY)
  scales = _scales(input_scale)
  codes, recon = [], []
  for i, start in enumerate(range(0, len(x_BxD), step)):
    x = jnp.asarray(x_BxD[start:start + step], jnp.float32)
    if mode == "inference":
      z, xhat = _reconstruct(params, jnp.asarray(threshold, jnp.float32), scales, x, sae)
    else:
      key_i = jax.random.fold_in(key, i)
      if sae.config.keeps_pool and i % sae.config.pool_every == 0:
        pool_P = pool(params, scales[0], x, key_i, sae)
      z, xhat = _reconstruct_batch(params, scales, x, key_i, sae,
                                   pool_P if sae.config.keeps_pool else None)
    codes.append(np.asarray(z))
    recon.append(np.asarray(xhat))
  return np.concatenate(codes), np.concatenate(recon)


class Modes(typing.NamedTuple):
  """`both_modes`' codes and reconstructions, in x's order."""
  z_inference: np.ndarray  # [N, F] scaled units
  xhat_inference: np.ndarray  # [N, D] raw units
  xhat_batch: np.ndarray  # [N, D]
  l0_batch: np.ndarray  # [N] the batch mode's codes per token
  pools: list  # Sampled-SAE: each batch's pool of top scores (`pool`'s top=True); else []


@functools.partial(jax.jit, static_argnames=("sae", "inference_sae"))
def _both(params, threshold, scales, x_BxD, key, sae: model.SAE, inference_sae: model.SAE,
          pool_P=None):
  """One batch in both modes, from one encoding; each mode decoded from its
  selected columns where it has few (a topk rule's k, a Sampled-SAE's pool)."""
  variables = {"params": params}
  a_BxF = jax.nn.relu(sae.apply(variables, x_BxD * scales[0], method=model.SAE.pre))
  if inference_sae.config.selection == "topk":  # `select_inference`'s codes, with their columns
    z_BxF, index_BxK = selection.topk_columns(a_BxF, inference_sae.config.k)
    values_BxK = jnp.take_along_axis(z_BxF, index_BxK, axis=1)
    xhat_BxD = (jnp.einsum("bk,bkd->bd", values_BxK, params["W_dec"][index_BxK])
                + params["b_dec"][None, :])
  else:
    z_BxF = inference_sae.apply(variables, a_BxF, threshold, method=model.SAE.select_inference)
    xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode)
  config, top = sae.config, None
  if config.selection == "sampled":  # the selection in the pool's P columns, as training
    rule = config.pool_rule
    chosen = selection.sampled_select_pooled(a_BxF, rule.pop("k"), rule.pop("l"), pool=pool_P,
                                             **model.sampled_options(key, **rule))
    xhat_batch_BxD = sae.apply(variables, chosen.values, chosen.pool,
                               method=model.SAE.decode_pooled)
    l0_B = jnp.sum(chosen.values != 0, axis=1)
    # The pool of top scores, even for a `sample_pool` SAE (drawn for "uniform").
    top = model.new_pool(a_BxF, key, **(config.pool_rule | {
        "sample_pool": config.sample_pool and config.score == "uniform"}))
  else:
    zb_BxF = sae.apply(variables, a_BxF, key=key, pool=pool_P, method=model.SAE.select)
    xhat_batch_BxD = sae.apply(variables, zb_BxF, method=model.SAE.decode)
    l0_B = jnp.sum(zb_BxF != 0, axis=1)
  return z_BxF, xhat_BxD / scales[1], xhat_batch_BxD / scales[1], l0_B, top


def both_modes(params, threshold, input_scale, x_BxD, sae: model.SAE,
               inference_sae: model.SAE, batch_size: int) -> Modes:
  """The inference mode (`inference_sae`'s rule, token by token) and the
  batch mode (`sae`'s training rule on consecutive batches of `batch_size`)
  of raw activations x, from one encoding of each batch, and the
  Sampled-SAE pools of `pools`, of these batches.
  """
  key = jax.random.key(BATCH_MODE_KEY)
  scales = _scales(input_scale)
  threshold = jnp.asarray(threshold, jnp.float32)
  parts, pools, pool_P = [], [], None
  for i, start in enumerate(range(0, len(x_BxD), batch_size)):
    x = jnp.asarray(x_BxD[start:start + batch_size], jnp.float32)
    key_i = jax.random.fold_in(key, i)
    if sae.config.keeps_pool and i % sae.config.pool_every == 0:
      pool_P = pool(params, scales[0], x, key_i, sae)
    *out, top = _both(params, threshold, scales, x, key_i, sae, inference_sae, pool_P)
    parts.append([np.asarray(array) for array in out])
    if top is not None:
      pools.append(np.asarray(top))
  return Modes(*(np.concatenate(arrays) for arrays in zip(*parts)), pools)


@functools.lru_cache(maxsize=None)
def splice(sae: model.SAE, chunk: int = 2048):
  """The SAE module as a JAX splice for `downstream.downstream_loss_jax`:
  (x [n, D] raw, params, threshold, input_scale) -> inference-mode
  reconstructions [n, D] (raw units), `chunk` rows at a time. An equal
  module gives the same function, so compilations are reused."""

  def reconstruction(x_NxD, params, threshold, input_scale):
    scales = _scales(input_scale)
    one = lambda x_D: _reconstruct(params, threshold, scales, x_D[None], sae)[1][0]
    return jax.lax.map(one, x_NxD, batch_size=chunk)

  return reconstruction


def reconstruction_metrics(x_BxD, xhat_BxD, z_BxF) -> dict:
  """fvu = Σ||x - xhat||² / Σ||x - mean x||², explained_variance = 1 - fvu,
  mse (mean over tokens of ||x - xhat||², summed over D as SAELens' evals
  sum it), l0 (mean nonzero codes per token), cosine (mean over
  tokens of cos(x, xhat)) and norm_ratio (mean of ||xhat|| / ||x||; below 1
  is shrinkage).

  >>> x = np.array([[1., 0.], [-1., 0.]])
  >>> reconstruction_metrics(x, x, np.array([[1., 0.], [0., 2.]]))
  {'fvu': 0.0, 'explained_variance': 1.0, 'mse': 0.0, 'l0': 1.0, 'cosine': 1.0, 'norm_ratio': 1.0}
  """
  x = np.asarray(x_BxD, np.float64)
  xhat = np.asarray(xhat_BxD, np.float64)
  error = np.square(x - xhat)
  fvu = _fvu(x, error)
  norm_x, norm_xhat = np.linalg.norm(x, axis=1), np.linalg.norm(xhat, axis=1)
  cosine = np.sum(x * xhat, axis=1) / np.maximum(norm_x * norm_xhat, 1e-30)
  return {"fvu": fvu, "explained_variance": 1 - fvu, "mse": float(error.sum(1).mean()),
          "l0": float(np.mean(np.sum(np.asarray(z_BxF) != 0, axis=1))),
          "cosine": float(cosine.mean()),
          "norm_ratio": float(np.mean(norm_xhat / np.maximum(norm_x, 1e-30)))}


def fvu(x_BxD, xhat_BxD) -> float:
  """Σ||x - xhat||² / Σ||x - mean x||² (`reconstruction_metrics`' fvu)."""
  x = np.asarray(x_BxD, np.float64)
  return _fvu(x, np.square(x - np.asarray(xhat_BxD, np.float64)))


def _fvu(x, error) -> float:
  variance = np.square(x - x.mean(0)).sum()
  return float(error.sum() / variance) if variance > 0 else math.nan  # constant x: no FVU


def sparsity_metrics(z_BxF, *, dense_density: float = 0.1, top_fraction: float = 0.1) -> dict:
  """How the codes spend their budget, over the tokens of z.

  - l0_std, l0_p10, l0_p50, l0_p90: the spread of nonzero codes per token
    (BatchTopK and Sampled-SAE give some tokens more than k, others fewer).
  - density_F: fraction of tokens on which each latent fires.
  - dead_fraction: latents with density 0; dense_fraction: density > dense_density.
  - top_share: fraction of all nonzero codes that belong to the top_fraction
    most frequent latents (top_fraction itself if spread evenly, up to 1).

  >>> m = sparsity_metrics(np.array([[1., 0., 0., 0.], [2., 3., 0., 0.]]), top_fraction=0.25)
  >>> m["l0_std"], m["dead_fraction"], m["dense_fraction"], m["top_share"]
  (0.5, 0.5, 0.5, 0.6666666666666666)
  """
  active_BxF = np.asarray(z_BxF) != 0
  l0_B = active_BxF.sum(axis=1)
  density_F = active_BxF.mean(axis=0)
  counts_F = np.sort(active_BxF.sum(axis=0))[::-1]
  n_top = max(1, int(round(top_fraction * len(counts_F))))
  return {"l0_std": float(l0_B.std()),
          "l0_p10": float(np.percentile(l0_B, 10)), "l0_p50": float(np.percentile(l0_B, 50)),
          "l0_p90": float(np.percentile(l0_B, 90)),
          "dead_fraction": float(np.mean(density_F == 0)),
          "dense_fraction": float(np.mean(density_F > dense_density)),
          "top_share": float(counts_F[:n_top].sum() / max(counts_F.sum(), 1)),
          "density_F": density_F}


def density_histogram(density_F, bins=np.arange(-6.0, 0.5, 0.5)) -> tuple[np.ndarray, np.ndarray]:
  """Counts of latents per log10(density) bin (edges `bins`), and the count
  of latents that never fire (log10 0 is not a number).

  >>> density_histogram(np.array([0.0, 0.001, 0.002, 0.5]), bins=np.array([-4., -2., 0.]))
  (array([2, 1]), 1)
  """
  density_F = np.asarray(density_F)
  alive = density_F[density_F > 0]
  counts, _ = np.histogram(np.log10(alive), bins=bins)
  return counts, int(np.sum(density_F == 0))


def pool_jaccard(pools) -> float:
  """Mean Jaccard overlap |A ∩ B| / |A ∪ B| of consecutive pools (1: the same
  latents every batch; near P / F: unrelated random pools).

  >>> pool_jaccard([[0, 1, 2], [1, 2, 3], [1, 2, 3]])
  0.75
  """
  sets = [set(np.asarray(p).tolist()) for p in pools]
  return float(np.mean([len(a & b) / len(a | b) for a, b in zip(sets, sets[1:])]))


def ground_truth_metrics(W_dec_FxD, dictionary_NxD, feature_class_N, *,
                         threshold: float = 0.9) -> dict:
  """gt_mmcs (mean over true directions of the best cosine with a decoder row)
  and gt_recovered (fraction with best cosine >= threshold), overall and per
  feature class (gt_mmcs_rare, gt_recovered_frequent, gt_recovered_parent, ...).

  >>> ground_truth_metrics(np.eye(2), np.array([[1., 0.], [1., 1.]]), np.array([0, 1]))["gt_recovered_rare"]
  0.0
  """
  from sae_jax import synthetic
  best_N = synthetic.best_cosines(W_dec_FxD, dictionary_NxD)
  out = {"gt_mmcs": float(best_N.mean()), "gt_recovered": float(np.mean(best_N >= threshold))}
  for value, name in synthetic.CLASS_NAMES.items():
    members = np.asarray(feature_class_N) == value
    if members.any():
      out[f"gt_mmcs_{name}"] = float(best_N[members].mean())
      out[f"gt_recovered_{name}"] = float(np.mean(best_N[members] >= threshold))
  return out


@functools.partial(jax.jit, static_argnames=("sae", "top"))
def pool(params, input_scale, x_BxD, key, sae: model.SAE, top: bool = False):
  """The Sampled-SAE pool of x as `select` chooses it, or with `top` the
  top scores even for a `sample_pool` SAE."""
  a_BxF = jax.nn.relu(sae.apply({"params": params}, x_BxD * input_scale, method=model.SAE.pre))
  rule = sae.config.pool_rule | ({"sample_pool": False} if top else {})
  return model.new_pool(a_BxF, key, **rule)


def pools(params, input_scale, x_BxD, sae: model.SAE, batch_size: int) -> list:
  """The Sampled-SAE pool (top scores) of each consecutive batch of x; for
  score "uniform", which has no top, the pools drawn as training draws them."""
  key = jax.random.key(BATCH_MODE_KEY)
  return [np.asarray(pool(params, jnp.float32(input_scale),
                           jnp.asarray(x_BxD[start:start + batch_size], jnp.float32),
                           jax.random.fold_in(key, i), sae, top=sae.config.score != "uniform"))
          for i, start in enumerate(range(0, len(x_BxD) - batch_size + 1, batch_size))]
