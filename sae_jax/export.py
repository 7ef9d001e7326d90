"""Activation export: a language model's activations at a hook to a sharded disk cache.

The model runs in torch (transformers) or in JAX (`sae_jax.lm`); torch and
transformers are imported lazily, so the rest of the library never needs
them. Layout of a cache directory:

    manifest.json             what was exported and how; "complete" is written last
    acts-00000.npy            [shard_rows, D] activations (bfloat16 stored as uint16 bits);
                              [shard_rows, 2, D] (hook, target_hook) pairs for a transcoder
    tokens-00000.npy          [shard_rows] int32 token ids
    positions-00000.npy       [shard_rows] int32 positions in the context

Texts are tokenized and cut into contexts of `context_length`
(`sae_jax.contexts`: a causal model's documents joined by `<|endoftext|>`, an
encoder's framed by [CLS] ... [SEP]). Position 0 of every context is left out
(its activations are huge-norm outliers), and so is any token in
`exclude_token_ids` and an encoder's special tokens. Hook names follow
TransformerLens (`hooks.py`): a block's input, attention output, MLP output
or output, read by a forward hook on that module (`hook_points.py`), after
which the forward stops. The output of block N, `blocks.N.hook_resid_post`,
is transformers' `hidden_states[N + 1]` — except for the top block, whose
`hidden_states` entry has the final layer norm applied; the hook reads the
block's raw output, so it is right for every N.
"""

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import typing

import numpy as np
import tqdm

from sae_jax import contexts as contexts_lib
from sae_jax import hook_points
from sae_jax import hooks
from sae_jax import storage, validation

MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("jax", "torch")
# Fields that make two caches different: a resume must agree on all of them.
IDENTITY = ("model", "revision", "hook", "target_hook", "dataset", "split", "text_field",
            "context_length", "dtype", "shard_rows", "batch_contexts", "exclude_token_ids",
            "backend")
# What a manifest written before a field existed meant by it.
_LEGACY = {"backend": "torch", "target_hook": None}


def default_backend(model: typing.Optional[str] = None, revision=None) -> str:
  """"jax" where JAX sees an accelerator (a TPU VM's only one) and `model`
  is of a family JAX runs (`lm.MODEL_TYPES`), else "torch"."""
  import jax  # noqa: PLC0415
  if jax.default_backend() == "cpu":
    return "torch"
  if model is not None:
    from sae_jax import lm  # noqa: PLC0415
    try:
      lm.load_config(model, revision)
    except (OSError, ValueError):  # another architecture, or not reachable (said later)
      return "torch"
  return "jax"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What to export."""
  model: str = "EleutherAI/pythia-160m"
  """A hub model id or a local directory (config.json + weights + tokenizer)."""
  revision: typing.Optional[str] = None
  """Hub revision (branch, tag or commit); None is the default branch."""
  hook: str = "blocks.6.hook_resid_post"
  """Where the activations are read, by TransformerLens' name (`hooks.py`):
  blocks.N.hook_resid_pre, _attn_out, _mlp_out or _resid_post, or
  blocks.N.ln2.hook_normalized."""
  target_hook: typing.Optional[str] = None
  """A transcoder's target (`transcoder.py`): each row holds the activations
  at `hook` and at this hook, at the same token; None: `hook` alone."""
  dataset: typing.Union[str, tuple] = "monology/pile-uncopyrighted"
  """A hub dataset (streamed), or a tuple of local .txt / .jsonl files."""
  split: str = "train"
  """Dataset split (hub datasets)."""
  text_field: str = "text"
  """The field holding the text in .jsonl or hub records."""
  context_length: int = 1024
  """Tokens per context."""
  tokens: int = 100_000_000
  """Activation rows to export (after leaving out position 0 and excluded ids)."""
  dtype: str = "float32"
  """Stored dtype: "float32", "float16" or "bfloat16"."""
  shard_rows: int = 65536
  """Rows per shard file (the last shard may be shorter)."""
  batch_contexts: int = 8
  """Contexts per forward pass. Part of the cache's identity: a batch's numbers
  can depend on its composition, so a resume recomputes whole batches."""
  exclude_token_ids: tuple = ()
  """Token ids whose rows are left out, e.g. (0,) for Pythia's <|endoftext|>."""
  device: typing.Optional[str] = None
  """torch device; None picks "cuda" when available, else "cpu"."""
  backend: typing.Optional[str] = None
  """Runs the model: "jax" (sae_jax.lm, on JAX's default device) or "torch"
  (transformers); None means `default_backend()`. The two agree to float
  rounding, so a cache is resumed only with the backend that started it."""

  def __post_init__(self):
    hooks.hook_layer(self.hook)
    hooks.check_target(self.hook, self.target_hook)
    owner = "ExportConfig"
    for name in ("context_length", "tokens", "shard_rows", "batch_contexts"):
      validation.check_int_field(owner, name, getattr(self, name),
                                 minimum=2 if name == "context_length" else 1)
    validation.check_choice_field(owner, "dtype", self.dtype, DTYPES)
    if self.backend is None:
      object.__setattr__(self, "backend", default_backend(self.model, self.revision))
    validation.check_choice_field(owner, "backend", self.backend, BACKENDS)
    if isinstance(self.dataset, list):
      object.__setattr__(self, "dataset", tuple(self.dataset))
    if isinstance(self.exclude_token_ids, list):
      object.__setattr__(self, "exclude_token_ids", tuple(self.exclude_token_ids))
    for token_id in self.exclude_token_ids:
      validation.check_int_field(owner, "exclude_token_ids[]", token_id, minimum=0)
    if isinstance(self.dataset, tuple):
      for path in self.dataset:
        if not str(path).endswith((".txt", ".jsonl")):
          raise ValueError(
              f"ExportConfig.dataset: local files must end in .txt or .jsonl; got {path!r}")
        if not os.path.isfile(path):
          raise ValueError(f"ExportConfig.dataset: no such file {path!r}")

  def identity(self) -> dict:
    d = dataclasses.asdict(self)
    d["dataset"] = list(d["dataset"]) if isinstance(d["dataset"], tuple) else d["dataset"]
    d["exclude_token_ids"] = list(d["exclude_token_ids"])
    return {name: d[name] for name in IDENTITY}


