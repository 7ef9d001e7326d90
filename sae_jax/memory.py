"""What a run needs of each device, refused before anything is allocated
when it cannot fit."""

import dataclasses
import math
import os
import typing

import jax
import numpy as np
from jax.experimental import multihost_utils

from sae_jax import mesh
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig


def device_memory() -> int:
  """Bytes each local device has: what JAX reports, or the host's memory
  shared by its (CPU) devices."""
  device = jax.local_devices()[0]
  try:
    have = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001  (not every backend reports)
    have = None
  if have is None:
    have = host_memory() // jax.local_device_count()
  return have


def host_memory() -> int:
  """Bytes of this host's physical memory."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_per_device(trains: typing.Sequence[TrainConfig], n_devices: int,
                      stream_rows: int = 0, latent_shards: int = 1) -> dict:
  """A floor on the bytes each device needs to train SAEs together:
  "state", every SAE's parameters (JumpReLU's thresholds too), two Adam
  moments and a gradient (4 copies); "activations", two [B / data shards,
  F] float32 encoder arrays of the widest SAE (the steps run one at a
  time); "stream", a --stream shuffle buffer of `stream_rows` rows a
  device (the rows and their order). With `latent_shards` M, a device
  holds F / M latents of each, and sees the tokens of one of the
  n_devices / M data shards."""
  state = sum(16 * (2 * c.sae.d_model * c.sae.n_latents // latent_shards
                    + c.sae.n_latents // latent_shards + c.sae.d_model
                    + (c.sae.n_latents if c.sae.selection == "jumprelu" else 0))
              for c in trains)
  tokens = max(trains[0].batch_size * latent_shards // n_devices, 1)
  activations = max(2 * 4 * tokens * c.sae.n_latents // latent_shards for c in trains)
  return {"state": state, "activations": activations,
          "stream": stream_rows * 4 * (trains[0].sae.row_width + 1)}


def _gib(n: int) -> str:
  return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_devices(c: TrainConfig, latent_shards: int = 1) -> None:
  """A latent group must be some of one process's devices or whole
  processes, and the batch must split evenly over the data shards."""
  mesh.check_latent_shards(latent_shards, jax.local_device_count(), jax.device_count())
  n = jax.local_device_count() * jax.process_count() // latent_shards
  if c.batch_size % n:
    shards = "devices" if latent_shards == 1 else "data shards (devices / --latent-shards)"
    raise ValueError(f"--batch-size {c.batch_size} must be divisible by the {n} {shards}")


def check_memory(c: TrainConfig, n_devices: int, latent_shards: int = 1) -> None:
  """Refuses an SAE that cannot fit, before anything is allocated (the floor
  of `memory_per_device`)."""
  need = memory_per_device([c], n_devices, latent_shards=latent_shards)
  have = device_memory()
  if need["state"] + need["activations"] > have:
    tokens = max(c.batch_size * latent_shards // n_devices, 1)
    split = f" (its latents split over {latent_shards})" if latent_shards > 1 else ""
    raise ValueError(
        f"--dict-size {c.sae.n_latents} and --batch-size {c.batch_size} need at least "
        f"{_gib(need['state'] + need['activations'])} on each device ({_gib(need['state'])} of "
        f"parameters, Adam moments and gradients, {_gib(need['activations'])} of encoder "
        f"activations for {tokens} tokens){split}; each of the {jax.local_device_count()} "
        f"{jax.local_devices()[0].platform} devices has {_gib(have)}"
        + ("" if latent_shards == jax.local_device_count() else
           f": split its latents over {'more ' if latent_shards > 1 else ''}devices with "
           f"--latent-shards"))


# Tokens the downstream loss splices at once (`evaluate.splice`'s chunk).
SPLICE_TOKENS = 2048


def end_of_run(config: RunConfig) -> dict:
  """A floor on the bytes the end of a run needs on one device, for what it
  puts there whole. Whole (`splits_end` False), the calibration and
  evaluation: "parameters" (the whole SAE's, no Adam moments) and
  "activations" (one [B, F] float32 batch: the calibration selects by the
  training rule on whole batches). Split over the latent groups
  (`latent_calibration.py`, `latent_evaluate.py`), only the downstream loss
  (--data pythia) puts the whole SAE on a device, splicing
  [SPLICE_TOKENS, F] at a time; {} where nothing is whole."""
  c = config.train
  F, D = c.sae.n_latents, c.sae.d_model
  params = 4 * (2 * D * F + F + D + (F if c.sae.selection == "jumprelu" else 0))
  if not splits_end(config):
    return {"parameters": params, "activations": 4 * c.batch_size * F}
  if config.data == "pythia" and config.downstream_contexts:
    return {"parameters": params, "activations": 4 * SPLICE_TOKENS * F}
  return {}


def splits_end(config: RunConfig) -> bool:
  """Whether the end of a run splits its calibration and evaluation over the
  latent groups: with --latent-shards M > 1, where the whole SAE's cannot
  fit on one device. Where it can, the end runs whole, the same bits
  whatever the mesh (split, the encoder's sums round per shard, and a
  Sampled-SAE pool of near-equal scores can come out otherwise)."""
  if config.latent_shards == 1:
    return False
  whole = dataclasses.replace(config, latent_shards=1)
  return sum(end_of_run(whole).values()) > device_memory()


def splits_end_agreed(config: RunConfig) -> bool:
  """`splits_end`, agreed by every process (all must call this together):
  split where any one's devices cannot hold the whole end, so that no
  process runs it whole while the others wait for it over the mesh."""
  split = splits_end(config)
  if jax.process_count() == 1:
    return split
  return bool(np.any(multihost_utils.process_allgather(np.asarray(split))))


def check_end_of_run(configs: typing.Sequence[RunConfig]) -> None:
  """Refuses, before training, SAEs whose end of run cannot fit on one
  device (`end_of_run`), rather than failing after their training."""
  have = device_memory()
  for config in configs:
    c, need = config.train, end_of_run(config)
    if sum(need.values()) > have:
      split = splits_end(config)
      what = ("calibrates and evaluates the whole SAE on one device" if not split
              else f"splices the whole SAE into the model for the downstream loss "
                   f"({SPLICE_TOKENS} tokens at a time)")
      cure = ("split its latents over devices with --latent-shards" if not split
              else "use --downstream-contexts 0")
      raise ValueError(
          f"--dict-size {c.sae.n_latents} at D={c.sae.d_model}"
          + (f" with --batch-size {c.batch_size}" if not split else "") +
          f" needs at least {_gib(sum(need.values()))} on one device at the end "
          f"of the run ({_gib(need['parameters'])} of parameters, "
          f"{_gib(need['activations'])} of encoder activations), which {what}; each of the "
          f"{jax.local_device_count()} {jax.local_devices()[0].platform} devices has "
          f"{_gib(have)}: {cure}, or use fewer latents")


def check_evaluation(configs: typing.Sequence[RunConfig], rows: typing.Sequence[int]) -> None:
  """Refuses, before training, an evaluation whose held-out codes cannot fit
  in the host's memory at the end of the run: a floor of two [rows, F]
  float32 arrays (inference and batch mode), one run at a time, `rows` the
  held-out rows of each (`sources.eval_rows`)."""
  host = host_memory()
  for config, n in zip(configs, rows):
    need = 2 * 4 * n * config.train.sae.n_latents
    if need > host:
      held = (f"--eval-tokens {config.eval_tokens}" if n == config.eval_tokens else
              f"{n} held-out rows (a tenth of --data {config.data})")
      raise ValueError(
          f"{held} with --dict-size {config.train.sae.n_latents} needs at least "
          f"{_gib(need)} of host memory for the held-out codes at the end of the run; this "
          f"host has {_gib(host)}: use fewer --eval-tokens")


def check_memory_many(configs: typing.Sequence[RunConfig], n_devices: int) -> None:
  """Says what training `configs` together needs on each device, and refuses
  it, before anything is allocated, when that is more than a device has."""
  first = configs[0]
  rows = (math.ceil(first.stream_contexts / n_devices) * first.export.context_length
          if first.stream else 0)
  m = first.latent_shards
  need = memory_per_device([config.train for config in configs], n_devices, rows, m)
  have = device_memory()
  total = sum(need.values())
  what = (f"{_gib(total)} on each device: {_gib(need['state'])} of parameters, Adam moments and "
          f"gradients of {len(configs)} SAEs" + (f" (their latents split over {m})" if m > 1
                                                  else "") +
          f", {_gib(need['activations'])} of encoder "
          f"activations" + (f", {_gib(need['stream'])} of stream buffer and the language "
                            f"model's weights" if first.stream else ""))
  if total > have:
    raise ValueError(f"the {len(configs)} SAEs trained in one pass need at least {what}; each of "
                     f"the {jax.local_device_count()} {jax.local_devices()[0].platform} devices "
                     f"has {_gib(have)}: train fewer at once, or sequentially")
  print(f"memory: the one pass needs at least {what} (of {_gib(have)})", flush=True)
