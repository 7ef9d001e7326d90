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
  """(module, before): the hook is that module's input (before) or output.
  A hook the model does not have is refused in one line naming the model
  `name`; `encoder`: the model is one (BERT), whose hook is its block output."""
  config = model.config
  layer = hooks.model_layer(hook, name, config.num_hidden_layers)
  hooks.check_architecture(hook, name, encoder, config.model_type)
  point = hooks.parse(hook).point
  block = blocks(model, config.num_hidden_layers)[layer]
  if point == "resid_pre":
    return block, True
  if point in ("resid_post", hooks.ENCODER_POINT):
    return block, False
  return getattr(block, hooks.SUBMODULES[config.model_type][point]), False


def _hidden(args: tuple, kwargs: dict):
  """A block's residual-stream input, given by position or by name."""
  return args[0] if args else kwargs["hidden_states"]


def _first(output):
  return output[0] if isinstance(output, tuple) else output


def capture(model, hook: str, keep: typing.Callable, name: str,
            encoder: bool = False) -> typing.Any:
  """Registers keep(activation [b, L, D]) at the hook, after which the
  forward stops (raises `Stop`: catch it around the model's call).

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
  module, before = site(model, hook, name, encoder)

  def stop(value):
    keep(value)
    raise Stop

  if before:
    return module.register_forward_pre_hook(lambda m, args, kwargs: stop(_hidden(args, kwargs)),
                                            with_kwargs=True)
  return module.register_forward_hook(lambda m, inputs, output: stop(_first(output)))


def replace(model, hook: str, fn: typing.Callable, name: str) -> typing.Any:
  """Registers the activation at the hook (a causal model's) to be replaced
  by fn(activation [b, L, D]) -> the same shape, or kept where fn returns
  None: a block's input as it goes in, an output as it comes out. Returns
  the torch hook's handle (`.remove()` undoes it); `name` as in `capture`."""
  module, before = site(model, hook, name)
  if before:
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
