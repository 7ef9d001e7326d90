"""Evaluation metrics on hand-computable cases, and the downstream loss on the
tiny GPT-NeoX against a direct computation."""

import jax
import numpy as np
import pytest

from sae_jax import evaluate
from sae_jax import model
from sae_jax import synthetic
from sae_jax.config import SAEConfig


def test_reconstruction_metrics_by_hand():
  x = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
  z = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
  perfect = evaluate.reconstruction_metrics(x, x, z)
  assert perfect["fvu"] == 0 and perfect["cosine"] == 1 and perfect["norm_ratio"] == 1
  assert perfect["l0"] == pytest.approx(5 / 3)  # 2, 0 and 3 nonzero codes
  half = evaluate.reconstruction_metrics(x, 0.5 * x, z)  # pure shrinkage
  assert half["norm_ratio"] == pytest.approx(0.5) and half["cosine"] == pytest.approx(1)
  total = np.square(x - x.mean(0)).sum()
  assert half["fvu"] == pytest.approx(np.square(0.5 * x).sum() / total)
  assert half["explained_variance"] == pytest.approx(1 - half["fvu"])
  assert half["mse"] == pytest.approx(np.square(0.5 * x).sum(1).mean())  # summed over D
  turned = evaluate.reconstruction_metrics(x, x[:, ::-1], z)
  assert turned["cosine"] == pytest.approx(np.mean([24 / 25, 0, 0]))


def test_sparsity_metrics_and_density_histogram():
  z = np.zeros((10, 5))
  z[:, 0] = 1.0  # latent 0 on every token: dense
  z[:2, 1] = 1.0  # latent 1 on 2 of 10 tokens
  z[0, 2] = 1.0  # latent 2 once; latents 3 and 4 never
  m = evaluate.sparsity_metrics(z, dense_density=0.5, top_fraction=0.2)
  np.testing.assert_allclose(m["density_F"], [1.0, 0.2, 0.1, 0.0, 0.0])
  assert (m["dead_fraction"], m["dense_fraction"]) == (0.4, 0.2)
  assert m["top_share"] == pytest.approx(10 / 13)
  l0 = np.array([3, 2] + [1] * 8)
  assert m["l0_std"] == pytest.approx(l0.std()) and m["l0_p50"] == 1 and m["l0_p90"] == pytest.approx(2.1)
  counts, never = evaluate.density_histogram(m["density_F"], bins=np.array([-2.0, -0.5, 0.5]))
  assert counts.tolist() == [2, 1] and never == 2


def test_pool_jaccard_and_ground_truth():
  assert evaluate.pool_jaccard([[0, 1], [0, 1], [0, 1]]) == 1
  assert evaluate.pool_jaccard([[0, 1], [2, 3]]) == 0
  assert evaluate.pool_jaccard([[0, 1, 2, 3], [2, 3, 4, 5]]) == pytest.approx(2 / 6)
  dictionary = np.eye(3)
  w = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # finds direction 0 only
  m = evaluate.ground_truth_metrics(w, dictionary, np.array([synthetic.RARE, synthetic.FREQUENT,
                                                             synthetic.FREQUENT]))
  c = np.sqrt(0.5)
  assert m["gt_mmcs"] == pytest.approx((1 + 2 * c) / 3)
  assert (m["gt_recovered_rare"], m["gt_recovered_frequent"]) == (1.0, 0.0)
  assert m["gt_mmcs_frequent"] == pytest.approx(c) and m["gt_recovered"] == pytest.approx(1 / 3)


