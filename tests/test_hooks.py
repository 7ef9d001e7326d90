"""TransformerLens hooks in the torch export and the downstream splice, on
tiny random GPT-NeoX, GPT-2, Llama, Qwen2, Mistral and Gemma-2 models: each
hook's rows equal the model's own hidden states or a hook on the module
the test names, the four add up as TransformerLens defines them, the
forward stops at the hook, and every wrong name is refused in one line.
The JAX models (`lm.py`) give the same at every hook, and the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import downstream
from sae_jax import export
from sae_jax import hooks
from sae_jax import lm as lm_jax
from tests import tiny_lm

FAMILIES = ("gpt_neox",) + tiny_lm.FAMILIES
JAX_FAMILIES = tuple(f for f in FAMILIES if lm_jax.family_of(f) is not None)
# Config options the families' defaults leave out, each in a model of its own.
VARIANTS = {
    "llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8), attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True)),
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=3,
                                   max_window_layers=1)),
    "gpt2_scaled": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True,
                                 activation_function="gelu")),
    "gemma2_capped": ("gemma2", dict(sliding_window=3, attn_logit_softcapping=0.005,
                                     query_pre_attn_scalar=1,
                                     final_logit_softcapping=0.5)),
}
POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "ln2_normalized")
# The module whose output is each point of block N, written out per family
# (the library finds it another way: hooks.SUBMODULES on the block list).
# ln2_normalized, TransformerLens' ln2.hook_normalized, is checked through
# the MLP's input: the MLP's norm's weight and bias (NORM) applied to it.
MODULE = {
    "gpt_neox": {"attn_out": "gpt_neox.layers.{}.attention", "mlp_out": "gpt_neox.layers.{}.mlp"},
    "gpt2": {"attn_out": "transformer.h.{}.attn", "mlp_out": "transformer.h.{}.mlp"},
    "gemma2": {"attn_out": "model.layers.{}.post_attention_layernorm",
               "mlp_out": "model.layers.{}.post_feedforward_layernorm"},
    **{f: {"attn_out": "model.layers.{}.self_attn", "mlp_out": "model.layers.{}.mlp"}
       for f in ("llama", "qwen2", "mistral")},
}
NORM = {"gpt_neox": "gpt_neox.layers.{}.post_attention_layernorm", "gpt2": "transformer.h.{}.ln_2",
        "gemma2": "model.layers.{}.pre_feedforward_layernorm",
        **{f: "model.layers.{}.post_attention_layernorm" for f in ("llama", "qwen2", "mistral")}}
IDS = np.random.default_rng(0).integers(2, 2 + len(tiny_lm.WORDS), (3, 9))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("families")
  out = {}
  for family in FAMILIES:
    (root / family).mkdir()
    out[family] = str(tiny_lm.build(root / family, layers=2, random_norms=True)
                      if family == "gpt_neox"
                      else tiny_lm.build_causal(root / family, family))
  (root / "bert").mkdir()
  out["bert"] = str(tiny_lm.build_bert(root / "bert"))
  for name, (family, overrides) in VARIANTS.items():
    (root / name).mkdir()
    out[name] = str(tiny_lm.build_causal(root / name, family, **overrides))
  return out


def hooked(model, hook):
  return export.HookedModel(export.ExportConfig(model=model, hook=hook, backend="torch"))


def direct(model_dir, ids):
  """The causal LM's hidden states, the outputs of the modules MODULE names,
  each MLP's input ("mlp_in"), its norm's input ("ln2_in") and the norm's
  (scale, shift, eps) ("ln2_affine")."""
  import torch
  import transformers
  lm = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  outputs, handles = {"logits": None}, []
  for point, path in MODULE[lm.config.model_type].items():
    for layer in range(lm.config.num_hidden_layers):
      keep = lambda m, i, o, key=(point, layer): outputs.__setitem__(
          key, (o[0] if isinstance(o, tuple) else o).numpy())
      handles.append(lm.get_submodule(path.format(layer)).register_forward_hook(keep))
      if point == "mlp_out":
        mlp = path.format(layer).replace("post_feedforward_layernorm", "mlp")
        keep_in = lambda m, i, key=("mlp_in", layer): outputs.__setitem__(key, i[0].numpy())
        handles.append(lm.get_submodule(mlp).register_forward_pre_hook(keep_in))
        norm = lm.get_submodule(NORM[lm.config.model_type].format(layer))
        keep_norm_in = lambda m, i, key=("ln2_in", layer): outputs.__setitem__(key, i[0].numpy())
        handles.append(norm.register_forward_pre_hook(keep_norm_in))
        w, b = norm.weight.detach().numpy(), getattr(norm, "bias", None)
        outputs["ln2_affine", layer] = (
            1 + w if lm.config.model_type == "gemma2" else w,
            0 if b is None else b.detach().numpy(),
            getattr(norm, "variance_epsilon", getattr(norm, "eps", None)))
  with torch.inference_mode():
    out = lm(input_ids=torch.as_tensor(ids), output_hidden_states=True)
  for handle in handles:
    handle.remove()
  outputs["logits"] = out.logits.numpy()
  return [h.numpy() for h in out.hidden_states], outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_hook_is_the_models_own_activation_there(models, family):
  hidden, module_out = direct(models[family], IDS)
  got = {(point, layer): hooked(models[family], hooks.name(layer, point))(IDS)
         for point in POINTS for layer in (0, 1)}
  for layer in (0, 1):
    np.testing.assert_array_equal(got["resid_pre", layer], hidden[layer])
    for point in ("attn_out", "mlp_out"):
      np.testing.assert_array_equal(got[point, layer], module_out[point, layer])
    check_ln2(got["ln2_normalized", layer], module_out, layer, family)
    # TransformerLens' residual stream: each block adds its attention's and
    # its MLP's outputs (GPT-NeoX's parallel residual too; Gemma-2's after
    # their norms), and the top block's output is before the final norm.
    np.testing.assert_allclose(got["resid_post", layer] - got["resid_pre", layer],
                               got["attn_out", layer] + got["mlp_out", layer],
                               rtol=1e-5, atol=1e-5 * np.abs(got["resid_post", layer]).max())
  np.testing.assert_array_equal(got["resid_post", 0], hidden[1])
  np.testing.assert_array_equal(got["resid_post", 0], got["resid_pre", 1])
  assert not np.allclose(got["resid_post", 1], hidden[2], atol=1e-3)  # the final norm


def close(got, want, rtol=1e-4):
  """Equal within rtol relative to the array's scale."""
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def check_ln2(n, module_out, layer, family):
  """ln2.hook_normalized is the MLP's norm's input normalized as
  TransformerLens' LayerNorm (centred, over sqrt(variance + eps)) or RMSNorm
  (over sqrt(mean square + eps)) normalizes it, in NumPy float64; and the
  norm's weight and bias make it the MLP's input."""
  n, (scale, shift, eps) = np.asarray(n), module_out["ln2_affine", layer]
  x = module_out["ln2_in", layer].astype(np.float64)
  if family.startswith(("gpt_neox", "gpt2")):  # LayerNorm
    x = x - x.mean(-1, keepdims=True)
  close(n, x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + eps))
  close(n * scale + shift, module_out["mlp_in", layer])


