"""The saved SAE's inference rule, chosen on the calibration tokens (SPEC.md,
"Inference"): per-latent thresholds (SAELens "jumprelu") where they
reconstruct about as well as the training rule, else each token's k′ ≤ k
largest codes (SAELens "topk").

Per-latent thresholds fire each latent as often as the training rule did,
but not with the same partners. With drawn pools (`--sample-pool`) training
sees each latent only beside a random few others, and the decoder learns
overlapping directions; at inference the thresholds let them all fire
together, and the saved SAE reconstructs worse than the mean (FVU 1.67
against the training rule's 0.79 at D=32, F=128, k=4, l=2: the table in
docs/inference-thresholds.md). Each token's top k′ keeps the strongest few
and reconstructs as well as training or better. So `--inference auto` (the
default) keeps the thresholds unless their FVU on the calibration tokens is
over `GAP` times the training rule's, and then saves the topk rule whose k′
reconstructs those tokens best.
"""

import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax import cut
from sae_jax import model
from sae_jax import transcoder
from sae_jax.config import SAEConfig

# How much worse than the training rule, on the calibration tokens, the
# per-latent thresholds may reconstruct before `auto` saves topk instead.
GAP = 1.1


class Rule(typing.NamedTuple):
  """The inference rule a run saves."""
  name: str  # "per-latent", "topk" or "global"
  threshold_F: np.ndarray  # θ per latent (scaled units); what "topk" ignores
  k: int  # latents per token ("topk"); the training k otherwise
  fvu: dict  # FVU on the calibration tokens: training rule, per-latent, best topk
  # "topk": each latent's firings under it on the calibration tokens (the
  # pass that chose it counts them); None for the others.
  counts_F: typing.Optional[np.ndarray] = None

  def sae(self, config: SAEConfig) -> SAEConfig:
    """The SAE config that encodes by this rule (`model.SAE.encode_inference`)."""
    if self.name != "topk":  # thresholds: a TopK transcoder's too
      return config if config.selection != "topk" else dataclasses.replace(
          config, selection="batchtopk")
    return dataclasses.replace(config, selection="topk", k=self.k)


def top_k_errors(params, a_BxF, y_BxD, k: int) -> tuple:
  """One batch's Σ‖y − ŷ‖² with each token's k′ largest codes of the
  activations a, for k′ = 1..k ([k]), and [k, F], how often each latent is
  a token's i-th largest positive code, whose cumulative sums over i < k′
  count the firings of the topk rule with k′ (`selection.topk`'s order:
  larger first, equal ones lower latent first)."""
  W_dec_FxD = params["W_dec"].astype(jnp.float32)
  a_BxF = a_BxF.astype(jnp.float32)
  values_BxK, latents_BxK = cut.top_k(a_BxF, k)

  def peel(error_BxD, i):  # the error once each token's i+1 largest codes are decoded
    error_BxD = error_BxD - values_BxK[:, i, None] * W_dec_FxD[latents_BxK[:, i]]
    return error_BxD, jnp.sum(jnp.square(error_BxD))

  _, top_K = lax.scan(peel, y_BxD - params["b_dec"][None, :], jnp.arange(k))
  counts_KxF = jnp.zeros((k, a_BxF.shape[1]), jnp.int32).at[
      jnp.arange(k)[None, :], latents_BxK].add((values_BxK > 0).astype(jnp.int32))
  return top_K.astype(jnp.float32), counts_KxF


