"""Where in a model an SAE reads: the hook names (TransformerLens's) and the
block and `hidden_states` entry each one means.

A block's output is `blocks.N.hook_resid_post` in a pre-norm decoder
(GPT-NeoX). In a post-LayerNorm encoder (BERT) TransformerLens names the
sum before the block's last LayerNorm `hook_resid_post`, and the block's
output, after it, `blocks.N.hook_normalized_resid_post`: the export reads
block outputs, so an encoder's hook is the latter.
"""

import re

_HOOK = re.compile(r"^blocks\.([0-9]+)\.hook_(resid_post|normalized_resid_post)$")


def _match(hook: str) -> re.Match:
  match = _HOOK.fullmatch(hook) if isinstance(hook, str) else None
  if match is None:
    raise ValueError(f"hook must look like 'blocks.N.hook_resid_post' (an encoder's: "
                     f"'blocks.N.hook_normalized_resid_post'); got {hook!r}")
  return match


def hook_layer(hook: str) -> int:
  """N of `blocks.N.hook_resid_post` (the output of block N)."""
  return int(_match(hook).group(1))


def model_layer(hook: str, model: str, n_layers: int) -> int:
  """N of the hook, checked against the model's blocks 0..n_layers - 1."""
  layer = hook_layer(hook)
  if layer >= n_layers:
    raise ValueError(f"hook {hook!r} needs block {layer}, but {model!r} has "
                     f"blocks 0..{n_layers - 1}")
  return layer


def check_architecture(hook: str, model: str, encoder: bool) -> None:
  """The hook names a block output of this kind of model (module docstring)."""
  match = _match(hook)
  layer, point = match.group(1), match.group(2)
  if encoder and point == "resid_post":
    raise ValueError(f"--hook {hook!r}: {model!r} is an encoder with a LayerNorm at the end of "
                     f"each block (BERT), where TransformerLens' hook_resid_post is the sum "
                     f"before it; the block's output, which the export reads, is "
                     f"'blocks.{layer}.hook_normalized_resid_post'")
  if not encoder and point == "normalized_resid_post":
    raise ValueError(f"--hook {hook!r}: {model!r} has no LayerNorm at the end of its blocks "
                     f"(only an encoder's, BERT's, has); its block output is "
                     f"'blocks.{layer}.hook_resid_post'")


def hidden_states_index(hook: str) -> int:
  """transformers' `hidden_states` index of the hook (N + 1; for a
  decoder's top block that entry is after the final layer norm, which this
  hook is not)."""
  return hook_layer(hook) + 1
