"""Per-latent inference thresholds: the calibration against NumPy, firing
rates on fresh tokens, latents that must never fire, and the batch mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import evaluate
from sae_jax import inference
from sae_jax import model
from sae_jax import saelens
from sae_jax import synthetic
from sae_jax import thresholds
from sae_jax.config import SAEConfig
from tests import reference

D, F, K, B = 16, 48, 3, 64
SOURCE = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=D, n_features=32))
N_WEAK = 6  # latents 0..5 have weak encoder columns: no rule ever selects them


def sae(selection, **kwargs):
  return SAEConfig(D, F, k=K, selection=selection, l=2.0, **kwargs)


def params_for(config, seed=0):
  x = jnp.asarray(SOURCE.sample(10**6, 512))
  params = model.init_params(jax.random.key(seed), model.SAE(config), x)["params"]
  weak_F = np.arange(F) < N_WEAK  # tiny encoder columns and a negative bias
  scale_1xF = np.where(weak_F, 1e-3, 1.0).astype(np.float32)[None, :]
  return dict(params, W_enc=params["W_enc"] * scale_1xF,
              b_enc=params["b_enc"] - np.where(weak_F, 0.5, 0.0).astype(np.float32))


def reference_calibration(params, x_NxD, config):
  """Counts by the NumPy rules, θ_j = the (n_j + 1)-th largest activation,
  and the rule's squared error."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x_NxD, np.float64)
  a = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
  counts, sse = np.zeros(F, np.int64), 0.0
  for batch, x_BxD in zip(a.reshape(-1, B, F), x.reshape(-1, B, D)):
    if config.selection == "batchtopk":
      mask = reference.batch_topk_mask(batch, K)
    else:
      cols = reference.pool(reference.scores(batch, config.score), config.pool_size)
      mask = reference.batch_topk_mask(batch, K, cols=cols)
    counts += mask.sum(0)
    sse += np.sum(np.square(x_BxD - (batch * mask) @ p["W_dec"] - p["b_dec"]))
  ranked = -np.sort(-a, axis=0)  # each column in descending order
  theta = np.array([ranked[n, j] if n < len(a) else 0.0 for j, n in enumerate(counts)])
  return counts, np.where(counts > 0, theta, thresholds.NEVER), a, sse


@pytest.mark.parametrize("selection", ["batchtopk", "sampled"])
def test_two_passes_give_the_bisections_bits_on_ties_and_edge_latents(selection):
  """Every latent's θ equals the 32-pass bisection's, bit for bit: on tokens
  repeated (ties at the threshold), latents never selected (NEVER), one
  selected on every token (0), one selected on each token it is positive on
  (its (n+1)-th largest is 0), and counts made up to hit every tier."""
  config = sae(selection)
  params = params_for(config)
  x = SOURCE.sample(7, 6 * B)
  x = np.concatenate([x, x[:2 * B]])  # every token of two batches twice: ties
  # Latent 6 fires on every token, far above the others: selected on all.
  # Latent 7 fires on half the tokens, far above the others: selected on each.
  W_enc = np.array(params["W_enc"])
  b_enc = np.array(params["b_enc"])
  W_enc[:, 6], b_enc[6] = 0.0, 100.0
  W_enc[:, 7], b_enc[7] = 0.0, 0.0
  W_enc[0, 7] = 1e4
  params = dict(params, W_enc=jnp.asarray(W_enc), b_enc=jnp.asarray(b_enc))
  sae_module = model.SAE(config)
  got = thresholds.calibrate(params, x, sae_module, batch_size=B)
  x_NxBxD = jnp.asarray(thresholds.batches(x, B))
  n = len(x)
  assert got.counts_F[6] == n and 0 < got.counts_F[7] < n
  assert got.threshold_F[6] == 0 and got.threshold_F[7] == 0
  assert np.all(got.threshold_F[:N_WEAK] == thresholds.NEVER)
  bisected = reference.bisected_thresholds(params, x_NxBxD, sae_module, got.counts_F)
  np.testing.assert_array_equal(got.threshold_F.view(np.int32), bisected.view(np.int32))
  # Made-up counts, 0 to every token, reach every tier and every edge.
  rng = np.random.default_rng(0)
  made_up = np.concatenate([[0, 1, 2, 3, n - 1, n, n], rng.integers(0, n + 1, F - 7)])
  np.testing.assert_array_equal(
      thresholds.per_latent_thresholds(params, x_NxBxD, sae_module, made_up).view(np.int32),
      reference.bisected_thresholds(params, x_NxBxD, sae_module, made_up).view(np.int32))
  # A token whose activations are NaN (x is) is never above a threshold.
  x_nan = x_NxBxD.at[1, 3].set(jnp.nan)
  np.testing.assert_array_equal(
      thresholds.per_latent_thresholds(params, x_nan, sae_module, made_up).view(np.int32),
      reference.bisected_thresholds(params, x_nan, sae_module, made_up).view(np.int32))
  # Under x64 the activations are float64, and θ is the float32 at or just above.
  with jax.enable_x64(True):
    params64 = {name: jnp.asarray(np.asarray(p, np.float64)) for name, p in params.items()}
    params64["b_enc"] = params64["b_enc"] + 1e-9 * rng.random(F)  # not float32 values
    x64 = jnp.asarray(np.asarray(x_NxBxD, np.float64))
    np.testing.assert_array_equal(
        thresholds.per_latent_thresholds(params64, x64, sae_module, made_up).view(np.int32),
        reference.bisected_thresholds(params64, x64, sae_module, made_up).view(np.int32))


