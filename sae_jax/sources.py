"""Opening a run's data: synthetic, a .npy or an activation cache, or the
language model itself (--stream); each gives a `DataSource`."""

import dataclasses
import typing

import jax
import numpy as np

from sae_jax import contexts as contexts_lib
from sae_jax import data
from sae_jax import export as export_lib
from sae_jax import hf
from sae_jax import hooks
from sae_jax import lm
from sae_jax import spelling
from sae_jax import storage
from sae_jax import stream as stream_lib
from sae_jax import synthetic as synthetic_lib
from sae_jax import train
from sae_jax.runconfig import RunConfig

INIT_SAMPLE = 4096
# Synthetic batches are indexed by step; these indices are never training steps.
SYNTHETIC_INIT_STEP, SYNTHETIC_EVAL_STEP, SYNTHETIC_CALIBRATION_STEP = (
    2**31 - 1, 2**31 - 2, 2**31 - 3)
# The SAE saw raw transformers hidden states, not TransformerLens' centred ones.
MODEL_KWARGS = {"model_from_pretrained_kwargs": {"center_writing_weights": False}}


def _hook_metadata(hook: str, target_hook: typing.Optional[str]) -> dict:
  """cfg.json's hook fields: hook_name, and a transcoder's target as
  hook_name_out (SAELens' transcoder config names it so, in a comment)."""
  return {"hook_name": hook, **({"hook_name_out": target_hook} if target_hook else {})}