# --- Files -------------------------------------------------------------------

def shard_names(index: int) -> dict:
  return {kind: f"{kind}-{index:05d}.npy" for kind in ("acts", "tokens", "positions")}


def sha256(path) -> str:
  digest = hashlib.sha256()
  with storage.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _save_npy(path: pathlib.PurePath, array: np.ndarray) -> None:
  storage.atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def write_manifest(out: pathlib.PurePath, manifest: dict) -> None:
  storage.atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def read_json_object(path: pathlib.PurePath, kind: str, remedy: str) -> dict:
  """The JSON object in `path`, or one line naming the file, what it should
  be (`kind`) and what to do (`remedy`)."""
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not a readable {kind} ({error}): {remedy}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} is not a {kind} (a JSON object): {remedy}")
  return value


def read_manifest(out) -> typing.Optional[dict]:
  path = storage.path(out) / MANIFEST
  if not path.exists():
    return None
  return read_json_object(path, "manifest", "the cache is damaged; export it again into an "
                                            "empty directory")


def _stored(acts: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes
    return acts.astype(ml_dtypes.bfloat16).view(np.uint16)
  return acts.astype(dtype)


# --- The model -----------------------------------------------------------------

class HookedModel:
  """A transformers model run up to the hook (and the target hook), and no
  further (`hook_points`)."""

  def __init__(self, config: ExportConfig):
    import torch
    from sae_jax import hf  # noqa: PLC0415
    self.device = hf.torch_device(config.device)
    self.tokenizer = hf.tokenizer(config.model, config.revision)
    self.model = hf.base_model(config.model, config.revision, torch.float32)
    self.model = self.model.to(self.device).eval()
    self.d_model = self.model.config.hidden_size
    self.encoder = hf.is_encoder(self.model.config)
    self._hooks = (config.hook,) + ((config.target_hook,) if config.target_hook else ())
    self._out = {}
    for hook in self._hooks:  # the forward stops once every hook has been seen
      hook_points.capture(self.model, hook, functools.partial(self._keep, hook), config.model,
                          self.encoder, stop=False)
    # RoBERTa's position ids start past its padding id: its tokenizer's
    # model_max_length (512 of 514 positions) is the one to trust there.
    limits = [getattr(self.model.config, "max_position_embeddings", None),
              self.tokenizer.model_max_length]
    limit = min((n for n in limits if isinstance(n, int) and n < 10**6), default=None)
    if self.encoder and limit is not None and config.context_length > limit:
      raise ValueError(f"--context-length {config.context_length}: {config.model!r} has "
                       f"positions for {limit} tokens")

  def _keep(self, hook, activation):
    self._out[hook] = activation
    if len(self._out) == len(self._hooks):
      raise hook_points.Stop

  def __call__(self, ids_BxL: np.ndarray) -> np.ndarray:
    """Float32 [b, L, D] activations at the hook ([b, L, 2, D] with the target's)."""
    import torch
    self._out = {}
    with torch.inference_mode():
      try:
        self.model(input_ids=torch.as_tensor(ids_BxL, device=self.device))
      except hook_points.Stop:
        pass
    return _joined([self._out[hook].float().cpu().numpy() for hook in self._hooks])


class JaxHookedModel:
  """The same as `HookedModel` with the model in JAX (`sae_jax.lm`): weights
  from safetensors, only the blocks up to the hook. Each forward batch is
  split over this process's devices when `batch_contexts` divides evenly
  among them (a TPU VM's chips), else it runs on JAX's default device."""

  def __init__(self, config: ExportConfig):
    import jax  # noqa: PLC0415
    from sae_jax import hf  # noqa: PLC0415
    from sae_jax import lm  # noqa: PLC0415
    self.tokenizer = hf.tokenizer(config.model, config.revision)
    try:
      self.config, params = lm.load(config.model, config.revision)
    except ValueError as error:
      raise ValueError(f"--backend jax: {error}; export it with --backend torch") from None
    self.hooks = (config.hook,) + ((config.target_hook,) if config.target_hook else ())
    for hook in self.hooks:
      hooks.check_decoder(hook, config.model, self.config.n_layers)
    self.d_model = self.config.hidden_size
    self.encoder = False
    devices = jax.local_devices()
    n = len(devices) if config.batch_contexts % len(devices) == 0 else 1
    self.mesh = jax.sharding.Mesh(np.array(devices[:n]), ("contexts",))
    spec = jax.sharding.PartitionSpec
    self.params = jax.device_put(params, jax.sharding.NamedSharding(self.mesh, spec()))
    self._split = jax.sharding.NamedSharding(self.mesh, spec("contexts"))

  def __call__(self, ids_BxL: np.ndarray) -> np.ndarray:
    """Float32 [b, L, D] activations at the hook ([b, L, 2, D] with the target's)."""
    import jax  # noqa: PLC0415
    from sae_jax import lm  # noqa: PLC0415
    b = len(ids_BxL)
    padded = np.pad(ids_BxL, ((0, -b % self.mesh.size), (0, 0)))  # a short last batch
    acts = lm.hooks_at(self.params, self.config, jax.device_put(padded, self._split),
                       self.hooks)
    return _joined([np.asarray(a)[:b] for a in acts])


def _joined(acts: list) -> np.ndarray:
  """One hook's [b, L, D], or a transcoder's pairs [b, L, 2, D]."""
  return acts[0] if len(acts) == 1 else np.stack(acts, axis=2)


# --- Export ----------------------------------------------------------------------

def _check_or_start(out: pathlib.PurePath, config: ExportConfig) -> dict:
  """The manifest to continue from; refuses a directory holding something else."""
  manifest = read_manifest(out)
  if manifest is None:
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
      raise ValueError(f"{out} is not empty and holds no {MANIFEST}: refusing to write there")
    return {**config.identity(), "complete": False, "shards": [], "total_tokens": 0}
  saved = lambda name: manifest.get(name, _LEGACY.get(name))
  differences = [f"{name}: cache has {saved(name)!r}, asked for {value!r}"
                 for name, value in config.identity().items() if saved(name) != value]
  if differences:
    raise ValueError(f"{out} holds a different export; refusing to overwrite it:\n  "
                     + "\n  ".join(differences))
  return manifest


def export_activations(config: ExportConfig, out, *, progress: bool = True,
                       on_shard: typing.Optional[typing.Callable[[dict], None]] = None) -> dict:
  """Exports `config.tokens` rows into directory `out`, resuming if it holds
  part of the same export.

  Only full shards are kept when resuming (a short last shard is recomputed),
  and whole forward batches are recomputed, so a resumed export is byte for
  byte the uninterrupted one.

  Args:
    config: what to export.
    out: the cache directory (created if missing).
    progress: show a tqdm bar with tokens/s.
    on_shard: called with the manifest after each shard is written.

  Returns:
    The final manifest.
  """
  storage.check_bucket(out, "--out")
  if config.backend == "torch":
    from sae_jax import hf  # noqa: PLC0415
    hf.torch_device(config.device)  # before anything is written
  out = storage.path(out)
  manifest = _check_or_start(out, config)
  shards = [s for s in manifest["shards"] if s["rows"] == config.shard_rows]
  done = sum(s["rows"] for s in shards)
  if manifest["complete"] and done + sum(
      s["rows"] for s in manifest["shards"][len(shards):]) >= config.tokens:
    return manifest
  model = (JaxHookedModel if config.backend == "jax" else HookedModel)(config)
  frame = contexts_lib.framing(model.tokenizer, model.encoder)
  contexts_lib.check_length(config.context_length, frame)
  excluded = contexts_lib.excluded_ids(model.tokenizer, model.encoder, config.exclude_token_ids)
  attention = "bidirectional" if model.encoder else "causal"
  if shards and manifest.get("attention", "causal") != attention:
    raise ValueError(f"{out} holds a {manifest.get('attention', 'causal')} export of "
                     f"{config.model!r} from before its contexts were framed as an "
                     f"{'encoder' if model.encoder else 'decoder'}'s; export to a new directory")
  out.mkdir(parents=True, exist_ok=True)
  for stale in [] if storage.is_remote(out) else out.glob(".*.tmp-*"):
    stale.unlink()  # left by an interrupted write (nothing is renamed on gs://)
  start_batch, skip_rows = (shards[-1]["next_batch"], shards[-1]["skip_rows"]) if shards else (0, 0)
  manifest.update(shards=shards, complete=False, total_tokens=done, d_model=model.d_model,
                  hidden_states_index=hooks.hidden_states_index(config.hook), prepend_bos=False,
                  excluded_positions=[0], bfloat16_stored_as="uint16",
                  attention=attention,
                  excluded_token_ids=excluded.tolist())
  pending = {"acts": [], "tokens": [], "positions": []}
  n_pending = 0

  def flush(next_batch, rows_into_batch):
    nonlocal n_pending, done
    index = len(manifest["shards"])
    names = shard_names(index)
    joined = {kind: np.concatenate(parts) for kind, parts in pending.items()}
    arrays = {kind: v[:config.shard_rows] for kind, v in joined.items()}
    for kind, name in names.items():
      _save_npy(out / name, _stored(arrays[kind], config.dtype) if kind == "acts" else arrays[kind])
    rows = len(arrays["tokens"])
    manifest["shards"].append({
        "rows": rows, "next_batch": next_batch, "skip_rows": rows_into_batch,
        "files": names, "sha256": {kind: sha256(out / name) for kind, name in names.items()}})
    done += rows
    manifest["total_tokens"] = done
    write_manifest(out, manifest)
    pending.update({kind: [v[config.shard_rows:]] for kind, v in joined.items()})
    n_pending -= rows
    if on_shard is not None:
      on_shard(manifest)

  bar = tqdm.tqdm(total=config.tokens, initial=done, unit="tok", unit_scale=True,
                  disable=not progress, dynamic_ncols=True)
  with bar:
    for batch_index, ids_BxL in contexts_lib.batches(config, model.tokenizer, start_batch,
                                                     frame):
      if done + n_pending >= config.tokens:
        break
      acts_BxLxD = model(ids_BxL)
      positions_BxL = np.broadcast_to(np.arange(ids_BxL.shape[1], dtype=np.int32), ids_BxL.shape)
      keep_BxL = (positions_BxL > 0) & ~np.isin(ids_BxL, excluded)
      rows = {"acts": acts_BxLxD[keep_BxL], "tokens": ids_BxL[keep_BxL],
              "positions": positions_BxL[keep_BxL]}
      if batch_index == start_batch and skip_rows:
        rows = {kind: v[skip_rows:] for kind, v in rows.items()}
      batch_start = n_pending  # rows of this batch begin here in `pending`
      base = skip_rows if batch_index == start_batch else 0
      for kind, v in rows.items():
        pending[kind].append(v)
      n_pending += len(rows["tokens"])
      bar.update(min(done + n_pending, config.tokens) - bar.n)
      while n_pending >= config.shard_rows and done + config.shard_rows <= config.tokens:
        # The next shard starts inside this batch, this many rows in.
        flush(batch_index, base + config.shard_rows - batch_start)
        batch_start -= config.shard_rows
    if n_pending and done < config.tokens:
      # A short last shard (budget or data exhausted): resumes recompute it.
      for kind in pending:
        pending[kind] = [np.concatenate(pending[kind])[:config.tokens - done]]
      n_pending = len(pending["tokens"][0])
      flush(-1, -1)
  if done == 0:  # not "0 rows in 0 shards", exit 0
    texts = config.dataset if isinstance(config.dataset, str) else " ".join(config.dataset)
    raise ValueError(f"the texts of --dataset {texts} gave no activation rows (no context of "
                     f"{config.context_length} tokens): give longer texts or a shorter "
                     f"--context-length")
  manifest["complete"] = True
  write_manifest(out, manifest)
  return manifest
