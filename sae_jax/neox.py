"""GPT-NeoX (Pythia) in JAX: transformers' GPTNeoXForCausalLM, as one family
of `lm.py`'s models (its config, weights, embedding, block and head).

With the parallel residual (Pythia's), attention and MLP both read the
block's input, and the block adds both to it: resid_post = resid_pre +
attn_out + mlp_out, as TransformerLens defines the hooks for it.
"""

import dataclasses
import functools

import jax.numpy as jnp

from sae_jax import lm_layers as layers

MODEL_TYPES = ("gpt_neox",)
PREFIX = "gpt_neox."  # taken off the weights' names


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
  """The sizes and conventions of one GPT-NeoX model (from its config.json)."""
  vocab_size: int
  hidden_size: int
  n_layers: int
  n_heads: int
  intermediate_size: int
  rope: tuple  # lm_layers.rope: (rotated dims, theta, type, parameters)
  layer_norm_eps: float
  parallel_residual: bool
  act: str
  tied: bool = False  # the unembedding is the token embedding

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.n_heads

  @classmethod
  def from_json(cls, d: dict) -> "NeoXConfig":
    """From a config.json's contents, old (`rotary_pct`, `rotary_emb_base`)
    or new (`rope_parameters`) style, with transformers' defaults."""
    act = d.get("hidden_act", "gelu")
    layers.activation(act, "hidden_act")
    head_size = d["hidden_size"] // d["num_attention_heads"]
    old = {"partial_rotary_factor": d.get("partial_rotary_factor", d.get("rotary_pct", 0.25)),
           "rope_theta": d.get("rope_theta", d.get("rotary_emb_base", 10000.0))}
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
               intermediate_size=d["intermediate_size"], rope=layers.rope({**d, **old}, head_size),
               layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
               parallel_residual=bool(d.get("use_parallel_residual", True)), act=act,
               tied=bool(d.get("tie_word_embeddings", False)))


Config = NeoXConfig  # what lm.py reads a config.json into


def params(get, config: NeoXConfig) -> dict:
  """The weights, by transformers' names (`get(name, transpose, optional)`:
  linear weights are stored [in, out])."""
  def layer(i):
    p = f"layers.{i}."
    return {"ln1_w": get(p + "input_layernorm.weight"), "ln1_b": get(p + "input_layernorm.bias"),
            "ln2_w": get(p + "post_attention_layernorm.weight"),
            "ln2_b": get(p + "post_attention_layernorm.bias"),
            "qkv_w": get(p + "attention.query_key_value.weight", True),
            "qkv_b": get(p + "attention.query_key_value.bias", False, True),
            "out_w": get(p + "attention.dense.weight", True),
            "out_b": get(p + "attention.dense.bias", False, True),
            "fc_in_w": get(p + "mlp.dense_h_to_4h.weight", True),
            "fc_in_b": get(p + "mlp.dense_h_to_4h.bias"),
            "fc_out_w": get(p + "mlp.dense_4h_to_h.weight", True),
            "fc_out_b": get(p + "mlp.dense_4h_to_h.bias")}

  embed_ = get("embed_in.weight")
  return {"embed": embed_, "layers": [layer(i) for i in range(config.n_layers)],
          "final_ln_w": get("final_layer_norm.weight"),
          "final_ln_b": get("final_layer_norm.bias"),
          "unembed": embed_.T if config.tied else get("embed_out.weight", True)}


def embed(params, config: NeoXConfig, tokens_BxL):
  return jnp.asarray(params["embed"])[tokens_BxL].astype(jnp.float32)


def context(config: NeoXConfig, length: int):
  """What every block of a forward over `length` positions shares."""
  return layers.rotary_tables(config.rope, length)


def _attention(p, x, config: NeoXConfig, rotary, dtype):
  B, L, _ = x.shape
  H, hs = config.n_heads, config.head_size
  qkv = layers.linear(x, p["qkv_w"], p["qkv_b"], dtype).reshape(B, L, H, 3 * hs)
  q, k, v = qkv[..., :hs], qkv[..., hs:2 * hs], qkv[..., 2 * hs:]
  q, k = layers.rotate(q, *rotary), layers.rotate(k, *rotary)
  return layers.linear(layers.attention(q, k, v, hs ** -0.5, dtype), p["out_w"], p["out_b"],
                       dtype)


def _mlp(p, x, config: NeoXConfig, dtype):
  h = layers.activation(config.act, "hidden_act")(
      layers.linear(x, p["fc_in_w"], p["fc_in_b"], dtype))
  return layers.linear(h, p["fc_out_w"], p["fc_out_b"], dtype)


def block(p, x, config: NeoXConfig, rotary, layer: int, dtype, edit):
  """Block `layer` on the residual stream x; edit(point, value) -> value at
  "attn_out", "ln2_normalized" (the MLP's norm, before its weight) and
  "mlp_out"."""
  eps = config.layer_norm_eps
  ln2 = functools.partial(edit, "ln2_normalized")
  attn = edit("attn_out", _attention(p, layers.layer_norm(x, p["ln1_w"], p["ln1_b"], eps),
                                     config, rotary, dtype))
  if config.parallel_residual:
    mlp = _mlp(p, layers.layer_norm(x, p["ln2_w"], p["ln2_b"], eps, ln2), config, dtype)
    return x + attn + edit("mlp_out", mlp)
  x = x + attn
  h = layers.layer_norm(x, p["ln2_w"], p["ln2_b"], eps, ln2)
  return x + edit("mlp_out", _mlp(p, h, config, dtype))


def head(params, config: NeoXConfig, x, dtype):
  """The final layer norm and the unembedding: logits [B, L, V] float32."""
  x = layers.layer_norm(x, params["final_ln_w"], params["final_ln_b"], config.layer_norm_eps)
  return layers.linear(x, jnp.asarray(params["unembed"]), None, dtype)