def test_a_latent_whose_largest_crowd_one_batch_goes_to_the_merge(monkeypatch):
  """Rows sorted by one latent's activation put all its largest in the first
  batches, more than a batch keeps of a column (`_capture_width` assumes
  shuffled rows): that latent, and only such, is found by the merge, and
  every θ is still the bisection's, bit for bit."""
  config = sae("batchtopk")
  params, module = params_for(config), model.SAE(config)
  x = SOURCE.sample(7, 8 * B)
  pre = np.asarray(module.apply({"params": params}, jnp.asarray(x), method=model.SAE.pre))
  crowded = int(np.argmax(np.sum(pre > 0, axis=0)))
  x_NxBxD = jnp.asarray(thresholds.batches(x[np.argsort(-pre[:, crowded], kind="stable")], B))
  counts = np.full(F, 40)  # a width of 10 or so a batch, against 40 in the first
  merged = []
  merge = thresholds._largest
  monkeypatch.setattr(thresholds, "_largest", lambda params, x, latents, *rest: (
      merged.extend(np.concatenate([np.asarray(i) for i in latents]).tolist()),
      merge(params, x, latents, *rest))[1])
  got = thresholds.per_latent_thresholds(params, x_NxBxD, module, counts)
  assert crowded in merged and len(set(merged)) < F - N_WEAK
  np.testing.assert_array_equal(
      got.view(np.int32),
      reference.bisected_thresholds(params, x_NxBxD, module, counts).view(np.int32))


@pytest.mark.parametrize("selection", ["batchtopk", "sampled"])
def test_calibration_matches_numpy_and_the_training_rule_on_its_tokens(selection):
  config = sae(selection)
  params = params_for(config)
  x = SOURCE.sample(7, 8 * B)
  got = thresholds.calibrate(params, x, model.SAE(config), batch_size=B)
  counts, theta, a, sse = reference_calibration(params, x, config)
  np.testing.assert_array_equal(got.counts_F, counts)
  np.testing.assert_allclose(got.training_sse, sse, rtol=1e-4)
  np.testing.assert_allclose(got.threshold_F, theta, rtol=1e-5)
  assert got.tokens == 8 * B and np.all(got.threshold_F[:N_WEAK] == thresholds.NEVER)
  # On the calibration tokens inference fires every latent exactly as often
  # as the training rule (the activations are continuous: no ties).
  z = model.SAE(config).apply({"params": params}, jnp.asarray(x), got.threshold_F,
                              method=model.SAE.encode_inference)
  np.testing.assert_array_equal(np.sum(np.asarray(z) > 0, axis=0), counts)


@pytest.mark.parametrize("options", [dict(pool_every=3), dict(sample_pool=True),
                                     dict(score="leverage")])
