"""Transcoders from a model to SAELens: both hooks exported row for row
(torch and JAX), pairs read as rows, a run on the tiny GPT-NeoX saved as
SAELens' jumprelu_transcoder with equal outputs, the downstream splice of
the target from the input, and every refusal in one line."""

import dataclasses
import json
import re
import signal

import numpy as np
import pytest
import torch

from sae_jax import checkpoint
from sae_jax import data
from sae_jax import downstream
from sae_jax import evaluate
from sae_jax import export
from sae_jax import lm as lm_jax
from sae_jax import model
from sae_jax import sources
from sae_jax import thresholds
from sae_jax import train
from sae_jax import transcoder
from sae_jax.runconfig import RunConfig
from tests import tiny_lm
from tests.helpers import cli, outputs, subprocess_run, wait_for_step
from tests.test_saelens import load

HOOK, TARGET = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
D = 16


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
  root = tmp_path_factory.mktemp("neox")
  (root / "model").mkdir()
  return {"model": str(tiny_lm.build(root / "model", layers=2, random_norms=True)),
          "texts": [str(p) for p in tiny_lm.write_texts(root / "texts")["txt"]]}


def export_pairs(neox, out, backend="torch", **kwargs):
  config = export.ExportConfig(model=neox["model"], hook=HOOK, target_hook=TARGET,
                               dataset=tuple(neox["texts"]), context_length=tiny_lm.L,
                               tokens=300, shard_rows=128, batch_contexts=4, backend=backend,
                               **kwargs)
  return export.export_activations(config, out, progress=False)


def test_an_export_writes_both_hooks_row_for_row_in_torch_and_jax(neox, tmp_path):
  manifest = export_pairs(neox, tmp_path / "torch")
  assert manifest["target_hook"] == TARGET and manifest["d_model"] == D
  acts = data.Activations(tmp_path / "torch")
  assert acts.pairs and acts.width == 2 * D
  rows = acts.read(0, 0, 128)
  stored = np.load(tmp_path / "torch" / "acts-00000.npy")
  assert stored.shape == (128, 2, D)
  # Each half is what an export of that hook alone holds, on the same tokens.
  for hook, half in ((HOOK, rows[:, :D]), (TARGET, rows[:, D:])):
    single = export.ExportConfig(model=neox["model"], hook=hook, dataset=tuple(neox["texts"]),
                                 context_length=tiny_lm.L, tokens=128, shard_rows=128,
                                 batch_contexts=4, backend="torch")
    export.export_activations(single, tmp_path / hook, progress=False)
    np.testing.assert_array_equal(half, np.load(tmp_path / hook / "acts-00000.npy"))
  np.testing.assert_array_equal(np.load(tmp_path / "torch" / "tokens-00000.npy"),
                                np.load(tmp_path / HOOK / "tokens-00000.npy"))
  # The JAX model gives the same pairs to float rounding.
  export_pairs(neox, tmp_path / "jax", backend="jax")
  got = data.Activations(tmp_path / "jax").read(0, 0, 128)
  np.testing.assert_allclose(got, rows, rtol=1e-4, atol=1e-4 * np.abs(rows).max())
  # A batch is [devices, b, 2·D], the pairs' halves side by side.
  batch = next(acts.batches(32, 2, seed=0, prefetch=0))
  assert batch.shape == (2, 16, 2 * D)
  # The caches say what they hold: --target-hook may name the pairs' target, or be left out.
  pairs, single = str(tmp_path / "torch"), str(tmp_path / HOOK)
  assert sources.transcoder_data(pairs, None) and sources.transcoder_data(pairs, TARGET)
  assert not sources.transcoder_data(single, None)
  for cache, hook, held in ((pairs, "blocks.1.hook_resid_post", f"pairs whose target is "
                             f"'{TARGET}'"), (single, TARGET, f"the activations of '{HOOK}' alone")):
    with pytest.raises(ValueError, match=re.escape(held)):
      sources.transcoder_data(cache, hook)


