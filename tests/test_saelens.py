"""The saved SAE in the real SAELens package: each architecture loads and
encodes and decodes held-out tokens as our inference does, per-latent
thresholds included, with the metadata SAELens and SAEBench read."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sae_jax import checkpoint
from sae_jax import evaluate
from sae_jax import model
from sae_jax import synthetic
from sae_jax import thresholds
from sae_jax import train
from sae_jax.runconfig import RunConfig
from tests import scripts

train_script = scripts.load("train")
ARGS = ["--dict-size", "64", "--k", "4", "--batch-size", "64", "--steps", "60",
        "--warmup-steps", "5", "--threshold-start", "10", "--eval-tokens", "512",
        "--calibration-tokens", "2048", "--no-progress"]


def sae_lens():
  with warnings.catch_warnings():  # transformer_lens warns about its own modules on import
    warnings.simplefilter("ignore", DeprecationWarning)
    import sae_lens as module  # noqa: PLC0415
  return module


def load(folder, *, expect_kwargs_warning=False):
  """SAE.load_from_disk, asserting which warnings it gives."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sae = sae_lens().SAE.load_from_disk(str(folder), device="cpu")
  messages = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
  if expect_kwargs_warning:  # SAELens asks for the model to be loaded with those kwargs
    assert len(messages) == 1 and "model_from_pretrained_kwargs" in messages[0], messages
  else:
    assert not messages, messages
  return sae


def ours(run, x):
  """Our inference codes and reconstruction of raw x, from the checkpoint and
  the rule of summary.json: the thresholds saved in saelens/, or each
  token's top k′."""
  config = RunConfig.from_dict(json.loads((run / "config.json").read_text())).train
  summary = json.loads((run / "summary.json").read_text())
  state = checkpoint.Checkpointer(run / "checkpoints").restore(
      train.create_train_state(config, x))
  scale = np.float32(state.input_scale)
  theta, sae = state.threshold, config.sae
  if summary.get("inference") == "topk":
    sae = dataclasses.replace(sae, selection="topk", k=summary["inference_k"])
  elif config.sae.selection != "topk":
    raw = load_file(str(run / "saelens" / "sae_weights.safetensors"))["threshold"]
    theta = raw * np.where(raw == thresholds.NEVER, np.float32(1), scale)  # NEVER stays
  z, xhat = evaluate.reconstruct(state.params, theta, state.input_scale, x,
                                 model.SAE(sae))
  return z / scale, xhat


@pytest.mark.slow
@pytest.mark.parametrize("selection, l, extra", [
    ("topk", 4, []), ("batchtopk", 4, ["--inference", "per-latent"]),
    ("sampled", 2, ["--inference", "per-latent"]),
    ("sampled", 2, ["--sample-pool", "--inference", "topk"]),
    ("batchtopk", 4, ["--matryoshka-groups", "0.25", "0.25", "0.5", "--inference", "per-latent"]),
    ("sampled", 2, ["--matryoshka-groups", "0.5", "0.5", "--inference", "per-latent"]),
    ("jumprelu", 4, ["--lr", "0.01", "--bandwidth", "0.05"])])
