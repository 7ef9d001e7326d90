"""Where in a model an SAE reads: the hook names (TransformerLens's, which
SAELens and SAEBench attach by) and what each means in a transformers model.

A decoder's block N has four (`POINTS`):
- `blocks.N.hook_resid_pre`: the residual stream into block N (the
  embeddings for N = 0), transformers' `hidden_states[N]`;
- `blocks.N.hook_attn_out`: the attention's output, after its output
  projection, as the block adds it to the stream;
- `blocks.N.hook_mlp_out`: the MLP's output, likewise;
- `blocks.N.hook_resid_post`: the block's output, `hidden_states[N + 1]`
  (for the top block that entry has the final norm applied; the hook has
  not).
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

POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
ENCODER_POINT = "normalized_resid_post"
# Per transformers `model_type`: the block's attribute whose output is
# attn_out and mlp_out.
SUBMODULES = {
    "gpt_neox": {"attn_out": "attention", "mlp_out": "mlp"},
    "gpt2": {"attn_out": "attn", "mlp_out": "mlp"},
    "llama": {"attn_out": "self_attn", "mlp_out": "mlp"},
    "mistral": {"attn_out": "self_attn", "mlp_out": "mlp"},
    "qwen2": {"attn_out": "self_attn", "mlp_out": "mlp"},
    "gemma2": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
}
_HOOK = re.compile(r"^blocks\.([0-9]+)\.hook_(" + "|".join(POINTS + (ENCODER_POINT,)) + r")$")
FORMS = ("'blocks.N.hook_resid_pre', 'blocks.N.hook_attn_out', 'blocks.N.hook_mlp_out' or "
         "'blocks.N.hook_resid_post' (an encoder's: 'blocks.N.hook_normalized_resid_post')")


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
  return Hook(int(match.group(1)), match.group(2))


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
  if point in ("attn_out", "mlp_out") and model_type is not None and model_type not in SUBMODULES:
    raise ValueError(f"--hook {hook!r}: where {model!r} (model type {model_type!r}) computes "
                     f"its {point} is known only for {', '.join(sorted(SUBMODULES))}; its "
                     f"'blocks.{layer}.hook_resid_pre' and 'blocks.{layer}.hook_resid_post' "
                     f"can be read")


def check_decoder(hook: str, model: str, n_layers: int) -> None:
  """The hook is one a decoder of n_layers blocks has (`model_layer`,
  `check_architecture`); `model` names it in the refusal."""
  model_layer(hook, model, n_layers)
  check_architecture(hook, model, encoder=False)


def hidden_states_index(hook: str) -> typing.Optional[int]:
  """transformers' `hidden_states` index of the hook (N + 1 for a block's
  output, N for its input), None for a point inside the block. For a
  decoder's top block that entry is after the final norm, which the hook is
  not."""
  layer, point = parse(hook)
  return {"resid_pre": layer, "resid_post": layer + 1, ENCODER_POINT: layer + 1}.get(point)