def test_pairs_in_a_npy_train_a_transcoder_by_themselves(tmp_path):
  pairs = np.random.default_rng(0).normal(size=(600, 2, 4)).astype(np.float32)
  np.save(tmp_path / "pairs.npy", pairs)
  acts = data.Activations(tmp_path / "pairs.npy", eval_rows=60)
  assert acts.pairs and acts.d_model == 4
  np.testing.assert_array_equal(acts.eval_batch(), pairs[-60:].reshape(60, 8))
  args = ["--data", tmp_path / "pairs.npy", "--dict-size", 16, "--k", 2, "--batch-size", 32,
          "--steps", 12, "--eval-tokens", 60, "--calibration-tokens", 64]
  assert cli(*args, "--out", tmp_path / "run") == 0
  o = outputs(tmp_path / "run")
  assert o["config"].train.sae.transcoder and o["cfg"]["architecture"] == "jumprelu_transcoder"
  assert o["cfg"]["d_out"] == 4 and o["cfg"]["metadata"]["hook_name"] == "unknown"


@pytest.mark.parametrize("args, message", [
    (["--target-hook", "blocks.0.hook_mlp_out"], r"--target-hook 'blocks.0.hook_mlp_out' "
     r"comes before --hook 'blocks.1.ln2.hook_normalized'"),
    (["--target-hook", HOOK], r"is --hook itself"),
    (["--target-hook", TARGET, "--inference", "topk"], r"SAELens has no TopK transcoder"),
    (["--target-hook", "blocks.1.hook_mlp_in"], r"hook must be .*ln2.hook_normalized"),
])
def test_bad_target_hooks_are_refused_in_one_line(neox, tmp_path, capsys, args, message):
  assert cli("--data", "pythia", "--model", neox["model"], "--hook", HOOK, *args,
             "--out", tmp_path / "run") == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: ")
  assert re.search(message, err), err


