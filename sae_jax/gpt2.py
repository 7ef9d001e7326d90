"""GPT-2 in JAX: transformers' GPT2LMHeadModel, as one family of `lm.py`'s
models (its config, weights, embedding, block and head).

Its Conv1D weights are stored [in, out] already; the unembedding is the
token embedding (tied, unless the config says not), and learned position
embeddings are added to the token's.
"""

import dataclasses
import functools

import jax.numpy as jnp

from sae_jax import lm_layers as layers

MODEL_TYPES = ("gpt2",)
PREFIX = "transformer."  # taken off the weights' names


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The sizes and conventions of one GPT-2 model (from its config.json)."""
  vocab_size: int
  hidden_size: int
  n_layers: int
  n_heads: int
  layer_norm_eps: float
  act: str
  scale_attn_weights: bool
  scale_by_layer: bool  # scale_attn_by_inverse_layer_idx
  n_positions: int  # the learned positions: the longest context
  tied: bool  # the unembedding is the token embedding

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.n_heads

  @classmethod
  def from_json(cls, d: dict) -> "GPT2Config":
    act = d.get("activation_function", "gelu_new")
    layers.activation(act, "activation_function")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["n_embd"], n_layers=d["n_layer"],
               n_heads=d["n_head"], layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
               act=act, scale_attn_weights=bool(d.get("scale_attn_weights", True)),
               scale_by_layer=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
               n_positions=d.get("n_positions", 1024),
               tied=bool(d.get("tie_word_embeddings", True)))


Config = GPT2Config  # what lm.py reads a config.json into


def params(get, config: GPT2Config) -> dict:
  """The weights, by transformers' names (`get(name, transpose, optional)`)."""
  def layer(i):
    p = f"h.{i}."
    return {"ln1_w": get(p + "ln_1.weight"), "ln1_b": get(p + "ln_1.bias"),
            "ln2_w": get(p + "ln_2.weight"), "ln2_b": get(p + "ln_2.bias"),
            "qkv_w": get(p + "attn.c_attn.weight"), "qkv_b": get(p + "attn.c_attn.bias"),
            "out_w": get(p + "attn.c_proj.weight"), "out_b": get(p + "attn.c_proj.bias"),
            "fc_in_w": get(p + "mlp.c_fc.weight"), "fc_in_b": get(p + "mlp.c_fc.bias"),
            "fc_out_w": get(p + "mlp.c_proj.weight"), "fc_out_b": get(p + "mlp.c_proj.bias")}

  embed_ = get("wte.weight")
  return {"embed": embed_, "positions": get("wpe.weight"),
          "layers": [layer(i) for i in range(config.n_layers)],
          "final_ln_w": get("ln_f.weight"), "final_ln_b": get("ln_f.bias"),
          "unembed": embed_.T if config.tied else get("lm_head.weight", True)}


def embed(params, config: GPT2Config, tokens_BxL):
  L = tokens_BxL.shape[1]
  return (jnp.asarray(params["embed"])[tokens_BxL]
          + jnp.asarray(params["positions"])[None, :L]).astype(jnp.float32)


def context(config: GPT2Config, length: int):
  return None


def block(p, x, config: GPT2Config, unused, layer: int, dtype, edit):
  """Block `layer` on the residual stream x; edit(point, value) -> value at
  "attn_out", "ln2_normalized" (the MLP's norm, before its weight) and
  "mlp_out"."""
  B, L, D = x.shape
  H, hs, eps = config.n_heads, config.head_size, config.layer_norm_eps
  qkv = layers.linear(layers.layer_norm(x, p["ln1_w"], p["ln1_b"], eps), p["qkv_w"],
                      p["qkv_b"], dtype)
  q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, L, H, hs) for i in range(3))
  scale = (hs ** -0.5 if config.scale_attn_weights else 1.0) / (
      layer + 1 if config.scale_by_layer else 1)
  attn = layers.linear(layers.attention(q, k, v, scale, dtype), p["out_w"], p["out_b"], dtype)
  x = x + edit("attn_out", attn)
  h = layers.layer_norm(x, p["ln2_w"], p["ln2_b"], eps, functools.partial(edit, "ln2_normalized"))
  h = layers.activation(config.act, "activation_function")(layers.linear(
      h, p["fc_in_w"], p["fc_in_b"], dtype))
  return x + edit("mlp_out", layers.linear(h, p["fc_out_w"], p["fc_out_b"], dtype))


def head(params, config: GPT2Config, x, dtype):
  """The final layer norm and the unembedding: logits [B, L, V] float32."""
  x = layers.layer_norm(x, params["final_ln_w"], params["final_ln_b"], config.layer_norm_eps)
  return layers.linear(x, jnp.asarray(params["unembed"]), None, dtype)
