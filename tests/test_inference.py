"""The saved SAE's inference rule: its errors against NumPy, the choice
between per-latent thresholds and each token's top k′, and a run with drawn
pools whose saved SAE reconstructs as well as its training rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import inference
from sae_jax import model
from sae_jax import synthetic
from sae_jax.config import SAEConfig
from tests import helpers

D, F, K, B = 16, 48, 3, 64
SOURCE = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=D, n_features=32))
CONFIG = SAEConfig(D, F, k=K, selection="sampled", l=2.0)


def setup():
  x = SOURCE.sample(7, 4 * B)
  params = model.init_params(jax.random.key(0), model.SAE(CONFIG), jnp.asarray(x))["params"]
  theta_F = np.random.default_rng(0).uniform(0, 0.5, F).astype(np.float32)
  return params, x.reshape(4, B, D), theta_F


def reference_errors(params, x_NxD, theta_F):
  """Σ‖x − x̂‖² with the thresholds, and with each token's k′ largest, by NumPy."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  a = np.maximum((x_NxD - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
  sse = lambda z: float(np.sum(np.square(x_NxD - z @ p["W_dec"] - p["b_dec"])))
  top = []
  for k in range(1, K + 1):
    keep = np.argsort(-a, axis=1, kind="stable")[:, :k]
    z = np.zeros_like(a)
    np.put_along_axis(z, keep, np.take_along_axis(a, keep, axis=1), axis=1)
    top.append(sse(z))
  return sse(np.where(a > theta_F, a, 0)), np.array(top)


def test_errors_match_numpy():
  params, x, theta_F = setup()
  thresholded, top_K, _ = inference._errors(params, jnp.asarray(x), jnp.asarray(theta_F),
                                          model.SAE(CONFIG))
  want_thresholded, want_top = reference_errors(params, np.asarray(x, np.float64).reshape(-1, D),
                                                theta_F)
  np.testing.assert_allclose(float(thresholded), want_thresholded, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(top_K), want_top, rtol=1e-4)
  assert want_top.shape == (K,) and len(set(want_top.round(3))) == K  # k′ changes the error


def test_the_choice():
  params, x, theta_F = setup()
  flat = np.asarray(x, np.float64).reshape(-1, D)
  variance = float(np.square(flat - flat.mean(0)).sum())
  thresholded, top = reference_errors(params, flat, theta_F)
  best = int(np.argmin(top)) + 1
  choose = lambda asked, training: inference.choose(asked, params, x, model.SAE(CONFIG),
                                                                theta_F, training)

  # auto keeps the thresholds within 1.1x of the training rule ...
  kept = choose("auto", thresholded / 1.09)
  assert (kept.name, kept.k) == ("per-latent", K)
  np.testing.assert_array_equal(kept.threshold_F, theta_F)
  assert kept.sae(CONFIG) == CONFIG
  np.testing.assert_allclose(kept.fvu["per-latent"], thresholded / variance, rtol=1e-4)
  np.testing.assert_allclose(kept.fvu["training_rule"], thresholded / 1.09 / variance)
  np.testing.assert_allclose(kept.fvu["topk"], top.min() / variance, rtol=1e-4)
  # ... and past it saves the top k′ that reconstructs best, if that is better.
  worse = choose("auto", thresholded / 1.11)
  assert top.min() < thresholded and (worse.name, worse.k) == ("topk", best)
  assert worse.sae(CONFIG) == SAEConfig(D, F, k=best, selection="topk", l=2.0)
  # Asked for: per-latent and global stay, topk is taken whatever the gap.
  assert choose("per-latent", thresholded / 10).name == "per-latent"
  assert choose("global", thresholded / 10).name == "global"
  assert "global" in choose("global", 1.0).fvu
  assert (choose("topk", thresholded).name, choose("topk", thresholded).k) == ("topk", best)


@pytest.mark.parametrize("ties", [False, True])
def test_a_topk_rule_counts_what_the_saved_sae_fires(ties):
  """The pass that chooses k′ counts each latent's firings under it: the
  counts a pass of the saved SAE's own encoder (`selection.topk`) gives,
  with ties (repeated tokens, activations rounded to a coarse grid, tokens
  with fewer than k positive codes) broken as it breaks them."""
  from sae_jax import evaluate
  params, x, theta_F = setup()
  if ties:  # coarse weights: many equal activations, and many zeros
    params = dict(params, W_enc=jnp.round(params["W_enc"] * 4) / 4,
                  b_enc=jnp.full(F, -0.5, jnp.float32), b_dec=jnp.zeros(D, jnp.float32))
    x = np.round(x * 2) / 2
    x[:, ::2] = x[:, 1::2]  # each token twice
  rule = inference.choose("topk", params, x, model.SAE(CONFIG), theta_F, 1.0)
  z, _ = evaluate.reconstruct(params, theta_F, 1.0, x.reshape(-1, D), model.SAE(rule.sae(CONFIG)))
  np.testing.assert_array_equal(rule.counts_F, np.sum(z > 0, axis=0))
  assert rule.counts_F.sum() > 0
  if ties:
    a = np.maximum(np.asarray(model.SAE(CONFIG).apply({"params": params}, jnp.asarray(
        x.reshape(-1, D)), method=model.SAE.pre)), 0)
    kth = -np.sort(-a, axis=1)[:, rule.k - 1:rule.k + 1]
    assert np.any((kth[:, 0] == kth[:, 1]) & (kth[:, 0] > 0))  # a tie at the k′-th
    assert np.any(np.sum(a > 0, axis=1) < rule.k)  # fewer positive than k′
  assert inference.choose("per-latent", params, x, model.SAE(CONFIG), theta_F, 1.0).counts_F \
      is None


@pytest.mark.slow
def test_drawn_pools_save_an_sae_as_good_as_training(tmp_path):
  """Issue 37's case 6, small: l=2 drawn pools, whose per-latent thresholds
  reconstruct 1.3x worse than the training rule; auto saves each token's top
  k′ instead, no worse than training. The same run finished per-latent (an
  end-only flag: no training) is the rule that fails, and says so."""
  out = tmp_path / "run"
  args = ["--data", "synthetic", "--l", "2", "--sample-pool", "--batch-size", "128",
          "--steps", "300", "--warmup-steps", "20", "--eval-tokens", "2048",
          "--calibration-tokens", "2048", "--out", out]
  assert helpers.cli(*args) == 0
  auto = helpers.outputs(out)
  s = auto["summary"]
  assert s["inference"] == "topk" and 1 <= s["inference_k"] <= 4
  assert s["fvu"] <= inference.GAP * s["batch_fvu"] and "inference_warning" not in s
  assert s["calibration_fvu_per_latent"] > inference.GAP * s["calibration_fvu_training_rule"]
  assert auto["cfg"]["architecture"] == "topk" and auto["cfg"]["k"] == s["inference_k"]
  assert "threshold" not in auto["weights"]
  assert s["l0"] == s["inference_k"]  # every token fires k′ latents

  assert helpers.cli(*args, "--inference", "per-latent") == 0
  thresholded = helpers.outputs(out)
  t = thresholded["summary"]
  assert t["steps"] == s["steps"] and t["batch_fvu"] == s["batch_fvu"]
  assert t["inference"] == "per-latent" and t["fvu"] > inference.GAP * t["batch_fvu"]
  assert "inference_warning" in t and thresholded["cfg"]["architecture"] == "jumprelu"
