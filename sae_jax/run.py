"""The main job: data, state, training loop, checkpoints, evaluation, export.

`experiments/train.py` parses a `RunConfig` and calls `run`. Re-running with
the same `out` resumes from the latest checkpoint and ends with the same
parameters as a run that was never interrupted.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import time
import typing

import jax
import numpy as np
import safetensors
from jax.experimental import multihost_utils

from sae_jax import checkpoint
from sae_jax import data
from sae_jax import evaluate
from sae_jax import export as export_lib
from sae_jax import saelens
from sae_jax import spelling
from sae_jax import storage
from sae_jax import synthetic as synthetic_lib
from sae_jax import thresholds
from sae_jax import train
from sae_jax import validation
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig

# May change between a run and its resume.
# Fields a run may change when it resumes: train.step only changes how the
# same gradients are computed, and the cache's manifest guards its backend.
# inference and calibration_tokens only change what is done after training.
# out is where the run is, not what it is: a run found under another spelling
# of its path (or moved) resumes.
RESUMABLE_FIELDS = ("log_every", "ckpt_every", "keep_checkpoints", "wandb", "tensorboard",
                    "train.step", "export.backend", "inference", "calibration_tokens", "out")
# Fields added after runs were saved without them: what those runs meant.
_ADDED_FIELDS = {"stream": False, "stream_contexts": 512, "train.sae.ridge": 0.01,
                 "train.sae.sketch": None, "train.sae.pool_every": 1, "synthetic.parents": 0,
                 "synthetic.children": 4, "synthetic.child_given_parent": 0.5}
INIT_SAMPLE = 4096
# Synthetic batches are indexed by step; these indices are never training steps.
SYNTHETIC_INIT_STEP, SYNTHETIC_EVAL_STEP, SYNTHETIC_CALIBRATION_STEP = (
    2**31 - 1, 2**31 - 2, 2**31 - 3)
INFERENCE_RULES = ("per-latent", "global")
# config.json's record of the data a run trains on (not part of the config).
FINGERPRINT = "data_fingerprint"
_ENDS = 1 << 20  # bytes at each end of a .npy that its fingerprint hashes
# The SAE saw raw transformers hidden states, not TransformerLens' centred ones.
MODEL_KWARGS = {"model_from_pretrained_kwargs": {"center_writing_weights": False}}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A training run: what to train, on which data, and where the outputs go."""
  train: TrainConfig
  """The SAE and its recipe."""
  out: str
  """Output directory: config.json, metrics.jsonl, checkpoints/, summary.json, saelens/."""
  data: str = "pythia"
  """"pythia" (the cache in cache_dir, exported first if missing), "synthetic",
  a cache directory or a .npy file [N, D]."""
  cache_dir: str = "cache/pythia-160m"
  """Where --data pythia keeps its activation cache."""
  # A factory: ExportConfig() asks JAX for its backend, which must wait for
  # jax.distributed.initialize on several hosts.
  export: export_lib.ExportConfig = dataclasses.field(default_factory=export_lib.ExportConfig)
  """Model, hook and text for --data pythia (its token budget is set by the run)."""
  synthetic: synthetic_lib.SyntheticConfig = synthetic_lib.SyntheticConfig()
  """The generating process for --data synthetic."""
  eval_tokens: int = 65536
  """Held-out tokens for the final evaluation."""
  inference: str = "per-latent"
  """The saved SAE's rule (BatchTopK, Sampled-SAE): "per-latent", a threshold
  per latent calibrated to fire it as often as training did, or "global",
  the EMA of the batch's smallest selected activation for every latent."""
  calibration_tokens: int = 65536
  """Training tokens the per-latent thresholds are calibrated on (whole
  batches; fewer if the data hold fewer)."""
  downstream_contexts: int = 16
  """--data pythia: contexts after the exported ones for the spliced-loss evaluation."""
  stream: bool = False
  """--data pythia: make the activations on the fly with the JAX model on the
  training devices, through an on-device shuffle buffer (no cache)."""
  stream_contexts: int = 512
  """--stream: contexts whose rows are shuffled together (over all devices)."""
  log_every: int = 100
  """Steps between lines of metrics.jsonl."""
  ckpt_every: int = 1000
  """Steps between checkpoints (one is also saved at the end and on SIGTERM)."""
  keep_checkpoints: int = 3
  """Checkpoints kept."""
  wandb: bool = False
  """Also log metrics to Weights & Biases (needs the wandb package)."""
  tensorboard: bool = False
  """Also log metrics for TensorBoard (needs the tensorboardX package)."""

  def __post_init__(self):
    for name in ("eval_tokens", "log_every", "ckpt_every", "keep_checkpoints",
                 "stream_contexts"):
      validation.check_int_field("RunConfig", name, getattr(self, name))
    validation.check_choice_field("RunConfig", "inference", self.inference, INFERENCE_RULES)
    validation.check_int_field("RunConfig", "calibration_tokens", self.calibration_tokens)
    if self.calibration_tokens < self.train.batch_size:
      raise ValueError(f"RunConfig.calibration_tokens ({self.calibration_tokens}) must be at "
                       f"least one batch ({self.train.batch_size} tokens): the training rule "
                       f"is calibrated on whole batches")
    validation.check_int_field("RunConfig", "downstream_contexts", self.downstream_contexts,
                               minimum=0)
    if not isinstance(self.stream, bool):
      raise ValueError(f"RunConfig.stream must be True or False; got {self.stream!r}")
    check_stream(self.stream, self.data, self.export.backend)
    if self.data not in ("pythia", "synthetic"):
      path = storage.path(self.data)
      if not (path.is_dir() or (path.suffix == ".npy" and path.is_file())):
        raise ValueError(f"--data must be 'pythia', 'synthetic', a cache directory or a .npy "
                         f"file; {self.data!r} is none of these")
    if self.data == "synthetic" and self.synthetic.d_model != self.train.sae.d_model:
      raise ValueError(f"d_model {self.train.sae.d_model} differs from the synthetic data's "
                       f"{self.synthetic.d_model}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["train"] = self.train.to_dict()
    d["export"] = self.export.identity() | {"tokens": self.export.tokens,
                                            "device": self.export.device}
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "RunConfig":
    d = dict(d)
    d.pop(FINGERPRINT, None)
    return cls(train=TrainConfig.from_dict(d.pop("train")),
               export=export_lib.ExportConfig(**d.pop("export")),
               synthetic=synthetic_lib.SyntheticConfig(**d.pop("synthetic")), **d)


def check_stream(stream: bool, data_arg: str, backend: str) -> None:
  """--stream needs --data pythia and the JAX model."""
  if stream and data_arg != "pythia":
    raise ValueError(f"--stream makes activations with the language model: it needs "
                     f"--data pythia; got --data {data_arg!r}")
  if stream and backend != "jax":
    raise ValueError(f"--stream runs the model in JAX; got --backend {backend!r}")


def reachable_model(model: str, revision=None) -> pathlib.Path:
  """The directory holding `model`'s config.json (a local directory, or the
  hub's copy, downloaded or cached); one line saying what to do instead when
  there is none. The hub is asked once, so an offline machine fails fast."""
  from sae_jax import neox  # noqa: PLC0415
  if model.startswith(("/", "./", "../", "~")) and not pathlib.Path(model).is_dir():
    raise ValueError(f"--model {model!r}: there is no such directory (a local model is a "
                     f"directory with config.json and *.safetensors)")
  try:
    return neox.model_dir(model, revision, ("config.json",))
  except (OSError, ValueError) as error:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ValueError(
        f"could not reach the model {model!r} ({reason}): it is not a local directory, and "
        f"neither the Hugging Face hub nor its local cache has it. Pass a local copy with "
        f"--model DIR, or set HF_HUB_OFFLINE=1 with the model (and --dataset) in the "
        f"Hugging Face cache, or train offline on --data synthetic") from None


def d_model_of(data_arg: str, *, cache_dir: str, model: str, revision=None,
               synthetic_d_model: int, stream: bool = False) -> int:
  """The activation width D of a run's data, found without doing any work."""
  if data_arg == "synthetic":
    return synthetic_d_model
  if data_arg == "pythia":
    manifest = None if stream else export_lib.read_manifest(cache_dir)
    if manifest is not None and "d_model" in manifest:
      return manifest["d_model"]
    directory = reachable_model(model, revision)
    if stream:
      from sae_jax import neox  # noqa: PLC0415
      return neox.load_config(str(directory)).hidden_size
    import transformers
    return transformers.AutoConfig.from_pretrained(directory).hidden_size
  path = storage.path(data_arg)
  if path.suffix == ".npy" and path.is_file():
    shape = data.open_npy(path).shape
    if len(shape) != 2:
      raise ValueError(f"{data_arg} must hold activations [N, D] (2 dimensions); got shape {shape}")
    return shape[1]
  manifest = export_lib.read_manifest(path) if path.is_dir() else None
  if manifest is None or "d_model" not in manifest:
    raise ValueError(f"--data {data_arg!r} is not 'pythia', 'synthetic', an activation cache "
                     f"directory or a .npy file")
  return manifest["d_model"]


class _Data(typing.NamedTuple):
  # (start step, saved position or None) -> batches
  batches: typing.Callable[[int, typing.Optional[dict]], typing.Iterator]
  sample: np.ndarray  # raw rows for the initialisation
  held_out: typing.Callable[[], np.ndarray]
  metadata: dict  # for SAELens
  calibration: typing.Callable[[int], np.ndarray]  # n -> raw training rows
  dictionary: typing.Optional[np.ndarray] = None  # synthetic ground truth
  position: typing.Callable[[int], typing.Optional[dict]] = lambda step: None  # to save
  # (final state, thresholds θ_F) -> the spliced-loss metrics
  downstream: typing.Optional[typing.Callable[[train.TrainState, np.ndarray], dict]] = None
  # The held-out rows' true coefficients [N, M] (synthetic data).
  true_codes: typing.Optional[typing.Callable[[], np.ndarray]] = None
  # The held-out rows' (token ids [N], first letters [N]) (a cache whose
  # model's tokenizer loads), or None.
  letters: typing.Optional[typing.Callable[[], typing.Optional[tuple]]] = None


def _open_data(config: RunConfig, n_devices: int, *, verify: bool = False) -> _Data:
  c = config.train
  if config.data == "synthetic":
    source = synthetic_lib.SyntheticSource(config.synthetic)
    p, n_proc = jax.process_index(), jax.process_count()

    def batches(start, position):
      for step in range(start, 2**31 - 2):
        rows = source.sample(step, c.batch_size).reshape(n_proc, -1, c.sae.d_model)[p]
        yield rows.reshape(n_devices, -1, c.sae.d_model)

    return _Data(batches, source.sample(SYNTHETIC_INIT_STEP, INIT_SAMPLE),
                 lambda: source.sample(SYNTHETIC_EVAL_STEP, config.eval_tokens),
                 {"model_name": "synthetic", "hook_name": "synthetic", "context_size": None,
                  "prepend_bos": False, "dataset_path": "synthetic"},
                 lambda n: source.sample(SYNTHETIC_CALIBRATION_STEP, n), source.dictionary,
                 true_codes=lambda: source.sample_with_codes(SYNTHETIC_EVAL_STEP,
                                                             config.eval_tokens)[1])
  if config.stream:
    return _open_stream(config)
  path = config.data
  if config.data == "pythia":
    path = config.cache_dir
    needed = c.total_steps * c.batch_size + config.eval_tokens
    export_lib.export_activations(dataclasses.replace(config.export, tokens=needed), path)
  manifest = export_lib.read_manifest(path) if storage.path(path).is_dir() else None
  n_rows = data.Activations(path).n_rows
  eval_rows = held_out_rows(config.eval_tokens, n_rows)
  if eval_rows < config.eval_tokens:
    print(f"holding out {eval_rows} rows for evaluation (a tenth of {n_rows}), "
          f"not eval_tokens={config.eval_tokens}", flush=True)
  if verify:
    print(f"verifying every shard of {path} against its sha256", flush=True)
  acts = data.Activations(path, eval_rows=eval_rows, verify=verify)
  metadata = {"model_name": manifest["model"] if manifest else "unknown",
              "hook_name": manifest["hook"] if manifest else "unknown",
              "context_size": manifest["context_length"] if manifest else None,
              "prepend_bos": False,
              "dataset_path": manifest["dataset"] if manifest else str(path),
              **(MODEL_KWARGS if manifest else {})}
  train_rows = acts.n_rows - eval_rows

  def letters():
    tokenizer = spelling.load_tokenizer(manifest["model"], manifest.get("revision"))
    if tokenizer is None:
      return None
    tokens = acts.eval_tokens()
    return tokens, spelling.token_letters(tokenizer, tokens)

  return _Data(
      lambda start, position: acts.batches(c.batch_size, n_devices, seed=c.seed,
                                           start_step=start),
      acts.sample(min(INIT_SAMPLE, train_rows), seed=c.seed),
      acts.eval_batch, metadata, lambda n: acts.sample(min(n, train_rows), seed=c.seed + 1),
      downstream=((lambda state, theta: _downstream(config, state, theta))
                  if config.data == "pythia" else None),
      letters=letters if manifest else None)


def _pythia_metadata(e: export_lib.ExportConfig) -> dict:
  return {"model_name": e.model, "hook_name": e.hook, "context_size": e.context_length,
          "prepend_bos": False,
          "dataset_path": list(e.dataset) if isinstance(e.dataset, tuple) else e.dataset,
          **MODEL_KWARGS}


def _open_stream(config: RunConfig) -> _Data:
  from sae_jax import stream as stream_lib  # noqa: PLC0415
  c = config.train
  source = stream_lib.Stream(
      config.export, train.make_mesh(), batch_size=c.batch_size,
      round_contexts=config.stream_contexts, eval_tokens=config.eval_tokens,
      downstream_contexts=config.downstream_contexts, seed=c.seed)

  def downstream(state, theta_F):
    return _downstream_jax(config, state, theta_F, source.lm_params, source.lm_config,
                           source.downstream_contexts)

  return _Data(source.batches, source.sample(INIT_SAMPLE), source.held_out,
               _pythia_metadata(config.export), source.sample, position=source.position,
               downstream=downstream)


def _downstream_jax(config: RunConfig, state: train.TrainState, theta_F, lm_params,
                    lm_config, ids_BxL: np.ndarray) -> dict:
  from sae_jax import downstream  # noqa: PLC0415
  if not len(ids_BxL):
    print("no contexts for the downstream loss: skipped", flush=True)
    return {}
  result = downstream.downstream_loss_jax(
      lm_params, lm_config, config.export.hook, ids_BxL, evaluate.splice(state.config.sae),
      (state.params, np.asarray(theta_F, np.float32), np.float32(state.input_scale)))
  return {f"downstream_{k}": v for k, v in result.items()}


def _downstream(config: RunConfig, state: train.TrainState, theta_F) -> dict:
  """Spliced-loss metrics on the contexts that follow the exported ones."""
  import transformers
  from sae_jax import downstream
  e = config.export
  used = export_lib.read_manifest(config.cache_dir)["total_tokens"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(e.model, revision=e.revision)
  excluded, rows, held_out = set(e.exclude_token_ids), 0, []
  for context in export_lib.contexts(e, tokenizer):
    if rows < used:  # a training (or evaluation-row) context: skip it
      rows += sum(int(t) not in excluded for t in context[1:])
    elif len(held_out) < config.downstream_contexts:
      held_out.append(context)
    else:
      break
  if not held_out:
    print("no text left after the exported tokens: downstream loss skipped", flush=True)
    return {}
  if e.backend == "jax":
    from sae_jax import neox  # noqa: PLC0415
    lm_config, lm_params = neox.load(e.model, e.revision)
    return _downstream_jax(config, state, theta_F, lm_params, lm_config, np.stack(held_out))
  splice = lambda h: evaluate.reconstruct(state.params, theta_F, state.input_scale, h,
                                          state.config.sae)[1]
  result = downstream.downstream_loss(e.model, e.hook, np.stack(held_out), splice,
                                      revision=e.revision, device=e.device)
  return {f"downstream_{k}": v for k, v in result.items()}


def _strict(value):
  """`value` with every non-finite float replaced by None (strict JSON)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def writes() -> bool:
  """Whether this process writes the run's own files (config.json,
  metrics.jsonl, summary.json, saelens/): process 0 of a multi-host run,
  whose files every host would write the same; orbax writes the
  checkpoints from every host, as it must."""
  return jax.process_index() == 0


def _write_text(path: pathlib.PurePath, text: str, then: str) -> None:
  """`text` written whole or not at all (`storage.atomic_write`), by process
  0 only; a failed write (a full disk) leaves nothing behind and is one line
  naming the file and `then`."""
  if not writes():
    return
  try:
    storage.atomic_write(path, lambda f: f.write(text.encode()))
  except OSError as error:
    raise ValueError(f"could not write {path} ({error.strerror or error}); nothing was left "
                     f"half-written: free space and re-run to {then}") from None


def write_json(path: pathlib.PurePath, value) -> None:
  """Strict JSON (NaN and inf as null), written whole or not at all."""
  _write_text(path, json.dumps(_strict(value), indent=1, allow_nan=False), "continue")


def _read_json(path: pathlib.PurePath) -> dict:
  return export_lib.read_json_object(path, "run config", "it was damaged outside sae_jax; "
                                                         "restore it, or use another --out")


def _check_resume(out: pathlib.PurePath, config: RunConfig) -> None:
  path = out / "config.json"
  new = config.to_dict()
  if path.exists():
    saved = _read_json(path)
    old = {k: v for k, v in saved.items() if k != FINGERPRINT}
    before, after = _ADDED_FIELDS | _flat(old), _flat(new)
    differences = [f"{k}: saved {before.get(k)!r}, now {after.get(k)!r}"
                   for k in sorted(set(before) | set(after))
                   if k not in RESUMABLE_FIELDS and before.get(k) != after.get(k)]
    if differences:
      raise ValueError(f"{out} holds a run with another config; refusing to resume it "
                       f"(use another --out):\n  " + "\n  ".join(differences))
    if old == new:
      return  # unchanged: nothing to write (so a full disk cannot stop a finished run here)
    if FINGERPRINT in saved:
      new[FINGERPRINT] = saved[FINGERPRINT]
  write_json(path, new)


def data_fingerprint(config: RunConfig) -> typing.Optional[dict]:
  """What identifies the run's data on disk: a cache by its shards' sha256s
  (from the manifest), a .npy by its size, mtime and a sha256 of its first
  and last MiB. None for data made from the config (synthetic, --stream)."""
  if config.data == "synthetic" or config.stream:
    return None
  path = storage.path(config.cache_dir if config.data == "pythia" else config.data)
  if path.is_dir():
    manifest = export_lib.read_manifest(path) or {}
    shards = "".join(shard["sha256"]["acts"] for shard in manifest.get("shards", []))
    return {"kind": "cache", "rows": manifest.get("total_tokens"),
            "sha256": hashlib.sha256(shards.encode()).hexdigest()}
  size = storage.size(path)
  ends = hashlib.sha256()
  with path.open("rb") as f:
    ends.update(f.read(_ENDS))
    f.seek(max(size - _ENDS, 0))
    ends.update(f.read(_ENDS))
  return {"kind": "npy", "bytes": size, "mtime": storage.mtime(path),
          "sha256_ends": ends.hexdigest()}


def _check_data(out: pathlib.PurePath, config: RunConfig, resuming: bool) -> None:
  """Refuses to resume on data other than the run's; records them otherwise."""
  path = out / "config.json"
  if not writes() and not path.exists():  # process 0's files need not be on this host
    return
  saved = _read_json(path)
  old, new = saved.get(FINGERPRINT), data_fingerprint(config)
  if resuming and old is not None and new is not None:
    changed = [f"{k} {old.get(k)!r} then, {new.get(k)!r} now"
               for k in ("kind", "rows", "bytes", "sha256", "sha256_ends")
               if old.get(k) != new.get(k)]
    if changed:
      raise ValueError(f"--data {config.data}: the data differ from those this run was "
                       f"checkpointed on ({'; '.join(changed)}); refusing to resume on other "
                       f"data: restore them, or use another --out")
    if old.get("mtime") != new.get("mtime"):
      print(f"--data {config.data} was modified since the run began, but its size and first "
            f"and last MiB are the same: resuming", flush=True)
  if new is not None and (old != new or not resuming):
    write_json(path, saved | {FINGERPRINT: new})


LOCK = ".lock"


def _claim(out) -> typing.Callable[[], None]:
  """Creates `out` and takes its lock; returns what releases it. Locally an
  advisory lock on out/.lock holding our pid, released when the descriptor
  closes or the process dies; on gs:// a `storage.Lease` in out/.lock. Only
  process 0 of a multi-host run takes it. Stale temporary files (a run
  killed while writing) are removed once it is held."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {str(out)!r} is a file, not a directory")
  if storage.is_remote(out):
    if jax.process_index():
      return lambda: None
    storage.check_bucket(out, "--out")
    lease = storage.Lease(out / LOCK)
    try:
      holder = lease.acquire()
    except OSError as error:
      raise ValueError(f"--out {out}: cannot write there ({type(error).__name__}: {error}); "
                       f"check that the bucket exists and that this machine's credentials may "
                       f"write to it") from None
    if holder is not None:
      raise ValueError(f"--out {out} is in use by another run ({holder}): wait for it to end, "
                       f"or use another --out (a lease not renewed for "
                       f"{storage.Lease.STALE:.0f} s is taken over)")
    return lease.release
  try:
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index():
      return lambda: None
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise ValueError(f"--out {str(out)!r}: cannot write there ({error.strerror})") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    raise ValueError(f"--out {out} is in use by another run (pid {holder}): wait for it to "
                     f"end, or use another --out") from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  except OSError as error:
    os.close(fd)
    raise ValueError(f"could not write {out / LOCK} ({error.strerror}); free space and "
                     f"re-run") from None
  _remove_stale(out)
  return lambda: os.close(fd)


def _remove_stale(out) -> None:
  """Removes temporary files a run killed while writing left in `out` (none
  on gs://, where nothing is written under a temporary name)."""
  if storage.is_remote(out):
    return
  for stale in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*"),
                *out.glob("checkpoints/.*.tmp-*")]:
    shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def _resume_metrics(path: pathlib.PurePath, step: int) -> None:
  """Cuts metrics.jsonl back to its lines up to `step` (the checkpoint's).
  A line that does not parse (cut short by a full disk or kill -9, or
  garbage) is dropped, and named with its file and line number."""
  if not path.exists():
    return
  kept, bad = [], []
  text = path.read_bytes().decode(errors="replace")
  lines = text.splitlines()
  for number, line in enumerate(lines, 1):
    try:
      logged = json.loads(line)["step"]
      if isinstance(logged, bool) or not isinstance(logged, int):
        raise ValueError(f"step is {logged!r}")
    except (ValueError, KeyError, TypeError) as error:
      bad.append(f"{path}:{number}: unreadable metrics line dropped ({error})")
      continue
    if logged <= step:
      kept.append(line)
  for line in bad[:3] + ([f"{path}: {len(bad) - 3} more unreadable lines dropped"]
                         if len(bad) > 3 else []):
    print(line, flush=True)
  if not bad and len(kept) == len(lines) and text.endswith("\n") == bool(lines):
    return  # already cut at the step
  _write_text(path, "".join(line + "\n" for line in kept), "resume")


def _finite(rows: np.ndarray, what: str) -> tuple:
  """The finite rows of `rows` and how many were dropped (said in a line)."""
  keep = np.isfinite(rows).all(axis=1)
  dropped = int(len(rows) - np.count_nonzero(keep))
  if dropped:
    print(f"{what}: dropped {dropped} of {len(rows)} rows that are not finite", flush=True)
    rows = rows[keep]
  if not len(rows):
    raise ValueError(f"{what}: all {dropped} rows are NaN or infinite; check the activations")
  return rows, dropped


def _device_memory() -> int:
  """Bytes each local device has: what JAX reports, or the host's memory
  shared by its (CPU) devices."""
  device = jax.local_devices()[0]
  try:
    have = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001  (not every backend reports)
    have = None
  if have is None:
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
  return have


def memory_per_device(trains: typing.Sequence[TrainConfig], n_devices: int,
                      stream_rows: int = 0) -> dict:
  """A floor on the bytes each device needs to train SAEs together:
  "state", every SAE's parameters, two Adam moments and a gradient (4
  copies); "activations", two [B / devices, F] float32 encoder arrays of the
  widest SAE (the steps run one at a time); "stream", a --stream shuffle
  buffer of `stream_rows` rows a device (the rows and their order)."""
  state = sum(16 * (2 * c.sae.d_model * c.sae.n_latents + c.sae.n_latents + c.sae.d_model)
              for c in trains)
  tokens = max(trains[0].batch_size // n_devices, 1)
  activations = max(2 * 4 * tokens * c.sae.n_latents for c in trains)
  return {"state": state, "activations": activations,
          "stream": stream_rows * 4 * (trains[0].sae.d_model + 1)}


def _gib(n: int) -> str:
  return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_memory(c: TrainConfig, n_devices: int) -> None:
  """Refuses an SAE that cannot fit, before anything is allocated (the floor
  of `memory_per_device`)."""
  need = memory_per_device([c], n_devices)
  have = _device_memory()
  if need["state"] + need["activations"] > have:
    tokens = max(c.batch_size // n_devices, 1)
    raise ValueError(
        f"--dict-size {c.sae.n_latents} and --batch-size {c.batch_size} need at least "
        f"{_gib(need['state'] + need['activations'])} on each device ({_gib(need['state'])} of "
        f"parameters, Adam moments and gradients, {_gib(need['activations'])} of encoder "
        f"activations for {tokens} tokens); each of the {jax.local_device_count()} "
        f"{jax.local_devices()[0].platform} devices has {_gib(have)}")


def check_memory_many(configs: typing.Sequence[RunConfig], n_devices: int) -> None:
  """Says what training `configs` together needs on each device, and refuses
  it, before anything is allocated, when that is more than a device has."""
  first = configs[0]
  rows = (math.ceil(first.stream_contexts / n_devices) * first.export.context_length
          if first.stream else 0)
  need = memory_per_device([config.train for config in configs], n_devices, rows)
  have = _device_memory()
  total = sum(need.values())
  what = (f"{_gib(total)} on each device: {_gib(need['state'])} of parameters, Adam moments and "
          f"gradients of {len(configs)} SAEs, {_gib(need['activations'])} of encoder "
          f"activations" + (f", {_gib(need['stream'])} of stream buffer and the language "
                            f"model's weights" if first.stream else ""))
  if total > have:
    raise ValueError(f"the {len(configs)} SAEs trained in one pass need at least {what}; each of "
                     f"the {jax.local_device_count()} {jax.local_devices()[0].platform} devices "
                     f"has {_gib(have)}: train fewer at once, or sequentially")
  print(f"memory: the one pass needs at least {what} (of {_gib(have)})", flush=True)


def held_out_rows(eval_tokens: int, n_rows: int) -> int:
  """Rows at the end of disk data held out for evaluation: eval_tokens, at
  most a tenth of the data."""
  return min(eval_tokens, n_rows // 10)


def check_data_size(config: RunConfig) -> None:
  """Disk data must hold one batch of training rows and a held-out row;
  with several processes, --data pythia's cache must be complete already
  (one export, not one per process into the same folder)."""
  if config.data == "pythia" and not config.stream and jax.process_count() > 1:
    manifest = export_lib.read_manifest(config.cache_dir) or {}
    needed = config.train.total_steps * config.train.batch_size + config.eval_tokens
    have = manifest.get("total_tokens", 0) if manifest.get("complete") else 0
    if have < needed:
      raise ValueError(
          f"--data pythia on {jax.process_count()} processes reads the cache in --cache-dir "
          f"{config.cache_dir}, which holds {have} of the {needed} tokens the run needs: export "
          f"it first, once (experiments/export_activations.py --out {config.cache_dir} --tokens "
          f"{needed} with the same --model, --hook and --dataset), or use --stream")
  if config.data in ("pythia", "synthetic"):
    return
  n_rows = data.Activations(config.data).n_rows
  held_out = lambda n: held_out_rows(config.eval_tokens, n)
  if held_out(n_rows) < 1 or n_rows - held_out(n_rows) < config.train.batch_size:
    need = max(10, config.train.batch_size)
    while need - held_out(need) < config.train.batch_size:
      need += 1
    raise ValueError(
        f"--data {config.data} holds {n_rows} rows: a run needs one batch "
        f"(--batch-size {config.train.batch_size}) of training rows plus held-out rows (a "
        f"tenth of the data, at most --eval-tokens), so at least {need} rows")


def _loggers(config: RunConfig, out: pathlib.PurePath):
  """Optional metric sinks, imported only when asked for: (log functions,
  close functions)."""
  sinks, closers = [], []
  if config.wandb:
    try:
      import wandb
    except ImportError:
      raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    run = wandb.init(project="sae_jax", dir=str(out), config=config.to_dict(),
                     id=out.name, resume="allow")
    sinks.append(lambda step, m: run.log(m, step=step))
    closers.append(run.finish)
  if config.tensorboard:
    try:
      import tensorboardX
    except ImportError:
      raise ValueError("--tensorboard needs the tensorboardX package: pip install tensorboardX") \
          from None
    writer = tensorboardX.SummaryWriter(str(out / "tensorboard"))
    sinks.append(lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()])
    closers.append(writer.close)
  return sinks, closers


def run(config: RunConfig, *, progress: bool = True,
        verify: bool = False) -> typing.Optional[dict]:
  """Trains (or resumes), then evaluates and exports.

  SIGTERM and a first Ctrl-C (SIGINT) finish the step in flight, save a
  checkpoint and stop; a second Ctrl-C exits at once (exit status 130),
  leaving the last finished checkpoint to resume from.

  Args:
    verify: check every cache shard's sha256 before training.

  Returns:
    The summary, or None if SIGTERM stopped the run (after a checkpoint).

  Raises:
    KeyboardInterrupt: Ctrl-C stopped the run (after a checkpoint).
  """
  _check_devices(config.train)
  check_memory(config.train, jax.device_count())
  check_data_size(config)
  summaries = _locked_run([config], storage.path(config.out), progress=progress, verify=verify)
  return None if summaries is None else summaries[0]


def _check_devices(c: TrainConfig) -> None:
  n = jax.local_device_count() * jax.process_count()
  if c.batch_size % n:
    raise ValueError(f"--batch-size {c.batch_size} must be divisible by the {n} devices")


def _locked_run(configs: list, out: pathlib.PurePath, *, progress: bool, verify: bool):
  """`_run` holding the lock on `out`."""
  release = _claim(out)
  try:
    return _run(configs, out, progress=progress, verify=verify)
  finally:
    release()


# What run_many's runs may set each their own way: the SAE (but its width)
# and the recipe; everything that decides the batches is shared.
_OWN_FIELDS = ("out", "train.sae", "train.learning_rate", "train.b1", "train.b2",
               "train.clip_norm", "train.warmup_steps", "train.decay_fraction",
               "train.auxk_weight", "train.dead_tokens", "train.threshold_beta",
               "train.threshold_start", "train.max_bad_steps", "train.step")
SWEEP_FILE = "sweep.json"  # run_many's record of its runs' names


def run_many(configs: typing.Sequence[RunConfig], out, *, progress: bool = True,
             verify: bool = False) -> typing.Optional[list]:
  """Trains several runs in one pass over one stream of batches (each batch
  is read, or made by the model, once), then evaluates and exports each.

  Each run writes what `run` writes into its own `config.out`, except the
  checkpoints: one, of every run's state, in `out/checkpoints`. Each run
  ends with the same parameters, bit for bit, as when trained alone by
  `run`; re-running resumes them all, and a changed list of runs is refused.
  A run already finished (every output written) is not exported again.

  Args:
    configs: runs that differ only in their SAE (not its width) and recipe,
      each with its own `out`.
    out: the sweep's directory (the lock, sweep.json, checkpoints/).
    verify: check every cache shard's sha256 before training.

  Returns:
    The summaries, in order, or None if SIGTERM stopped the pass.

  Raises:
    KeyboardInterrupt: Ctrl-C stopped the pass (after a checkpoint).
  """
  configs, out = list(configs), storage.path(out)
  first = _flat(configs[0].to_dict())
  for config in configs[1:]:
    other = _flat(config.to_dict())
    differ = [k for k in sorted(set(first) | set(other))
              if not k.startswith(_OWN_FIELDS) and first.get(k) != other.get(k)]
    if configs[0].train.sae.d_model != config.train.sae.d_model:
      differ.append("train.sae.d_model")
    if differ:
      raise ValueError(f"run_many trains runs on one stream of batches: {config.out} and "
                       f"{configs[0].out} differ in {', '.join(differ)}")
  homes = [_absolute(config.out) for config in configs]
  if len(set(homes)) != len(homes) or _absolute(out) in homes:
    raise ValueError(f"run_many's runs need an out each, apart from the sweep's {out}; got "
                     f"{[config.out for config in configs]}")
  _check_devices(configs[0].train)
  check_memory_many(configs, jax.device_count())
  check_data_size(configs[0])
  return _locked_run(configs, out, progress=progress, verify=verify)


def _absolute(path) -> str:
  """A path to compare: absolute if local, the URL if remote."""
  return str(path) if storage.is_remote(path) else str(pathlib.Path(path).absolute())


def _flat(d: dict, prefix: str = "") -> dict:
  """{"a.b": v} from {"a": {"b": v}}."""
  return {k2: v2 for k, v in d.items() for k2, v2 in (
      _flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}


def _check_runs(out: pathlib.PurePath, names: list) -> None:
  """Refuses to resume a pass over another list of runs; records the list."""
  path = out / SWEEP_FILE
  if path.exists():
    saved = export_lib.read_json_object(path, "sweep record", "restore it, or use another --out")
    before = saved.get("runs")
    if before != names:
      gone = [n for n in before or [] if n not in names]
      new = [n for n in names if n not in (before or [])]
      what = "; ".join(filter(None, [f"removed {', '.join(gone)}" if gone else "",
                                     f"added {', '.join(new)}" if new else "",
                                     "" if gone or new else "the same runs in another order"]))
      raise ValueError(f"{out} holds a sweep of other runs; refusing to resume it (use another "
                       f"--out, or the same variants): {what}")
    return
  write_json(path, {"runs": names})


def _run(configs: list, out: pathlib.PurePath, *, progress: bool, verify: bool):
  """Trains `configs` together (one data stream, one checkpoint in `out`),
  then evaluates and exports each; `run` is the case of one, in `out`."""
  one = len(configs) == 1 and _absolute(configs[0].out) == _absolute(out)
  homes = [storage.path(config.out) for config in configs]
  names = [home.name for home in homes]
  c = configs[0].train
  n_devices = jax.local_device_count()
  if not one:
    _check_runs(out, names)
  for home, config in zip(homes, configs):
    if not one:  # `run` has made `out` and cleaned it under its lock
      home.mkdir(parents=True, exist_ok=True)
      _remove_stale(home)
    _check_resume(home, config)
  ckpt = checkpoint.Checkpointer(out / "checkpoints", keep=configs[0].keep_checkpoints)
  # What is checkpointed: the state, or the list of states.
  saved = lambda states: states[0] if one else list(states)
  stop = {"signal": None, "pressed": False, "why": None}

  # Several processes must stop after the same step: SIGTERM goes to JAX's
  # preemption notifier, and every process asks it, each step, whether a
  # stop was agreed (`reached_preemption_sync_point`); Ctrl-C becomes a SIGTERM.
  together = jax.process_count() > 1

  def on_signal(number, frame):
    if number == signal.SIGINT and stop["pressed"]:  # the second Ctrl-C
      os.write(2, b"\nsecond Ctrl-C: exiting now; re-run to resume from the last checkpoint\n")
      os._exit(130)
    if number == signal.SIGINT:
      stop["pressed"] = True
      os.write(2, b"\nCtrl-C: finishing the step and saving a checkpoint "
                  b"(Ctrl-C again exits at once)\n")
    if together:
      stop["why"] = signal.Signals(number).name
      signal.raise_signal(signal.SIGTERM)  # to JAX's notifier, which tells the others
    else:
      stop["signal"] = signal.Signals(number).name

  def should_stop(step):
    if together and multihost_utils.reached_preemption_sync_point(step):
      stop["signal"] = stop["why"] or "SIGTERM"
    return stop["signal"] is not None

  previous = {}
  closers = []
  try:
    sinks = []
    for home, config in zip(homes, configs):
      more, close = _loggers(config, home) if writes() else ([], [])
      sinks.append(more)
      closers += close
    print(f"devices: {jax.device_count()} ({n_devices} local, {jax.devices()[0].platform}); "
          f"batch {c.batch_size} tokens, {c.batch_size // jax.device_count()} per device; "
          f"{c.total_steps} steps" + ("" if one else f"; {len(configs)} SAEs in one pass"),
          flush=True)
    for config in configs:
      print(json.dumps(config.to_dict()), flush=True)
    source = _open_data(configs[0], n_devices, verify=verify)  # Ctrl-C here: an export resumes
    # From here on a signal never interrupts a write (orbax's above all): it
    # is noted, and the loop stops after the step in flight.
    previous = {n: signal.signal(n, on_signal)
                for n in ((signal.SIGINT,) if together else (signal.SIGTERM, signal.SIGINT))}
    sample, _ = _finite(source.sample, "the initialisation sample")
    states = [train.create_train_state(config.train, sample) for config in configs]
    restored = ckpt.restore(saved(states))
    if restored is not None:
      states = [restored] if one else list(restored)
    start = int(states[0].step)
    for home, config in zip(homes, configs):
      _check_data(home, config, resuming=start > 0)
    position = ckpt.data_position(start) if start else None
    if start:
      print(f"resuming at step {start}", flush=True)
    with contextlib.ExitStack() as files:
      logs, metrics = [], []
      for home, more in zip(homes, sinks):
        if not writes():
          logs.append(lambda step, m: None)
          continue
        _resume_metrics(home / "metrics.jsonl", start)
        # Unbuffered: each line is one write, so a failed one leaves nothing
        # pending for close() to fail on again. On gs:// the file is uploaded
        # whole as each checkpoint is saved and with the checkpoint step's
        # line (logged a step late), so a resumed run finds every line.
        metrics.append(files.enter_context(storage.appender(home / "metrics.jsonl")))
        logs.append(_metrics_log(home / "metrics.jsonl", metrics[-1], more,
                                 configs[0].ckpt_every))

      def on_step(step, replicated):
        if step % configs[0].ckpt_every == 0:
          for lines in metrics:
            lines.flush()
          ckpt.save(saved([train.unreplicate(r) for r in replicated]), source.position(step))

      began = time.perf_counter()
      replicated = train.train_many(
          [train.replicate(state) for state in states], source.batches(start, position),
          log_every=configs[0].log_every, on_log=lambda i, step, m: logs[i](step, m),
          on_step=on_step, should_stop=should_stop,
          progress=progress, names=names)
      seconds = time.perf_counter() - began
    states = [train.unreplicate(r) for r in replicated]
    ckpt.save(saved(states), source.position(int(states[0].step)))
    ckpt.close()
  finally:
    for number, handler in previous.items():
      signal.signal(number, handler)
    with contextlib.suppress(Exception):  # closed already, or closing after an error
      ckpt.close()
    for close in closers:
      close()
  if stop["signal"] and int(states[0].step) < c.total_steps:
    print(f"stopped by {stop['signal']} at step {int(states[0].step)}; checkpoint saved: re-run "
          f"the same command to resume", flush=True)
    if stop["signal"] == "SIGINT":
      raise KeyboardInterrupt
    return None
  summaries = []
  for home, config, state in zip(homes, configs, states):
    if not one and finished(home):
      summaries.append(json.loads((home / "summary.json").read_text()))
      continue
    if not one:
      print(f"--- {home.name}: evaluation and export", flush=True)
    summaries.append(_finish(config, home, state, source,
                             (int(state.step) - start) * c.batch_size / max(seconds, 1e-9)))
  return summaries


def _metrics_log(path: pathlib.PurePath, metrics_file, sinks: list, ckpt_every: int):
  """on_log(step, metrics): a line of `path` (open as `metrics_file`, flushed
  with each checkpoint step's line), then each sink."""

  def on_log(step, m):
    try:
      line = (json.dumps(_strict(m)) + "\n").encode()
      while line:  # a raw write may take only part of it
        line = line[metrics_file.write(line):]
      if step % ckpt_every == 0:
        metrics_file.flush()
    except OSError as error:
      raise ValueError(f"could not write {path} at step {step} ({error.strerror}); free "
                       f"space and re-run to resume from the last checkpoint") from None
    for sink in sinks:
      sink(step, m)

  return on_log


def _finish(config: RunConfig, out: pathlib.PurePath, state: train.TrainState, source: _Data,
            tokens_per_second: float) -> dict:
  """Thresholds, evaluation and the SAELens export of a trained state; summary.json last."""
  c = config.train
  calibration, theta_F = _thresholds(config, state, source)
  summary = _evaluate(config, state, source, theta_F, calibration)
  summary.update(tokens=int(state.step) * c.batch_size, steps=int(state.step),
                 tokens_per_second=tokens_per_second)
  if not writes():
    return summary
  try:
    saelens.export_saelens(
        out / "saelens", state.params, theta_F, float(state.input_scale), c.sae,
        source.metadata,
        log10_density=thresholds.log10_density(calibration.counts_F, calibration.tokens))
  except (OSError, safetensors.SafetensorError) as error:
    reason = getattr(error, "strerror", None) or str(error)
    raise ValueError(f"could not write {out / 'saelens'} ({reason}); nothing was left "
                     f"half-written, and a saelens/ written before is as it was: free space "
                     f"and re-run to finish") from None
  write_json(out / "summary.json", summary)  # last: the run is finished once it exists
  print(json.dumps(_strict(summary)), flush=True)
  return summary


def finished(out) -> bool:
  """Whether the run in `out` has written every output (summary.json last)."""
  out = storage.path(out)
  return all((out / name).is_file() for name in (
      "summary.json", "saelens/cfg.json", "saelens/sae_weights.safetensors"))


def _thresholds(config: RunConfig, state: train.TrainState, source: _Data):
  """The calibration pass over training rows (shuffled, whole batches) and
  the inference thresholds θ_F it gives, or the global θ for every latent."""
  c = config.train
  rows, _ = _finite(source.calibration(config.calibration_tokens), "the calibration rows")
  rows = rows[np.random.default_rng(c.seed).permutation(len(rows))]
  calibration = thresholds.calibrate(
      state.params, rows * np.float32(state.input_scale), c.sae, batch_size=c.batch_size,
      per_latent=config.inference == "per-latent")
  if config.inference == "per-latent" and c.sae.selection != "topk":
    return calibration, calibration.threshold_F
  return calibration, np.full(c.sae.n_latents, np.float32(state.threshold))


def _evaluate(config: RunConfig, state: train.TrainState, source: _Data, theta_F,
              calibration: thresholds.Calibration) -> dict:
  """summary.json: the held-out tokens in inference mode (the saved SAE) and
  in batch mode (the training rule on shuffled batches of the same tokens)."""
  c = config.train
  raw = source.held_out()
  held_out, dropped = _finite(raw, "the held-out rows")
  z, xhat = evaluate.reconstruct(state.params, theta_F, state.input_scale, held_out, c.sae)
  concepts = _concepts(config, state, source, held_out, z, np.isfinite(raw).all(axis=1))
  summary = evaluate.reconstruction_metrics(held_out, xhat, z)
  sparsity = evaluate.sparsity_metrics(z)
  counts, never = evaluate.density_histogram(sparsity.pop("density_F"))
  summary.update({f"eval_{k}" if k == "dead_fraction" else k: v for k, v in sparsity.items()},
                 density_histogram_log10=counts.tolist(), density_never_fired=never)
  shuffled = held_out[np.random.default_rng(c.seed).permutation(len(held_out))]
  z, xhat = evaluate.reconstruct(state.params, theta_F, state.input_scale, shuffled, c.sae,
                                 mode="batch", batch_size=c.batch_size)
  batch = evaluate.reconstruction_metrics(shuffled, xhat, z)
  summary.update(batch_fvu=batch["fvu"], batch_l0=batch["l0"])
  if c.sae.selection == "sampled":
    size = min(c.batch_size, len(held_out) // 2)
    summary["pool_jaccard"] = evaluate.pool_jaccard(
        evaluate.pools(state.params, state.input_scale, held_out, c.sae, size))
  summary.update(
      dead_fraction=float(np.mean(state.steps_since_fired_F >= c.dead_steps)),
      skipped_steps=int(state.skipped_steps), threshold=float(state.threshold),
      input_scale=float(state.input_scale), calibration_tokens=calibration.tokens,
      eval_rows=len(held_out), eval_rows_dropped=dropped)
  if c.sae.selection != "topk":
    can_fire_F = theta_F < thresholds.NEVER
    summary.update(
        inference=config.inference, never_fire_fraction=float(np.mean(~can_fire_F)),
        threshold_median=float(np.median(theta_F[can_fire_F])) if can_fire_F.any() else None)
  if source.dictionary is not None:
    summary.update(evaluate.ground_truth_metrics(state.params["W_dec"], source.dictionary,
                                                 config.synthetic.feature_class()))
  summary.update(concepts)
  if source.downstream is not None:
    summary.update(source.downstream(state, theta_F))
  return summary


def _concepts(config: RunConfig, state: train.TrainState, source: _Data, x_NxD, z_NxF,
              kept_N) -> dict:
  """Sparse probing and absorption (`probing.py`) of the held-out rows x
  (the finite ones, `kept_N`, of those the data gave) from their inference
  codes z: of every true feature, and each parent of a hierarchy, on
  synthetic data; of first letters on a cache's tokens."""
  from sae_jax import probing  # noqa: PLC0415
  scale = np.float32(state.input_scale)  # codes / scale: the SAE's input units, as in SAELens
  W_dec = np.asarray(state.params["W_dec"])
  drop = lambda result, key: {k: v for k, v in result.items() if k != key}
  if source.true_codes is not None:
    truth = source.true_codes()[kept_N]
    codes = z_NxF / scale
    out = drop(probing.sparse_probing(codes, truth > 0, dense_NxD=x_NxD), "per_task")
    if config.synthetic.parents:
      out |= drop(probing.ground_truth_absorption(x_NxD, codes, W_dec, truth, source.dictionary,
                                                  config.synthetic.parent_of()), "per_parent")
    return out
  found = source.letters() if source.letters is not None else None
  if found is None:
    return {}
  tokens, letter = found[0][kept_N], found[1][kept_N]
  words = letter >= 0
  codes, x_NxD, tokens, letter = z_NxF[words] / scale, x_NxD[words], tokens[words], letter[words]
  out = drop(probing.sparse_probing(
      codes, letter[:, None] == np.arange(len(spelling.LETTERS))[None, :], dense_NxD=x_NxD),
      "per_task")
  return out | drop(probing.letter_absorption(x_NxD, codes, W_dec, letter, tokens), "per_letter")