def test_downstream_loss_against_a_direct_computation(lm):
  import torch
  import transformers
  from sae_jax import downstream
  from sae_jax import contexts as contexts_lib
  from tests.tiny_lm import export_config
  tok = transformers.AutoTokenizer.from_pretrained(lm["model"])
  ids = np.stack([c for c, _ in zip(contexts_lib.contexts(export_config(lm), tok), range(6))]).astype(np.int64)
  hook = "blocks.1.hook_resid_post"
  same = downstream.downstream_loss(lm["model"], hook, ids, lambda h: h, batch_contexts=4)
  model = transformers.GPTNeoXForCausalLM.from_pretrained(lm["model"]).eval()
  with torch.no_grad():
    clean = model(torch.as_tensor(ids), labels=torch.as_tensor(ids))
  assert same["clean_ce"] == pytest.approx(float(clean.loss), rel=1e-5)
  assert same["spliced_ce"] == pytest.approx(same["clean_ce"], rel=1e-6)
  assert abs(same["kl"]) < 1e-6 and same["loss_recovered"] == pytest.approx(1.0, abs=1e-5)

  half = downstream.downstream_loss(lm["model"], hook, ids, lambda h: 0.5 * h, batch_contexts=4)
  zero = downstream.downstream_loss(lm["model"], hook, ids, lambda h: 0 * h, batch_contexts=4)
  assert zero["spliced_ce"] == pytest.approx(zero["zero_ce"], rel=1e-6)
  assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-5)

  # Directly: halve block 1's output at positions 1.. with our own hook.
  def halve(module, inputs, output):
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = torch.cat([hidden[:, :1], 0.5 * hidden[:, 1:]], dim=1)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

  handle = model.gpt_neox.layers[1].register_forward_hook(halve)
  with torch.no_grad():
    spliced = model(torch.as_tensor(ids), labels=torch.as_tensor(ids))
  handle.remove()
  assert half["spliced_ce"] == pytest.approx(float(spliced.loss), rel=1e-5)
  p = torch.log_softmax(clean.logits[:, :-1], -1)
  q = torch.log_softmax(spliced.logits[:, :-1], -1)
  kl = float((p.exp() * (p - q)).sum(-1).mean())
  assert half["kl"] == pytest.approx(kl, rel=1e-4) and half["kl"] > 0
  assert half["loss_recovered"] == pytest.approx(
      (half["zero_ce"] - half["spliced_ce"]) / (half["zero_ce"] - half["clean_ce"]))


@pytest.mark.slow
def test_downstream_loss_in_jax_equals_torch(lm):
  """The JAX path (lm.logits_with) gives the torch path's numbers, for the
  identity and for a real SAE's reconstruction."""
  import transformers
  from sae_jax import downstream
  from sae_jax import contexts as contexts_lib
  from sae_jax import lm as lm_jax
  from sae_jax import train
  from sae_jax.config import SAEConfig
  from sae_jax.config import TrainConfig
  from tests.tiny_lm import export_config
  tok = transformers.AutoTokenizer.from_pretrained(lm["model"])
  ids = np.stack([c for c, _ in zip(contexts_lib.contexts(export_config(lm), tok), range(6))])
  hook = "blocks.1.hook_resid_post"
  config, params = lm_jax.load(lm["model"])
  sae_config = SAEConfig(d_model=16, n_latents=32, k=3, selection="batchtopk")
  sample = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  state = train.create_train_state(TrainConfig(sae_config, batch_size=8, steps=4, warmup_steps=0,
                                               threshold_start=0), sample)
  threshold = np.float32(0.05)  # low enough that some codes fire
  numpy_splice = lambda h: evaluate.reconstruct(state.params, threshold, state.input_scale, h,
                                                model.SAE(sae_config))[1]
  identity = lambda h: h
  for torch_splice, jax_splice, args in (
      (identity, identity, ()),
      (numpy_splice, evaluate.splice(model.SAE(sae_config)),
       (state.params, threshold, state.input_scale))):
    want = downstream.downstream_loss(lm["model"], hook, ids, torch_splice, batch_contexts=4)
    got = downstream.downstream_loss_jax(params, config, hook, ids, jax_splice, args,
                                         batch_contexts=4)
    assert set(got) == set(want)
    for name in ("clean_ce", "spliced_ce", "zero_ce", "kl"):
      assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    # A ratio of differences of the above: their rounding grows in it.
    assert got["loss_recovered"] == pytest.approx(want["loss_recovered"], rel=1e-3)
  assert want["kl"] > 1e-4  # the SAE's splice changed the predictions
  with pytest.raises(ValueError, match=r"hook 'blocks.3.hook_resid_post' needs block 3"):
    downstream.downstream_loss_jax(params, config, "blocks.3.hook_resid_post", ids, identity)
  with pytest.raises(ValueError, match=r"ids_BxL must be int token ids"):
    downstream.downstream_loss_jax(params, config, hook, ids[0], identity)