@pytest.mark.parametrize("family", JAX_FAMILIES + tuple(VARIANTS))
def test_the_jax_model_gives_each_hook_and_the_logits_as_transformers(models, family):
  hidden, module_out = direct(models[family], IDS)
  config, params = lm_jax.load(models[family])
  names = tuple(hooks.name(layer, point) for layer in (0, 1) for point in POINTS)
  got = dict(zip(names, lm_jax.hooks_at(params, config, IDS, names)))
  for layer in (0, 1):
    close(got[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    for point in ("attn_out", "mlp_out"):
      close(got[hooks.name(layer, point)], module_out[point, layer])
    check_ln2(got[hooks.name(layer, "ln2_normalized")], module_out, layer, family)
  close(got["blocks.0.hook_resid_post"], hidden[1])
  close(got["blocks.1.hook_resid_post"], got["blocks.1.hook_resid_pre"]
        + got["blocks.1.hook_attn_out"] + got["blocks.1.hook_mlp_out"])
  logits = np.asarray(lm_jax.logits(params, config, IDS))
  close(logits, module_out["logits"])
  # A splice at a point inside a block: the identity changes nothing, and
  # zeroing it changes what follows.
  same = lm_jax.logits_with(params, config, IDS, "blocks.0.hook_attn_out", _identity)
  close(np.asarray(same), logits, 1e-6)
  zero = lm_jax.logits_with(params, config, IDS, "blocks.0.hook_attn_out", jnp.zeros_like)
  assert not np.allclose(np.asarray(zero), logits, atol=1e-3)


def _identity(x):
  return x


def test_the_forward_stops_at_the_hook(models):
  for point in POINTS:
    model = hooked(models["llama"], hooks.name(0, point))
    ran = []
    model.model.layers[1].register_forward_pre_hook(lambda *_: ran.append(1))
    mlp = model.model.layers[0].mlp
    later = {"resid_pre": model.model.layers[0].self_attn, "attn_out": mlp,
             "mlp_out": model.model.layers[1], "resid_post": model.model.layers[1],
             "ln2_normalized": mlp}[point]
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
    ("blocks.0.hook_normalized_resid_post", {"backend": "jax", "model": "bert"},
     ["--backend jax", "is a 'bert' model; sae_jax runs gemma2, gpt2, gpt_neox, llama, mistral, "
      "qwen2 in JAX", "export it with --backend torch"]),
    ("blocks.2.hook_attn_out", {"backend": "jax"}, ["needs block 2", "has blocks 0..1"]),
])
def test_wrong_hooks_are_refused_in_one_line(models, hook, config, words):
  with pytest.raises(ValueError) as error:
    model = models[config.pop("model", "gpt2")]
    hooked_config = dict(model=model, hook=hook, backend="torch") | config
    kind = export.JaxHookedModel if config.get("backend") == "jax" else export.HookedModel
    kind(export.ExportConfig(**hooked_config))
  message = str(error.value)
  assert "\n" not in message and all(w in message for w in words), message


