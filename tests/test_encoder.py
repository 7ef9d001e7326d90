"""An encoder (BERT) through the pipeline: its contexts framed by [CLS] ...
[SEP] with those rows left out, whole-word first letters from WordPiece,
no downstream loss, and the real-model demo on all-MiniLM-L6-v2."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from sae_jax import contexts
from sae_jax import export
from sae_jax import spelling
from tests import scripts
from tests import tiny_lm
from tests.test_saelens import load, ours

demo_script = scripts.load("minilm_demo")
absorption_script = scripts.load("absorption")
HOOK = "blocks.1.hook_normalized_resid_post"  # a BERT block's output


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  root = tmp_path_factory.mktemp("bert")
  return {"model": str(tiny_lm.build_bert(root / "model")),
          "texts": tuple(map(str, tiny_lm.write_texts(root / "texts")["txt"]))}


def bert_export(bert, **kwargs) -> export.ExportConfig:
  return export.ExportConfig(**{**dict(
      model=bert["model"], hook=HOOK, dataset=bert["texts"], context_length=16, tokens=300,
      shard_rows=128, batch_contexts=4, backend="torch"), **kwargs})


def test_an_encoder_export_frames_its_contexts_and_leaves_the_frame_out(bert, tmp_path):
  config = bert_export(bert)
  manifest = export.export_activations(config, tmp_path / "cache", progress=False)
  assert manifest["attention"] == "bidirectional" and manifest["complete"]
  tok = transformers.AutoTokenizer.from_pretrained(bert["model"])
  special = set(tok.all_special_ids)
  assert manifest["excluded_token_ids"] == sorted(special)
  read = lambda kind: np.concatenate([np.load(tmp_path / "cache" / s["files"][kind])
                                      for s in manifest["shards"]])
  acts, tokens, positions = read("acts"), read("tokens"), read("positions")
  # The reference: every document's WordPiece ids joined by [SEP], cut into
  # bodies of 14, each run as [CLS] body [SEP] through BertModel itself.
  joined = [t for text in contexts.texts(config)
            for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
  bodies = [joined[i:i + 14] for i in range(0, len(joined) - 13, 14)]
  model = transformers.AutoModel.from_pretrained(bert["model"]).eval()
  want_acts, want_tokens, want_positions = [], [], []
  for body in bodies:
    ids = np.array([tok.cls_token_id, *body, tok.sep_token_id])
    with torch.no_grad():
      hidden = model(torch.as_tensor(ids[None]), output_hidden_states=True).hidden_states[2]
    keep = np.array([i not in special for i in ids]) & (np.arange(16) > 0)
    want_acts.append(hidden[0].numpy()[keep])
    want_tokens.append(ids[keep])
    want_positions.append(np.arange(16)[keep])
    if sum(len(t) for t in want_tokens) >= 300:
      break
  np.testing.assert_array_equal(tokens, np.concatenate(want_tokens)[:300])
  np.testing.assert_array_equal(positions, np.concatenate(want_positions)[:300])
  np.testing.assert_allclose(acts, np.concatenate(want_acts)[:300], rtol=1e-5, atol=1e-5)
  assert 0 < positions.min() and positions.max() < 15


def test_an_encoder_export_resumes_byte_for_byte(bert, tmp_path):
  """Stopped after its first shard (a shard boundary inside a forward batch),
  then resumed: the same files as an uninterrupted export."""
  config = bert_export(bert, shard_rows=100)

  class Stop(Exception):
    pass

  def stop(manifest):
    raise Stop

  with pytest.raises(Stop):
    export.export_activations(config, tmp_path / "stopped", progress=False, on_shard=stop)
  export.export_activations(config, tmp_path / "stopped", progress=False)
  export.export_activations(config, tmp_path / "straight", progress=False)
  files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}
  assert files(tmp_path / "stopped") == files(tmp_path / "straight")
  assert export.read_manifest(tmp_path / "stopped")["shards"][1]["skip_rows"] > 0


@pytest.mark.parametrize("change, message", [
    (dict(context_length=65), r"^--context-length 65: .* has positions for 64 tokens$"),
    (dict(context_length=2), r"^--context-length 2 leaves no text inside the model's 2 framing"),
    (dict(hook="blocks.1.hook_resid_post"), r"^--hook 'blocks.1.hook_resid_post': .* is an "
                                            r"encoder .*'blocks.1.hook_normalized_resid_post'$")])
def test_an_encoder_export_refuses_what_does_not_fit_it(bert, tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    export.export_activations(bert_export(bert, **change), tmp_path / "cache", progress=False)
  assert not (tmp_path / "cache").exists()


def test_a_decoder_has_no_normalized_resid_post(lm, tmp_path):
  with pytest.raises(ValueError, match=r"has no LayerNorm at the end of its blocks .* its block "
                                       r"output is 'blocks.1.hook_resid_post'$"):
    export.export_activations(tiny_lm.export_config(lm, hook="blocks.1.hook_normalized_resid_post"),
                              tmp_path / "cache", progress=False)
  assert not (tmp_path / "cache").exists()


def test_wordpiece_letters_come_from_whole_words(bert):
  tok = transformers.AutoTokenizer.from_pretrained(bert["model"])
  # "eab" is one token; "aab" is "a" "##ab"; "dot" is "d" "##ot".
  ids = tok("eab aab eab dot fot eab", add_special_tokens=False)["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == ["eab", "a", "##ab", "eab", "d", "##ot", "fot", "eab"]
  positions = np.array([1, 2, 3, 4, 5, 6, 8, 9])  # the row of position 7 was left out ([SEP])
  letters = spelling.token_letters(tok, ids, positions)
  # A word's first piece is no whole word; the last row's next is unknown.
  np.testing.assert_array_equal(letters, [4, -1, -1, 4, -1, -1, 5, -1])
  np.testing.assert_array_equal(spelling.token_letters(tok, ids[:2], [1, 3]), [4, -1])
  # A gap (a left-out row) ends a word even before a "##" piece.
  np.testing.assert_array_equal(spelling.token_letters(tok, ids[1:4], [1, 3, 4]), [0, -1, -1])
  np.testing.assert_array_equal(spelling.token_letters(tok, ids[1:4], [1, 2, 3]), [-1, -1, -1])
  # Without positions, each token by its own text ("a" and "d" would count).
  np.testing.assert_array_equal(spelling.token_letters(tok, ids), [4, 0, -1, 4, 3, -1, 5, 4])


@pytest.mark.slow
def test_the_real_model_demo_end_to_end(tmp_path, capsys):
  """The demo's command at a small size: all-MiniLM-L6-v2 (the demo extra)
  on Python's documentation, a short run, and SAELens' codes equal ours."""
  out, cache = tmp_path / "run", tmp_path / "cache"
  assert demo_script.main(["--corpus", str(tmp_path / "docs.jsonl"), "--cache-dir", str(cache),
                           "--out", str(out), "--dict-size", "256", "--k", "8", "--l", "2",
                           "--steps", "20", "--batch-size", "64", "--context-length", "64",
                           "--eval-tokens", "512", "--calibration-tokens", "1024",
                           "--no-progress"]) == 0
  printed = capsys.readouterr().out
  assert "wrote " + str(tmp_path / "docs.jsonl") in printed
  summary = json.loads((out / "summary.json").read_text())
  assert summary["downstream_skipped"].startswith("the model is an encoder")
  assert not any(k.startswith("downstream_") and k != "downstream_skipped" for k in summary)
  assert summary["probe_tasks"] >= 10 and 0 <= summary["probe_f1_k1"] <= 1
  manifest = export.read_manifest(cache)
  assert manifest["attention"] == "bidirectional" and manifest["d_model"] == 384
  cfg = json.loads((out / "saelens" / "cfg.json").read_text())
  assert cfg["metadata"]["hook_name"] == "blocks.3.hook_normalized_resid_post"
  x = np.load(cache / manifest["shards"][-1]["files"]["acts"])[-64:].astype(np.float32)
  sae = load(out / "saelens", expect_kwargs_warning=True)
  want, _ = ours(out, x)
  with torch.no_grad():
    got = sae.encode(torch.as_tensor(x)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert (got > 0).any()
  assert set(load_file(str(out / "saelens" / "sae_weights.safetensors"))) >= {"W_enc", "W_dec"}
  # SAEBench's prompts are a causal model's: refused in one line.
  assert absorption_script.main([str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "is an encoder (bidirectional attention)" in err, err
  # A corpus that is not JSON lines is refused before anything is written.
  assert demo_script.main(["--corpus", str(tmp_path / "docs.txt"), "--out",
                           str(tmp_path / "other")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: --corpus must end in .jsonl (the corpus is JSON lines); got " \
                f"'{tmp_path / 'docs.txt'}'"
  assert not (tmp_path / "docs.txt").exists() and not (tmp_path / "other").exists()