def test_the_count_pass_selects_in_the_pool_as_the_sae_selects(options):
  """The count pass selects a Sampled-SAE's codes in the pool's columns
  (`sampled_select_pooled`): the SAE module's dense selection's, with pools
  kept between batches, drawn, or scored by leverage."""
  config = sae("sampled", **options)
  params, module = params_for(config), model.SAE(config)
  x = jnp.asarray(thresholds.batches(SOURCE.sample(7, 8 * B), B))
  counts_F, sse, none = thresholds._count(params, x, module)
  assert none is None  # no top-k′ errors unless asked for
  key, want_F, want_sse, pool_P = jax.random.key(thresholds.CALIBRATION_KEY), 0, 0.0, None
  for i in range(len(x)):
    a = jax.nn.relu(module.apply({"params": params}, x[i], method=model.SAE.pre))
    key_i = jax.random.fold_in(key, i)
    if config.keeps_pool:
      kept = (jnp.zeros(config.pool_size, jnp.int32) if pool_P is None else pool_P,
              i % config.pool_every == 0)
      pool_P = model.step_pool(a, key_i, kept, **config.pool_rule)
    z = module.apply({"params": params}, a, key=key_i, pool=pool_P, method=model.SAE.select)
    want_F = want_F + np.sum(np.asarray(z) > 0, axis=0)
    want_sse += float(jnp.sum(jnp.square(
        x[i] - module.apply({"params": params}, z, method=model.SAE.decode))))
  np.testing.assert_array_equal(np.asarray(counts_F), want_F)
  np.testing.assert_allclose(float(sse), want_sse, rtol=1e-5)


def test_fresh_tokens_fire_each_latent_as_the_training_rule_does():
  """On tokens the calibration never saw, each latent's inference firing
  count n' is within sampling error of the training rule's count n on the
  same tokens. Whether a latent is in a batch's pool is decided per batch,
  so n varies from batch to batch much more than a binomial count would:
  with s_j the spread of latent j's count over the fresh batches (nb of them,
  N tokens) and nb_cal calibration batches, Var(n) ≈ nb s², the error of θ_j
  adds about nb² s² / nb_cal, and n' itself varies like a binomial count,
  N p (1 - p). Five standard deviations of the sum, plus 3 for ties at
  small counts, bound |n' - n|."""
  config = sae("sampled")
  params = params_for(config, seed=1)
  nb_cal, nb = 64, 32
  x_cal, x = SOURCE.sample(8, nb_cal * B), SOURCE.sample(9, nb * B)
  got = thresholds.calibrate(params, x_cal, model.SAE(config), batch_size=B)
  z_inference, _ = evaluate.reconstruct(params, got.threshold_F, 1.0, x, model.SAE(config))

  def per_batch(x):  # the training rule's count of each latent in each batch
    z, _ = evaluate.reconstruct(params, 0.0, 1.0, x, model.SAE(config), mode="batch", batch_size=B)
    return np.sum(z.reshape(-1, B, F) > 0, axis=1)

  counts = per_batch(x)
  fired, expected = np.sum(z_inference > 0, axis=0), counts.sum(0)
  np.testing.assert_array_equal(per_batch(x_cal).sum(0), got.counts_F)
  # The spread over all the batches, calibration ones included.
  p, s2 = expected / (nb * B), np.concatenate([counts, per_batch(x_cal)]).var(0, ddof=1)
  bound = 5 * np.sqrt(nb * s2 + nb**2 * s2 / nb_cal + nb * B * p * (1 - p)) + 3
  assert np.all(np.abs(fired - expected) <= bound), (fired, expected, bound)
  assert abs(fired.sum() / expected.sum() - 1) < 0.05  # L0
  assert np.all(fired[:N_WEAK] == 0) and expected.sum() > 0.9 * K * nb * B


def test_global_rule_counts_only_and_topk_needs_no_thresholds():
  for config in (sae("sampled"), sae("topk")):
    params = params_for(config)
    got = thresholds.calibrate(params, SOURCE.sample(7, 2 * B), model.SAE(config), batch_size=B,
                               per_latent=config.selection != "sampled")
    assert got.counts_F.sum() > 0 and np.all(got.threshold_F == 0)
  with pytest.raises(ValueError, match=r"needs at least one batch of 64 tokens; got 63"):
    thresholds.calibrate(params, SOURCE.sample(7, B - 1), model.SAE(config), batch_size=B)


