"""Downstream loss: the language model's next-token loss with the SAE's
reconstruction spliced in at the hook (torch and transformers, imported lazily).

For contexts [b, L]: the output of block N at positions 1..L-1 is replaced by
splice(output) (position 0 is left alone: the SAE never trained on it), and the
model runs on. Reported, as means over the L - 1 predicted positions:

- clean_ce, spliced_ce, zero_ce: next-token cross-entropy with the block
  output untouched, replaced by the splice, and replaced by zeros;
- loss_recovered = (zero_ce - spliced_ce) / (zero_ce - clean_ce);
- kl: KL(clean || spliced) of the next-token distributions.
"""

import typing

import numpy as np

from sae_jax import export


def downstream_loss(model: str, hook: str, ids_BxL: np.ndarray,
                    splice: typing.Callable[[np.ndarray], np.ndarray], *,
                    revision: typing.Optional[str] = None, device: typing.Optional[str] = None,
                    batch_contexts: int = 8) -> dict:
  """Runs `model` (hub id or directory) on token ids [b, L] three ways.

  Args:
    model, revision: the causal language model.
    hook: `blocks.N.hook_resid_post`.
    ids_BxL: int token ids.
    splice: float32 [n, D] block outputs -> [n, D] replacements (raw units).
    device: torch device; None picks cuda when available.
    batch_contexts: contexts per forward pass.

  Returns:
    clean_ce, spliced_ce, zero_ce, loss_recovered, kl (floats).
  """
  import torch
  import torch.nn.functional as fn
  import transformers
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  lm = transformers.AutoModelForCausalLM.from_pretrained(model, revision=revision,
                                                         dtype=torch.float32).to(device).eval()
  block = export._blocks(lm, lm.config.num_hidden_layers)[export.hook_layer(hook)]
  mode = {"replace": None}

  def replace(module, inputs, output):
    if mode["replace"] is None:
      return output
    hidden = output[0] if isinstance(output, tuple) else output
    new = hidden.clone()
    rest = hidden[:, 1:]
    new[:, 1:] = mode["replace"](rest.reshape(-1, rest.shape[-1])).reshape(rest.shape)
    return (new, *output[1:]) if isinstance(output, tuple) else new

  def from_numpy(h):
    out = splice(h.detach().float().cpu().numpy())
    return torch.as_tensor(np.asarray(out, np.float32), device=h.device, dtype=h.dtype)

  handle = block.register_forward_hook(replace)
  sums = {"clean_ce": 0.0, "spliced_ce": 0.0, "zero_ce": 0.0, "kl": 0.0}
  n = 0
  try:
    with torch.inference_mode():
      for start in range(0, len(ids_BxL), batch_contexts):
        ids = torch.as_tensor(np.asarray(ids_BxL[start:start + batch_contexts], np.int64),
                              device=device)
        logp = {}
        for name, replacement in (("clean", None), ("spliced", from_numpy),
                                  ("zero", torch.zeros_like)):
          mode["replace"] = replacement
          logits = lm(input_ids=ids).logits[:, :-1].float()
          logp[name] = fn.log_softmax(logits, dim=-1)
          target = ids[:, 1:]
          nll = -logp[name].gather(-1, target[..., None])[..., 0]
          sums[f"{name}_ce"] += float(nll.sum())
        sums["kl"] += float((logp["clean"].exp() * (logp["clean"] - logp["spliced"])).sum())
        n += ids[:, 1:].numel()
  finally:
    handle.remove()
  out = {name: value / n for name, value in sums.items()}
  out["loss_recovered"] = ((out["zero_ce"] - out["spliced_ce"])
                           / (out["zero_ce"] - out["clean_ce"]))
  return out
