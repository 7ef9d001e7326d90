"""dictionary_learning's TopK, BatchTopK, Matryoshka BatchTopK and JumpReLU
trainers, set up with our recipe.

The reference that `benchmarks/peers.py` measures us against and that
`tests/test_parity.py` holds our training step to, step for step. Install it
without its heavy dependencies:

    pip install --no-deps dictionary-learning==0.1.0 einops

Its package `__init__` imports nnsight (for its activation buffer), which
neither side needs; an empty stand-in module is put in its place when nnsight
is not installed.
"""

import contextlib
import sys
import types

import numpy as np
import torch

from sae_jax.config import TrainConfig


def trainer_classes() -> dict:
  """{"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "matryoshka":
  MatryoshkaBatchTopKTrainer, "jumprelu": JumpReluTrainer}."""
  if "nnsight" not in sys.modules:
    try:
      import nnsight  # noqa: F401
    except ImportError:
      stand_in = types.ModuleType("nnsight")
      stand_in.LanguageModel = object
      sys.modules["nnsight"] = stand_in
  try:
    from dictionary_learning.trainers import BatchTopKTrainer, TopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
  except ImportError as error:
    raise ImportError(f"the reference trainers need dictionary_learning ({error}): "
                      f"pip install --no-deps dictionary-learning==0.1.0 einops") from None
  return {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer,
          "matryoshka": MatryoshkaBatchTopKTrainer, "jumprelu": JumpReluTrainer}


def make_trainer(config: TrainConfig, params=None):
  """A dictionary_learning trainer running `config`'s recipe.

  Args:
    config: our config (selection "topk" or "batchtopk", the latter with
      or without Matryoshka groups; clip_norm 1.0, which dictionary_learning
      hard-codes).
    params: our initial parameters to start from (scaled units); None keeps
      dictionary_learning's own random initialisation.
  """
  c, s = config, config.sae
  if s.selection not in ("topk", "batchtopk", "jumprelu"):
    raise ValueError(f"dictionary_learning has no trainer for selection {s.selection!r}")
  if c.clip_norm != 1.0:
    raise ValueError(f"dictionary_learning clips at 1.0; got clip_norm={c.clip_norm}")
  decay_start = c.total_steps - round(c.decay_fraction * c.total_steps)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if s.selection == "jumprelu":
    if (c.b1, c.b2) != (0.0, 0.999):
      raise ValueError(f"dictionary_learning's JumpReLU trainer fixes Adam's betas at (0, 0.999); "
                       f"got b1={c.b1}, b2={c.b2}")
    trainer = trainer_classes()["jumprelu"](
        steps=c.total_steps, activation_dim=s.d_model, dict_size=s.n_latents, layer=0,
        lm_name="reference", lr=c.learning_rate, bandwidth=c.bandwidth,
        sparsity_penalty=c.sparsity_penalty, warmup_steps=c.warmup_steps,
        sparsity_warmup_steps=c.sparsity_warmup_steps,
        decay_start=decay_start if decay_start < c.total_steps else None,
        target_l0=c.target_l0, seed=c.seed, device=device)
    trainer.dead_feature_threshold = c.dead_tokens
    if params is not None:
      set_params(trainer, params)
    return trainer
  kind, nested = s.selection, {}
  if c.matryoshka_groups is not None:
    if s.selection != "batchtopk":
      raise ValueError(f"dictionary_learning's Matryoshka trainer is BatchTopK; got "
                       f"selection {s.selection!r}")
    kind, nested = "matryoshka", dict(
        group_fractions=list(c.matryoshka_groups),
        group_weights=None if c.matryoshka_weights is None else list(c.matryoshka_weights))
  trainer = trainer_classes()[kind](
      steps=c.total_steps, activation_dim=s.d_model, dict_size=s.n_latents, k=s.k, layer=0,
      lm_name="reference", lr=c.learning_rate, auxk_alpha=c.auxk_weight,
      warmup_steps=c.warmup_steps,
      decay_start=decay_start if decay_start < c.total_steps else None,
      threshold_beta=c.threshold_beta, threshold_start_step=c.threshold_start, seed=c.seed,
      device=device, **nested)
  # Fixed in its constructor; ours are config fields.
  trainer.dead_feature_threshold = c.dead_tokens
  trainer.top_k_aux = c.auxk_k
  if params is not None:
    set_params(trainer, params)
  return trainer


def set_params(trainer, params) -> None:
  """Our parameters (W_enc [D,F], b_enc, W_dec [F,D], b_dec; JumpReLU's
  threshold [F]) into the trainer's SAE."""
  ae = trainer.ae
  tensor = lambda name: _tensor(trainer, params[name])
  with torch.no_grad():
    if not hasattr(ae, "encoder"):  # Matryoshka's and JumpReLU's hold the matrices as we do
      for name in _OWN_NAMES[hasattr(ae, "threshold") and "threshold" in params]:
        getattr(ae, name).copy_(tensor(name))
      return
    ae.encoder.weight.copy_(tensor("W_enc").T)
    ae.encoder.bias.copy_(tensor("b_enc"))
    ae.decoder.weight.copy_(tensor("W_dec").T)
    ae.b_dec.copy_(tensor("b_dec"))


def get_params(trainer) -> dict:
  """The trainer's SAE as our parameters (float32 NumPy)."""
  ae = trainer.ae
  host = lambda t: t.detach().cpu().numpy().copy()
  if not hasattr(ae, "encoder"):
    jump = isinstance(getattr(ae, "threshold", None), torch.nn.Parameter)
    return {name: host(getattr(ae, name)) for name in _OWN_NAMES[jump]}
  return {"W_enc": host(ae.encoder.weight).T.copy(), "b_enc": host(ae.encoder.bias),
          "W_dec": host(ae.decoder.weight).T.copy(), "b_dec": host(ae.b_dec)}


# The parameters a trainer's SAE holds by our names: without and with a
# learned threshold (Matryoshka's SAE holds its BatchTopK threshold as a buffer).
_OWN_NAMES = {False: ("W_enc", "b_enc", "W_dec", "b_dec"),
              True: ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def _tensor(trainer, x) -> torch.Tensor:
  return torch.tensor(np.asarray(x, np.float32), device=trainer.device)


@contextlib.contextmanager
def keep_b_dec(trainer):
  """Within it, the trainer's step 0 keeps its SAE's b_dec instead of
  replacing it by the geometric median of the first batch (its own b_dec
  initialisation), so both sides can start from the same weights."""
  from dictionary_learning.trainers import top_k
  b_dec = trainer.ae.b_dec.detach().clone()
  module_median = top_k.geometric_median
  trainer.geometric_median = lambda points, *args, **kwargs: b_dec.clone()
  top_k.geometric_median = trainer.geometric_median
  try:
    yield
  finally:
    top_k.geometric_median = module_median
    del trainer.geometric_median


def update(trainer, step: int, x_BxD, *, keep_init: bool = False) -> float:
  """One step on x (already scaled); returns the step's loss."""
  x = _tensor(trainer, x_BxD)
  if step == 0 and keep_init:
    with keep_b_dec(trainer):
      return trainer.update(step, x)
  return trainer.update(step, x)


def encode(trainer, x_BxD) -> np.ndarray:
  """Inference codes as dictionary_learning computes them (BatchTopK: its
  threshold; TopK: per-token top-k)."""
  with torch.no_grad():
    return trainer.ae.encode(_tensor(trainer, x_BxD)).cpu().numpy()


def decode(trainer, z_BxF) -> np.ndarray:
  with torch.no_grad():
    return trainer.ae.decode(_tensor(trainer, z_BxF)).cpu().numpy()
