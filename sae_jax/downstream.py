"""Downstream loss: the language model's next-token loss with the SAE's
reconstruction spliced in at the hook, with the model in torch (transformers,
imported lazily) or in JAX (`sae_jax.lm`, through its splice entry point).

For contexts [b, L]: the activation at the hook (`hooks.py`: a block's
input, attention output, MLP output or output) at positions 1..L-1 is
replaced by splice(activation) (position 0 is left alone: the SAE never
trained on it), and the model runs on. Reported, as means over the L - 1
predicted positions:

- clean_ce, spliced_ce, zero_ce: next-token cross-entropy with the
  activation untouched, replaced by the splice, and replaced by zeros;
- loss_recovered = (zero_ce - spliced_ce) / (zero_ce - clean_ce);
- kl: KL(clean || spliced) of the next-token distributions.
"""

import functools
import typing

import numpy as np

from sae_jax import hook_points
from sae_jax import hooks


def downstream_loss(model: str, hook: str, ids_BxL: np.ndarray,
                    splice: typing.Callable[[np.ndarray], np.ndarray], *,
                    revision: typing.Optional[str] = None, device: typing.Optional[str] = None,
                    batch_contexts: int = 8, read: typing.Optional[str] = None) -> dict:
  """Runs `model` (hub id or directory) on token ids [b, L] three ways.

  Args:
    model, revision: the causal language model.
    hook: where the SAE reads and its reconstruction is put back (`hooks.py`).
    ids_BxL: int token ids.
    splice: float32 [n, D] activations at the hook -> [n, D] replacements (raw units).
    device: torch device; None picks cuda when available.
    batch_contexts: contexts per forward pass.
    read: a transcoder's input hook, before `hook`: splice gets the
      activations there, and its output replaces those at `hook`.

  Returns:
    clean_ce, spliced_ce, zero_ce, loss_recovered, kl (floats).
  """
  import torch
  import torch.nn.functional as fn
  from sae_jax import hf  # noqa: PLC0415
  device = hf.torch_device(device)
  lm = hf.causal_lm(model, revision, torch.float32).to(device).eval()
  mode = {"replace": None}

  def replace(hidden):  # position 0 (never trained on) is kept
    if mode["replace"] is None:
      return None
    new = hidden.clone()
    rest = hidden[:, 1:]
    new[:, 1:] = mode["replace"](rest.reshape(-1, rest.shape[-1])).reshape(rest.shape)
    return new

  def from_numpy(h):
    source = h if read is None else held["read"][:, 1:].reshape(h.shape)
    out = splice(source.detach().float().cpu().numpy())
    return torch.as_tensor(np.asarray(out, np.float32), device=h.device, dtype=h.dtype)

  held = {}
  if read is not None:
    hooks.check_target(read, hook)
    reading = hook_points.capture(lm, read, lambda h: held.__setitem__("read", h), model,
                                  stop=False)
  handle = hook_points.replace(lm, hook, replace, model)
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
    if read is not None:
      reading.remove()
  return _summary(sums, n)


def _summary(sums: dict, n: int) -> dict:
  """Means over the n predicted positions, and the loss recovered."""
  out = {name: value / n for name, value in sums.items()}
  out["loss_recovered"] = ((out["zero_ce"] - out["spliced_ce"])
                           / (out["zero_ce"] - out["clean_ce"]))
  return out


def _zero_after_first(x_BxLxD):
  return x_BxLxD.at[:, 1:].set(0)


def _splice_after_first(x_BxLxD, *args, splice):
  rest = x_BxLxD[:, 1:]
  new = splice(rest.reshape(-1, rest.shape[-1]), *args).reshape(rest.shape)
  return x_BxLxD.at[:, 1:].set(new.astype(x_BxLxD.dtype))


def _transcode_after_first(y_BxLxD, x_BxLxD, *args, splice):
  """A transcoder's splice: y at positions 1.. from x's there."""
  rest = x_BxLxD[:, 1:]
  new = splice(rest.reshape(-1, rest.shape[-1]), *args).reshape(y_BxLxD[:, 1:].shape)
  return y_BxLxD.at[:, 1:].set(new.astype(y_BxLxD.dtype))


@functools.lru_cache(maxsize=None)
def _after_first(splice, transcoder: bool = False):
  """The same hashable function for the same splice, so its compilation is reused."""
  return functools.partial(_transcode_after_first if transcoder else _splice_after_first,
                           splice=splice)


@functools.lru_cache(maxsize=None)
def _sums_fn():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from sae_jax import lm  # noqa: PLC0415

  @functools.partial(jax.jit, static_argnames=("config", "hook", "fn", "read"))
  def sums(params, config, ids_BxL, hook, fn, fn_args, read):
    target_BxL = ids_BxL[:, 1:]
    logp = lambda logits: jax.nn.log_softmax(logits[:, :-1], axis=-1)
    clean = logp(lm.logits(params, config, ids_BxL))
    spliced = logp(lm.logits_with(params, config, ids_BxL, hook, fn, fn_args, read=read))
    zero = logp(lm.logits_with(params, config, ids_BxL, hook, _zero_after_first))
    nll = lambda lp: -jnp.sum(jnp.take_along_axis(lp, target_BxL[..., None], axis=-1))
    return {"clean_ce": nll(clean), "spliced_ce": nll(spliced), "zero_ce": nll(zero),
            "kl": jnp.sum(jnp.exp(clean) * (clean - spliced))}

  return sums


def downstream_loss_jax(params, config, hook: str, ids_BxL: np.ndarray,
                        splice: typing.Callable, splice_args: tuple = (), *,
                        batch_contexts: int = 8, read: typing.Optional[str] = None) -> dict:
  """`downstream_loss` with the model in JAX: `sae_jax.lm` params and config
  (`lm.load`), spliced through `lm.logits_with`. No torch.

  Args:
    params, config: the model (`lm.load(model)`).
    hook: where the splice replaces the activations (`hooks.POINTS`).
    ids_BxL: int token ids.
    splice: a JAX function (h [n, D], *splice_args) -> [n, D] replacements
      (raw units). It is static: pass the same function each time, and its
      arrays (an SAE's parameters) in `splice_args`.
    batch_contexts: contexts per forward pass.
    read: a transcoder's input hook, as for `downstream_loss`.

  Returns:
    clean_ce, spliced_ce, zero_ce, loss_recovered, kl (floats).

  For example, `downstream_loss_jax(*lm.load("EleutherAI/pythia-160m"),
  "blocks.6.hook_resid_post", ids, identity)` has kl 0 and spliced_ce = clean_ce.
  """
  hooks.check_decoder(hook, "the model", config.n_layers)
  ids_BxL = np.asarray(ids_BxL)
  if ids_BxL.ndim != 2 or ids_BxL.shape[1] < 2 or not np.issubdtype(ids_BxL.dtype, np.integer):
    raise ValueError(f"ids_BxL must be int token ids [contexts, length >= 2]; got "
                     f"{ids_BxL.dtype} {ids_BxL.shape}")
  sums_fn, fn = _sums_fn(), _after_first(splice, read is not None)
  sums = {"clean_ce": 0.0, "spliced_ce": 0.0, "zero_ce": 0.0, "kl": 0.0}
  for start in range(0, len(ids_BxL), batch_contexts):
    ids = ids_BxL[start:start + batch_contexts].astype(np.int32)
    for name, value in sums_fn(params, config, ids, hook, fn, tuple(splice_args), read).items():
      sums[name] += float(value)
  return _summary(sums, ids_BxL.shape[0] * (ids_BxL.shape[1] - 1))
