"""A transformers model's files without torch: its directory (local, or the
hub's copy) and its safetensors weights as float32 NumPy arrays, whatever
float type they were saved in (bfloat16 included, which `safetensors.numpy`
cannot read), memory-mapped until each is converted.

The safetensors format: an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the bytes.
"""

import json
import pathlib
import typing

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
INDEX = "model.safetensors.index.json"


def model_dir(model: str, revision: typing.Optional[str] = None,
              patterns=("*.json", "*.safetensors")) -> pathlib.Path:
  """`model` itself if it is a directory; else the hub id's files matching
  `patterns`, downloaded or found in the Hugging Face cache (HF_HUB_OFFLINE=1:
  the cache only). Raises OSError when neither has them."""
  path = pathlib.Path(model)
  if path.is_dir():
    return path
  import huggingface_hub  # noqa: PLC0415 (only for hub ids)
  return pathlib.Path(huggingface_hub.snapshot_download(
      model, revision=revision, allow_patterns=list(patterns)))


def files(directory: pathlib.Path) -> list:
  """The model's weight files: those its index names where it has one (so a
  copy in another layout beside them, e.g. Mistral's consolidated.safetensors,
  is not read too), else every *.safetensors."""
  index = directory / INDEX
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [directory / name for name in names]
  found = sorted(directory.glob("*.safetensors"))
  if not found:
    raise FileNotFoundError(f"{directory} holds no *.safetensors weights (save the model with "
                            "save_pretrained(..., safe_serialization=True))")
  return found


def read(path: pathlib.Path) -> dict:
  """{name: array} of one safetensors file, memory-mapped in its own dtype."""
  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(length))
  header.pop("__metadata__", None)
  if not header:
    return {}
  data = np.memmap(path, np.uint8, mode="r", offset=8 + length)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{path}: weight {name!r} has dtype {info['dtype']}, which sae_jax does "
                       f"not read (it reads {', '.join(DTYPES)})")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def float32(directory: pathlib.Path, prefix: str = "") -> typing.Callable:
  """get(name, transpose=False, optional=False): the weight `name` (its
  `prefix` taken off every name) as a float32 array, transposed if asked;
  None for a missing optional one, and for a missing other one a KeyError
  that names it."""
  tensors = {}
  for path in files(directory):
    tensors.update({name.removeprefix(prefix): value for name, value in read(path).items()})

  def get(name, transpose=False, optional=False):
    if name not in tensors:
      if optional:
        return None
      raise KeyError(f"{directory}: weight {name!r} is missing")
    value = np.asarray(tensors[name], np.float32)
    return value.T if transpose else value

  return get