def test_pools_of_every_score_including_uniform():
  """The pools pool_jaccard compares: the top scores, and for "uniform"
  (no top; it needs drawn pools) the pools training would draw, a new one
  per batch."""
  x = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=8, n_features=16)).sample(0, 64)
  for score, sample_pool in (("l2", False), ("l2", True), ("uniform", True)):
    config = SAEConfig(8, 32, k=2, l=2.0, score=score, sample_pool=sample_pool)
    params = model.init_params(jax.random.key(0), model.SAE(config), x)["params"]
    pools = evaluate.pools(params, 1.0, x, model.SAE(config), 16)
    assert len(pools) == 4 and all(len(set(p.tolist())) == 4 for p in pools), score
    if score == "uniform":
      assert len({tuple(sorted(p.tolist())) for p in pools}) > 1


def test_a_saved_sae_worse_than_its_training_rule_is_said():
  """summary.json carries fvu_ratio (inference over batch mode, the same
  tokens), and past 1.1x a warning that the run prints last."""
  from sae_jax import finish  # noqa: PLC0415  (the end of a run imports the export)
  assert finish.inference_gap({"fvu": 0.21, "batch_fvu": 0.2}) == {"fvu_ratio": 0.21 / 0.2}
  worse = finish.inference_gap({"fvu": 2.13, "batch_fvu": 0.80})
  assert worse["fvu_ratio"] == 2.13 / 0.80
  assert worse["inference_warning"].startswith(
      "the saved SAE reconstructs worse than its training rule on the same held-out tokens: "
      "FVU 2.1300 in inference mode (what SAELens computes) against 0.8000 (2.66x)")
  assert finish.inference_gap({"fvu": 0.5, "batch_fvu": None}) == {}


@pytest.mark.parametrize("selection, options, inference", [
    ("sampled", {}, "topk"), ("sampled", dict(pool_every=2), "thresholds"),
    ("sampled", dict(score="uniform", sample_pool=True), "topk"),
    ("batchtopk", {}, "thresholds"), ("topk", {}, "topk"), ("jumprelu", {}, "thresholds")])
def test_both_modes_from_one_encoding_are_the_two_passes(selection, options, inference):
  """`both_modes` gives, from one encoding per batch, what `reconstruct`
  gives in each mode on the same batches: the inference codes bit for bit
  (the encoder's rounding can depend on the rows it multiplies), the batch mode's
  codes per token, both reconstructions within rounding (each decoded from
  its few columns where it can be), and the pools `pools` finds on the
  same batches. A last batch shorter than the others is a batch of its own."""
  import dataclasses  # noqa: PLC0415

  x = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=8, n_features=16)).sample(1, 80)
  config = SAEConfig(8, 32, k=3, l=2.0, selection=selection, **options)
  params = model.init_params(jax.random.key(0), model.SAE(config), x)["params"]
  rng = np.random.default_rng(0)
  if inference == "topk":
    inference_config, threshold = dataclasses.replace(config, selection="topk", k=2), 0.0
  else:
    inference_config = config if selection != "topk" else dataclasses.replace(
        config, selection="batchtopk")
    threshold = rng.uniform(0.0, 0.3, 32).astype(np.float32)
  sae, inference_sae, scale = model.SAE(config), model.SAE(inference_config), 1.7
  got = evaluate.both_modes(params, threshold, scale, x, sae, inference_sae, batch_size=32)
  z, xhat = evaluate.reconstruct(params, threshold, scale, x, inference_sae, chunk=32)
  np.testing.assert_array_equal(got.z_inference, z)
  np.testing.assert_allclose(got.xhat_inference, xhat, rtol=1e-5, atol=1e-5)
  z, xhat = evaluate.reconstruct(params, threshold, scale, x, sae, mode="batch", batch_size=32)
  np.testing.assert_array_equal(got.l0_batch, np.sum(z != 0, axis=1))
  np.testing.assert_allclose(got.xhat_batch, xhat, rtol=1e-5, atol=1e-5)
  assert np.any(got.l0_batch > 0) and np.any(got.z_inference > 0)
  if selection != "sampled":
    assert got.pools == []
  else:
    want = evaluate.pools(params, scale, x, sae, 32)  # whole batches only
    assert len(got.pools) == 3 and len(want) == 2
    for mine, theirs in zip(got.pools, want):
      np.testing.assert_array_equal(np.sort(mine), np.sort(theirs))
