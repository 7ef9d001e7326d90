"""A trained SAE as a folder SAELens loads: cfg.json, sae_weights.safetensors
and sparsity.safetensors.

The input scale c is folded into the weights. The SAE saw c·x, so on raw x
every pre-activation, code and threshold is 1/c of its trained value:
b_dec / c, b_enc / c, θ_j / c, with W_enc and W_dec unchanged. Then
normalize_activations is "none". BatchTopK and Sampled-SAE are saved as
"jumprelu" with a threshold per latent (SAELens: relu(h) * (h > threshold),
h = (x - b_dec) @ W_enc + b_enc); a latent that must never fire keeps the
largest float32. TopK is saved as "topk" with its k. JumpReLU is saved as
"jumprelu" with its learned thresholds and apply_b_dec_to_input false (its
encoder reads x, not x - b_dec).

A transcoder (`transcoder.py`) is saved as "jumprelu_transcoder" (SAELens
has no TopK transcoder: a TopK one keeps calibrated thresholds too), with
d_out. It saw c_in·x and reconstructed c_out·y, so on raw x its codes are
1/c_in of the trained ones (b_enc / c_in, θ_j / c_in) and its raw
reconstruction is W_dec · c_in / c_out and b_dec / c_out.

The metadata say who trained the SAE: `sae_lens_training_version` is null
(SAELens would otherwise fill in, and save back, its own version) and
`sae_jax_version` is ours.
"""

import importlib.metadata
import json
import pathlib
import typing

import numpy as np

from sae_jax import storage, thresholds
from sae_jax.config import SAEConfig

# cfg.json's metadata.sae_lens_version: the first SAELens release whose
# format these files follow (SAELens did not write them; see README.md).
SAE_LENS_VERSION = "6.0.0"


def folded_weights(params: dict, threshold, input_scale, selection: str) -> dict:
  """float32 arrays W_enc [D,F], W_dec [F,D], b_enc [F], b_dec [D] (and
  threshold [F] unless TopK) acting on raw activations; `threshold` is one
  per latent or one for all (scaled units); `input_scale` c, or a
  transcoder's (c_in, c_out)."""
  c, c_out = np.broadcast_to(np.asarray(input_scale, np.float64), (2,))
  W_dec = np.asarray(params["W_dec"], np.float32)
  weights = {
      "W_enc": np.asarray(params["W_enc"], np.float32),
      "W_dec": W_dec if c == c_out else (W_dec * (c / c_out)).astype(np.float32),
      "b_enc": np.asarray(params["b_enc"], np.float32) / np.float32(c),
      "b_dec": np.asarray(params["b_dec"], np.float32) / np.float32(c_out),
  }
  if selection != "topk":
    theta_F = np.broadcast_to(np.asarray(threshold, np.float32), weights["b_enc"].shape)
    never_F = theta_F == np.float32(thresholds.NEVER)  # stays the largest float: never fires
    weights["threshold"] = np.divide(theta_F, np.float32(c), where=~never_F,
                                     out=np.full_like(theta_F, thresholds.NEVER))
  return weights


