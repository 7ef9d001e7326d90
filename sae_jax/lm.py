"""Causal language models in JAX, with no torch: GPT-NeoX (`neox.py`), GPT-2
(`gpt2.py`), the Llama family (`llama.py`: Llama, Mistral, Qwen2) and
Gemma-2 (`gemma2.py`), read from transformers' files and run at
TransformerLens's hook points.

Weights come straight from an HF model directory or hub id (`config.json`
and `*.safetensors`, through `safetensors.numpy`). The entry points are
jit-compiled and batched over contexts:

    hook_at(params, config, tokens_BxL, hook)       # the activations at a hook
    hooks_at(params, config, tokens_BxL, hooks)     # at several, one forward
    logits(params, config, tokens_BxL)
    logits_with(params, config, tokens_BxL, hook, fn, fn_args)   # hook -> fn(it, *fn_args)

A hook is `blocks.N.hook_resid_pre`, `hook_attn_out`, `hook_mlp_out` or
`hook_resid_post` (`hooks.py` says what each is); only blocks 0..N are run
for it, and resid_post is the raw output of block N, before the final norm
even for the top block. Norms, softmax and rotary embeddings run in float32;
`dtype` (float32 or bfloat16) is the dtype of the matmuls' inputs.
"""

import functools
import json
import typing

import jax
import numpy as np

from sae_jax import gemma2
from sae_jax import gpt2
from sae_jax import hooks as hooks_lib
from sae_jax import llama
from sae_jax import lm_layers
from sae_jax import neox
from sae_jax import weights

FAMILIES = (neox, gpt2, llama, gemma2)
MODEL_TYPES = tuple(sorted(t for family in FAMILIES for t in family.MODEL_TYPES))
Config = typing.Union[neox.NeoXConfig, gpt2.GPT2Config, llama.LlamaConfig, gemma2.Gemma2Config]


def family_of(model_type: typing.Optional[str]):
  """The module that computes a transformers `model_type`, or None."""
  return next((f for f in FAMILIES if model_type in f.MODEL_TYPES), None)


def _family(config):
  return next(f for f in FAMILIES if type(config) is f.Config)


def config_from_json(d: dict, model: str = "the model") -> Config:
  """The config of the JAX model for a config.json's contents; one line
  naming the model types we compute where this is another."""
  family = family_of(d.get("model_type"))
  if family is None:
    raise ValueError(f"{model!r} is a {d.get('model_type')!r} model; sae_jax runs "
                     f"{', '.join(MODEL_TYPES)} in JAX")
  try:
    return family.Config.from_json(d)
  except (KeyError, TypeError) as error:
    raise ValueError(f"{model!r}: its config.json lacks or mistypes a field its "
                     f"{d.get('model_type')!r} model needs ({error!r})") from None


def load_config(model: str, revision: typing.Optional[str] = None) -> Config:
  """The config of a model from a directory or hub id (config.json only)."""
  directory = weights.model_dir(model, revision, ("config.json",))
  return config_from_json(json.loads((directory / "config.json").read_text()), model)


def load(model: str, revision: typing.Optional[str] = None) -> tuple:
  """(config, params) of a model from a directory or hub id, as float32
  NumPy arrays; linear weights are stored [in, out]."""
  directory = weights.model_dir(model, revision)
  # config.json is read directly: transformers' AutoConfig imports torch.
  config = load_config(str(directory))
  family = _family(config)
  return config, family.params(weights.float32(directory, family.PREFIX), config)


def _check(config, tokens_BxL, hooks: typing.Sequence[str], dtype) -> str:
  """Refuses bad arguments in one line; the dtype's name."""
  if np.ndim(tokens_BxL) != 2:
    raise ValueError(f"tokens must have shape [contexts, length]; got {np.shape(tokens_BxL)}")
  for hook in hooks:
    layer, point = hooks_lib.parse(hook)
    if point not in hooks_lib.POINTS or layer >= config.n_layers:
      raise ValueError(f"hook must name a point of blocks 0..{config.n_layers - 1} "
                       f"({', '.join(hooks_lib.POINTS)}); got {hook!r}")
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in lm_layers.DTYPES:
    raise ValueError(f"dtype must be one of {lm_layers.DTYPES}; got {dtype!r}")
  positions = getattr(config, "n_positions", None)
  if positions is not None and np.shape(tokens_BxL)[1] > positions:
    raise ValueError(f"tokens: contexts of {np.shape(tokens_BxL)[1]} tokens are longer than "
                     f"the model's {positions} positions")
  return name


