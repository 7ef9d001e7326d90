"""Where in a model an SAE reads: the hook names (TransformerLens's
`blocks.N.hook_resid_post`) and the block and `hidden_states` entry each
one means."""

import re

_HOOK = re.compile(r"^blocks\.([0-9]+)\.hook_resid_post$")


def hook_layer(hook: str) -> int:
  """N of `blocks.N.hook_resid_post` (the output of block N)."""
  match = _HOOK.fullmatch(hook) if isinstance(hook, str) else None
  if match is None:
    raise ValueError(f"hook must look like 'blocks.N.hook_resid_post'; got {hook!r}")
  return int(match.group(1))


def model_layer(hook: str, model: str, n_layers: int) -> int:
  """N of the hook, checked against the model's blocks 0..n_layers - 1."""
  layer = hook_layer(hook)
  if layer >= n_layers:
    raise ValueError(f"hook {hook!r} needs block {layer}, but {model!r} has "
                     f"blocks 0..{n_layers - 1}")
  return layer


def hidden_states_index(hook: str) -> int:
  """transformers' `hidden_states` index of the hook (N + 1; for the top block
  that entry is after the final layer norm, which this hook is not)."""
  return hook_layer(hook) + 1
