"""TransformerLens hook points on a transformers (torch) model: the module a
hook is read from (`hooks.py` says what each means), a forward hook that
captures it and stops the forward there, and one that replaces it (the
downstream loss's splice). Part of the torch export and downstream loss
(the `activations` extra): torch is imported where a model is hooked."""

import typing

from sae_jax import hooks


class Stop(Exception):
  """Raised by a capture: nothing after the hooked module is computed."""


def blocks(model, n_layers: int):
  """The model's transformer blocks (its ModuleList of n_layers)."""
  import torch  # noqa: PLC0415
  for module in model.modules():
    if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
      return module
  raise ValueError(f"could not find the {n_layers} transformer blocks of {type(model).__name__}")


def site(model, hook: str, name: str, encoder: bool = False) -> tuple:
  """(module, where): the hook is that module's "input", "output", or
  (a norm's) "normalized" input, before its weight and bias. A hook the
  model does not have is refused in one line naming the model `name`;
  `encoder`: the model is one (BERT), whose hook is its block output."""
  config = model.config
  layer = hooks.model_layer(hook, name, config.num_hidden_layers)
  hooks.check_architecture(hook, name, encoder, config.model_type)
  point = hooks.parse(hook).point
  block = blocks(model, config.num_hidden_layers)[layer]
  if point == "resid_pre":
    return block, "input"
  if point in ("resid_post", hooks.ENCODER_POINT):
    return block, "output"
  module = getattr(block, hooks.SUBMODULES[config.model_type][point])
  return module, "normalized" if point == "ln2_normalized" else "output"


def _normalized(norm, x):
  """A LayerNorm's or RMSNorm's input normalized as the module does it, before
  its weight (and bias)."""
  import torch  # noqa: PLC0415
  if isinstance(norm, torch.nn.LayerNorm):
    return torch.nn.functional.layer_norm(x, norm.normalized_shape, eps=norm.eps)
  eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
  x32 = x.float()
  return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _affine(norm, n):
  """The norm's weight (and bias) applied to normalized n: its output."""
  import torch  # noqa: PLC0415
  if isinstance(norm, torch.nn.LayerNorm):
    return n * norm.weight + norm.bias
  if type(norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm scales by 1 + w, in float32
    return (n.float() * (1.0 + norm.weight.float())).to(n.dtype)
  return norm.weight * n


def _hidden(args: tuple, kwargs: dict):
  """A block's residual-stream input, given by position or by name."""
  return args[0] if args else kwargs["hidden_states"]


def _first(output):
  return output[0] if isinstance(output, tuple) else output


def capture(model, hook: str, keep: typing.Callable, name: str,
            encoder: bool = False, stop: bool = True) -> typing.Any:
  """Registers keep(activation [b, L, D]) at the hook, after which the
  forward stops (raises `Stop`: catch it around the model's call) unless
  `stop` is False (keep may raise `Stop` itself).

  Args:
    model: a transformers model (torch); its config names its type.
    hook: a TransformerLens hook name (`hooks.py`), refused in one line where
      the model has no such point.
    keep: called with the activation tensor.
    name: the model's name (hub id or directory) for those refusals.
    encoder: the model is an encoder (BERT).

  Returns:
    The torch hook's handle (`.remove()` undoes it).
  """
  module, where = site(model, hook, name, encoder)

  def seen(value):
    keep(value)
    if stop:
      raise Stop

  if where == "normalized":
    return module.register_forward_pre_hook(
        lambda m, args: seen(_normalized(m, args[0])))
  if where == "input":
    return module.register_forward_pre_hook(lambda m, args, kwargs: seen(_hidden(args, kwargs)),
                                            with_kwargs=True)
  return module.register_forward_hook(lambda m, inputs, output: seen(_first(output)))


def replace(model, hook: str, fn: typing.Callable, name: str) -> typing.Any:
  """Registers the activation at the hook (a causal model's) to be replaced
  by fn(activation [b, L, D]) -> the same shape, or kept where fn returns
  None: a block's input as it goes in, an output as it comes out. Returns
  the torch hook's handle (`.remove()` undoes it); `name` as in `capture`."""
  module, where = site(model, hook, name)
  if where == "normalized":  # the norm's output from the replaced normalized input
    def norm(m, inputs, output):
      new = fn(_normalized(m, inputs[0]))
      return None if new is None else _affine(m, new)
    return module.register_forward_hook(norm)
  if where == "input":
    def pre(m, args, kwargs):
      new = fn(_hidden(args, kwargs))
      if new is None:
        return None
      return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
    return module.register_forward_pre_hook(pre, with_kwargs=True)

  def post(m, inputs, output):
    new = fn(_first(output))
    if new is None:
      return None
    return (new, *output[1:]) if isinstance(output, tuple) else new
  return module.register_forward_hook(post)