def test_target_hooks_that_disagree_with_the_data_are_refused(tmp_path, capsys):
  np.save(tmp_path / "pairs.npy", np.zeros((100, 2, 4), np.float32))
  np.save(tmp_path / "rows.npy", np.zeros((100, 4), np.float32))
  for data_arg, message in (("pairs.npy", "leave --target-hook out"),
                            ("rows.npy", "leave --target-hook out"),
                            ("synthetic", "--data synthetic makes SAE data")):
    path = tmp_path / data_arg if data_arg != "synthetic" else data_arg
    assert cli("--data", path, "--target-hook", TARGET, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def run_on_the_neox(neox, tmp_path, selection, *extra):
  args = ["--data", "pythia", "--model", neox["model"], "--dataset", *neox["texts"],
          "--hook", HOOK, "--target-hook", TARGET, "--context-length", tiny_lm.L,
          "--cache-dir", tmp_path / "cache", "--dict-size", 64, "--k", 4, "--batch-size", 32,
          "--steps", 20, "--eval-tokens", 64, "--calibration-tokens", 256,
          "--selection", selection, *extra]
  assert cli(*args, "--out", tmp_path / "run") == 0
  return tmp_path / "run"


def check_saelens(run, rows, held_out=True):
  """SAELens' transcoder on the inputs of raw pairs gives our inference codes
  and reconstructions, and on the run's `held_out` rows the FVU and L0
  summary.json say."""
  o = outputs(run)
  config = o["config"].train
  x, y = transcoder.split(rows, config.sae.d_model)
  state = checkpoint.Checkpointer(run / "checkpoints").restore(
      train.create_train_state(config, rows))
  sae = load(run / "saelens", expect_kwargs_warning=o["config"].data == "pythia")
  assert type(sae).__name__ == "JumpReLUTranscoder" and sae.cfg.d_out == config.sae.d_model
  c_in, _ = train.scales(state)
  raw = o["weights"]["threshold"]  # back to scaled units; NEVER stays
  theta = raw * np.where(raw == thresholds.NEVER, np.float32(1), np.float32(c_in))
  if config.sae.selection == "jumprelu":
    theta = np.asarray(state.params["threshold"])
  sae_config = config.sae if config.sae.selection != "topk" else dataclasses.replace(
      config.sae, selection="batchtopk")  # a TopK transcoder is saved with thresholds
  z, yhat = evaluate.reconstruct(state.params, theta, train.scales(state), x,
                                 model.SAE(sae_config))
  with torch.no_grad():
    out, codes = sae.forward_with_activations(torch.as_tensor(x))
  np.testing.assert_allclose(codes.numpy(), z / np.float32(c_in), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.numpy(), yhat, rtol=1e-4, atol=1e-5 * np.abs(yhat).max())
  fvu = np.sum((y - out.numpy()) ** 2) / np.sum((y - y.mean(0)) ** 2)
  if not held_out:
    return o
  assert o["summary"]["fvu"] == pytest.approx(float(fvu), rel=1e-4)
  assert o["summary"]["l0"] == pytest.approx(float(np.mean(np.sum(codes.numpy() > 0, 1))))
  return o


def test_a_transcoder_trains_on_the_neox_and_loads_in_saelens(neox, tmp_path):
  run = run_on_the_neox(neox, tmp_path, "sampled", "--l", 2)
  o = check_saelens(run, data.Activations(tmp_path / "cache", eval_rows=64).eval_batch())
  meta = o["cfg"]["metadata"]
  assert (meta["hook_name"], meta["hook_name_out"]) == (HOOK, TARGET)
  assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
  assert o["cfg"]["apply_b_dec_to_input"] is False
  s = o["summary"]
  assert s["target_scale"] != s["input_scale"] and "absorption_skipped" in s
  assert s["downstream_loss_recovered"] == pytest.approx(
      (s["downstream_zero_ce"] - s["downstream_spliced_ce"])
      / (s["downstream_zero_ce"] - s["downstream_clean_ce"]))
  # The training FVU is against the target: the metrics' last line is the step's.
  assert 0 < o["metrics"][-1]["fvu"] < 10
  # The browser reads the inputs of the cache's pairs: its held-out firing
  # rates are SAELens' codes of the held-out inputs.
  from sae_jax import browse
  browse.build(run, progress=False)
  index = json.loads((run / "browser" / "data" / "index.js").read_text()[len("SAE.index("):-3])
  held = data.Activations(tmp_path / "cache", eval_rows=64).eval_batch()[:, :D]
  with torch.no_grad():
    codes = load(run / "saelens", expect_kwargs_warning=True).encode(torch.as_tensor(held))
  np.testing.assert_allclose(index["density"], (codes.numpy() > 0).mean(0), atol=1e-3)


@pytest.mark.slow
def test_a_streamed_transcoder_splices_in_jax_and_loads_in_saelens(neox, tmp_path):
  run = run_on_the_neox(neox, tmp_path, "batchtopk", "--stream", "--stream-contexts", 8)
  export_pairs(neox, tmp_path / "pairs")
  o = check_saelens(run, data.Activations(tmp_path / "pairs").read(0, 0, 128), held_out=False)
  assert o["config"].export.backend == "jax" and o["config"].train.sae.transcoder
  assert o["cfg"]["metadata"]["hook_name_out"] == TARGET
  assert o["summary"]["downstream_kl"] > 0 and o["summary"]["target_scale"] > 0


def test_the_downstream_splice_replaces_the_target_from_the_input(neox):
  """The model's own MLP as the splice changes nothing; a random map does,
  by the same amount in torch and in JAX."""
  import transformers
  from sae_jax import contexts as contexts_lib
  tok = transformers.AutoTokenizer.from_pretrained(neox["model"])
  config = export.ExportConfig(model=neox["model"], hook=HOOK, dataset=tuple(neox["texts"]),
                               context_length=tiny_lm.L)
  ids = np.stack([c for c, _ in zip(contexts_lib.contexts(config, tok), range(4))])
  layer = transformers.AutoModelForCausalLM.from_pretrained(neox["model"]).gpt_neox.layers[1]
  norm = layer.post_attention_layernorm
  assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))

  def own_mlp(h):  # the norm's weight and bias, then the MLP
    with torch.no_grad():
      return layer.mlp(torch.as_tensor(h) * norm.weight + norm.bias).numpy()

  same = downstream.downstream_loss(neox["model"], TARGET, ids, own_mlp, read=HOOK)
  assert same["kl"] == pytest.approx(0, abs=1e-7)  # float rounding of the norm
  assert same["spliced_ce"] == pytest.approx(same["clean_ce"], rel=1e-6)
  M = np.random.default_rng(1).normal(size=(D, D)).astype(np.float32) / 10
  want = downstream.downstream_loss(neox["model"], TARGET, ids, lambda h: h @ M, read=HOOK)
  config, params = lm_jax.load(neox["model"])
  got = downstream.downstream_loss_jax(params, config, TARGET, ids, _times, (M,), read=HOOK)
  assert want["kl"] > 1e-6
  for name in ("clean_ce", "spliced_ce", "zero_ce", "kl"):
    assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-7), name


