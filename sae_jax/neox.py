"""GPT-NeoX (Pythia) in JAX: transformers' GPTNeoXForCausalLM forward pass,
with no torch.

Weights are read straight from an HF model directory or hub id
(`config.json` and `*.safetensors`, through `safetensors.numpy`). Three
entry points, all jit-compatible and batched over contexts:

    resid_at(params, config, tokens_BxL, layer)   # output of block `layer`
    logits(params, config, tokens_BxL)
    logits_with(params, config, tokens_BxL, layer, fn, fn_args)   # block output -> fn(it, *fn_args)

`layer` follows `blocks.N.hook_resid_post` (`hooks.hook_layer`): the raw
output of block N, before the final layer norm even for the top block; only
blocks 0..N are computed. Layer norms, softmax and rotary embeddings run in
float32; `dtype` (float32 or bfloat16) is the dtype of the matmuls' inputs.
"""

import dataclasses
import functools
import json
import pathlib
import typing

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "bfloat16")
# transformers' ACT2FN names for the GELUs GPT-NeoX configs use.
_GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_fast": True, "gelu_pytorch_tanh": True}


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
  """The sizes and conventions of one GPT-NeoX model (from its config.json)."""
  vocab_size: int
  hidden_size: int
  n_layers: int
  n_heads: int
  intermediate_size: int
  rotary_pairs: int  # rotary frequencies per head: the first 2·rotary_pairs dims rotate
  rope_theta: float
  layer_norm_eps: float
  parallel_residual: bool
  gelu_approximate: bool

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.n_heads

  @classmethod
  def from_json(cls, d: dict) -> "NeoXConfig":
    """From a config.json's contents, old (`rotary_pct`) or new
    (`rope_parameters`) style, with transformers' defaults."""
    if d.get("model_type") != "gpt_neox":
      raise ValueError(f"sae_jax's JAX model is GPT-NeoX's (model_type 'gpt_neox'); got "
                       f"{d.get('model_type')!r}")
    act = d.get("hidden_act", "gelu")
    if act not in _GELU_APPROXIMATE:
      raise ValueError(f"hidden_act must be one of {sorted(_GELU_APPROXIMATE)}; got {act!r}")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
      raise ValueError(f"only the default rotary embedding is supported; got "
                       f"{rope or d.get('rope_scaling')}")
    fraction = rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25))
    theta = rope.get("rope_theta", d.get("rotary_emb_base", 10000.0))
    head_size = d["hidden_size"] // d["num_attention_heads"]
    # transformers: inv_freq over arange(0, int(head_size * fraction), 2).
    pairs = len(range(0, int(head_size * fraction), 2))
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
               intermediate_size=d["intermediate_size"], rotary_pairs=pairs,
               rope_theta=float(theta), layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
               parallel_residual=bool(d.get("use_parallel_residual", True)),
               gelu_approximate=_GELU_APPROXIMATE[act])


def model_dir(model: str, revision: typing.Optional[str] = None,
              patterns=("*.json", "*.safetensors")) -> pathlib.Path:
  """`model` itself if it is a directory; else the hub id's files matching
  `patterns`, downloaded or found in the Hugging Face cache (HF_HUB_OFFLINE=1:
  the cache only). Raises OSError when neither has them."""
  path = pathlib.Path(model)
  if path.is_dir():
    return path
  import huggingface_hub  # noqa: PLC0415 (only for hub ids)
  return pathlib.Path(huggingface_hub.snapshot_download(
      model, revision=revision, allow_patterns=list(patterns)))


def load_config(model: str, revision: typing.Optional[str] = None) -> NeoXConfig:
  """The config of a GPT-NeoX from a directory or hub id (config.json only)."""
  directory = model_dir(model, revision, ("config.json",))
  return NeoXConfig.from_json(json.loads((directory / "config.json").read_text()))


def load(model: str, revision: typing.Optional[str] = None) -> tuple[NeoXConfig, dict]:
  """(config, params) of a GPT-NeoX from a directory or hub id, as float32
  NumPy arrays; linear weights are stored [in, out]."""
  import safetensors.numpy  # noqa: PLC0415
  directory = model_dir(model, revision)
  # config.json is read directly: transformers' AutoConfig imports torch.
  config = load_config(str(directory))
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{directory} holds no *.safetensors weights (save the model with "
                            "save_pretrained(..., safe_serialization=True))")
  tensors = {}
  for file in files:
    tensors.update(safetensors.numpy.load_file(file))
  tensors = {name.removeprefix("gpt_neox."): value for name, value in tensors.items()}

  def get(name, transpose=False):
    if name not in tensors:
      raise KeyError(f"{directory}: weight {name!r} is missing")
    value = np.asarray(tensors[name], np.float32)
    return value.T if transpose else value

  def layer(i):
    p = f"layers.{i}."
    out = {"ln1_w": get(p + "input_layernorm.weight"), "ln1_b": get(p + "input_layernorm.bias"),
           "ln2_w": get(p + "post_attention_layernorm.weight"),
           "ln2_b": get(p + "post_attention_layernorm.bias"),
           "qkv_w": get(p + "attention.query_key_value.weight", True),
           "out_w": get(p + "attention.dense.weight", True),
           "fc_in_w": get(p + "mlp.dense_h_to_4h.weight", True),
           "fc_in_b": get(p + "mlp.dense_h_to_4h.bias"),
           "fc_out_w": get(p + "mlp.dense_4h_to_h.weight", True),
           "fc_out_b": get(p + "mlp.dense_4h_to_h.bias")}
    zeros = lambda n: np.zeros(n, np.float32)  # attention_bias=False configs have none
    out["qkv_b"] = tensors.get(p + "attention.query_key_value.bias", zeros(3 * config.hidden_size))
    out["out_b"] = tensors.get(p + "attention.dense.bias", zeros(config.hidden_size))
    return out

  params = {"embed": get("embed_in.weight"),
            "layers": [layer(i) for i in range(config.n_layers)],
            "final_ln_w": get("final_layer_norm.weight"), "final_ln_b": get("final_layer_norm.bias"),
            "unembed": get("embed_out.weight", True)}
  return config, params


