"""TransformerLens hooks in the torch export and the downstream splice, on
tiny random GPT-NeoX, GPT-2, Llama, Qwen2, Mistral and Gemma-2 models: each
hook's rows equal the model's own hidden states or a hook on the module
the test names, the four add up as TransformerLens defines them, the
forward stops at the hook, and every wrong name is refused in one line."""

import json

import numpy as np
import pytest

from sae_jax import downstream
from sae_jax import export
from sae_jax import hooks
from tests import tiny_lm

FAMILIES = ("gpt_neox",) + tiny_lm.FAMILIES
POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
# The module whose output is each point of block N, written out per family
# (the library finds it another way: hooks.SUBMODULES on the block list).
MODULE = {
    "gpt_neox": {"attn_out": "gpt_neox.layers.{}.attention", "mlp_out": "gpt_neox.layers.{}.mlp"},
    "gpt2": {"attn_out": "transformer.h.{}.attn", "mlp_out": "transformer.h.{}.mlp"},
    "gemma2": {"attn_out": "model.layers.{}.post_attention_layernorm",
               "mlp_out": "model.layers.{}.post_feedforward_layernorm"},
    **{f: {"attn_out": "model.layers.{}.self_attn", "mlp_out": "model.layers.{}.mlp"}
       for f in ("llama", "qwen2", "mistral")},
}
IDS = np.random.default_rng(0).integers(2, 2 + len(tiny_lm.WORDS), (3, 9))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("families")
  out = {}
  for family in FAMILIES:
    (root / family).mkdir()
    out[family] = str(tiny_lm.build(root / family, layers=2) if family == "gpt_neox"
                      else tiny_lm.build_causal(root / family, family))
  return out


def hooked(model, hook):
  return export.HookedModel(export.ExportConfig(model=model, hook=hook, backend="torch"))


def direct(model_dir, ids):
  """The causal LM's hidden states and the outputs of the modules MODULE names."""
  import torch
  import transformers
  lm = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  outputs, handles = {}, []
  for point, path in MODULE[lm.config.model_type].items():
    for layer in range(lm.config.num_hidden_layers):
      keep = lambda m, i, o, key=(point, layer): outputs.__setitem__(
          key, (o[0] if isinstance(o, tuple) else o).numpy())
      handles.append(lm.get_submodule(path.format(layer)).register_forward_hook(keep))
  with torch.inference_mode():
    hidden = lm(input_ids=torch.as_tensor(ids), output_hidden_states=True).hidden_states
  for handle in handles:
    handle.remove()
  return [h.numpy() for h in hidden], outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_hook_is_the_models_own_activation_there(models, family):
  hidden, module_out = direct(models[family], IDS)
  got = {(point, layer): hooked(models[family], f"blocks.{layer}.hook_{point}")(IDS)
         for point in POINTS for layer in (0, 1)}
  for layer in (0, 1):
    np.testing.assert_array_equal(got["resid_pre", layer], hidden[layer])
    for point in ("attn_out", "mlp_out"):
      np.testing.assert_array_equal(got[point, layer], module_out[point, layer])
    # TransformerLens' residual stream: each block adds its attention's and
    # its MLP's outputs (GPT-NeoX's parallel residual too; Gemma-2's after
    # their norms), and the top block's output is before the final norm.
    np.testing.assert_allclose(got["resid_post", layer] - got["resid_pre", layer],
                               got["attn_out", layer] + got["mlp_out", layer],
                               rtol=1e-5, atol=1e-5 * np.abs(got["resid_post", layer]).max())
  np.testing.assert_array_equal(got["resid_post", 0], hidden[1])
  np.testing.assert_array_equal(got["resid_post", 0], got["resid_pre", 1])
  assert not np.allclose(got["resid_post", 1], hidden[2], atol=1e-3)  # the final norm


def test_the_forward_stops_at_the_hook(models):
  for point in POINTS:
    model = hooked(models["llama"], f"blocks.0.hook_{point}")
    ran = []
    model.model.layers[1].register_forward_pre_hook(lambda *_: ran.append(1))
    later = {"resid_pre": model.model.layers[0].self_attn, "attn_out": model.model.layers[0].mlp,
             "mlp_out": model.model.layers[1], "resid_post": model.model.layers[1]}[point]
    later.register_forward_pre_hook(lambda *_: ran.append(point))
    model(IDS)
    assert ran == [], point