@functools.partial(jax.jit, static_argnames=("sae",))
def _errors(params, x_NxBxD, theta_F, sae: model.SAE):
  """Σ‖x − x̂‖² over every batch: with the thresholds θ_F, and with each
  token's k′ largest codes for k′ = 1..k ([k]); and the topk rules'
  firings [k, F] (`top_k_errors`)."""
  k = sae.config.k
  variables = {"params": params}

  def one(totals, rows_BxW):
    x_BxD, y_BxD = transcoder.sides(rows_BxW, sae.config)
    a_BxF = jax.nn.relu(sae.apply(variables, x_BxD, method=model.SAE.pre)).astype(jnp.float32)
    z_BxF = jnp.where(a_BxF > theta_F[None, :], a_BxF, 0)
    thresholded = jnp.sum(jnp.square(y_BxD - sae.apply(variables, z_BxF,
                                                       method=model.SAE.decode)))
    top_K, counts_KxF = top_k_errors(params, a_BxF, y_BxD, k)
    return (totals[0] + thresholded.astype(jnp.float32), totals[1] + top_K,
            totals[2] + counts_KxF), None

  zero = jnp.zeros((), jnp.float32)
  counts = jnp.zeros((k, sae.config.n_latents), jnp.int32)
  totals, _ = lax.scan(one, (zero, jnp.zeros(k, jnp.float32), counts), x_NxBxD)
  return totals


def choose(asked: str, params, x_NxBxD, sae: model.SAE, threshold_F,
           training_sse: float, errors=None) -> Rule:
  """The rule to save, from the calibration batches x (scaled units).

  Args:
    asked: `RunConfig.inference` (`runconfig.INFERENCE_RULES`): "global"
      and "per-latent" are kept as asked, "topk" takes the k′ ≤ k that
      reconstructs x best, "auto" takes it only where the thresholds are
      more than `GAP` times worse than the training rule.
    threshold_F: the per-latent thresholds, or the global one for every latent.
    training_sse: Σ‖x − x̂‖² of the training rule on the same batches.
    errors: (Σ‖x − x̂‖² with threshold_F, the top-k′ errors [k], their
      firings [k, F]) on those batches, found by the calibration's passes
      (`thresholds.Calibration.errors`); None: a pass over x finds them.

  Returns:
    Rule (for BatchTopK and Sampled-SAE; a TopK SAE keeps its own rule).

  >>> sae = model.SAE(SAEConfig(2, 3, k=1, selection="batchtopk"))
  >>> params = {"W_enc": jnp.eye(2, 3), "b_enc": jnp.zeros(3), "W_dec": jnp.eye(3, 2),
  ...           "b_dec": jnp.zeros(2)}
  >>> x = jnp.array([[[4., 1.], [0., 3.]]])  # thresholds that let both fire: exact
  >>> choose("auto", params, x, sae, np.zeros(3, np.float32), 1.).name
  'per-latent'
  >>> rule = choose("topk", params, x, sae, np.zeros(3, np.float32), 1.)
  >>> rule.name, rule.k, rule.fvu["topk"]  # one code per token leaves the 1: 1 / 10
  ('topk', 1, 0.1)
  """
  x_NxBxD = np.asarray(x_NxBxD, np.float32)
  y_NxBxD = transcoder.sides(x_NxBxD, sae.config)[1]  # what the SAE reconstructs
  mean_D = y_NxBxD.mean(axis=(0, 1), dtype=np.float64)
  variance = sum(float(np.square(y_BxD - mean_D).sum()) for y_BxD in y_NxBxD)
  if errors is None:
    errors = _errors(params, jnp.asarray(x_NxBxD, jnp.float32),
                     jnp.asarray(threshold_F, jnp.float32), sae)
  thresholded, top_K, counts_KxF = errors
  top_K = np.asarray(top_K, np.float64)
  best = int(np.argmin(top_K))
  thresholds = "global" if asked == "global" else "per-latent"
  # Constant tokens have no variance: no FVU (NaN), and auto keeps the thresholds.
  ratio = lambda sse: float(sse) / variance if variance > 0 else math.nan
  fvu = {"training_rule": ratio(training_sse), thresholds: ratio(thresholded),
         "topk": ratio(top_K[best])}
  use_topk = asked == "topk" or (asked == "auto" and fvu[thresholds] > GAP * fvu["training_rule"]
                                 and fvu["topk"] < fvu[thresholds])
  threshold_F = np.asarray(threshold_F, np.float32)
  if use_topk:
    counts_F = np.asarray(counts_KxF)[:best + 1].sum(axis=0, dtype=np.int64)
    return Rule("topk", threshold_F, best + 1, fvu, counts_F)
  return Rule(thresholds, threshold_F, sae.config.k, fvu)