def test_never_firing_latents_stay_silent_in_the_saved_sae():
  """θ = the largest float32 survives the fold by the input scale (dividing
  it by c < 1 would overflow) and, in SAELens' formula relu(h)·(h > θ),
  leaves those latents at 0 however large h gets."""
  config = sae("batchtopk")
  params = params_for(config)
  got = thresholds.calibrate(params, SOURCE.sample(7, 4 * B), model.SAE(config), batch_size=B)
  weights = saelens.folded_weights(params, got.threshold_F, 0.5, "batchtopk")
  never = weights["threshold"] == thresholds.NEVER
  assert never[:N_WEAK].all() and np.isfinite(weights["threshold"]).all()
  np.testing.assert_allclose(weights["threshold"][~never], got.threshold_F[~never] / 0.5)
  x = 1e6 * SOURCE.sample(11, 256)  # huge inputs: h is far above every real threshold
  h = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
  z = np.maximum(h, 0) * (h > weights["threshold"])
  assert np.all(z[:, never] == 0) and np.any(z[:, ~never] > 0)
  assert np.all(thresholds.log10_density(got.counts_F, got.tokens)[:N_WEAK] == -10)


def test_batch_mode_is_the_training_rule_and_refuses_a_missing_batch_size():
  config = sae("batchtopk")
  params = params_for(config)
  x = SOURCE.sample(12, 2 * B + 10)  # two whole batches and a short one
  z, xhat = evaluate.reconstruct(params, 0.0, 1.0, x, model.SAE(config), mode="batch", batch_size=B)
  for lo, hi in ((0, B), (B, 2 * B), (2 * B, 2 * B + 10)):
    a = np.asarray(jax.nn.relu(model.SAE(config).apply({"params": params}, jnp.asarray(x[lo:hi]),
                                                        method=model.SAE.pre)))
    np.testing.assert_array_equal(z[lo:hi] > 0, reference.batch_topk_mask(a, K))
  assert xhat.shape == x.shape
  with pytest.raises(ValueError, match=r"mode='batch' needs batch_size, an integer >= 1; got None"):
    evaluate.reconstruct(params, 0.0, 1.0, x, model.SAE(config), mode="batch")
  with pytest.raises(ValueError, match=r"mode must be one of 'inference', 'batch'; got 'train'"):
    evaluate.reconstruct(params, 0.0, 1.0, x, model.SAE(config), mode="train")


@pytest.mark.parametrize("selection", ["batchtopk", "sampled", "transcoder"])
def test_the_rule_choices_errors_come_from_the_two_passes(selection):
  """`calibrate`'s errors for `inference.choose` (the thresholds' from the
  second pass's buffers, the top k′ ones and their firings from the first
  pass) are those a third pass over the tokens (`inference._errors`)
  finds, with every token of two batches twice (ties); none where a latent
  is selected on every token, whose codes no buffer holds."""
  config = sae("batchtopk" if selection == "transcoder" else selection,
               transcoder=selection == "transcoder")
  params = params_for(config)
  x = SOURCE.sample(7, 6 * B)
  x = np.concatenate([x, x[:2 * B]])
  if config.transcoder:  # (input, target) pairs
    x = np.concatenate([x, 3 * np.tanh(x) + 1], axis=1)
  module = model.SAE(config)
  got = thresholds.calibrate(params, x, module, batch_size=B, rule_errors=True)
  want = inference._errors(params, jnp.asarray(thresholds.batches(x, B)),
                           jnp.asarray(got.threshold_F), module)
  assert got.errors is not None and got.errors[2].sum() > 0
  np.testing.assert_allclose(got.errors[0], float(want[0]), rtol=1e-5)
  np.testing.assert_allclose(got.errors[1], np.asarray(want[1]), rtol=1e-6)
  np.testing.assert_array_equal(got.errors[2], np.asarray(want[2]))
  assert got.errors[0] != pytest.approx(got.training_sse, rel=1e-3)  # not the rule's own
  everywhere = dict(params, b_enc=params["b_enc"].at[N_WEAK].set(100.0))
  selected = thresholds.calibrate(everywhere, x, module, batch_size=B, rule_errors=True)
  assert selected.counts_F[N_WEAK] == len(x) and selected.errors is None
  assert thresholds.calibrate(params, x, module, batch_size=B).errors is None