ENCODER_DOWNSTREAM = ("the model is an encoder (bidirectional attention): next-token loss "
                      "does not apply to it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSource:
  """Everything a run reads, each part made only when asked for."""
  batches: typing.Callable[[int, typing.Optional[dict]], typing.Iterator]
  """(start step, saved position or None) -> the batches [devices, B / devices, D]."""
  sample: np.ndarray
  """Raw training rows for the initialisation."""
  held_out: typing.Callable[[], np.ndarray]
  """The held-out rows of the final evaluation."""
  calibration: typing.Callable[[int], np.ndarray]
  """n -> raw training rows for the inference thresholds."""
  metadata: dict
  """What SAELens' cfg.json says of the activations."""
  position: typing.Callable[[int], typing.Optional[dict]] = lambda step: None
  """step -> what the checkpoint saves of the source's position (--stream)."""
  dictionary: typing.Optional[np.ndarray] = None
  """Synthetic data: the true directions [M, D]."""
  true_codes: typing.Optional[typing.Callable[[], np.ndarray]] = None
  """Synthetic data: the held-out rows' true coefficients [N, M]."""
  letters: typing.Optional[typing.Callable[[], typing.Optional[tuple]]] = None
  """A cache or --stream: the held-out rows' (token ids [N], first letters
  [N]), or None when the model's tokenizer does not load."""
  downstream_ids: typing.Optional[typing.Callable[[], np.ndarray]] = None
  """--data pythia: token ids [contexts, L] the run did not train on, for the
  spliced loss: after the cache's rows, or reserved before --stream's."""
  language_model: typing.Optional[typing.Callable[[], tuple]] = None
  """--data pythia with the JAX model: (lm config, params); None with torch's."""
  downstream_skipped: typing.Optional[str] = None
  """--data pythia on an encoder: why the spliced loss does not apply."""


def open_source(config: RunConfig, n_devices: int, *, verify: bool = False,
                share: typing.Optional[tuple] = None) -> DataSource:
  """The run's data: made from the config, read from disk (exported first
  for --data pythia), or made by the model on the devices (--stream).
  Batches come as [n_devices, B / all data shards, D]: share (i, n) of each
  batch, by default (this process, the processes); processes that feed one
  latent group read the same share (`mesh.process_data`)."""
  share = (jax.process_index(), jax.process_count()) if share is None else share
  if config.data == "synthetic":
    return _synthetic(config, n_devices, share)
  if config.stream:
    return _stream(config)
  return _disk(config, n_devices, verify, share)


def _synthetic(config: RunConfig, n_devices: int, share: tuple) -> DataSource:
  c = config.train
  source = synthetic_lib.SyntheticSource(config.synthetic)
  p, n_proc = share

  def batches(start, position):
    for step in range(start, 2**31 - 2):
      rows = source.sample(step, c.batch_size).reshape(n_proc, -1, c.sae.d_model)[p]
      yield rows.reshape(n_devices, -1, c.sae.d_model)

  return DataSource(
      batches=batches, sample=source.sample(SYNTHETIC_INIT_STEP, INIT_SAMPLE),
      held_out=lambda: source.sample(SYNTHETIC_EVAL_STEP, config.eval_tokens),
      calibration=lambda n: source.sample(SYNTHETIC_CALIBRATION_STEP, n),
      metadata={"model_name": "synthetic", "hook_name": "synthetic", "context_size": None,
                "prepend_bos": False, "dataset_path": "synthetic"},
      dictionary=source.dictionary,
      true_codes=lambda: source.sample_with_codes(SYNTHETIC_EVAL_STEP, config.eval_tokens)[1])


def _disk(config: RunConfig, n_devices: int, verify: bool, share: tuple) -> DataSource:
  c = config.train
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
  target = manifest.get("target_hook") if manifest else None
  metadata = {"model_name": manifest["model"] if manifest else "unknown",
              **(_hook_metadata(manifest["hook"], target) if manifest
                 else {"hook_name": "unknown"}),
              "context_size": manifest["context_length"] if manifest else None,
              "prepend_bos": False,
              "dataset_path": manifest["dataset"] if manifest else str(path),
              **(MODEL_KWARGS if manifest else {})}
  train_rows = acts.n_rows - eval_rows

  def letters():
    tokenizer = spelling.load_tokenizer(manifest["model"], manifest.get("revision"))
    return None if tokenizer is None else _letters(tokenizer, acts.eval_tokens(),
                                                   acts.eval_positions())

  e = config.export
  pythia = config.data == "pythia"
  encoder = bool(manifest) and manifest.get("attention") == "bidirectional"
  return DataSource(
      batches=lambda start, position: acts.batches(c.batch_size, n_devices, seed=c.seed,
                                                   start_step=start, process_index=share[0],
                                                   process_count=share[1]),
      sample=acts.sample(min(INIT_SAMPLE, train_rows), seed=c.seed),
      held_out=acts.eval_batch,
      calibration=lambda n: acts.sample(min(n, train_rows), seed=c.seed + 1),
      metadata=metadata,
      letters=letters if manifest else None,
      downstream_ids=(lambda: _contexts_after_cache(config)) if pythia and not encoder else None,
      language_model=((lambda: lm.load(e.model, e.revision))
                      if pythia and e.backend == "jax" else None),
      downstream_skipped=ENCODER_DOWNSTREAM if pythia and encoder else None)


def _contexts_after_cache(config: RunConfig) -> np.ndarray:
  """Up to `downstream_contexts` contexts of the text after those the cache
  exported (its training and held-out rows) [n, L]."""
  e = config.export
  if not config.downstream_contexts:
    return np.zeros((0, e.context_length), np.int32)
  used = export_lib.read_manifest(config.cache_dir)["total_tokens"]
  tokenizer = hf.tokenizer(e.model, e.revision)
  excluded, rows, after = set(e.exclude_token_ids), 0, []
  for context in contexts_lib.contexts(e, tokenizer):
    if rows < used:  # a training (or evaluation-row) context: skip it
      rows += sum(int(t) not in excluded for t in context[1:])
    elif len(after) < config.downstream_contexts:
      after.append(context)
    else:
      break
  return np.stack(after) if after else np.zeros((0, e.context_length), np.int32)


def _stream(config: RunConfig) -> DataSource:
  c, e = config.train, config.export
  source = stream_lib.Stream(
      e, train.make_mesh(), batch_size=c.batch_size,
      round_contexts=config.stream_contexts, eval_tokens=config.eval_tokens,
      downstream_contexts=config.downstream_contexts, seed=c.seed)
  if isinstance(e.dataset, tuple):  # local text is tokenized ahead; a hub dataset is not
    source.check_steps(c.total_steps)
  return DataSource(
      batches=source.batches, sample=source.sample(INIT_SAMPLE), held_out=source.held_out,
      calibration=source.sample, position=source.position,
      metadata={"model_name": e.model, **_hook_metadata(e.hook, e.target_hook),
                "context_size": e.context_length, "prepend_bos": False,
                "dataset_path": list(e.dataset) if isinstance(e.dataset, tuple) else e.dataset,
                **MODEL_KWARGS},
      letters=lambda: _letters(source.tokenizer, source.held_out_tokens()),
      downstream_ids=lambda: source.downstream_contexts,
      language_model=lambda: (source.lm_config, source.lm_params))


def _letters(tokenizer, tokens_N: np.ndarray, positions_N=None) -> tuple:
  """(token ids, first letters) of the held-out rows (`DataSource.letters`)."""
  return tokens_N, spelling.token_letters(tokenizer, tokens_N, positions_N)


def finite(rows: np.ndarray, what: str) -> tuple:
  """The finite rows of `rows` and how many were dropped (said in a line)."""
  keep = np.isfinite(rows).all(axis=1)
  dropped = int(len(rows) - np.count_nonzero(keep))
  if dropped:
    print(f"{what}: dropped {dropped} of {len(rows)} rows that are not finite", flush=True)
    rows = rows[keep]
  if not len(rows):
    raise ValueError(f"{what}: all {dropped} rows are NaN or infinite; check the activations")
  return rows, dropped


def held_out_rows(eval_tokens: int, n_rows: int) -> int:
  """Rows at the end of disk data held out for evaluation: eval_tokens, at
  most a tenth of the data."""
  return min(eval_tokens, n_rows // 10)


def eval_rows(config: RunConfig) -> int:
  """The held-out rows a run evaluates on: --eval-tokens of synthetic data,
  --stream and --data pythia (whose cache is made for the run), at most a
  tenth of other disk data (`held_out_rows`)."""
  if config.data in ("pythia", "synthetic"):
    return config.eval_tokens
  return held_out_rows(config.eval_tokens, data.Activations(config.data).n_rows)


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


def transcoder_data(data_arg: str, target_hook: typing.Optional[str]) -> bool:
  """Whether a run's data are a transcoder's (input, target) pairs: with
  --data pythia, as --target-hook asks; a cache or .npy holds pairs or
  not, which --target-hook must agree with (or be left out)."""
  if data_arg in ("pythia", "synthetic"):
    return target_hook is not None
  acts = data.Activations(data_arg)
  saved = acts.manifest.get("target_hook") if acts.manifest else None
  if target_hook is None or (saved is not None and saved == target_hook):
    return acts.pairs
  if acts.manifest is None:
    raise ValueError(f"--target-hook {target_hook!r}: --data {data_arg} is a .npy, whose "
                     f"{'pairs say' if acts.pairs else 'rows say'} nothing of hooks; leave "
                     f"--target-hook out (an [N, 2, D] .npy of (input, target) pairs trains a "
                     f"transcoder by itself)")
  raise ValueError(f"--target-hook {target_hook!r}: the cache --data {data_arg} holds "
                   + (f"pairs whose target is {saved!r}" if saved else
                      f"the activations of {acts.manifest['hook']!r} alone")
                   + "; leave --target-hook out, or export the pairs it names")


def d_model_of(data_arg: str, *, cache_dir: str, model: str, revision=None,
               synthetic_d_model: int, stream: bool = False,
               hook: typing.Optional[str] = None, target_hook: typing.Optional[str] = None
               ) -> int:
  """The activation width D of a run's data, found without doing any work
  (and, for a model not yet exported, whether it has `hook` and `target_hook`)."""
  wanted = [h for h in (hook, target_hook) if h is not None]
  if data_arg == "synthetic":
    return synthetic_d_model
  if data_arg == "pythia":
    manifest = None if stream else export_lib.read_manifest(cache_dir)
    if manifest is not None and "d_model" in manifest:
      return manifest["d_model"]
    directory = hf.reachable_model(model, revision)
    if stream:
      try:
        lm_config = lm.load_config(str(directory))
      except ValueError as error:
        raise ValueError(f"--stream runs the model in JAX: {error}; export a cache with "
                         f"--backend torch instead (leave --stream out)") from None
      for h in wanted:
        hooks.check_decoder(h, model, lm_config.n_layers)
      return lm_config.hidden_size
    config = hf.model_config(directory)
    for h in wanted:
      hooks.check_architecture(h, model, hf.is_encoder(config), config.model_type)
    return config.hidden_size
  path = storage.path(data_arg)
  if path.suffix == ".npy" and path.is_file():
    shape = data.open_npy(path).shape
    if len(shape) != 2 and (len(shape) != 3 or shape[1] != 2):
      raise ValueError(f"{data_arg} must hold activations [N, D] (or a transcoder's pairs "
                       f"[N, 2, D]); got shape {shape}")
    return shape[-1]
  manifest = export_lib.read_manifest(path) if path.is_dir() else None
  if manifest is None or "d_model" not in manifest:
    raise ValueError(f"--data {data_arg!r} is not 'pythia', 'synthetic', an activation cache "
                     f"directory or a .npy file")
  return manifest["d_model"]