def test_inside_a_block_of_an_unknown_family_and_of_an_encoder_is_refused():
  with pytest.raises(ValueError, match=r"known only for gemma2, gpt2, gpt_neox, llama, mistral, "
                                       r"qwen2; its 'blocks.3.hook_resid_pre' and"):
    hooks.check_architecture("blocks.3.hook_attn_out", "m", False, "opt")
  hooks.check_architecture("blocks.3.hook_resid_pre", "m", False, "opt")
  with pytest.raises(ValueError, match=r"encoder \(BERT\), whose export reads only block "
                                       r"outputs, 'blocks.1.hook_normalized_resid_post'"):
    hooks.check_architecture("blocks.1.hook_mlp_out", "m", True, "bert")
  assert hooks.hidden_states_index("blocks.4.hook_resid_pre") == 4


def test_on_an_accelerator_the_families_jax_runs_default_to_jax(models, monkeypatch):
  import jax
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for family in JAX_FAMILIES:
    assert export.default_backend(models[family]) == "jax", family
    for point in POINTS:
      config = export.ExportConfig(model=models[family], hook=hooks.name(1, point))
      assert config.backend == "jax", (family, point)
  assert export.default_backend(models["bert"]) == "torch"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert export.default_backend(models["llama"]) == "torch"


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
  # --stream runs the Llama in JAX to the same hook, and splices there.
  assert cli(*args, "--stream", "--stream-contexts", 8, "--out", tmp_path / "stream") == 0
  o = outputs(tmp_path / "stream")
  assert o["cfg"]["metadata"]["hook_name"] == hook and o["config"].export.backend == "jax"
  assert o["summary"]["downstream_kl"] > 0


