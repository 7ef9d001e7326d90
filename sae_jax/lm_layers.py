"""The pieces the JAX language models (`neox.py`, `gpt2.py`, `llama.py`,
`gemma2.py`) are built of, each as transformers computes it: norms, linear maps, rotary
embeddings and causal attention.

Norms, softmax and rotary embeddings run in float32; `dtype` (float32 or
bfloat16) is the dtype of the matmuls' inputs, which accumulate in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "bfloat16")
# transformers' ACT2FN names of the activations the configs use.
GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_fast": True,
                    "gelu_pytorch_tanh": True}
ROPE_TYPES = ("default", "linear", "llama3")


def along_last(v, x):
  """Vector v shaped to broadcast along x's last axis."""
  return jnp.reshape(v, (1,) * (x.ndim - 1) + (-1,))


def layer_norm(x, w, b, eps, normalized=None):
  """LayerNorm; `normalized` (a hook: TransformerLens' hook_normalized) maps
  the normalized x before the weight and bias are applied."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  n = (x - mean) * jax.lax.rsqrt(var + eps)
  n = n if normalized is None else normalized(n)
  return n * along_last(w, x) + along_last(b, x)


def rms_norm(x, w, eps, offset=0.0, normalized=None):
  """Llama's RMSNorm (Gemma's scales by offset + w, offset 1); `normalized`
  as for `layer_norm`."""
  x = x.astype(jnp.float32)
  n = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  n = n if normalized is None else normalized(n)
  return n * (offset + along_last(w, x))


def linear(x, w, b, dtype):
  """x @ w (+ b): w is [in, out]; b may be None."""
  y = jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return y if b is None else y + along_last(b, y)


def activation(name: str, what: str):
  """transformers' ACT2FN[name] for the activations our models use; one
  line naming the config field `what` otherwise."""
  if name in GELU_APPROXIMATE:
    return lambda x: jax.nn.gelu(x, approximate=GELU_APPROXIMATE[name])
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"{what} must be one of {sorted(GELU_APPROXIMATE) + ['silu']}; got {name!r}")


def rope(d: dict, head_size: int, default_fraction: float = 1.0,
         default_theta: float = 10000.0) -> tuple:
  """The rotary embedding a config.json asks for, as hashable numbers:
  (rotated dims, theta, rope type, its parameters as sorted pairs). Reads the
  new style (`rope_parameters`) and the old (`rope_theta`, `rope_scaling`,
  `partial_rotary_factor`); one line for a type we do not compute."""
  params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  kind = params.pop("rope_type", params.pop("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope type must be one of {ROPE_TYPES}; the model's config.json has "
                     f"{kind!r}")
  fraction = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", default_fraction))
  theta = float(params.pop("rope_theta", d.get("rope_theta", default_theta)))
  if kind == "llama3":  # transformers' fallbacks for the context it was trained on
    params.setdefault("original_max_position_embeddings", d.get(
        "original_max_position_embeddings", d.get("max_position_embeddings")))
  keep = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}.get(kind, ())
  missing = [k for k in keep if params.get(k) is None]
  if missing:
    raise ValueError(f"the {kind} rotary embedding needs {', '.join(missing)} in the model's "
                     f"config.json; it has {sorted(params)}")
  return (int(head_size * fraction), theta, kind,
          tuple(sorted((k, float(params[k])) for k in keep)))


def rotary_tables(rope_spec: tuple, length: int):
  """cos, sin [L, rotated dims], as transformers' rotary embedding of that
  type computes them (`modeling_rope_utils`)."""
  dim, theta, kind, params = rope_spec
  params = dict(params)
  inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  if kind == "linear":
    inv_freq = inv_freq / np.float32(params["factor"])
  elif kind == "llama3":
    factor, old = params["factor"], params["original_max_position_embeddings"]
    low, high = old / params["low_freq_factor"], old / params["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - params["low_freq_factor"]) / (
        params["high_freq_factor"] - params["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high) & ~(wavelen > low)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
  angles = np.concatenate([freqs, freqs], axis=-1)
  return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def rotate(x, cos, sin):
  """The rotary embedding on the first cos.shape[-1] dims of x [B, L, H, hs]
  (rotate_half: the two halves of those dims pair up)."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def attention(q, k, v, scale: float, dtype, window=None, softcap=None):
  """Causal attention of q [B, L, H, hs] over k, v [B, L, KV, hs] (KV divides
  H: grouped queries), each query seeing at most `window` positions, itself
  included, where a window is given (transformers' sliding window). With
  `softcap` (Gemma-2's), the scores are softcap · tanh(scores / softcap)
  before the mask and the softmax. Returns [B, L, H·hs] float32."""
  B, L, H, hs = q.shape
  if softcap is None:
    local = None if window is None else (window - 1, 0)
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       scale=scale, is_causal=True, local_window_size=local)
    return out.astype(jnp.float32).reshape(B, L, H * hs)
  groups = H // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32) * scale
  scores = softcap * jnp.tanh(scores / softcap)
  query, key = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
  seen = (key <= query) & (True if window is None else key > query - window)
  weights = jax.nn.softmax(jnp.where(seen[None, None], scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v.astype(dtype),
                   preferred_element_type=jnp.float32)
  return out.reshape(B, L, H * hs)
