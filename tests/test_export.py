"""Export from a tiny random GPT-NeoX: the right rows, resumes, refusals."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import torch
import transformers

from sae_jax import data
from sae_jax import export
from sae_jax import hooks
from sae_jax import lm as lm_jax
from tests.tiny_lm import L
from tests.tiny_lm import export_config as config


def expected_contexts(lm, files, text_field="text"):
  """Contexts rebuilt by hand: documents joined by <|endoftext|> (id 0)."""
  tok = transformers.AutoTokenizer.from_pretrained(lm["model"])
  stream = []
  for path in files:
    for line in pathlib.Path(path).read_text().splitlines():
      text = json.loads(line)[text_field] if path.endswith(".jsonl") else line
      stream += tok(text, add_special_tokens=False)["input_ids"] + [0]
  n = len(stream) // L
  return np.asarray(stream[:n * L]).reshape(n, L)


def read_cache(path):
  manifest = export.read_manifest(path)
  load = lambda kind: np.concatenate([np.load(path / s["files"][kind]) for s in manifest["shards"]])
  return manifest, load("acts"), load("tokens"), load("positions")


def test_hook_names():
  assert hooks.hook_layer("blocks.6.hook_resid_post") == 6
  assert hooks.hidden_states_index("blocks.6.hook_resid_post") == 7
  with pytest.raises(ValueError,
                     match=r"hook must be 'blocks.N.hook_resid_pre', .*; got 'blocks.6'"):
    hooks.hook_layer("blocks.6")
  for odd in ("blocks.\u0661.hook_resid_post", "blocks.1.hook_resid_post\n"):  # an Arabic-Indic 1
    with pytest.raises(ValueError, match=r"hook must be"):
      hooks.hook_layer(odd)


@pytest.mark.parametrize("layer", [1, 2])  # below the top block, and the top block
def test_rows_are_the_residual_stream_after_the_block(lm, tmp_path, layer):
  c = config(lm, hook=f"blocks.{layer}.hook_resid_post")
  manifest = export.export_activations(c, tmp_path / "cache", progress=False)
  manifest, acts, tokens, positions = read_cache(tmp_path / "cache")
  assert manifest["complete"] and manifest["total_tokens"] == 700 == len(acts)
  assert manifest["hidden_states_index"] == layer + 1 and manifest["d_model"] == 16
  assert [s["rows"] for s in manifest["shards"]] == [128] * 5 + [60]

  ids = expected_contexts(lm, c.dataset)
  n_contexts = -(-700 // (L - 1))
  model = transformers.GPTNeoXForCausalLM.from_pretrained(lm["model"]).eval()
  with torch.no_grad():
    hidden = model(torch.as_tensor(ids[:n_contexts]), output_hidden_states=True).hidden_states
    # The top block's raw output: hidden_states[-1] has the final layer norm applied.
    normed = hidden[-1].numpy()
    model.gpt_neox.final_layer_norm = torch.nn.Identity()
    raw = model(torch.as_tensor(ids[:n_contexts]), output_hidden_states=True).hidden_states
  want = raw[layer + 1].numpy()[:, 1:].reshape(-1, 16)[:700]  # position 0 left out
  np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(tokens, ids[:n_contexts, 1:].reshape(-1)[:700])
  np.testing.assert_array_equal(positions, np.tile(np.arange(1, L), n_contexts)[:700])
  assert np.any(positions != 0) and not np.any(positions == 0)
  if layer == 2:
    assert not np.allclose(acts, normed[:, 1:].reshape(-1, 16)[:700], atol=1e-3)
  else:
    np.testing.assert_allclose(want, hidden[layer + 1].numpy()[:, 1:].reshape(-1, 16)[:700])


def test_jsonl_text_field_and_excluded_ids(lm, tmp_path):
  c = config(lm, dataset=lm["texts"]["jsonl"], text_field="body", exclude_token_ids=(0,),
             tokens=200)
  export.export_activations(c, tmp_path / "cache", progress=False)
  _, acts, tokens, positions = read_cache(tmp_path / "cache")
  ids = expected_contexts(lm, c.dataset, "body")
  keep = (np.arange(L) > 0)[None, :] & (ids != 0)
  np.testing.assert_array_equal(tokens, ids[keep][:200])
  np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(L), ids.shape)[keep][:200])
  assert 0 not in tokens
  with pytest.raises(ValueError, match=r"no field 'text'"):
    export.export_activations(config(lm, dataset=lm["texts"]["jsonl"]), tmp_path / "other",
                              progress=False)


def test_interrupted_export_resumes_byte_for_byte(lm, tmp_path):
  c = config(lm, tokens=500)
  export.export_activations(c, tmp_path / "whole", progress=False)

  class Killed(Exception):
    pass

  def kill_after_two(manifest):
    if len(manifest["shards"]) == 2:
      raise Killed

  with pytest.raises(Killed):
    export.export_activations(c, tmp_path / "resumed", progress=False, on_shard=kill_after_two)
  assert not export.read_manifest(tmp_path / "resumed")["complete"]
  (tmp_path / "resumed" / ".acts-00002.npy.tmp-999").write_bytes(b"half a file")
  export.export_activations(c, tmp_path / "resumed", progress=False)
  files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}
  assert files(tmp_path / "resumed") == files(tmp_path / "whole")

  # A bigger budget extends the cache, recomputing the short last shard.
  bigger = dataclasses.replace(c, tokens=700)
  export.export_activations(bigger, tmp_path / "resumed", progress=False)
  export.export_activations(bigger, tmp_path / "direct", progress=False)
  assert files(tmp_path / "resumed") == files(tmp_path / "direct")


def test_a_different_export_is_refused_and_nothing_is_overwritten(lm, tmp_path):
  export.export_activations(config(lm, tokens=200), tmp_path / "cache", progress=False)
  before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
  with pytest.raises(ValueError, match=r"(?s)refusing to overwrite.*hook: cache has "
                     r"'blocks.1.hook_resid_post', asked for 'blocks.2.hook_resid_post'"
                     r".*dtype: cache has 'float32', asked for 'float16'"):
    export.export_activations(config(lm, tokens=200, hook="blocks.2.hook_resid_post",
                                     dtype="float16"), tmp_path / "cache", progress=False)
  assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"not empty and holds no manifest.json"):
    export.export_activations(config(lm), tmp_path / "busy", progress=False)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_low_precision_caches_read_back(lm, tmp_path, dtype, tolerance):
  export.export_activations(config(lm, tokens=256), tmp_path / "f32", progress=False)
  export.export_activations(config(lm, tokens=256, dtype=dtype), tmp_path / "low", progress=False)
  full = np.concatenate([data.Activations(tmp_path / "f32").read(i, 0, 128) for i in range(2)])
  low = np.concatenate([data.Activations(tmp_path / "low").read(i, 0, 128) for i in range(2)])
  assert low.dtype == np.float32
  np.testing.assert_allclose(low, full, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hook="resid_post"), r"hook must be"),
    (dict(hook="blocks.3.hook_resid_post"), None),  # caught when the model is known
    (dict(context_length=1), r"ExportConfig.context_length must be an integer >= 2; got 1"),
    (dict(dtype="int8"), r"ExportConfig.dtype must be one of 'float32', 'float16', 'bfloat16'"),
    (dict(dataset=("notes.md",)), r"local files must end in .txt or .jsonl; got 'notes.md'"),
    (dict(dataset=("missing.txt",)), r"no such file 'missing.txt'"),
    (dict(exclude_token_ids=(-1,)), r"exclude_token_ids\[\] must be an integer >= 0"),
])
def test_bad_export_config(lm, tmp_path, kwargs, message):
  if message is None:
    with pytest.raises(ValueError, match=r"needs block 3, but .* has blocks 0..2"):
      export.export_activations(config(lm, **kwargs), tmp_path / "cache", progress=False)
    return
  with pytest.raises(ValueError, match=message):
    config(lm, **kwargs)


def test_command_line(lm, tmp_path, capsys):
  from tests import scripts
  argv = ["--model", lm["model"], "--dataset", *lm["texts"]["txt"],
          "--hook", "blocks.1.hook_resid_post", "--context-length", str(L), "--tokens", "200",
          "--shard-rows", "128", "--batch-contexts", "4", "--out", str(tmp_path / "cli")]
  assert scripts.load("export_activations").main(argv) == 0
  assert "200 rows of blocks.1.hook_resid_post (D=16, float32) in 2 shards" in capsys.readouterr().out
  export.export_activations(config(lm, tokens=200), tmp_path / "api", progress=False)
  files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}
  assert files(tmp_path / "cli") == files(tmp_path / "api")
  # Texts that give no context (an empty file): one line, not "0 rows ... in 0 shards".
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  capsys.readouterr()
  argv = [*argv[:argv.index("--dataset") + 1], str(empty), *argv[argv.index("--hook"):-1],
          str(tmp_path / "empty")]
  assert scripts.load("export_activations").main(argv) == 2
  out, err = capsys.readouterr()
  assert err.strip().splitlines()[-1].startswith(  # after transformers' loading bar
      f"error: the texts of --dataset {empty} gave no activation rows")
  assert "0 rows" not in out


def test_jax_backend_writes_the_same_cache(lm, cache, tmp_path):
  """`cache` (the session fixture) ran the model in torch; the JAX model
  gives the same rows to float rounding, in the same files and manifest."""
  c = config(lm, backend="jax")
  model = export.JaxHookedModel(c)
  assert model.mesh.size == 4  # each batch split over the 4 devices
  ids = expected_contexts(lm, c.dataset)[:7]  # not a multiple of 4: padded, then cut back
  lm_config, params = lm_jax.load(c.model)
  np.testing.assert_allclose(model(ids), lm_jax.hook_at(params, lm_config, ids, c.hook),
                             rtol=1e-5, atol=1e-5)
  manifest = export.export_activations(c, tmp_path / "jax", progress=False)
  want_manifest, want_acts, want_tokens, want_positions = read_cache(cache)
  manifest, acts, tokens, positions = read_cache(tmp_path / "jax")
  assert (want_manifest["backend"], manifest["backend"]) == ("torch", "jax")
  assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in want_manifest["shards"]]
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(positions, want_positions)
  np.testing.assert_allclose(acts, want_acts, rtol=1e-4, atol=1e-4 * np.abs(want_acts).max())
  # A cache is resumed only by the backend that started it.
  with pytest.raises(ValueError, match="backend: cache has 'jax', asked for 'torch'"):
    export.export_activations(config(lm, backend="torch", tokens=900), tmp_path / "jax",
                              progress=False)


def test_backend_is_checked_and_defaults_by_platform():
  assert export.ExportConfig().backend == export.default_backend() == "torch"  # a CPU here
  with pytest.raises(ValueError, match="ExportConfig.backend must be one of 'jax', 'torch'"):
    export.ExportConfig(backend="tf")
