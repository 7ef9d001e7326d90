"""First letters on a real (tiny) GPT-NeoX: a run on a cache reports them in
summary.json, and experiments/absorption.py runs SAEBench's prompts through
the model and the saved SAE."""

import json

import numpy as np
import pytest
import torch
import transformers

from sae_jax import export
from sae_jax import probing
from sae_jax import saelens
from sae_jax import spelling
from tests import scripts
from tests import tiny_lm

train_script = scripts.load("train")
absorption_script = scripts.load("absorption")

SMALL = ["--dict-size", "64", "--k", "4", "--l", "4", "--batch-size", "64", "--steps", "20",
         "--warmup-steps", "2", "--threshold-start", "5", "--calibration-tokens", "256",
         "--no-progress"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """The tiny model, its embeddings carrying each word's first letter."""
  root = tmp_path_factory.mktemp("letter_lm")
  rng = np.random.default_rng(0)
  text = root / "words.txt"
  text.write_text("\n".join(" ".join(rng.choice(tiny_lm.WORDS, size=30)) for _ in range(300)))
  return {"model": str(tiny_lm.build(root / "model", letters=1.0)),
          "texts": {"txt": (str(text),)}}


@pytest.fixture(scope="module")
def letter_run(lm, tmp_path_factory):
  """A run on a 6000-row cache of the tiny model, 600 rows held out."""
  root = tmp_path_factory.mktemp("letters")
  cache = root / "cache"
  export.export_activations(tiny_lm.export_config(lm, tokens=6000, shard_rows=2048), cache,
                            progress=False)
  out = root / "run"
  assert train_script.main(["--data", str(cache), "--eval-tokens", "600", *SMALL,
                            "--out", str(out)]) == 0
  return out, cache


@pytest.mark.slow
def test_a_run_on_a_cache_reports_first_letter_metrics(lm, letter_run):
  out, cache = letter_run
  summary = json.loads((out / "summary.json").read_text())
  # A held-out token that is a word (all but <|endoftext|>) has one of 6 letters.
  assert summary["probe_tasks"] == 6 and summary["eval_rows"] == 600
  assert summary["probe_acc_dense"] > 0.9  # the tiny model's embeddings carry the letter
  for k in (1, 2, 5):
    assert 0.5 <= summary[f"probe_acc_k{k}"] <= 1 and 0 <= summary[f"probe_f1_k{k}"] <= 1
  assert summary["absorption_letters"] >= 4
  assert 0 <= summary["absorption"] <= summary["absorption_fraction"] + 1e-12 <= 1
  # The labels are the held-out tokens' first letters, as the tokenizer spells them.
  tokenizer = transformers.AutoTokenizer.from_pretrained(lm["model"])
  manifest = export.read_manifest(cache)
  tokens = np.concatenate([np.load(cache / s["files"]["tokens"]) for s in manifest["shards"]])
  held_out = tokens[-600:]
  spelled = [tokenizer.decode([t]) for t in held_out]
  want = [ord(w[0]) - ord("a") if w.isalpha() else -1 for w in spelled]
  np.testing.assert_array_equal(spelling.token_letters(tokenizer, held_out), want)
  assert -1 in want and len(set(want)) == 7


def test_first_letter_of_a_token():
  assert [spelling.first_letter(w) for w in (" Zebra", "apple", " 9lives", "co-op", " ", "é")] \
      == [25, 0, -1, -1, -1, -1]


def test_prompt_activations_are_the_models_at_the_word(lm):
  tokenizer = transformers.AutoTokenizer.from_pretrained(lm["model"])
  words = spelling.vocabulary(tokenizer)
  assert [t for _, t in words] == tiny_lm.WORDS  # every word, none of the special tokens
  x, ids = spelling.prompt_activations(lm["model"], "blocks.1.hook_resid_post", tokenizer,
                                       words[:20], batch=8, progress=False)
  assert x.shape == (20, 16) and list(ids) == [i for i, _ in words[:20]]
  model = transformers.GPTNeoXForCausalLM.from_pretrained(lm["model"]).eval()
  rng = np.random.default_rng(0)  # the examples prompt_activations drew, drawn again
  texts = [t for _, t in words[:20]]
  for n, (i, text) in enumerate(words[:20]):
    others = [texts[j] for j in rng.choice(20, 11, replace=False) if texts[j] != text][:10]
    head, tail = spelling.prompt(text, others)
    assert head.endswith("\n" + text) and tail == " has the first letter:"
    assert head.count(" has the first letter: ") == 10
    ids_L = tokenizer(head + tail)["input_ids"]
    position = len(tokenizer(head)["input_ids"]) - 1
    assert ids_L[position] == i
    with torch.no_grad():
      hidden = model(torch.tensor([ids_L]), output_hidden_states=True).hidden_states[2]
    np.testing.assert_allclose(x[n], hidden[0, position].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_absorption_command(lm, letter_run, capsys):
  out, _ = letter_run
  assert absorption_script.main([str(out), "--words", "0", "--batch", "16",
                                 "--no-progress"]) == 0
  printed = capsys.readouterr().out
  result = json.loads((out / "absorption.json").read_text())
  assert result["words"] == 60 and result["absorption_letters"] >= 1
  assert f"absorption: {result['absorption']}" in printed
  # The same numbers from the activations and SAELens' formulas on the saved weights.
  tokenizer = transformers.AutoTokenizer.from_pretrained(lm["model"])
  x, ids = spelling.prompt_activations(lm["model"], "blocks.1.hook_resid_post", tokenizer,
                                       spelling.vocabulary(tokenizer), progress=False)
  weights, cfg = saelens.load(out / "saelens")
  h = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
  codes = np.maximum(h, 0) * (h > weights["threshold"])
  want = probing.letter_absorption(x, codes, weights["W_dec"], spelling.token_letters(
      tokenizer, ids), ids)
  assert result["absorption"] == pytest.approx(want["absorption"])
  assert result["split_latents"] == pytest.approx(want["split_latents"])
  assert sorted(result["per_letter"]) == sorted(spelling.LETTERS[i] for i in want["per_letter"])


@pytest.mark.slow
def test_the_absorption_command_refuses_what_it_cannot_read(tmp_path, letter_run, capsys):
  synthetic = tmp_path / "synthetic"
  assert train_script.main(["--data", "synthetic", "--synthetic-d-model", "16", *SMALL,
                            "--eval-tokens", "512", "--out", str(synthetic)]) == 0
  capsys.readouterr()
  out, _ = letter_run
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_bytes((out / "config.json").read_bytes())
  for run, message in ((synthetic, "trained on --data 'synthetic', not on a language model"),
                       (tmp_path / "nothing", "holds no config.json"),
                       (unfinished, "holds no saved SAE (cfg.json and sae_weights.safetensors "
                                    "missing): is the run finished?")):
    assert absorption_script.main([str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
