"""The one door to Hugging Face: transformers' tokenizers, configs and torch
models, and whether a hub model can be reached at all.

transformers is imported here and nowhere else, inside the functions that
need it, so the JAX side (and a TPU VM without torch) imports this module for
free. Each function takes a hub id or a local directory.
"""

import pathlib
import typing

from sae_jax import weights
from sae_jax import validation


def reachable_model(model: str, revision=None) -> pathlib.Path:
  """The directory holding `model`'s config.json (a local directory, or the
  hub's copy, downloaded or cached); one line saying what to do instead when
  there is none. The hub is asked once, so an offline machine fails fast."""
  if model.startswith(("/", "./", "../", "~")) and not pathlib.Path(model).is_dir():
    raise ValueError(f"--model {model!r}: there is no such directory (a local model is a "
                     f"directory with config.json and *.safetensors)")
  try:
    return weights.model_dir(model, revision, ("config.json",))
  except (OSError, ValueError) as error:
    reason = validation.reason(error)
    raise ValueError(
        f"could not reach the model {model!r} ({reason}): it is not a local directory, and "
        f"neither the Hugging Face hub nor its local cache has it. Pass a local copy with "
        f"--model DIR, or set HF_HUB_OFFLINE=1 with the model (and --dataset) in the "
        f"Hugging Face cache, or train offline on --data synthetic") from None


def torch_device(name: typing.Optional[str]) -> str:
  """The torch device to run on: `name` (--device), or "cuda" where torch
  sees one, else "cpu"; one line when torch cannot use `name` here."""
  import torch  # noqa: PLC0415
  if name is None:
    return "cuda" if torch.cuda.is_available() else "cpu"
  try:
    device = torch.device(name)
  except RuntimeError:
    raise ValueError(f"--device {name!r} is not a torch device: use cpu, cuda or "
                     f"cuda:N") from None
  if device.type == "cuda" and not torch.cuda.is_available():
    raise ValueError(f"--device {name!r}: torch {torch.__version__} sees no CUDA device "
                     f"here; leave --device out to run on the CPU")
  if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
    raise ValueError(f"--device {name!r}: torch sees {torch.cuda.device_count()} CUDA "
                     f"devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
  return name


def tokenizer(model, revision: typing.Optional[str] = None):
  """The model's tokenizer (needs no torch)."""
  import transformers  # noqa: PLC0415 (transformers is optional: the activations extra)
  return transformers.AutoTokenizer.from_pretrained(model, revision=revision)


def model_config(model, revision: typing.Optional[str] = None):
  """The model's transformers config (any architecture transformers knows)."""
  import transformers  # noqa: PLC0415
  return transformers.AutoConfig.from_pretrained(model, revision=revision)


def hidden_size(model, revision: typing.Optional[str] = None) -> int:
  """The model's width D, from its config."""
  return model_config(model, revision).hidden_size


def base_model(model: str, revision: typing.Optional[str], dtype):
  """The torch base model (no LM head), in `dtype`. Its load report would
  list the head's weights as unexpected, which they are not for us, so
  transformers is quiet while it loads."""
  import transformers  # noqa: PLC0415
  verbosity = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()
  try:
    return transformers.AutoModel.from_pretrained(model, revision=revision, dtype=dtype)
  finally:
    transformers.logging.set_verbosity(verbosity)


def causal_lm(model: str, revision: typing.Optional[str], dtype):
  """The torch causal language model (with its LM head), in `dtype`."""
  import transformers  # noqa: PLC0415
  return transformers.AutoModelForCausalLM.from_pretrained(model, revision=revision,
                                                           dtype=dtype)


def is_encoder(config) -> bool:
  """Whether a transformers config is an encoder's (BERT's bidirectional
  attention): a masked language model's type, not configured as a decoder.
  Next-token loss and causal prompts do not apply to it."""
  from transformers.models.auto import modeling_auto  # noqa: PLC0415
  return (config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
          and not getattr(config, "is_decoder", False))
