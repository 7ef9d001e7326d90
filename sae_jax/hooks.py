"""Where in a model an SAE reads: the hook names (TransformerLens's, which
SAELens and SAEBench attach by) and what each means in a transformers model.

A decoder's block N has five (`POINTS`):
- `blocks.N.hook_resid_pre`: the residual stream into block N (the
  embeddings for N = 0), transformers' `hidden_states[N]`;
- `blocks.N.hook_attn_out`: the attention's output, after its output
  projection, as the block adds it to the stream;
- `blocks.N.hook_mlp_out`: the MLP's output, likewise;
- `blocks.N.hook_resid_post`: the block's output, `hidden_states[N + 1]`
  (for the top block that entry has the final norm applied; the hook has
  not);
- `blocks.N.ln2.hook_normalized`: the MLP's norm's normalized input,
  before the norm's weight and bias (LayerNorm: centred and divided by its
  RMS; RMSNorm: divided by its RMS), as TransformerLens hooks it, folded or
  not; a transcoder's usual input (`transcoder.py`).
GPT-NeoX's parallel residual (Pythia) adds both to the block's input,
resid_post = resid_pre + attn_out + mlp_out, with the MLP reading
resid_pre, as TransformerLens defines them for it. Gemma-2 normalizes each
output before adding it; its attn_out and mlp_out are after those norms
(`post_attention_layernorm`, `post_feedforward_layernorm`), as in
TransformerLens. `SUBMODULES` says which module of a block gives each, per
transformers model type.

A post-LayerNorm encoder (BERT) has one: TransformerLens names the sum
before the block's last LayerNorm `hook_resid_post`, and the block's output,
after it, `blocks.N.hook_normalized_resid_post`, the hook an encoder's
export reads.
"""

import re
import typing

POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "ln2_normalized")
ENCODER_POINT = "normalized_resid_post"
# Each point's name after blocks.N.; the others are hook_<point>.
NAMES = {"ln2_normalized": "ln2.hook_normalized"}
# Per transformers `model_type`: the block's attribute whose output is
# attn_out and mlp_out, and the MLP's norm (ln2_normalized).
_LLAMA = {"attn_out": "self_attn", "mlp_out": "mlp", "ln2_normalized": "post_attention_layernorm"}
SUBMODULES = {
    "gpt_neox": {"attn_out": "attention", "mlp_out": "mlp",
                 "ln2_normalized": "post_attention_layernorm"},
    "gpt2": {"attn_out": "attn", "mlp_out": "mlp", "ln2_normalized": "ln_2"},
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gemma2": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm",
               "ln2_normalized": "pre_feedforward_layernorm"},
}
_NAMES = {NAMES.get(point, f"hook_{point}"): point for point in POINTS + (ENCODER_POINT,)}
_HOOK = re.compile(r"^blocks\.([0-9]+)\.(" + "|".join(map(re.escape, _NAMES)) + r")$")
FORMS = ("'blocks.N.hook_resid_pre', 'blocks.N.hook_attn_out', 'blocks.N.hook_mlp_out', "
         "'blocks.N.hook_resid_post' or 'blocks.N.ln2.hook_normalized' (an encoder's: "
         "'blocks.N.hook_normalized_resid_post')")


class Hook(typing.NamedTuple):
  layer: int  # N, the block
  point: str  # one of POINTS, or ENCODER_POINT


def parse(hook: str) -> Hook:
  """The block and point a hook name means, or one line that lists the forms.

  >>> parse("blocks.3.hook_mlp_out")
  Hook(layer=3, point='mlp_out')
  """
  match = _HOOK.fullmatch(hook) if isinstance(hook, str) else None
  if match is None:
    raise ValueError(f"hook must be {FORMS}; got {hook!r}")
  return Hook(int(match.group(1)), _NAMES[match.group(2)])


def name(layer: int, point: str) -> str:
  """The hook name of a block's point.

  >>> name(2, "ln2_normalized"), name(0, "mlp_out")
  ('blocks.2.ln2.hook_normalized', 'blocks.0.hook_mlp_out')
  """
  return f"blocks.{layer}.{NAMES.get(point, f'hook_{point}')}"