def _times(h, M):
  return h @ M


@pytest.mark.slow
@pytest.mark.parametrize("selection, extra", [
    ("topk", []), ("batchtopk", ["--matryoshka-groups", "0.5", "0.5"]),
    ("jumprelu", ["--lr", "0.01", "--bandwidth", "0.05"])])
def test_every_rule_saves_a_transcoder_saelens_loads(tmp_path, selection, extra):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4096, D)).astype(np.float32) * 3 + 1
  M = rng.normal(size=(D, D)).astype(np.float32)
  pairs = np.stack([x, np.maximum(x @ M, 0) * 0.1 - 2], axis=1)
  np.save(tmp_path / "pairs.npy", pairs)
  assert cli("--data", tmp_path / "pairs.npy", "--dict-size", 64, "--k", 4, "--batch-size", 64,
             "--steps", 150, "--eval-tokens", 256, "--selection", selection, *extra,
             "--out", tmp_path / "run") == 0
  o = check_saelens(tmp_path / "run", pairs[-256:].reshape(256, 2 * D))
  assert o["summary"]["fvu"] < 1  # it learned some of the map
  assert RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())
                             ).train.sae.transcoder


@pytest.mark.slow
def test_a_transcoder_resumes_exactly_after_sigterm(tmp_path):
  """Its target scale is in the checkpoint: a stopped run ends as the
  uninterrupted one, to the byte."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8192, D)).astype(np.float32)
  np.save(tmp_path / "pairs.npy", np.stack([x, np.tanh(x @ rng.normal(size=(D, D))) * 4], 1))
  args = ["--data", str(tmp_path / "pairs.npy"), "--selection", "sampled", "--l", "2",
          "--ckpt-every", "10"]
  steps = 120
  assert cli(*args, "--steps", steps, "--log-every", 1, "--out", tmp_path / "straight") == 0
  process = subprocess_run(tmp_path / "resumed", steps, args)
  wait_for_step(tmp_path / "resumed", 40, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  assert not (tmp_path / "resumed" / "summary.json").exists()
  assert cli(*args, "--steps", steps, "--log-every", 1, "--out", tmp_path / "resumed") == 0
  a, b = outputs(tmp_path / "straight"), outputs(tmp_path / "resumed")
  assert a["bytes"] == b["bytes"] and a["summary"]["fvu"] == b["summary"]["fvu"]
  assert a["summary"]["target_scale"] == b["summary"]["target_scale"]