def test_each_architecture_loads_and_matches_our_inference(tmp_path, selection, l, extra):
  npy = tmp_path / "acts.npy"
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=16, n_features=32))
  np.save(npy, 3.0 * source.sample(0, 8192) + 0.5)  # an input scale for the export to fold
  run = tmp_path / "run"
  assert train_script.main([*ARGS, "--data", str(npy), "--selection", selection, "--l", str(l),
                            "--out", str(run), *extra]) == 0
  summary = json.loads((run / "summary.json").read_text())
  top = selection == "topk" or "topk" in extra  # a TopK SAE, or a Sampled-SAE saved as one
  jump = selection == "jumprelu"  # saved with its learned thresholds, x not centred by b_dec
  assert summary.get("inference", "topk") == ("topk" if top else "learned" if jump else
                                              "per-latent")
  sae = load(run / "saelens")
  assert type(sae).__name__ == ("TopKSAE" if top else "JumpReLUSAE")
  if top:
    assert sae.cfg.k == summary.get("inference_k", 4)
  x = np.load(npy)[-512:]
  with torch.no_grad():
    z = sae.encode(torch.tensor(x)).numpy()
    xhat = sae.decode(torch.tensor(z)).numpy()
  our_z, our_xhat = ours(run, x)
  assert np.array_equal(z > 0, our_z > 0)  # no latent fires differently
  np.testing.assert_allclose(z, our_z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(xhat, our_xhat, rtol=1e-4, atol=1e-4)
  # summary.json's fvu, as a user computes it from saelens/ on the held-out rows
  fvu = np.square(x - xhat).sum() / np.square(x - x.mean(0)).sum()
  np.testing.assert_allclose(fvu, summary["fvu"], rtol=1e-4)

  log10 = load_file(str(run / "saelens" / "sparsity.safetensors"))["sparsity"]
  assert log10.shape == (64,) and log10.dtype == np.float32 and np.all(log10 <= 0)
  if jump:
    assert sae.cfg.apply_b_dec_to_input is False
    learned = checkpoint.Checkpointer(run / "checkpoints").restore(train.create_train_state(
        RunConfig.from_dict(json.loads((run / "config.json").read_text())).train, x))
    np.testing.assert_allclose(sae.threshold.detach().numpy() * learned.input_scale,
                               learned.params["threshold"], rtol=1e-6)
    assert len(np.unique(learned.params["threshold"])) > 10
  elif not top:  # a vector of thresholds, and latents that never fire
    theta = sae.threshold.detach().numpy()
    assert len(np.unique(theta)) > 10
    never = theta == thresholds.NEVER
    np.testing.assert_array_equal(never, log10 == -10)  # never selected in calibration
    assert never.any() == (selection == "sampled")  # a pool of 8 leaves latents out
    with torch.no_grad():
      huge = sae.encode(torch.tensor(100 * x)).numpy()
    assert np.all(huge[:, never] == 0) and np.any(huge[:, ~never] > 0)

  # Who trained it: SAELens keeps our null (it would fill in its own version)
  # and writes it back when it saves.
  assert sae.cfg.metadata.sae_lens_training_version is None
  assert sae.cfg.metadata.sae_jax_version == "0.1.0"
  if "--matryoshka-groups" in extra:  # the prefixes' ends, under SAELens' own name
    fractions = extra[1:extra.index("--inference")]
    assert sae.cfg.metadata.matryoshka_widths == np.cumsum(
        [int(float(f) * 64) for f in fractions]).tolist()
  sae.save_model(tmp_path / "resaved")
  resaved = json.loads((tmp_path / "resaved" / "cfg.json").read_text())
  assert resaved["metadata"]["sae_lens_training_version"] is None


@pytest.mark.slow
def test_model_activations_say_they_are_not_centred(cache, tmp_path):
  """An SAE on a transformers model's hidden states tells HookedSAETransformer
  (and SAEBench, through SAELens' cfg) to load the model without centring
  the writing weights; SAELens warns, as it does for every SAE with such kwargs."""
  run = tmp_path / "run"
  assert train_script.main([*ARGS, "--data", str(cache), "--batch-size", "32", "--steps", "12",
                            "--eval-tokens", "64", "--calibration-tokens", "256",
                            "--out", str(run)]) == 0
  cfg = json.loads((run / "saelens" / "cfg.json").read_text())
  assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
  assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
  sae = load(run / "saelens", expect_kwargs_warning=True)
  assert sae.cfg.metadata.model_from_pretrained_kwargs == {"center_writing_weights": False}


def test_weights_that_do_not_match_their_cfg_are_one_line(tmp_path):
  """saelens.load (the browser's and spelling's reader) checks every tensor's
  shape against cfg.json: swapped W_enc and W_dec were a flax traceback."""
  from safetensors.numpy import save_file  # noqa: PLC0415
  from sae_jax import saelens  # noqa: PLC0415
  D, F = 4, 8
  cfg = {"d_in": D, "d_sae": F, "architecture": "jumprelu"}
  weights = {"W_enc": np.zeros((D, F), np.float32), "W_dec": np.ones((F, D), np.float32),
             "b_enc": np.zeros(F, np.float32), "b_dec": np.zeros(D, np.float32),
             "threshold": np.zeros(F, np.float32)}
  (tmp_path / "cfg.json").write_text(json.dumps(cfg))
  save_file(weights, str(tmp_path / "sae_weights.safetensors"))
  assert saelens.load(tmp_path)[1] == cfg
  for broken, said in ((dict(weights, W_enc=weights["W_dec"], W_dec=weights["W_enc"]),
                        r"W_enc is \(8, 4\), but cfg.json's d_in=4, d_sae=8 make it \(4, 8\)"),
                       ({k: v for k, v in weights.items() if k != "threshold"},
                        r"threshold is missing, but")):
    save_file(broken, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=said):
      saelens.load(tmp_path)