def _forward(params, config, tokens_BxL, last: int, edit, dtype):
  """Blocks 0..last on the tokens, with edit(layer, point, value) -> value
  at each hook point; the residual stream after block `last`."""
  family = _family(config)
  x = family.embed(params, config, tokens_BxL)
  shared = family.context(config, tokens_BxL.shape[1])
  for i in range(last + 1):
    x = edit(i, "resid_pre", x)
    x = family.block(params["layers"][i], x, config, shared, i, dtype,
                     functools.partial(edit, i))
    x = edit(i, "resid_post", x)
  return x


def hooks_at(params, config: Config, tokens_BxL, hooks: typing.Sequence[str],
             dtype="float32") -> tuple:
  """The activations at each of `hooks` ([B, L, D] float32 each), from one
  forward that stops after the highest block they name."""
  hooks = tuple(hooks)
  if not hooks:
    raise ValueError("hooks must name at least one hook")
  return _hooks_at(params, config, tokens_BxL, hooks, _check(config, tokens_BxL, hooks, dtype))


@functools.partial(jax.jit, static_argnames=("config", "hooks", "dtype"))
def _hooks_at(params, config: Config, tokens_BxL, hooks: tuple, dtype: str) -> tuple:
  wanted = {hooks_lib.parse(h): h for h in hooks}
  seen = {}

  def edit(layer, point, value):
    if (layer, point) in wanted:
      seen[wanted[layer, point]] = value
    return value

  _forward(params, config, tokens_BxL, max(layer for layer, _ in wanted), edit, np.dtype(dtype))
  return tuple(seen[h] for h in hooks)


def hook_at(params, config: Config, tokens_BxL, hook: str, dtype="float32"):
  """The activations at `hook` ([B, L, D] float32)."""
  return hooks_at(params, config, tokens_BxL, (hook,), dtype)[0]


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def logits(params, config: Config, tokens_BxL, dtype="float32"):
  """Next-token logits [B, L, V] (float32)."""
  dtype = _check(config, tokens_BxL, (), dtype)
  x = _forward(params, config, tokens_BxL, config.n_layers - 1, lambda i, p, v: v,
               np.dtype(dtype))
  return _family(config).head(params, config, x, np.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("config", "hook", "fn", "dtype", "read"))
def logits_with(params, config: Config, tokens_BxL, hook: str,
                fn: typing.Callable[..., jax.Array], fn_args=(), dtype="float32",
                read: typing.Optional[str] = None):
  """Logits with the activations at `hook` replaced by fn(them, *fn_args)
  ([B, L, D] -> [B, L, D]; e.g. an SAE's reconstruction). `fn` is static, so
  it must be hashable and is best kept the same between calls; arrays it
  needs (an SAE's parameters) go in `fn_args`, which are traced. With
  `read`, an earlier hook (a transcoder's input), they are replaced by
  fn(them, the activations at `read`, *fn_args)."""
  dtype = _check(config, tokens_BxL, (hook,) + ((read,) if read else ()), dtype)
  at = hooks_lib.parse(hook)
  if read is not None:
    hooks_lib.check_target(read, hook)
  source, seen = (at if read is None else hooks_lib.parse(read)), {}

  def edit(i, point, v):
    if (i, point) == source:
      seen["read"] = v
    if (i, point) != at:
      return v
    return fn(v, *fn_args) if read is None else fn(v, seen["read"], *fn_args)

  x = _forward(params, config, tokens_BxL, config.n_layers - 1, edit, np.dtype(dtype))
  return _family(config).head(params, config, x, np.dtype(dtype))