def test_an_export_at_the_mlp_records_its_hook_and_splices_there(models, tmp_path):
  texts = tiny_lm.write_texts(tmp_path / "texts")
  config = export.ExportConfig(model=models["gpt2"], hook="blocks.1.hook_mlp_out",
                               dataset=[str(p) for p in texts["txt"]], context_length=tiny_lm.L,
                               tokens=200, shard_rows=64, batch_contexts=4, backend="torch")
  manifest = export.export_activations(config, tmp_path / "cache", progress=False)
  assert manifest["hook"] == "blocks.1.hook_mlp_out" and manifest["hidden_states_index"] is None
  assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
  ids = IDS[:2]
  same = downstream.downstream_loss(models["gpt2"], "blocks.1.hook_mlp_out", ids, lambda h: h)
  zero = downstream.downstream_loss(models["gpt2"], "blocks.1.hook_mlp_out", ids, np.zeros_like)
  assert abs(same["kl"]) < 1e-6 and same["spliced_ce"] == pytest.approx(same["clean_ce"])
  assert zero["spliced_ce"] == pytest.approx(zero["zero_ce"]) and zero["kl"] > 1e-6
  # The same ablation by hand: block 1's MLP output zeroed after position 0.
  import torch
  import transformers
  lm = transformers.AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()

  def zeroed(module, inputs, output):
    output = output.clone()
    output[:, 1:] = 0
    return output

  lm.get_submodule("transformer.h.1.mlp").register_forward_hook(zeroed)
  with torch.inference_mode():
    logits = lm(input_ids=torch.as_tensor(ids)).logits[:, :-1]
  by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              torch.as_tensor(ids[:, 1:]).reshape(-1))
  assert zero["spliced_ce"] == pytest.approx(float(by_hand), rel=1e-5)
  # A block's input is replaced as it goes in: zeroing block 1's input at
  # positions 1.. is zeroing block 0's output there.
  before = downstream.downstream_loss(models["gpt2"], "blocks.1.hook_resid_pre", ids, np.zeros_like)
  after = downstream.downstream_loss(models["gpt2"], "blocks.0.hook_resid_post", ids, np.zeros_like)
  assert before["spliced_ce"] == pytest.approx(after["spliced_ce"], rel=1e-6)


@pytest.mark.parametrize("hook, config, words", [
    ("blocks.0.hook_mlp", {},
     ["hook must be", "blocks.N.hook_attn_out", "got 'blocks.0.hook_mlp'"]),
    ("blocks.2.hook_attn_out", {}, ["needs block 2", "has blocks 0..1"]),
    ("blocks.0.hook_mlp_out", {"backend": "jax"},
     ["--backend jax runs the model in JAX", "blocks.0.hook_resid_post", "--backend torch"]),
])
def test_wrong_hooks_are_refused_in_one_line(models, hook, config, words):
  with pytest.raises(ValueError) as error:
    hooked_config = dict(model=models["gpt2"], hook=hook, backend="torch") | config
    export.HookedModel(export.ExportConfig(**hooked_config))
  message = str(error.value)
  assert "\n" not in message and all(w in message for w in words), message


def test_inside_a_block_of_an_unknown_family_and_of_an_encoder_is_refused():
  """And the JAX model's refusal, in one line."""
  with pytest.raises(ValueError, match=r"known only for gemma2, gpt2, gpt_neox, llama, mistral, "
                                       r"qwen2; its 'blocks.3.hook_resid_pre' and"):
    hooks.check_architecture("blocks.3.hook_attn_out", "m", False, "opt")
  hooks.check_architecture("blocks.3.hook_resid_pre", "m", False, "opt")
  with pytest.raises(ValueError, match=r"encoder \(BERT\), whose export reads only block "
                                       r"outputs, 'blocks.1.hook_normalized_resid_post'"):
    hooks.check_architecture("blocks.1.hook_mlp_out", "m", True, "bert")
  with pytest.raises(ValueError, match=r"--stream runs the model in JAX"):
    hooks.check_jax("blocks.1.hook_resid_pre", "--stream")
  assert hooks.hidden_states_index("blocks.4.hook_resid_pre") == 4


def test_on_an_accelerator_only_a_block_output_defaults_to_jax(models, monkeypatch):
  import jax
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert export.default_backend(models["gpt_neox"], hook="blocks.1.hook_resid_post") == "jax"
  for point in ("resid_pre", "attn_out", "mlp_out"):
    assert export.default_backend(models["gpt_neox"], hook=f"blocks.1.hook_{point}") == "torch"
  assert export.default_backend(models["gpt2"], hook="blocks.1.hook_resid_post") == "torch"


@pytest.mark.slow
def test_a_run_at_the_mlp_of_a_llama_saves_its_hook_for_saelens(models, tmp_path, capsys):
  from tests.helpers import cli, outputs
  from tests.test_saelens import load
  texts = tiny_lm.write_texts(tmp_path / "texts")
  hook = "blocks.1.hook_mlp_out"
  args = ["--data", "pythia", "--model", models["llama"], "--dataset", *texts["txt"],
          "--hook", hook, "--context-length", tiny_lm.L, "--cache-dir", tmp_path / "cache",
          "--batch-size", 32, "--steps", 12, "--eval-tokens", 64, "--selection", "batchtopk"]
  assert cli(*args, "--out", tmp_path / "run") == 0
  o = outputs(tmp_path / "run")
  assert o["cfg"]["metadata"]["hook_name"] == hook and o["cfg"]["d_in"] == 16
  s = o["summary"]
  assert s["downstream_loss_recovered"] == pytest.approx(
      (s["downstream_zero_ce"] - s["downstream_spliced_ce"])
      / (s["downstream_zero_ce"] - s["downstream_clean_ce"]))
  sae = load(tmp_path / "run" / "saelens", expect_kwargs_warning=True)
  assert sae.cfg.metadata.hook_name == hook
  # --stream runs the model in JAX, which gives block outputs only: refused
  # in one line before anything is written.
  capsys.readouterr()
  assert cli(*args, "--stream", "--out", tmp_path / "stream") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--stream runs the model in JAX" in err, err
  assert not (tmp_path / "stream").exists()
