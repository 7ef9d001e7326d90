"""Our TopK, BatchTopK and Matryoshka BatchTopK training against
dictionary_learning's trainers (PyPI dictionary-learning 0.1.0), step for
step on the same batches from the same initial weights: losses, parameters,
threshold and dead-latent counts."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from sae_jax import model
from sae_jax import synthetic
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from tests import scripts

dl = scripts.load_benchmark("dl_reference")

D, F, K, B, STEPS = 16, 64, 4, 64, 40
SOURCE = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=D, n_features=32, active=3))


def recipe(selection, **kwargs):
  # Warm-up, decay and a threshold start inside the run; latents are dead
  # after 3 silent steps, so AuxK runs on many steps.
  return TrainConfig(SAEConfig(D, F, k=K, selection=selection), batch_size=B, steps=STEPS,
                     lr=2e-3, warmup_steps=5, threshold_start=8, dead_tokens=3 * B, seed=1,
                     **kwargs)


def train_both(config):
  """Our state and dictionary_learning's trainer after STEPS steps, and each
  step's (our loss, their loss, our AuxK loss)."""
  torch.manual_seed(0)
  state = train.create_train_state(config, SOURCE.sample(10**6, 1024))
  scale = np.float32(state.input_scale)
  # Latents 0..7 start with weak encoder columns: they stay silent and die.
  weak = np.where(np.arange(F) < 8, 0.05, 1.0).astype(np.float32)[None, :]
  state = state.replace(params=dict(state.params, W_enc=state.params["W_enc"] * weak))
  trainer = dl.make_trainer(config, jax.device_get(state.params))
  ours = train.replicate(state, 1)
  losses = []
  for step in range(STEPS):
    x = SOURCE.sample(step, B)
    theirs = dl.update(trainer, step, x * scale, keep_init=True)  # the step scales by c too
    ours, metrics = train.p_train_step(ours, x[None])
    losses.append((float(metrics["loss"]), theirs, float(metrics.get("auxk_loss", 0))))
  return train.unreplicate(ours), trainer, np.array(losses)


# Matryoshka: groups of 16, 16 and 32 latents (dead latents 0-7 are in the
# first), with dictionary_learning's default weights and with others.
MATRYOSHKA = {"matryoshka": dict(matryoshka_groups=(0.25, 0.25, 0.5)),
              "matryoshka_weighted": dict(matryoshka_groups=(0.125, 0.375, 0.5),
                                          matryoshka_weights=(3.0, 1.0, 0.5))}


@pytest.mark.parametrize("selection", ["topk", "batchtopk", "matryoshka", pytest.param(
    "matryoshka_weighted", marks=pytest.mark.slow)])
def test_training_equals_dictionary_learning(selection):
  config = recipe("batchtopk", **MATRYOSHKA[selection]) if selection in MATRYOSHKA else \
      recipe(selection)
  state, trainer, losses = train_both(config)
  # AuxK ran on most steps, and the losses are on the same scale (summed over D).
  assert np.mean(losses[:, 2] > 0) > 0.5
  np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=3e-5)
  assert losses[0, 0] > 1  # per element it would be below 1: E||x||² = D = 16
  theirs = dl.get_params(trainer)
  for name, ours in state.params.items():
    np.testing.assert_allclose(ours, theirs[name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(state.threshold, float(trainer.ae.threshold), rtol=1e-5)
  assert float(state.threshold) > 0
  silent_steps = trainer.num_tokens_since_fired.numpy() // B
  np.testing.assert_array_equal(state.steps_since_fired_F,
                                np.minimum(silent_steps, config.dead_steps))
  assert trainer.dead_features > 0 and np.any(state.steps_since_fired_F >= config.dead_steps)


def jumprelu_recipe(**kwargs):
  # Adam's b1 = 0, as dictionary_learning fixes it; a bandwidth wide enough
  # that the straight-through estimators see many entries on every step, and
  # a target L0 below the start's, so that the thresholds move.
  return TrainConfig(SAEConfig(D, F, k=K, selection="jumprelu"), batch_size=B, steps=STEPS,
                     lr=2e-3, b1=0.0, warmup_steps=5, sparsity_warmup_steps=10, bandwidth=0.05,
                     dead_tokens=3 * B, seed=1, **kwargs)


def test_jumprelu_training_equals_dictionary_learning():
  config = jumprelu_recipe()
  state, trainer, losses = train_both(config)
  np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=3e-5)
  theirs = dl.get_params(trainer)
  assert set(theirs) == set(state.params) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
  for name, ours in state.params.items():
    np.testing.assert_allclose(ours, theirs[name], rtol=1e-4, atol=1e-5, err_msg=name)
  # The thresholds moved from their start, each its own way.
  moved = np.abs(state.params["threshold"] - model.INITIAL_THRESHOLD)
  assert np.mean(moved > 1e-3) > 0.5 and np.std(state.params["threshold"]) > 1e-3
  silent_steps = trainer.num_tokens_since_fired.numpy() // B
  np.testing.assert_array_equal(state.steps_since_fired_F,
                                np.minimum(silent_steps, config.dead_steps))
  # Both initialise the thresholds and b_dec alike (the rest is drawn).
  start = train.create_train_state(config, SOURCE.sample(10**6, 1024)).params
  fresh = dl.get_params(dl.make_trainer(config))
  for name in ("threshold", "b_dec", "b_enc"):
    np.testing.assert_array_equal(start[name], fresh[name], err_msg=name)
  # The trained SAEs encode held-out tokens alike, by the learned thresholds.
  x = SOURCE.sample(10**6 + 1, 256) * np.float32(state.input_scale)
  ours = model.SAE(config.sae).apply({"params": state.params}, x, state.params["threshold"],
                                     method=model.SAE.encode_inference)
  codes = dl.encode(trainer, x)
  assert np.mean((np.asarray(ours) > 0) == (codes > 0)) > 0.999 and np.mean(codes > 0) > 0.01
  np.testing.assert_allclose(ours, codes, rtol=1e-3, atol=1e-4)


def test_inference_codes_equal_dictionary_learning():
  """The trained SAEs encode held-out tokens alike (BatchTopK by its
  threshold, TopK per token)."""
  for selection in ("topk", "batchtopk"):
    state, trainer, _ = train_both(recipe(selection))
    x = SOURCE.sample(10**6 + 1, 256) * np.float32(state.input_scale)
    ours = model.SAE(state.config.sae).apply({"params": state.params}, x, state.threshold,
                                             method=model.SAE.encode_inference)
    theirs = dl.encode(trainer, x)
    assert np.mean((np.asarray(ours) > 0) == (theirs > 0)) > 0.999
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_b_dec_initialisation_is_the_same_geometric_median():
  """dictionary_learning takes the geometric median of its first batch; we
  take it of a larger sample (4096 rows by default), by the same Weiszfeld
  iteration run to convergence."""
  dl.trainer_classes()
  from dictionary_learning.trainers.top_k import geometric_median
  x = SOURCE.sample(5, 512)
  theirs = geometric_median(torch.tensor(x)).numpy()
  np.testing.assert_allclose(model.geometric_median(x), theirs, atol=1e-4)


def test_reference_refuses_what_it_cannot_run():
  with pytest.raises(ValueError, match=r"clips at 1.0; got clip_norm=0.5"):
    dl.make_trainer(recipe("topk", clip_norm=0.5))
  with pytest.raises(ValueError, match=r"no trainer for selection 'sampled'"):
    dl.make_trainer(dataclasses.replace(recipe("topk"),
                                        sae=SAEConfig(D, F, k=K, selection="sampled")))