def _last(v, x):
  """Vector v shaped to broadcast along x's last axis."""
  return jnp.reshape(v, (1,) * (x.ndim - 1) + (-1,))


def _layer_norm(x, w, b, eps):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * _last(w, x) + _last(b, x)


def _linear(x, w, b, dtype):
  y = jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return y + _last(b, y)


def _rotary(config: NeoXConfig, length: int):
  """cos, sin [L, 2·pairs], as transformers' default rotary embedding."""
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, 2 * config.rotary_pairs, 2, dtype=np.float32)
                                         / np.float32(2 * config.rotary_pairs))
  freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
  angles = np.concatenate([freqs, freqs], axis=-1)
  return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def _rotate(x, cos, sin):
  """Rotary embedding on the first cos.shape[-1] dims of x [B, L, H, hs]."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def _attention(p, x, config: NeoXConfig, rotary, dtype):
  B, L, _ = x.shape
  H, hs = config.n_heads, config.head_size
  qkv = _linear(x, p["qkv_w"], p["qkv_b"], dtype).reshape(B, L, H, 3 * hs)
  q, k, v = qkv[..., :hs], qkv[..., hs:2 * hs], qkv[..., 2 * hs:]
  q, k = _rotate(q, *rotary), _rotate(k, *rotary)
  out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                     scale=hs ** -0.5, is_causal=True).astype(jnp.float32)
  return _linear(out.reshape(B, L, H * hs), p["out_w"], p["out_b"], dtype)


def _mlp(p, x, config: NeoXConfig, dtype):
  h = jax.nn.gelu(_linear(x, p["fc_in_w"], p["fc_in_b"], dtype),
                  approximate=config.gelu_approximate)
  return _linear(h, p["fc_out_w"], p["fc_out_b"], dtype)


def _block(p, x, config: NeoXConfig, rotary, dtype):
  eps = config.layer_norm_eps
  attn = _attention(p, _layer_norm(x, p["ln1_w"], p["ln1_b"], eps), config, rotary, dtype)
  if config.parallel_residual:
    return x + attn + _mlp(p, _layer_norm(x, p["ln2_w"], p["ln2_b"], eps), config, dtype)
  x = x + attn
  return x + _mlp(p, _layer_norm(x, p["ln2_w"], p["ln2_b"], eps), config, dtype)


def _check(config: NeoXConfig, tokens_BxL, layer, dtype):
  if np.ndim(tokens_BxL) != 2:
    raise ValueError(f"tokens must have shape [contexts, length]; got {np.shape(tokens_BxL)}")
  if layer is not None and not (isinstance(layer, int) and 0 <= layer < config.n_layers):
    raise ValueError(f"layer must be an int in [0, {config.n_layers - 1}]; got {layer!r}")
  if jnp.dtype(dtype).name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")


def _blocks(params, config: NeoXConfig, tokens_BxL, last: int, dtype):
  """The outputs of blocks 0..last (a list of [B, L, D] float32)."""
  x = jnp.asarray(params["embed"])[tokens_BxL].astype(jnp.float32)
  rotary = _rotary(config, tokens_BxL.shape[1])
  outputs = []
  for i in range(last + 1):
    x = _block(params["layers"][i], x, config, rotary, dtype)
    outputs.append(x)
  return outputs


def _head(params, config: NeoXConfig, x, first: int, tokens_BxL, dtype):
  """Blocks first.. on x, then the final layer norm and the unembedding."""
  rotary = _rotary(config, tokens_BxL.shape[1])
  for i in range(first, config.n_layers):
    x = _block(params["layers"][i], x, config, rotary, dtype)
  x = _layer_norm(x, params["final_ln_w"], params["final_ln_b"], config.layer_norm_eps)
  return jnp.matmul(x.astype(dtype), jnp.asarray(params["unembed"]).astype(dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "layer", "dtype"))
def resid_at(params, config: NeoXConfig, tokens_BxL, layer: int, dtype="float32"):
  """The residual stream after block `layer` ([B, L, D] float32)."""
  _check(config, tokens_BxL, layer, dtype)
  return _blocks(params, config, tokens_BxL, layer, jnp.dtype(dtype))[-1]


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def logits(params, config: NeoXConfig, tokens_BxL, dtype="float32"):
  """Next-token logits [B, L, V] (float32)."""
  _check(config, tokens_BxL, None, dtype)
  return _head(params, config, params["embed"][tokens_BxL].astype(jnp.float32), 0, tokens_BxL,
               jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("config", "layer", "fn", "dtype"))
def logits_with(params, config: NeoXConfig, tokens_BxL, layer: int,
                fn: typing.Callable[..., jax.Array], fn_args=(), dtype="float32"):
  """Logits with the residual after block `layer` replaced by fn(it, *fn_args)
  ([B, L, D] -> [B, L, D]; e.g. an SAE's reconstruction). `fn` is static, so
  it must be hashable and is best kept the same between calls; arrays it
  needs (an SAE's parameters) go in `fn_args`, which are traced."""
  _check(config, tokens_BxL, layer, dtype)
  x = _blocks(params, config, tokens_BxL, layer, jnp.dtype(dtype))[-1]
  return _head(params, config, fn(x, *fn_args), layer + 1, tokens_BxL, jnp.dtype(dtype))