def export_saelens(out, params: dict, threshold, input_scale, config: SAEConfig,
                   metadata: typing.Mapping[str, typing.Any], *,
                   log10_density=None) -> pathlib.PurePath:
  """Writes the folder `out` (replacing it whole, never leaving half of it).

  Args:
    out: the folder to write.
    params: the SAE's parameters (scaled units, as trained).
    threshold: the inference thresholds θ_j [F], or one for all (scaled units).
    input_scale: the constant c the inputs were multiplied by, or a
      transcoder's (c_in, c_out) (`train.scales`).
    config: the SAE's config.
    metadata: SAELens metadata: model_name, hook_name, context_size,
      prepend_bos, dataset_path and, for activations of a transformers
      model, model_from_pretrained_kwargs (the version fields are added).
    log10_density: log10 firing frequency per latent [F], written as
      sparsity.safetensors (key "sparsity"), or None for no such file.

  Returns:
    The folder's path.
  """
  from safetensors.numpy import save_file
  out = storage.path(out)
  if config.transcoder and config.selection == "topk":
    raise ValueError("a transcoder is saved with thresholds (SAELens has no TopK transcoder); "
                     "export it with its calibrated thresholds")
  weights = folded_weights(params, threshold, input_scale, config.selection)
  cfg = {
      "architecture": ("jumprelu_transcoder" if config.transcoder else
                       "topk" if config.selection == "topk" else "jumprelu"),
      "d_in": config.d_model,
      **({"d_out": config.d_model} if config.transcoder else {}),
      "d_sae": config.n_latents,
      "dtype": "float32",
      "device": "cpu",
      "apply_b_dec_to_input": config.centred,
      "normalize_activations": "none",
      "reshape_activations": "none",
      "metadata": {**metadata, "sae_lens_version": SAE_LENS_VERSION,
                   "sae_lens_training_version": None,
                   "sae_jax_version": importlib.metadata.version("sae_jax")},
  }
  if config.selection == "topk":
    cfg["k"] = config.k
  if storage.is_remote(out):
    _upload(out, weights, cfg, log10_density)
    return out
  def fill(folder):
    save_file(weights, str(folder / "sae_weights.safetensors"))
    if log10_density is not None:
      save_file({"sparsity": np.asarray(log10_density, np.float32)},
                str(folder / "sparsity.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))

  storage.write_folder(out, fill)
  return out


def _upload(out, weights: dict, cfg: dict, log10_density) -> None:
  """The folder's files on gs://, each uploaded whole (a folder cannot be
  swapped in one step there); cfg.json last. The run's summary.json, written
  after them, marks the export finished."""
  from safetensors.numpy import save
  write = lambda name, data: storage.atomic_write(out / name, lambda f: f.write(data))
  write("sae_weights.safetensors", save(weights))
  if log10_density is not None:
    write("sparsity.safetensors", save({"sparsity": np.asarray(log10_density, np.float32)}))
  else:
    storage.remove(out / "sparsity.safetensors")  # from an earlier export
  write("cfg.json", json.dumps(cfg, indent=1).encode())


def load(folder) -> tuple[dict, dict]:
  """(weights, cfg) of a saved SAE folder, or one line saying what is missing."""
  from safetensors.numpy import load
  folder = storage.path(folder)  # a local folder, or gs://
  paths = [folder / "cfg.json", folder / "sae_weights.safetensors"]
  missing = [path.name for path in paths if not path.is_file()]
  if missing:
    raise ValueError(f"{folder} holds no saved SAE ({' and '.join(missing)} missing): is the "
                     f"run finished?")
  weights, cfg = load(paths[1].read_bytes()), json.loads(paths[0].read_text())
  D, F = cfg.get("d_in"), cfg.get("d_sae")
  D_out = cfg.get("d_out", D)
  want = {"W_enc": (D, F), "W_dec": (F, D_out), "b_enc": (F,), "b_dec": (D_out,)}
  if cfg.get("architecture") in ("jumprelu", "jumprelu_transcoder"):
    want["threshold"] = (F,)
  for name, shape in want.items():
    got = weights[name].shape if name in weights else "missing"
    if got != shape:
      raise ValueError(f"{paths[1]}: {name} is {got}, but cfg.json's d_in={D}, d_sae={F} "
                       f"make it {shape}: the weights do not belong to this cfg.json (were "
                       f"they swapped, or edited?)")
  return weights, cfg


def input_offset(weights: dict, cfg: dict) -> np.ndarray:
  """What SAELens subtracts from x before its encoder: b_dec, or zeros where
  cfg's apply_b_dec_to_input is false (a JumpReLU SAE's)."""
  b_dec = np.asarray(weights["b_dec"], np.float32)
  return b_dec if cfg.get("apply_b_dec_to_input", True) else np.zeros_like(b_dec)


def encode(weights: dict, cfg: dict, x_NxD) -> np.ndarray:
  """Codes [N, F] of raw activations by SAELens' formulas for the saved
  architectures: h = (x - b_dec) @ W_enc + b_enc (x @ W_enc + b_enc when
  cfg's apply_b_dec_to_input is false), then relu(h) * (h > θ) ("jumprelu")
  or each row's k largest of relu(h) ("topk")."""
  h = (np.asarray(x_NxD, np.float32) - input_offset(weights, cfg)) @ weights["W_enc"] + \
      weights["b_enc"]
  if cfg["architecture"] in ("jumprelu", "jumprelu_transcoder"):
    return np.maximum(h, 0) * (h > weights["threshold"])
  z = np.zeros_like(h)
  top = np.argpartition(-h, cfg["k"] - 1, axis=1)[:, :cfg["k"]]
  np.put_along_axis(z, top, np.maximum(np.take_along_axis(h, top, axis=1), 0), axis=1)
  return z
