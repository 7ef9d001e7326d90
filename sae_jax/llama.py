"""The Llama family in JAX: transformers' LlamaForCausalLM, Qwen2ForCausalLM
and MistralForCausalLM, as one family of `lm.py`'s models (config, weights,
embedding, block and head).

They differ only in their configs: biases on the query, key and value maps
(Qwen2's, Llama's `attention_bias`) or the MLP (`mlp_bias`), grouped
key-value heads, a head size of their own (`head_dim`), the rotary
embedding's type (default, linear, Llama 3's), a sliding attention window
(`windows`) and
a tied unembedding. A bias is read where the weights have one.
"""

import dataclasses
import functools
import typing

import jax.numpy as jnp

from sae_jax import lm_layers as layers

MODEL_TYPES = ("llama", "mistral", "qwen2")
PREFIX = "model."  # taken off the weights' names


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The sizes and conventions of one Llama-family model (config.json)."""
  vocab_size: int
  hidden_size: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_size: int
  rope: tuple  # lm_layers.rope: (rotated dims, theta, type, parameters)
  rms_norm_eps: float
  act: str
  windows: tuple  # per layer, its sliding window (None: the whole context)
  tied: bool  # the unembedding is the token embedding

  @classmethod
  def from_json(cls, d: dict) -> "LlamaConfig":
    act = d.get("hidden_act", "silu")
    layers.activation(act, "hidden_act")
    heads, n = d["num_attention_heads"], d["num_hidden_layers"]
    head_size = d.get("head_dim") or d["hidden_size"] // heads
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], n_layers=n,
               n_heads=heads, n_kv_heads=d.get("num_key_value_heads") or heads,
               head_size=head_size, rope=layers.rope(d, head_size),
               rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), act=act,
               windows=windows(d), tied=bool(d.get("tie_word_embeddings", False)))


def windows(d: dict) -> tuple:
  """Each layer's sliding window (None: the whole context), as transformers
  5 reads each model type's config: Mistral's `sliding_window` (default
  4096) on every layer; Qwen2's only with `use_sliding_window`, on the layers
  `layer_types` names, or else those from `max_window_layers` (default 28)
  on; none for Llama; for another type (Gemma-2's), `layer_types`."""
  n, kind, window = d["num_hidden_layers"], d.get("model_type"), d.get("sliding_window")
  if kind == "llama":
    return (None,) * n
  if kind == "mistral":
    return (d.get("sliding_window", 4096),) * n
  if kind == "qwen2" and not d.get("use_sliding_window", False):
    return (None,) * n
  kinds = d.get("layer_types") or [
      "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
      for i in range(n)]
  return tuple(window if window and k == "sliding_attention" else None for k in kinds)


Config = LlamaConfig  # what lm.py reads a config.json into


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def projections(get, prefix: str) -> dict:
  """A block's linear maps (`PROJECTIONS`) as q_w, q_b, ..., down_b, weights
  [in, out] and biases where the weights have them (else None)."""
  out = {}
  for name in PROJECTIONS:
    short = name.split(".")[1].removesuffix("_proj")
    out[short + "_w"] = get(prefix + name + ".weight", True)
    out[short + "_b"] = get(prefix + name + ".bias", False, True)
  return out


def params(get, config: LlamaConfig) -> dict:
  """The weights, by transformers' names (`get(name, transpose, optional)`:
  linear weights are stored [in, out])."""
  def layer(i):
    p = f"layers.{i}."
    return {"ln1_w": get(p + "input_layernorm.weight"),
            "ln2_w": get(p + "post_attention_layernorm.weight"), **projections(get, p)}

  embed_ = get("embed_tokens.weight")
  unembed = embed_.T if config.tied else get("lm_head.weight", True)
  return {"embed": embed_, "layers": [layer(i) for i in range(config.n_layers)],
          "final_norm_w": get("norm.weight"), "unembed": unembed}


def embed(params, config: LlamaConfig, tokens_BxL):
  return jnp.asarray(params["embed"])[tokens_BxL].astype(jnp.float32)


def context(config: LlamaConfig, length: int):
  """What every block of a forward over `length` positions shares."""
  return layers.rotary_tables(config.rope, length)


def attention(p, h, config, rotary, window: typing.Optional[int], dtype, softcap=None,
              scale=None):
  """The attention of normalized h [B, L, D], through its output map (config:
  n_heads, n_kv_heads, head_size; `scale` by default head_size^-1/2)."""
  B, L, _ = h.shape
  hs = config.head_size
  q = layers.linear(h, p["q_w"], p["q_b"], dtype).reshape(B, L, config.n_heads, hs)
  k = layers.linear(h, p["k_w"], p["k_b"], dtype).reshape(B, L, config.n_kv_heads, hs)
  v = layers.linear(h, p["v_w"], p["v_b"], dtype).reshape(B, L, config.n_kv_heads, hs)
  q, k = layers.rotate(q, *rotary), layers.rotate(k, *rotary)
  out = layers.attention(q, k, v, hs ** -0.5 if scale is None else scale, dtype, window, softcap)
  return layers.linear(out, p["o_w"], p["o_b"], dtype)


def gated_mlp(p, h, act: str, dtype):
  """down(act(gate(h)) · up(h)) of normalized h."""
  gate = layers.activation(act, "hidden_act")(layers.linear(h, p["gate_w"], p["gate_b"], dtype))
  return layers.linear(gate * layers.linear(h, p["up_w"], p["up_b"], dtype), p["down_w"],
                       p["down_b"], dtype)


def block(p, x, config: LlamaConfig, rotary, layer: int, dtype, edit):
  """Block `layer` on the residual stream x; edit(point, value) -> value at
  "attn_out", "ln2_normalized" (the MLP's norm, before its weight) and
  "mlp_out"."""
  eps = config.rms_norm_eps
  x = x + edit("attn_out", attention(p, layers.rms_norm(x, p["ln1_w"], eps), config, rotary,
                                     config.windows[layer], dtype))
  h = layers.rms_norm(x, p["ln2_w"], eps, normalized=functools.partial(edit, "ln2_normalized"))
  return x + edit("mlp_out", gated_mlp(p, h, config.act, dtype))


def head(params, config: LlamaConfig, x, dtype):
  """The final RMSNorm and the unembedding: logits [B, L, V] float32."""
  x = layers.rms_norm(x, params["final_norm_w"], config.rms_norm_eps)
  return layers.linear(x, jnp.asarray(params["unembed"]), None, dtype)
