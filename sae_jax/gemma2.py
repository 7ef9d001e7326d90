"""Gemma-2 in JAX: transformers' Gemma2ForCausalLM, as one family of `lm.py`'s
models (config, weights, embedding, block and head).

What sets it apart from the Llama family (`llama.py`): the embedding is
scaled by sqrt(D); its RMSNorms scale by 1 + w; each block has four of them,
the attention's and the MLP's outputs being normalized before they are
added (so attn_out and mlp_out are after those norms, as TransformerLens and
`hooks.py` have them); attention scores are scaled by
query_pre_attn_scalar^-1/2 and soft-capped, as are the logits; layers
alternate a sliding window with full attention (`layer_types`); the
unembedding is tied.
"""

import dataclasses
import functools
import math
import typing

import jax.numpy as jnp

from sae_jax import llama
from sae_jax import lm_layers as layers

MODEL_TYPES = ("gemma2",)
PREFIX = "model."  # taken off the weights' names
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm")


@dataclasses.dataclass(frozen=True)
class Gemma2Config(llama.LlamaConfig):
  """The sizes and conventions of one Gemma-2 model (config.json): the Llama
  family's, and its own scale and soft caps."""
  attention_scale: float = 1.0
  attention_softcap: typing.Optional[float] = None
  logit_softcap: typing.Optional[float] = None

  @classmethod
  def from_json(cls, d: dict) -> "Gemma2Config":
    """With transformers' defaults where a key is missing (head_dim 256,
    soft caps 50 and 30, a window of 4096 on every other layer); a soft cap
    given as null is none."""
    n = d["num_hidden_layers"]
    kinds = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(n)]
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    base = llama.LlamaConfig.from_json({"sliding_window": 4096, "head_dim": 256, **d,
                                        "hidden_act": act, "layer_types": kinds,
                                        "tie_word_embeddings": True})
    cap = lambda key, default: None if d.get(key, default) is None else float(d.get(key, default))
    return cls(**dataclasses.asdict(base),
               attention_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
               attention_softcap=cap("attn_logit_softcapping", 50.0),
               logit_softcap=cap("final_logit_softcapping", 30.0))


Config = Gemma2Config  # what lm.py reads a config.json into


def params(get, config: Gemma2Config) -> dict:
  """The weights, by transformers' names (`get(name, transpose, optional)`:
  linear weights are stored [in, out])."""
  def layer(i):
    p = f"layers.{i}."
    norms = {name: get(p + name + ".weight") for name in NORMS}
    return {**norms, **llama.projections(get, p)}

  embed_ = get("embed_tokens.weight")
  return {"embed": embed_, "layers": [layer(i) for i in range(config.n_layers)],
          "final_norm_w": get("norm.weight"), "unembed": embed_.T}


def embed(params, config: Gemma2Config, tokens_BxL):
  scale = jnp.float32(math.sqrt(config.hidden_size))  # transformers' normalizer, in float32
  return jnp.asarray(params["embed"])[tokens_BxL].astype(jnp.float32) * scale


def context(config: Gemma2Config, length: int):
  """What every block of a forward over `length` positions shares."""
  return layers.rotary_tables(config.rope, length)


def _norm(x, w, config, normalized=None):
  return layers.rms_norm(x, w, config.rms_norm_eps, offset=1.0, normalized=normalized)


def block(p, x, config: Gemma2Config, rotary, layer: int, dtype, edit):
  """Block `layer` on the residual stream x; edit(point, value) -> value at
  "attn_out", "ln2_normalized" (the MLP's norm, before its weight) and
  "mlp_out" (after their post-norms)."""
  attn = llama.attention(p, _norm(x, p["input_layernorm"], config), config, rotary,
                         config.windows[layer], dtype, config.attention_softcap,
                         config.attention_scale)
  x = x + edit("attn_out", _norm(attn, p["post_attention_layernorm"], config))
  h = _norm(x, p["pre_feedforward_layernorm"], config, functools.partial(edit, "ln2_normalized"))
  mlp = llama.gated_mlp(p, h, config.act, dtype)
  return x + edit("mlp_out", _norm(mlp, p["post_feedforward_layernorm"], config))


def head(params, config: Gemma2Config, x, dtype):
  """The final norm, the tied unembedding and the logits' soft cap."""
  logits = layers.linear(_norm(x, params["final_norm_w"], config),
                         jnp.asarray(params["unembed"]), None, dtype)
  if config.logit_softcap is not None:
    logits = config.logit_softcap * jnp.tanh(logits / config.logit_softcap)
  return logits