def hook_layer(hook: str) -> int:
  """N of `blocks.N.hook_...`."""
  return parse(hook).layer


def model_layer(hook: str, model: str, n_layers: int) -> int:
  """N of the hook, checked against the model's blocks 0..n_layers - 1."""
  layer = hook_layer(hook)
  if layer >= n_layers:
    raise ValueError(f"hook {hook!r} needs block {layer}, but {model!r} has "
                     f"blocks 0..{n_layers - 1}")
  return layer


def check_architecture(hook: str, model: str, encoder: bool,
                       model_type: typing.Optional[str] = None) -> None:
  """The hook is one this kind of model has (module docstring); for attn_out
  and mlp_out, one whose module we know (`model_type`, when given)."""
  layer, point = parse(hook)
  if encoder and point == "resid_post":
    raise ValueError(f"--hook {hook!r}: {model!r} is an encoder with a LayerNorm at the end of "
                     f"each block (BERT), where TransformerLens' hook_resid_post is the sum "
                     f"before it; the block's output, which the export reads, is "
                     f"'blocks.{layer}.hook_normalized_resid_post'")
  if encoder and point != ENCODER_POINT:
    raise ValueError(f"--hook {hook!r}: {model!r} is an encoder (BERT), whose export reads "
                     f"only block outputs, 'blocks.{layer}.hook_normalized_resid_post'")
  if not encoder and point == ENCODER_POINT:
    raise ValueError(f"--hook {hook!r}: {model!r} has no LayerNorm at the end of its blocks "
                     f"(only an encoder's, BERT's, has); its block output is "
                     f"'blocks.{layer}.hook_resid_post'")
  if point in ("attn_out", "mlp_out", "ln2_normalized") and model_type is not None \
      and model_type not in SUBMODULES:
    raise ValueError(f"--hook {hook!r}: where {model!r} (model type {model_type!r}) computes "
                     f"its {point} is known only for {', '.join(sorted(SUBMODULES))}; its "
                     f"'blocks.{layer}.hook_resid_pre' and 'blocks.{layer}.hook_resid_post' "
                     f"can be read")


def check_decoder(hook: str, model: str, n_layers: int) -> None:
  """The hook is one a decoder of n_layers blocks has (`model_layer`,
  `check_architecture`); `model` names it in the refusal."""
  model_layer(hook, model, n_layers)
  check_architecture(hook, model, encoder=False)


# Where each point of a block is computed, in forward order.
_ORDER = ("resid_pre", "attn_out", "ln2_normalized", "mlp_out", "resid_post")


def check_target(hook: str, target: typing.Optional[str]) -> None:
  """A transcoder's target hook (`transcoder.py`): another hook at or after
  its input in the forward (None: an SAE, nothing to check).

  >>> check_target("blocks.1.ln2.hook_normalized", "blocks.0.hook_mlp_out")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: --target-hook 'blocks.0.hook_mlp_out' comes before --hook ...
  """
  if target is None:
    return
  (layer, point), (target_layer, target_point) = parse(hook), parse(target)
  if ENCODER_POINT in (point, target_point):
    raise ValueError(f"--target-hook {target!r}: transcoders read and reconstruct a decoder's "
                     f"hooks, not an encoder's")
  if target == hook:
    raise ValueError(f"--target-hook {target!r} is --hook itself: leave it out to train an SAE "
                     f"that reconstructs its input")
  place = lambda layer, point: (layer, _ORDER.index(point))
  if place(target_layer, target_point) < place(layer, point):
    raise ValueError(f"--target-hook {target!r} comes before --hook {hook!r} in the forward: a "
                     f"transcoder reconstructs a later hook from an earlier one")


def hidden_states_index(hook: str) -> typing.Optional[int]:
  """transformers' `hidden_states` index of the hook (N + 1 for a block's
  output, N for its input), None for a point inside the block. For a
  decoder's top block that entry is after the final norm, which the hook is
  not."""
  layer, point = parse(hook)
  return {"resid_pre": layer, "resid_post": layer + 1, ENCODER_POINT: layer + 1}.get(point)