def test_weights_load_from_bfloat16_and_from_the_shards_an_index_names(models, tmp_path):
  """Hub checkpoints of these families are bfloat16, often sharded beside
  a copy in another layout (Mistral's consolidated.safetensors)."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
  model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="4KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  shards = sorted(tmp_path.glob("model-*.safetensors"))
  assert len(shards) > 1
  import safetensors.torch
  safetensors.torch.save_file({"model.norm.weight": torch.zeros(16)},  # not in the index
                              tmp_path / "consolidated.safetensors")
  from sae_jax import weights
  assert weights.files(tmp_path) == shards
  config, params = lm_jax.load(str(tmp_path))
  want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers"][1]["q_w"], want)
  np.testing.assert_array_equal(params["final_norm_w"],
                                model.model.norm.weight.detach().float().numpy())
  assert lm_jax.hook_at(params, config, IDS, "blocks.0.hook_mlp_out").dtype == np.float32


@pytest.mark.parametrize("config, windows", [
    # Qwen2 written before layer_types: windows from max_window_layers on.
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2),
     (None, None, 8, 8)),
    (dict(model_type="qwen2", sliding_window=8), (None,) * 4),  # use_sliding_window is False
    (dict(model_type="mistral"), (4096,) * 4),  # transformers' default window
    (dict(model_type="mistral", sliding_window=None), (None,) * 4),
    (dict(model_type="llama", sliding_window=8), (None,) * 4),  # Llama has none
])
def test_sliding_windows_are_read_as_transformers_reads_each_type(config, windows):
  from sae_jax import llama
  assert llama.windows(dict(config, num_hidden_layers=4)) == windows


DROP = object()  # a key taken out of the config


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0,
                               low_freq_factor=1.0, high_freq_factor=4.0),
          max_position_embeddings=None),
     r"the llama3 rotary embedding needs original_max_position_embeddings"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=8.0)),
     r"rope type must be one of \('default', 'linear', 'llama3'\); .* 'yarn'"),
    (dict(vocab_size=DROP), r"its config.json lacks or mistypes a field its 'llama' model "
                            r"needs \(KeyError\('vocab_size'\)\)"),
])
def test_configs_jax_cannot_run_are_refused_in_one_line(models, change, message):
  import json
  config = json.loads((tiny_lm.pathlib.Path(models["llama"]) / "config.json").read_text())
  changed = {k: v for k, v in {**config, **change}.items() if v is not DROP}
  with pytest.raises(ValueError, match=message) as error:
    lm_jax.config_from_json(changed, "m")
  assert "\n" not in str(error.value)
  # Llama 3's trained context falls back to max_position_embeddings, as in transformers.
  rope = dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0)
  got = lm_jax.config_from_json({**config, "rope_parameters": rope,
                                 "max_position_embeddings": 64}, "m")
  assert dict(got.rope[3])["original_max_position_embeddings"] == 64


def test_gpt2_contexts_past_its_positions_are_refused(models):
  config, params = lm_jax.load(models["gpt2"])
  with pytest.raises(ValueError, match=r"contexts of 129 tokens are longer than the model's 128 "
                                       r"positions"):
    lm_jax.hook_at(params, config, np.zeros((1, 129), np.int32), "blocks.0.hook_mlp_out")
  with pytest.raises(ValueError, match="hooks must name at least one hook"):
    lm_jax.hooks_at(params, config, IDS, [])
  with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\); got "
                                       r"'fp8'"):
    lm_jax.hook_at(params, config, IDS, "blocks.0.hook_mlp_out", dtype="fp8")
